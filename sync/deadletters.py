"""Dead letters of the sync worker: events that cannot be applied go to the table
rag.dead_letters (in the batch's transaction) and to the Kafka topic freshet.sync.dlq (before
offsets are committed), with the reason and the original record, so they can be inspected and
replayed. The topic's messages are the consumer runtime's dead-letter envelope
(freshet/consumer.py), the same format as every stage's."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from freshet.consumer import MAX_REASON, MAX_STORED_KEY, clean_text, envelope, storable
from freshet.consumer import stored_bytes as _bytes
from freshet.retry import transient_db_error
from freshet.sync.changes import Rejected

logger = logging.getLogger(__name__)

DLQ_TOPIC = "freshet.sync.dlq"
# The most of a record's value kept in rag.dead_letters (its key: MAX_STORED_KEY, 8 KiB); a
# longer one is cut, with its size and SHA-256 recorded, and `freshet dlq replay` reads the whole
# record back from its topic. Far below Kafka's default 1 MiB message limit even as base64. The
# dead-letter topic's copy is smaller (freshet/consumer.py, MAX_MESSAGE_VALUE: 96 KiB).
MAX_STORED_VALUE = 256 * 1024


def _row(r: Rejected) -> tuple[Any, ...]:
    key = storable(r.key, MAX_STORED_KEY)
    value = storable(r.value, MAX_STORED_VALUE)
    return (
        clean_text(r.position.topic or "", 500),
        r.position.partition if r.position.partition is not None else -1,
        r.position.offset if r.position.offset is not None else -1,
        key.text,
        value.text,
        clean_text(r.stage, 100),
        clean_text(r.error_type, 200),
        clean_text(r.reason, MAX_REASON),
        value.size,
        value.sha256,
        key.truncated or value.truncated,
        clean_text(r.table, 500),
        clean_text(r.doc_key, 2000),
    )


_INSERT = (
    "INSERT INTO rag.dead_letters (topic, partition, kafka_offset, record_key, record_value,"
    " stage, error_type, reason, record_size, record_sha256, truncated, source_table, doc_key)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
    " ON CONFLICT (topic, partition, kafka_offset) DO UPDATE SET"
    " stage = EXCLUDED.stage, error_type = EXCLUDED.error_type, reason = EXCLUDED.reason,"
    " resolved_at = NULL"
)


def store(conn: psycopg.Connection, rejected: Sequence[Rejected]) -> None:
    """Insert dead letters; a redelivered record keeps its first row (unique position).

    Storing cannot fail on a record's bytes or size: every field is made storable first, and
    should the database still refuse one letter, it is stored without the record's bytes."""
    if not rejected:
        return
    rows = [_row(r) for r in rejected]
    try:
        with conn.transaction():
            conn.cursor().executemany(_INSERT, rows)
    except psycopg.Error as exc:
        if transient_db_error(exc):
            raise
        logger.error("dead letters refused as a batch (%s); storing them one by one", exc)
        for row in rows:
            try:
                with conn.transaction():
                    conn.execute(_INSERT, row)
            except psycopg.Error as inner:
                if transient_db_error(inner):
                    raise
                reason = f"{row[7]} (record not storable: {inner})"[:MAX_REASON]
                bare = (*row[:3], None, None, *row[5:7], reason, *row[8:])
                with conn.transaction():
                    conn.execute(_INSERT, bare)
    for r in rejected:
        logger.warning(
            "dead letter topic=%s partition=%s offset=%s table=%s key=%s stage=%s: %s",
            r.position.topic,
            r.position.partition,
            r.position.offset,
            r.table,
            clean_text(r.doc_key, 200),
            r.stage,
            clean_text(r.reason, 500),
        )


def dlq_message(r: Rejected) -> tuple[bytes | None, bytes]:
    """Key and value of the dead-letter topic record for a rejected event: the runtime's
    envelope (always well under the default 1 MiB message limit: a long key is replaced by its
    digest)."""
    return envelope(
        consumer="sync",
        stage=r.stage,
        topic=r.position.topic,
        partition=r.position.partition,
        offset=r.position.offset,
        key=r.key,
        value=r.value,
        error_type=r.error_type,
        reason=r.reason,
        table=r.table,
        doc_key=r.doc_key,
    )


@dataclass(frozen=True)
class DeadLetter:
    id: int
    topic: str
    partition: int
    offset: int
    record_key: str | None
    record_value: str | None
    stage: str
    error_type: str
    reason: str
    created_at: Any
    replay_count: int
    resolved_at: Any
    record_size: int | None = None
    record_sha256: str | None = None
    truncated: bool = False
    source_table: str | None = None
    doc_key: str | None = None

    @property
    def key(self) -> bytes | None:
        return _bytes(self.record_key)

    @property
    def value(self) -> bytes | None:
        return _bytes(self.record_value)

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "stage": self.stage,
            "error_type": self.error_type,
            "reason": self.reason,
            "created_at": str(self.created_at),
            "replay_count": self.replay_count,
            "resolved_at": str(self.resolved_at) if self.resolved_at else None,
            "record_key": self.record_key,
            "record_value": self.record_value,
            "record_size": self.record_size,
            "record_sha256": self.record_sha256,
            "truncated": self.truncated,
            "table": self.source_table,
            "doc_key": self.doc_key,
        }


_COLUMNS = (
    "id, topic, partition, kafka_offset, record_key, record_value, stage, error_type, reason,"
    " created_at, replay_count, resolved_at, record_size, record_sha256, truncated,"
    " source_table, doc_key"
)


def list_dead_letters(
    conn: psycopg.Connection, *, include_resolved: bool = False, limit: int = 100
) -> list[DeadLetter]:
    where = "" if include_resolved else " WHERE resolved_at IS NULL"
    rows = conn.execute(
        "SELECT " + _COLUMNS + " FROM rag.dead_letters" + where + " ORDER BY id LIMIT %s",
        (limit,),
    ).fetchall()
    return [DeadLetter(*row) for row in rows]


def get_dead_letters(conn: psycopg.Connection, ids: Sequence[int]) -> list[DeadLetter]:
    rows = conn.execute(
        "SELECT " + _COLUMNS + " FROM rag.dead_letters WHERE id = ANY(%s) ORDER BY id",
        (list(ids),),
    ).fetchall()
    return [DeadLetter(*row) for row in rows]


def mark_replayed(
    conn: psycopg.Connection, letter_id: int, resolved: bool, reason: str | None
) -> None:
    conn.execute(
        "UPDATE rag.dead_letters SET replay_count = replay_count + 1, replayed_at = now(),"
        " resolved_at = CASE WHEN %s THEN now() ELSE resolved_at END,"
        " reason = coalesce(%s, reason) WHERE id = %s",
        (resolved, reason, letter_id),
    )
