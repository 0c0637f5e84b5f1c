"""Deadlines and progress, around every step's handler (the same for every kind).

An async request carries its ``deadline`` (POST /ask sets it: FRESHET_ASK_DEADLINE_S, or the
request's ``deadline_s``), and every step passes it on. A step that gets a message past the
deadline does not run its handler: it ends the request as ``timeout`` in the answers table,
saying which step it was waiting for and which steps were done, and produces nothing, so no
model time goes to an answer nobody waits for. A step that handled a message records it in
``rag.answer_steps`` (a sub-question as its part), which GET /api/v1/answers/<id> and the ask
page show as the steps complete.

A request no step sees again (its step has no worker, a message was dead-lettered) is ended
by the `Sweeper`, which every `validate` worker runs between polls.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg_pool import PoolTimeout

from freshet.answering.answers import AnswerStore, StoredAnswer
from freshet.answering.messages import deadline_of, loads, request_id, user_of
from freshet.consumer import Output

logger = logging.getLogger(__name__)

Handler = Callable[[Any], list[Output]]

# How often a validate worker looks for pending requests past their deadline, and how long
# past it a request may be before the sweeper (not the step holding it) ends it.
SWEEP_EVERY_S = 2.0
SWEEP_GRACE_S = 2.0


class Tracked:
    """``handler`` of step ``step``, with the request's deadline and progress kept in
    ``store``."""

    def __init__(
        self,
        step: str,
        handler: Handler,
        store: AnswerStore,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.step = step
        self.handler = handler
        self.store = store
        self.clock = clock
        self.timed_out = 0

    def __call__(self, record: Any) -> list[Output]:
        body = loads(record.value)
        parent = body.get("parent")
        request = parent if isinstance(parent, str) and parent else request_id(body)
        deadline = deadline_of(body)
        if deadline is not None and self.clock() >= deadline:
            question = str(body.get("parent_question") or body.get("question") or "")
            late = StoredAnswer(request, question, user_of(body), deadline=deadline)
            if self.store.time_out(late, self.step):
                self.timed_out += 1
            return []
        outputs = self.handler(record)
        part, parts = (_int(body.get("part")), _int(body.get("parts"))) if parent else (0, 0)
        self.store.step_done(request, self.step, part, parts)
        return outputs


def _int(value: Any) -> int:
    try:
        return max(0, int(value))
    except (TypeError, ValueError):
        return 0


class Sweeper:
    """Between polls, at most every ``every_s`` seconds: end as ``timeout`` the pending
    requests more than ``grace_s`` past their deadline. A database away skips a round."""

    def __init__(
        self, store: AnswerStore, every_s: float = SWEEP_EVERY_S, grace_s: float = SWEEP_GRACE_S
    ) -> None:
        self.store = store
        self.every_s = every_s
        self.grace_s = grace_s
        self._last = 0.0
        self.ended = 0

    def __call__(self, stop: threading.Event) -> None:
        now = time.monotonic()
        if stop.is_set() or now - self._last < self.every_s:
            return
        self._last = now
        try:
            ended = self.store.sweep(self.grace_s)
        except (psycopg.Error, PoolTimeout) as exc:
            logger.warning("deadline sweep skipped: the database did not answer (%s)", exc)
            return
        if ended:
            self.ended += len(ended)
            logger.info("ended %d request(s) past their deadline as timeout", len(ended))
