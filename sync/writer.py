"""Apply a batch of changes to schema `rag` in one transaction, re-embedding only what changed.

Per document, in record order:
- an event whose version (source LSN, then Kafka offset) is not newer than the stored one
  changes nothing (replays, rebalances, redelivery);
- a delete removes every chunk and keeps the document row as a versioned marker, so an older
  replayed insert cannot bring it back; a tombstone only acts when it is newer (by offset) than
  what set the stored state;
- an upsert completes unavailable TOAST columns from the stored row, maps, chunks, and embeds
  only chunks whose hash the document does not already have; a metadata-only change embeds
  nothing.
Each document is written inside a savepoint, so one bad document becomes a dead letter while the
rest of the batch commits. The caller commits Kafka offsets only after this transaction.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import psycopg
from psycopg.types.json import Jsonb

from freshet.embedder import Embedder
from sync.changes import Change, Kind, Rejected
from sync.chunking import Chunk, Chunker
from sync.mapping import Document, MappingError, complete_row

logger = logging.getLogger(__name__)


@dataclass
class ApplyStats:
    applied: int = 0
    stale: int = 0
    superseded: int = 0
    deleted: int = 0
    tombstones: int = 0
    metadata_only: int = 0
    embeddings: int = 0
    chunks_written: int = 0
    chunks_deleted: int = 0
    # Seconds spent reading + chunking, embedding, and writing (the rest is Kafka and commit).
    plan_seconds: float = 0.0
    embed_seconds: float = 0.0
    write_seconds: float = 0.0
    # (table, source commit time) of every live (non-snapshot) change that took effect.
    committed: list[tuple[str, datetime]] = field(default_factory=list)
    dead: list[Rejected] = field(default_factory=list)


@dataclass
class _Stored:
    id: int
    version: tuple[int, int]
    topic: str | None
    partition: int | None
    row: dict[str, Any]
    deleted: bool


@dataclass
class _Intent:
    """The final state one document must reach in this batch."""

    key: tuple[str, str]
    last: Change  # the change that sets the version
    delete: bool
    row: dict[str, Any] | None = None
    document: Document | None = None
    chunks: list[Chunk] = field(default_factory=list)
    kept: dict[int, tuple[int, int]] = field(default_factory=dict)  # new index -> (id, old index)
    to_embed: list[int] = field(default_factory=list)  # new chunk indexes needing a vector
    vectors: dict[int, np.ndarray] = field(default_factory=dict)
    stale_ids: list[int] = field(default_factory=list)


def _dead(change: Change, stage: str, exc: Exception) -> Rejected:
    return Rejected(
        change.position, change.raw_key, change.raw_value, stage, type(exc).__name__, str(exc)
    )


@dataclass
class Writer:
    embedder: Embedder
    chunker: Chunker

    def apply(self, conn: psycopg.Connection, changes: Sequence[Change]) -> ApplyStats:
        stats = ApplyStats()
        if not changes:
            return stats
        with conn.transaction():
            started = time.perf_counter()
            stored = self._load(conn, changes)
            intents = self._resolve(changes, stored, stats)
            self._plan(conn, intents, stored, stats)
            planned = time.perf_counter()
            self._embed(intents, stats)
            embedded = time.perf_counter()
            for intent in intents:
                self._write(conn, intent, stored.get(intent.key), stats)
            stats.plan_seconds = planned - started
            stats.embed_seconds = embedded - planned
        stats.write_seconds = time.perf_counter() - embedded
        return stats

    # --- reading the stored state ------------------------------------------------------
    @staticmethod
    def _load(
        conn: psycopg.Connection, changes: Sequence[Change]
    ) -> dict[tuple[str, str], _Stored]:
        keys = sorted({(c.table, c.doc_key) for c in changes})
        rows = conn.execute(
            "SELECT id, source_table, doc_key, source_lsn, source_seq, kafka_topic,"
            " kafka_partition, source_row, deleted_at IS NOT NULL"
            " FROM rag.documents"
            " WHERE (source_table, doc_key) IN (SELECT * FROM unnest(%s::text[], %s::text[]))"
            " ORDER BY id FOR UPDATE",
            ([k[0] for k in keys], [k[1] for k in keys]),
        ).fetchall()
        return {
            (r[1], r[2]): _Stored(r[0], (r[3], r[4]), r[5], r[6], r[7] or {}, r[8]) for r in rows
        }

    # --- deciding what each document becomes --------------------------------------------
    @staticmethod
    def _resolve(
        changes: Sequence[Change], stored: dict[tuple[str, str], _Stored], stats: ApplyStats
    ) -> list[_Intent]:
        by_doc: dict[tuple[str, str], list[Change]] = defaultdict(list)
        for change in changes:
            by_doc[(change.table, change.doc_key)].append(change)
        intents = []
        for key, doc_changes in by_doc.items():
            current = stored.get(key)
            version = current.version if current else (-1, -1)
            deleted = current.deleted if current else True
            row: dict[str, Any] | None = None if deleted or current is None else current.row
            last_position = (
                (current.topic, current.partition, current.version[1]) if current else None
            )
            intent: _Intent | None = None
            for change in doc_changes:
                pos = change.position
                if change.kind is Kind.TOMBSTONE:
                    stats.tombstones += 1
                    newer = last_position is None or (
                        (pos.topic, pos.partition) == last_position[:2]
                        and (pos.offset or 0) > last_position[2]
                    )
                    if newer and not deleted:
                        if intent is not None:
                            stats.superseded += 1
                        intent = _Intent(key, change, delete=True)
                        deleted, row = True, None
                    continue
                if change.version <= version:
                    stats.stale += 1
                    continue
                if intent is not None:
                    stats.superseded += 1
                version = change.version
                last_position = (pos.topic, pos.partition, pos.offset or 0)
                if change.commit_time is not None and not change.snapshot:
                    stats.committed.append((change.table, change.commit_time))
                if change.kind is Kind.DELETE:
                    intent = _Intent(key, change, delete=True)
                    deleted, row = True, None
                else:
                    row = complete_row(change.row or {}, row)
                    intent = _Intent(key, change, delete=False, row=row)
                    deleted = False
            if intent is not None:
                intents.append(intent)
        return intents

    def _plan(
        self,
        conn: psycopg.Connection,
        intents: list[_Intent],
        stored: dict[tuple[str, str], _Stored],
        stats: ApplyStats,
    ) -> None:
        """Map and chunk each upsert; match new chunks to existing ones by hash."""
        doc_ids = [stored[i.key].id for i in intents if i.key in stored]
        existing: dict[int, list[tuple[int, int, str]]] = defaultdict(list)
        if doc_ids:
            for chunk_id, doc_id, index, digest in conn.execute(
                "SELECT id, document_id, chunk_index, text_hash FROM rag.chunks"
                " WHERE document_id = ANY(%s) ORDER BY document_id, chunk_index",
                (doc_ids,),
            ):
                existing[doc_id].append((chunk_id, index, digest))
        for intent in intents:
            old = existing.get(stored[intent.key].id, []) if intent.key in stored else []
            if intent.delete:
                intent.stale_ids = [chunk_id for chunk_id, _, _ in old]
                continue
            try:
                assert intent.row is not None
                intent.document = intent.last.mapping.map_row(intent.row)
            except MappingError as exc:
                stats.dead.append(_dead(intent.last, "map", exc))
                intent.document = None
                continue
            intent.chunks = self.chunker.chunk(intent.document.text)
            available: dict[str, list[tuple[int, int]]] = defaultdict(list)
            for chunk_id, index, digest in old:
                available[digest].append((chunk_id, index))
            for chunk in intent.chunks:
                if available.get(chunk.hash):
                    intent.kept[chunk.index] = available[chunk.hash].pop(0)
                else:
                    intent.to_embed.append(chunk.index)
            intent.stale_ids = [cid for pairs in available.values() for cid, _ in pairs]

    def _embed(self, intents: list[_Intent], stats: ApplyStats) -> None:
        """One embedding call for the whole batch; per document again if that call fails."""
        pending = [i for i in intents if i.document is not None and i.to_embed]
        texts = [i.chunks[n].text for i in pending for n in i.to_embed]
        if not texts:
            return
        try:
            vectors = self.embedder.embed(texts)
        except Exception as exc:  # noqa: BLE001 - isolate the document that fails below
            logger.warning("batch embedding failed (%s); retrying per document", exc)
            for intent in pending:
                try:
                    own = self.embedder.embed([intent.chunks[n].text for n in intent.to_embed])
                except Exception as inner:  # noqa: BLE001 - becomes a dead letter
                    stats.dead.append(_dead(intent.last, "embed", inner))
                    intent.document = None
                    continue
                intent.vectors = dict(zip(intent.to_embed, own, strict=True))
                stats.embeddings += len(intent.to_embed)
            return
        stats.embeddings += len(texts)
        cursor = 0
        for intent in pending:
            for n in intent.to_embed:
                intent.vectors[n] = vectors[cursor]
                cursor += 1

    # --- writing ---------------------------------------------------------------------
    def _write(
        self, conn: psycopg.Connection, intent: _Intent, current: _Stored | None, stats: ApplyStats
    ) -> None:
        if not intent.delete and intent.document is None:
            return  # mapped or embedded badly: already a dead letter
        try:
            with conn.transaction():  # a savepoint: this document only
                if intent.delete:
                    self._write_delete(conn, intent, current, stats)
                else:
                    self._write_upsert(conn, intent, stats)
        except (psycopg.DataError, psycopg.IntegrityError) as exc:
            stats.dead.append(_dead(intent.last, "write", exc))
            return
        stats.applied += 1

    @staticmethod
    def _version_params(change: Change) -> dict[str, Any]:
        pos = change.position
        return {
            "table": change.table,
            "key": change.doc_key,
            "lsn": change.lsn if change.lsn is not None else -1,
            "seq": pos.offset or 0,
            "txid": change.tx_id,
            "ts": change.commit_time,
            "topic": pos.topic,
            "partition": pos.partition,
        }

    def _write_delete(
        self, conn: psycopg.Connection, intent: _Intent, current: _Stored | None, stats: ApplyStats
    ) -> None:
        if intent.stale_ids:
            conn.execute("DELETE FROM rag.chunks WHERE id = ANY(%s)", (intent.stale_ids,))
            stats.chunks_deleted += len(intent.stale_ids)
        stats.deleted += 1
        if intent.last.kind is Kind.TOMBSTONE:
            if current is not None:
                conn.execute(
                    "UPDATE rag.documents SET deleted_at = coalesce(deleted_at, now()),"
                    " source_row = '{}'::jsonb, indexed_at = now() WHERE id = %s",
                    (current.id,),
                )
            return
        conn.execute(
            "INSERT INTO rag.documents (source_table, doc_key, source_lsn, source_seq,"
            " source_txid, source_ts, kafka_topic, kafka_partition, deleted_at)"
            " VALUES (%(table)s, %(key)s, %(lsn)s, %(seq)s, %(txid)s, %(ts)s, %(topic)s,"
            " %(partition)s, now())"
            " ON CONFLICT (source_table, doc_key) DO UPDATE SET"
            " source_lsn = EXCLUDED.source_lsn, source_seq = EXCLUDED.source_seq,"
            " source_txid = EXCLUDED.source_txid, source_ts = EXCLUDED.source_ts,"
            " kafka_topic = EXCLUDED.kafka_topic, kafka_partition = EXCLUDED.kafka_partition,"
            " deleted_at = now(), source_row = '{}'::jsonb, content_hash = NULL,"
            " indexed_at = now()",
            self._version_params(intent.last),
        )

    def _write_upsert(self, conn: psycopg.Connection, intent: _Intent, stats: ApplyStats) -> None:
        doc = intent.document
        assert doc is not None
        params = self._version_params(intent.last)
        metadata = dict(doc.metadata, title=doc.title)
        params.update(
            title=doc.title,
            metadata=Jsonb(doc.metadata),
            groups=list(doc.access_groups),
            hash=hashlib.sha256(doc.text.encode()).hexdigest(),
            row=Jsonb(doc.row),
        )
        row = conn.execute(
            "INSERT INTO rag.documents (source_table, doc_key, title, metadata, access_groups,"
            " content_hash, source_lsn, source_seq, source_txid, source_ts, kafka_topic,"
            " kafka_partition, source_row, deleted_at)"
            " VALUES (%(table)s, %(key)s, %(title)s, %(metadata)s, %(groups)s, %(hash)s,"
            " %(lsn)s, %(seq)s, %(txid)s, %(ts)s, %(topic)s, %(partition)s, %(row)s, NULL)"
            " ON CONFLICT (source_table, doc_key) DO UPDATE SET"
            " title = EXCLUDED.title, metadata = EXCLUDED.metadata,"
            " access_groups = EXCLUDED.access_groups, content_hash = EXCLUDED.content_hash,"
            " source_lsn = EXCLUDED.source_lsn, source_seq = EXCLUDED.source_seq,"
            " source_txid = EXCLUDED.source_txid, source_ts = EXCLUDED.source_ts,"
            " kafka_topic = EXCLUDED.kafka_topic, kafka_partition = EXCLUDED.kafka_partition,"
            " source_row = EXCLUDED.source_row, deleted_at = NULL, indexed_at = now()"
            " RETURNING id",
            params,
        ).fetchone()
        assert row is not None
        doc_id = row[0]
        if intent.stale_ids:
            conn.execute("DELETE FROM rag.chunks WHERE id = ANY(%s)", (intent.stale_ids,))
            stats.chunks_deleted += len(intent.stale_ids)
        if intent.kept:
            # Kept chunks keep their text and vector; index, metadata and groups follow the row.
            conn.cursor().executemany(
                "UPDATE rag.chunks SET chunk_index = %s, metadata = %s, access_groups = %s,"
                " updated_at = now() WHERE id = %s AND (chunk_index <> %s"
                " OR metadata <> %s OR access_groups <> %s)",
                [
                    (
                        index,
                        Jsonb(metadata),
                        params["groups"],
                        chunk_id,
                        index,
                        Jsonb(metadata),
                        params["groups"],
                    )
                    for index, (chunk_id, _) in intent.kept.items()
                ],
            )
        if intent.vectors:
            conn.cursor().executemany(
                "INSERT INTO rag.chunks (document_id, source_table, doc_key, chunk_index, text,"
                " text_hash, embedding, metadata, access_groups, source_lsn, source_ts)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                [
                    (
                        doc_id,
                        doc.source_table,
                        doc.doc_key,
                        n,
                        intent.chunks[n].text,
                        intent.chunks[n].hash,
                        intent.vectors[n],
                        Jsonb(metadata),
                        params["groups"],
                        params["lsn"],
                        params["ts"],
                    )
                    for n in intent.to_embed
                ],
            )
            stats.chunks_written += len(intent.vectors)
        elif not intent.stale_ids:
            stats.metadata_only += 1
