"""Dead letters: events that cannot be applied go to the table rag.dead_letters (in the batch's
transaction) and to the Kafka topic freshet.sync.dlq (before offsets are committed), with the
reason and the original record, so they can be inspected and replayed."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from sync.changes import Rejected

logger = logging.getLogger(__name__)

DLQ_TOPIC = "freshet.sync.dlq"


def _text(raw: bytes | None) -> str | None:
    """Record bytes as text when they are UTF-8, else as base64 with a marker."""
    if raw is None:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "base64:" + base64.b64encode(raw).decode("ascii")


def _bytes(text: str | None) -> bytes | None:
    if text is None:
        return None
    if text.startswith("base64:"):
        return base64.b64decode(text[len("base64:") :])
    return text.encode("utf-8")


def store(conn: psycopg.Connection, rejected: Sequence[Rejected]) -> None:
    """Insert dead letters; a redelivered record keeps its first row (unique position)."""
    if not rejected:
        return
    conn.cursor().executemany(
        "INSERT INTO rag.dead_letters (topic, partition, kafka_offset, record_key, record_value,"
        " stage, error_type, reason) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (topic, partition, kafka_offset) DO UPDATE SET"
        " stage = EXCLUDED.stage, error_type = EXCLUDED.error_type, reason = EXCLUDED.reason",
        [
            (
                r.position.topic,
                r.position.partition,
                r.position.offset,
                _text(r.key),
                # NUL cannot be stored in text; keep such a record as base64.
                _text(r.value)
                if r.value is None or b"\x00" not in r.value
                else "base64:" + base64.b64encode(r.value).decode("ascii"),
                r.stage,
                r.error_type,
                r.reason.replace("\x00", "\\0"),
            )
            for r in rejected
        ],
    )
    for r in rejected:
        logger.warning(
            "dead letter topic=%s partition=%s offset=%s stage=%s: %s",
            r.position.topic,
            r.position.partition,
            r.position.offset,
            r.stage,
            r.reason,
        )


def dlq_message(r: Rejected) -> tuple[bytes | None, bytes]:
    """Key and value of the dead-letter topic record for a rejected event."""
    value = {
        "topic": r.position.topic,
        "partition": r.position.partition,
        "offset": r.position.offset,
        "stage": r.stage,
        "error_type": r.error_type,
        "reason": r.reason,
        "record_key": _text(r.key),
        "record_value": _text(r.value),
    }
    return r.key, json.dumps(value).encode()


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
        }


_COLUMNS = (
    "id, topic, partition, kafka_offset, record_key, record_value, stage, error_type, reason,"
    " created_at, replay_count, resolved_at"
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
