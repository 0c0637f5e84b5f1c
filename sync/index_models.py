"""The sync worker's side of a model change: the model its vectors come from, and the shadow
model it writes too while `freshet reembed` builds one (freshet/index_model.py, sync/reembed.py).

Every batch's transaction starts with ``check``: under the model lock (shared), the state is
read; a switch to another model raises ``ModelSwitched`` (nothing of the batch is written; the
worker is rebuilt with the index's model and the batch is applied again), and a shadow that
started or ended is loaded or dropped here, so every chunk written from then on carries both
vectors and the shadow never falls behind.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg

from freshet.embedder import Embedder
from freshet.index_model import IndexModel, ModelSwitched, read, read_locked
from freshet.settings import Settings

logger = logging.getLogger(__name__)

# How often an idle worker reads the state (a switch or a new shadow while no change arrives).
IDLE_CHECK_SECONDS = 2.0


@dataclass
class IndexModels:
    settings: Settings
    active: str  # the model of this worker's embedder
    load: Callable[[str], Embedder]
    shadow_name: str | None = None
    shadow: Embedder | None = None
    # False: follow switches only, never load the shadow model (the large lane's writer).
    shadow_writes: bool = True
    _checked_at: float = 0.0

    def check(self, conn: psycopg.Connection[Any]) -> IndexModel:
        """In a writer's transaction, first: the state under the shared model lock."""
        state = read_locked(conn)
        self._follow(state)
        return state

    def check_idle(self, conn: psycopg.Connection[Any]) -> None:
        """Between polls, every IDLE_CHECK_SECONDS: the same without the lock."""
        now = time.monotonic()
        if now - self._checked_at < IDLE_CHECK_SECONDS:
            return
        self._checked_at = now
        self._follow(read(conn))

    def _follow(self, state: IndexModel) -> None:
        active = state.active(self.settings)
        if active != self.active:
            raise ModelSwitched(f"the index switched from {self.active} to {active}")
        wanted = state.building if self.shadow_writes else None
        if wanted == self.shadow_name:
            return
        if wanted is None:
            logger.info("the shadow of %s ended; writing one vector again", self.shadow_name)
            self.shadow_name, self.shadow = None, None
            return
        started = time.monotonic()
        self.shadow = self.load(wanted)
        self.shadow_name = wanted
        logger.warning(
            "a re-embed to %s is in progress: writing both models' vectors (loaded in %.1f s)",
            wanted,
            time.monotonic() - started,
        )
