"""Dead letters: events that cannot be applied go to the table rag.dead_letters (in the batch's
transaction) and to the Kafka topic freshet.sync.dlq (before offsets are committed), with the
reason and the original record, so they can be inspected and replayed."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from freshet.retry import transient_db_error
from freshet.sync.changes import Rejected

logger = logging.getLogger(__name__)

DLQ_TOPIC = "freshet.sync.dlq"
# The most of a record's key and value kept in a dead letter (table and topic); a longer one is
# cut, with its size and SHA-256 recorded, and `freshet dlq replay` reads the whole record back
# from its topic. Both stay far below Kafka's default 1 MiB message limit even as base64.
MAX_STORED_VALUE = 256 * 1024
MAX_STORED_KEY = 8 * 1024
MAX_REASON = 4000
# The dead-letter topic's copy is smaller: JSON escapes a control character into 6 bytes, so
# 96 KiB of record stays under 600 KB whatever it holds.
MAX_MESSAGE_VALUE = 96 * 1024


@dataclass(frozen=True)
class Stored:
    """A record's bytes as they can be stored in a text column and a JSON message."""

    text: str | None
    size: int | None
    sha256: str | None
    truncated: bool


def storable(raw: bytes | None, limit: int) -> Stored:
    """UTF-8 text when the bytes are UTF-8 without NUL, else base64 with a marker; at most
    ``limit`` bytes of the original are kept."""
    if raw is None:
        return Stored(None, None, None, False)
    raw = bytes(raw)
    cut = raw[:limit]
    try:
        text = cut.decode("utf-8")
        if "\x00" in text or text.startswith("base64:"):
            raise ValueError("not storable as text")
    except ValueError:  # UnicodeDecodeError is a ValueError
        text = "base64:" + base64.b64encode(cut).decode("ascii")
    return Stored(text, len(raw), hashlib.sha256(raw).hexdigest(), len(raw) > limit)


def clean_text(text: str | None, limit: int) -> str | None:
    """Text that PostgreSQL and JSON encoders accept: no NUL, no lone surrogate, bounded."""
    if text is None:
        return None
    text = text.replace("\x00", "\\0").encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[:limit] + f"... ({len(text):,} characters)"


def _bytes(text: str | None) -> bytes | None:
    if text is None:
        return None
    if text.startswith("base64:"):
        return base64.b64decode(text[len("base64:") :])
    return text.encode("utf-8")


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
    """Key and value of the dead-letter topic record for a rejected event (always well under
    the default 1 MiB message limit: a long key is replaced by its digest)."""
    row = _row(r)
    cut = storable(r.value, MAX_MESSAGE_VALUE)
    value = {
        "topic": row[0],
        "partition": row[1],
        "offset": row[2],
        "table": row[11],
        "doc_key": row[12],
        "stage": row[5],
        "error_type": row[6],
        "reason": row[7],
        "record_key": row[3],
        "record_value": cut.text,
        "record_size": row[8],
        "record_sha256": row[9],
        "truncated": row[10] or cut.truncated,
    }
    key = r.key
    if key is not None and len(key) > MAX_STORED_KEY:
        key = hashlib.sha256(key).hexdigest().encode()
    return key, json.dumps(value).encode()


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
