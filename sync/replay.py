"""`freshet dlq replay`: run dead-lettered records through the current code again."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import psycopg

from freshet.cdc.events import RecordPosition
from freshet.sync import deadletters
from freshet.sync.changes import Router
from freshet.sync.writer import Writer

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


Fetch = Callable[[str, int, int], tuple[bytes | None, bytes | None] | None]


def replay(
    conn: psycopg.Connection,
    router: Router,
    writer: Writer,
    ids: Sequence[int] | None = None,
    fetch: Fetch | None = None,
) -> list[ReplayOutcome]:
    """Replay the given dead letters (all unresolved ones when `ids` is None).

    A letter is resolved when its record now applies (or is older than the stored version, which
    means a newer change already replaced it); otherwise its reason is updated. A letter whose
    stored copy was cut (a record too large to keep whole) is replayed from its topic, read
    back by ``fetch`` at its position."""
    letters = (
        deadletters.get_dead_letters(conn, ids)
        if ids
        else deadletters.list_dead_letters(conn, limit=10_000)
    )
    outcomes = []
    for letter in letters:
        key, value = letter.key, letter.value
        if letter.truncated:
            original = fetch(letter.topic, letter.partition, letter.offset) if fetch else None
            if original is None:
                gone = (
                    "the stored copy of this record is cut and the record is no longer in its "
                    "topic; re-snapshot the row (`freshet verify --repair`)"
                )
                with conn.transaction():
                    deadletters.mark_replayed(conn, letter.id, resolved=False, reason=gone)
                outcomes.append(ReplayOutcome(letter.id, False, gone))
                continue
            key, value = original
        record = _Record(letter.topic, letter.partition, letter.offset, key, value)
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


def kafka_fetch(bootstrap_servers: str) -> Fetch:
    """Read one record back from its topic by position (None when retention removed it)."""

    def fetch(topic: str, partition: int, offset: int) -> tuple[bytes | None, bytes | None] | None:
        from kafka import KafkaConsumer, TopicPartition

        from freshet.cdc.kafka import require_broker

        require_broker(bootstrap_servers)  # a clear error, not kafka-python's NoBrokersAvailable
        consumer = KafkaConsumer(
            bootstrap_servers=bootstrap_servers,
            group_id=None,
            enable_auto_commit=False,
            max_partition_fetch_bytes=64 << 20,
            fetch_max_bytes=64 << 20,
        )
        try:
            tp = TopicPartition(topic, partition)
            consumer.assign([tp])
            consumer.seek(tp, offset)
            deadline = 10
            while deadline > 0:
                for records in consumer.poll(timeout_ms=1000).values():
                    for record in records:
                        if record.offset == offset:
                            return record.key, record.value
                        if record.offset > offset:
                            return None
                deadline -= 1
            return None
        finally:
            consumer.close()

    return fetch
