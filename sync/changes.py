"""Route Kafka records to per-document changes: decode, find the table's mapping, key them.

Pure apart from logging. A record that cannot be decoded or keyed becomes a `Rejected` (bound
for the dead letters), whatever the exception: nothing a record contains can stop its partition.
A record of a table without a mapping is ignored, loudly once per table.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol

from freshet.cdc.events import (
    ChangeEvent,
    DecodeError,
    Op,
    RecordPosition,
    Tombstone,
    decode_record,
)
from freshet.consumer import DLQ_SUFFIX
from freshet.sync.mapping import MappingError, Mappings, TableMapping

logger = logging.getLogger(__name__)

CONTROL_SCHEMA = "freshet_cdc"


class KafkaRecord(Protocol):
    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...


class Kind(StrEnum):
    UPSERT = "upsert"
    DELETE = "delete"
    TOMBSTONE = "tombstone"
    # Every document of the table older than this change's LSN goes (TRUNCATE).
    TRUNCATE = "truncate"
    # The row exists but its event was too large to carry: the document is hidden.
    OVERSIZED = "oversized"


@dataclass(frozen=True)
class Change:
    """What one record asks of one document."""

    kind: Kind
    mapping: TableMapping
    doc_key: str
    position: RecordPosition
    row: Mapping[str, Any] | None = None
    lsn: int | None = None
    tx_id: int | None = None
    commit_time: datetime | None = None
    snapshot: bool = False
    # For OVERSIZED: the size of the event that was replaced by the marker, and the limit.
    oversized_bytes: int | None = None
    size_limit: int | None = None
    # The record as it arrived, for the dead letters should the change fail later.
    raw_key: bytes | None = None
    raw_value: bytes | None = None

    @property
    def table(self) -> str:
        return self.mapping.table

    @property
    def version(self) -> tuple[int, int]:
        """Source position first, then the record's offset (event order within a row)."""
        return (self.lsn if self.lsn is not None else -1, self.position.offset or 0)


@dataclass(frozen=True)
class Rejected:
    """A record that cannot be applied, with the reason; it goes to the dead letters."""

    position: RecordPosition
    key: bytes | None
    value: bytes | None
    stage: str
    error_type: str
    reason: str
    # Which document it was meant for, when that much could be read.
    table: str | None = None
    doc_key: str | None = None


@dataclass
class Routed:
    changes: list[Change] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    ignored: int = 0


def topic_pattern(prefix: str) -> str:
    """Every captured table's topic (PREFIX.schema.table), not Debezium's control tables and
    heartbeats, and never a dead-letter topic: no topic whose name ends in `.dlq` (the sync
    worker's freshet.sync.dlq, the workflow's rag.workflow.dlq, whatever the prefix)."""
    last = re.escape(DLQ_SUFFIX.lstrip("."))
    return rf"^{re.escape(prefix)}\.(?!freshet_cdc\.)[^.]+\.(?!{last}$)[^.]+$"


def table_of_topic(topic: str, prefix: str) -> str | None:
    """`PREFIX.schema.table` -> `schema.table`; None for other topics."""
    if not topic.startswith(prefix + "."):
        return None
    rest = topic[len(prefix) + 1 :]
    return rest if rest.count(".") == 1 else None


@dataclass
class Router:
    mappings: Mappings
    topic_prefix: str
    _warned: set[str] = field(default_factory=set)

    def route(self, records: Iterable[KafkaRecord]) -> Routed:
        routed = Routed()
        for record in records:
            self._route_one(record, routed)
        return routed

    def _route_one(self, record: KafkaRecord, routed: Routed) -> None:
        position = RecordPosition(record.topic, record.partition, record.offset)
        table = table_of_topic(record.topic, self.topic_prefix)
        if table is None or table.startswith(CONTROL_SCHEMA + "."):
            routed.ignored += 1
            return
        mapping = self.mappings.get(table)
        if mapping is None:
            if table not in self._warned:
                self._warned.add(table)
                logger.warning(
                    "table %s has no mapping in the mapping file: its changes are ignored "
                    "(topic %s)",
                    table,
                    record.topic,
                )
            routed.ignored += 1
            return

        stage = "decode"
        try:
            decoded = decode_record(record)
            stage = "map"
            change = self._change(mapping, decoded, position)
        except Exception as exc:  # noqa: BLE001 - every failure of one record is a dead letter
            if not isinstance(exc, DecodeError | MappingError):
                logger.warning(
                    "unexpected %s while routing topic=%s partition=%s offset=%s",
                    type(exc).__name__,
                    record.topic,
                    record.partition,
                    record.offset,
                )
            routed.rejected.append(
                Rejected(
                    position, record.key, record.value, stage, type(exc).__name__, str(exc), table
                )
            )
            return
        routed.changes.append(replace(change, raw_key=record.key, raw_value=record.value))

    @staticmethod
    def _change(
        mapping: TableMapping, decoded: ChangeEvent | Tombstone, position: RecordPosition
    ) -> Change:
        if isinstance(decoded, Tombstone):
            if decoded.key is None:
                raise MappingError("tombstone without a key")
            return Change(Kind.TOMBSTONE, mapping, mapping.doc_key(decoded.key), position)
        if decoded.table != mapping.table:
            raise MappingError(f"event of table {decoded.table} on the topic of {mapping.table}")
        common: dict[str, Any] = {
            "mapping": mapping,
            "position": position,
            "lsn": decoded.lsn,
            "tx_id": decoded.source.tx_id,
            "commit_time": decoded.source.commit_time,
            "snapshot": decoded.source.is_snapshot,
        }
        if decoded.op is Op.TRUNCATE:
            if decoded.lsn is None:
                raise MappingError("TRUNCATE event without a source LSN")
            return Change(Kind.TRUNCATE, doc_key="", **common)
        if decoded.op is Op.OVERSIZED:
            if decoded.key is None:
                raise MappingError("oversized-event marker without a record key")
            return Change(
                Kind.OVERSIZED,
                doc_key=mapping.doc_key(decoded.key),
                oversized_bytes=decoded.oversized_bytes,
                size_limit=decoded.size_limit,
                **common,
            )
        kind = Kind.DELETE if decoded.op is Op.DELETE else Kind.UPSERT
        key_source = decoded.key or decoded.row or {}
        return Change(
            kind=kind,
            doc_key=mapping.doc_key(key_source),
            row=decoded.after if kind is Kind.UPSERT else None,
            **common,
        )
