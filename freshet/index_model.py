"""Which model the index's vectors come from: rag.embedding_state, read by every process that
embeds (the sync worker for chunks, the web app and workflow for queries, `freshet reembed`).

A model change (`freshet reembed`, sync/reembed.py) builds a shadow embedding in
rag.chunks.embedding_next and then switches in one transaction: the columns are renamed and the
generation grows by one. A process whose model is no longer the index's must not write or
search with it: the sync worker checks the state in each batch's transaction under a shared
advisory lock (the switch takes it exclusively), and a search statement carries a one-time
filter on rag.embedding_generation() (freshet.answering.retrieval).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

from freshet.errors import FreshetError
from freshet.settings import Settings

logger = logging.getLogger(__name__)

# The advisory lock a writer's transaction shares and a switch (or a shadow's start or end)
# holds exclusively.
LOCK_KEY = 0x66726573_6D6F646C  # "fresmodl"

SHADOW_COLUMN = "embedding_next"
PREVIOUS_COLUMN = "embedding_previous"
SHADOW_INDEX = "ix_chunks_embedding_next_hnsw"
ACTIVE_INDEX = "ix_chunks_embedding_hnsw"
PREVIOUS_INDEX = "ix_chunks_embedding_previous_hnsw"


class ModelSwitched(Exception):  # noqa: N818 - a signal to rebuild, not a failure
    """The index switched to another embedding model under a process: what it embeds no longer
    matches the index. The sync worker is rebuilt with the new model (nothing is committed)."""


@dataclass(frozen=True)
class IndexModel:
    """One read of rag.embedding_state."""

    generation: int = 0
    model: str | None = None
    dim: int | None = None
    switched_at: datetime | None = None
    previous_model: str | None = None
    shadow_model: str | None = None
    shadow_dim: int | None = None
    shadow_state: str | None = None
    shadow_started: datetime | None = None
    gate: dict[str, Any] | None = None
    # False: the database predates migration 0013 (no state, no rag.embedding_generation()).
    present: bool = True

    def active(self, settings: Settings) -> str:
        """The model of rag.chunks.embedding: the switched-to one, else EMBEDDING_MODEL."""
        return self.model or settings.embedding_model

    @property
    def building(self) -> str | None:
        """The model a shadow is being built for (the sync worker writes it too), if any."""
        return self.shadow_model if self.shadow_state == "building" else None


def read(conn: psycopg.Connection[Any]) -> IndexModel:
    """The state as of this statement's snapshot (a default one before migration 0013)."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute("SELECT to_regclass('rag.embedding_state') IS NOT NULL AS present")
        present = cur.fetchone()
        if not present or not present["present"]:
            return IndexModel(present=False)
        cur.execute(
            "SELECT generation, model, dim, switched_at, previous_model, shadow_model,"
            " shadow_dim, shadow_state, shadow_started, gate FROM rag.embedding_state"
        )
        row = cur.fetchone()
    return IndexModel(**row) if row else IndexModel()


def read_locked(conn: psycopg.Connection[Any], *, exclusive: bool = False) -> IndexModel:
    """Inside a transaction: take the model lock (shared: a writer; exclusive: a switch), then
    read the state in a snapshot taken after the lock, so a switch that committed while this
    waited is seen."""
    conn.execute(
        "SELECT pg_advisory_xact_lock(%s)"
        if exclusive
        else "SELECT pg_advisory_xact_lock_shared(%s)",
        (LOCK_KEY,),
    )
    return read(conn)


def current(settings: Settings) -> IndexModel | None:
    """The state through a short connection of its own; None if the database cannot be read
    now (the caller goes on with EMBEDDING_MODEL and checks again later)."""
    from freshet.db import connect, database_url

    try:
        with connect(database_url(settings), autocommit=True) as conn:
            return read(conn)
    except (psycopg.Error, FreshetError, OSError) as exc:
        logger.warning("cannot read the index's embedding model (%s); using EMBEDDING_MODEL", exc)
        return None
