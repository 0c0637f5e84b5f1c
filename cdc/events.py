"""Decode Debezium PostgreSQL change events (JSON converter, schemas off) into typed objects.

A record's value is Debezium's envelope {before, after, source, op, ts_ms}; its key is the row's
primary key. A delete is followed by a tombstone (same key, null value), decoded as `Tombstone`.
Columns that Debezium could not read (an unchanged TOASTed value under REPLICA IDENTITY DEFAULT)
carry the placeholder `__debezium_unavailable_value`; they decode to the `UNAVAILABLE` sentinel,
so no code can mistake the placeholder for the column's text.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final

UNAVAILABLE_PLACEHOLDER: Final = "__debezium_unavailable_value"


class _Unavailable:
    """The value of a column Debezium did not receive (unchanged TOAST)."""

    _instance: _Unavailable | None = None

    def __new__(cls) -> _Unavailable:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNAVAILABLE"

    def __bool__(self) -> bool:
        return False


UNAVAILABLE: Final = _Unavailable()


class Op(StrEnum):
    CREATE = "c"
    UPDATE = "u"
    DELETE = "d"
    READ = "r"  # a snapshot row
    TRUNCATE = "t"
    # Not Debezium's: the marker that connectors/jvm/transforms (OversizedGuard) sends instead
    # of an event larger than the size limit, with the event's source block and its size.
    OVERSIZED = "oversized"


class DecodeError(ValueError):
    """The record is not a Debezium change event this decoder understands."""


@dataclass(frozen=True)
class SourceInfo:
    """Where and when the change happened in the source database."""

    connector: str
    name: str  # the topic prefix
    db: str
    schema: str
    table: str
    lsn: int | None
    tx_id: int | None
    commit_time: datetime  # the source commit time (source.ts_us / ts_ms)
    snapshot: str  # "false", "true", "first", "last", "incremental", ...
    last_commit_lsn: int | None = None
    # The stream position when the event was emitted (source.sequence[1]); an incremental
    # snapshot's read event has no lsn of its own and is ordered by this one.
    stream_lsn: int | None = None

    @property
    def qualified_table(self) -> str:
        return f"{self.schema}.{self.table}"

    @property
    def is_snapshot(self) -> bool:
        return self.snapshot not in ("false", "")


@dataclass(frozen=True)
class RecordPosition:
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None


@dataclass(frozen=True)
class ChangeEvent:
    op: Op
    key: Mapping[str, Any] | None
    before: Mapping[str, Any] | None
    after: Mapping[str, Any] | None
    source: SourceInfo
    emitted_at: datetime | None  # when Debezium produced the event
    position: RecordPosition = field(default_factory=RecordPosition)
    # For Op.OVERSIZED: the serialized size of the event that was replaced, and the limit.
    oversized_bytes: int | None = None
    size_limit: int | None = None

    @property
    def table(self) -> str:
        return self.source.qualified_table

    @property
    def lsn(self) -> int | None:
        """The event's source position. An incremental snapshot's read event has none: it
        reflects the row as of the stream position it was emitted at (Debezium drops it when a
        change of the row arrives inside its window), so that position orders it."""
        if self.source.lsn is None and self.source.is_snapshot:
            return self.source.stream_lsn
        return self.source.lsn

    @property
    def row(self) -> Mapping[str, Any] | None:
        """The row as it is after the change (the old row for a delete)."""
        return self.before if self.op is Op.DELETE else self.after

    @property
    def unavailable_columns(self) -> frozenset[str]:
        """Columns of `after` whose value Debezium did not send (unchanged TOAST)."""
        if not self.after:
            return frozenset()
        return frozenset(name for name, value in self.after.items() if value is UNAVAILABLE)


@dataclass(frozen=True)
class Tombstone:
    """The null-valued record that follows a delete, for log compaction."""

    key: Mapping[str, Any] | None
    position: RecordPosition = field(default_factory=RecordPosition)


Decoded = ChangeEvent | Tombstone


def decode(
    key: bytes | str | None,
    value: bytes | str | None,
    *,
    topic: str | None = None,
    partition: int | None = None,
    offset: int | None = None,
) -> Decoded:
    """One Kafka record -> ChangeEvent or Tombstone; DecodeError says why it is not one."""
    position = RecordPosition(topic, partition, offset)
    decoded_key = _json(key, "key") if key is not None else None
    if decoded_key is not None and not isinstance(decoded_key, dict):
        raise DecodeError(f"record key is not a JSON object: {str(decoded_key)[:80]}")
    if value is None:
        return Tombstone(key=decoded_key, position=position)
    envelope = _json(value, "value")
    if not isinstance(envelope, dict):
        raise DecodeError("record value is not a JSON object")
    if "schema" in envelope and "payload" in envelope:
        # The JSON converter with schemas.enable=true wraps the envelope.
        envelope = envelope["payload"]
        if envelope is None:
            return Tombstone(key=decoded_key, position=position)
    try:
        op = Op(envelope["op"])
    except KeyError:
        raise DecodeError("envelope has no 'op' field (not a Debezium change event)") from None
    except (ValueError, TypeError):
        raise DecodeError(f"unknown op {str(envelope['op'])[:80]!r}") from None
    if op is Op.OVERSIZED:
        return _oversized(decoded_key, envelope, position)
    before = _row(envelope.get("before"), "before")
    after = _row(envelope.get("after"), "after")
    if op in (Op.CREATE, Op.READ, Op.UPDATE) and after is None:
        raise DecodeError(f"op={op.value} event without 'after'")
    if op is Op.DELETE and before is None:
        raise DecodeError("op=d event without 'before'")
    source = _source(envelope.get("source"))
    return ChangeEvent(
        op=op,
        key=decoded_key,
        before=before,
        after=after,
        source=source,
        emitted_at=_time(envelope.get("ts_us"), envelope.get("ts_ms")),
        position=position,
    )


def decode_record(record: Any) -> Decoded:
    """``decode`` of a Kafka record (anything with topic, partition, offset, key and value)."""
    return decode(
        record.key,
        record.value,
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
    )


def _oversized(key: Mapping[str, Any] | None, envelope: dict[str, Any], at: RecordPosition) -> Any:
    info = envelope.get("oversized")
    if not isinstance(info, dict):
        raise DecodeError("oversized marker without its 'oversized' block")
    try:
        size, limit = int(info["bytes"]), int(info["limit"])
    except (KeyError, TypeError, ValueError, OverflowError):
        raise DecodeError("oversized marker with a malformed 'oversized' block") from None
    return ChangeEvent(
        op=Op.OVERSIZED,
        key=key,
        before=None,
        after=None,
        source=_source(envelope.get("source")),
        emitted_at=_time(envelope.get("ts_us"), envelope.get("ts_ms")),
        position=at,
        oversized_bytes=size,
        size_limit=limit,
    )


def _json(raw: bytes | str, what: str) -> Any:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DecodeError(f"record {what} is not JSON: {exc}") from None
    except RecursionError:
        raise DecodeError(f"record {what} is JSON nested too deeply to read") from None


def _row(raw: Any, what: str) -> dict[str, Any] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise DecodeError(f"'{what}' is not an object")
    return {name: _column(value) for name, value in raw.items()}


def _column(value: Any) -> Any:
    if value == UNAVAILABLE_PLACEHOLDER:
        return UNAVAILABLE
    # An unchanged TOASTed array arrives as a one-element list holding the placeholder.
    if isinstance(value, list) and value == [UNAVAILABLE_PLACEHOLDER]:
        return UNAVAILABLE
    return value


def _source(raw: Any) -> SourceInfo:
    if not isinstance(raw, dict):
        raise DecodeError("envelope has no 'source' block")
    try:
        sequence = json.loads(raw["sequence"]) if raw.get("sequence") else [None, None]
        last_commit = int(sequence[0]) if sequence and sequence[0] is not None else None
        stream = int(sequence[1]) if len(sequence) > 1 and sequence[1] is not None else None
        commit_time = _time(raw.get("ts_us"), raw.get("ts_ms"))
        if commit_time is None:
            raise DecodeError("source block has no ts_ms")
        return SourceInfo(
            connector=str(raw.get("connector", "")),
            name=str(raw.get("name", "")),
            db=str(raw.get("db", "")),
            schema=str(raw["schema"]),
            table=str(raw["table"]),
            lsn=_int_or_none(raw.get("lsn")),
            tx_id=_int_or_none(raw.get("txId")),
            commit_time=commit_time,
            snapshot=str(raw.get("snapshot", "false")).lower(),
            last_commit_lsn=last_commit,
            stream_lsn=stream,
        )
    except KeyError as exc:
        raise DecodeError(f"source block lacks {exc.args[0]!r}") from None
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise DecodeError(f"malformed source block: {str(exc)[:200]}") from None


def _int_or_none(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"{str(value)[:40]!r} is not an integer")
    return int(value)


def _time(us: Any, ms: Any) -> datetime | None:
    """A timestamp from microseconds (preferred) or milliseconds since the epoch."""
    raw, scale = (us, 1_000_000) if us is not None else (ms, 1_000)
    if raw is None:
        return None
    try:
        return datetime.fromtimestamp(int(_int_or_none(raw) or 0) / scale, tz=UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        raise DecodeError(f"timestamp {str(raw)[:40]!r} is not a time since the epoch") from None
