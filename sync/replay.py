"""`freshet dlq replay`: run dead-lettered records through the current code again."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import psycopg

from cdc.events import RecordPosition
from sync import deadletters
from sync.changes import Router
from sync.writer import Writer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass(frozen=True)
class ReplayOutcome:
    id: int
    resolved: bool
    reason: str | None


def replay(
    conn: psycopg.Connection, router: Router, writer: Writer, ids: Sequence[int] | None = None
) -> list[ReplayOutcome]:
    """Replay the given dead letters (all unresolved ones when `ids` is None).

    A letter is resolved when its record now applies (or is older than the stored version, which
    means a newer change already replaced it); otherwise its reason is updated."""
    letters = (
        deadletters.get_dead_letters(conn, ids)
        if ids
        else deadletters.list_dead_letters(conn, limit=10_000)
    )
    outcomes = []
    for letter in letters:
        record = _Record(letter.topic, letter.partition, letter.offset, letter.key, letter.value)
        routed = router.route([record])
        reason = routed.rejected[0].reason if routed.rejected else None
        if reason is None and routed.changes:
            with conn.transaction():
                stats = writer.apply(conn, routed.changes)
                if stats.dead:
                    reason = stats.dead[0].reason
                    raise psycopg.Rollback()
        with conn.transaction():
            deadletters.mark_replayed(conn, letter.id, resolved=reason is None, reason=reason)
        outcomes.append(ReplayOutcome(letter.id, reason is None, reason))
        logger.info(
            "replayed dead letter %d (%s): %s",
            letter.id,
            RecordPosition(letter.topic, letter.partition, letter.offset),
            "resolved" if reason is None else reason,
        )
    return outcomes
