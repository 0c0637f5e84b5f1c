"""Apply a batch of changes to schema `rag` in one transaction, re-embedding only what changed.

Per document, in record order:
- an event whose version (source LSN, then Kafka offset) is not newer than the stored one
  changes nothing (replays, rebalances, redelivery), and neither does an event older than the
  table's newest TRUNCATE (rag.truncations), whichever partition it comes from;
- a delete removes every chunk and keeps the document row as a versioned marker, so an older
  replayed insert cannot bring it back; a tombstone only acts when it is newer (by offset) than
  what set the stored state;
- an upsert completes unavailable TOAST columns from the stored row (or, for a key the index
  has never stored, from the source row), maps, chunks, and embeds only chunks whose hash the
  document does not already have; a metadata-only change embeds nothing;
- a row that cannot be served (its event was over the size limit, or the mapping no longer fits
  it) hides the document: no chunks, a reason, the version kept; a later event re-evaluates it.
A TRUNCATE removes every document of its table older than it. The batch's documents are
written together, in a few set-based statements (one COPY for every new chunk, so the BM25
triggers run once per batch); if that fails, each document is written again inside its own
savepoint, so one bad document becomes a dead letter while the rest of the batch commits. Only
a transient database error (the server or the connection gone) escapes, to retry the batch. The
caller commits Kafka offsets only after this transaction.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import psycopg
from psycopg.types.json import Jsonb

from freshet.cdc.events import RecordPosition
from freshet.embedder import Embedder
from freshet.index_model import SHADOW_COLUMN
from freshet.retry import transient_db_error
from freshet.sync import problems
from freshet.sync.changes import Change, Kind, Rejected
from freshet.sync.chunking import Chunk, Chunker
from freshet.sync.index_models import IndexModels
from freshet.sync.mapping import Document, MappingError, complete_row, unavailable_columns
from freshet.sync.source_rows import SourceRows

logger = logging.getLogger(__name__)


@dataclass
class ApplyStats:
    applied: int = 0
    stale: int = 0
    superseded: int = 0
    deleted: int = 0
    tombstones: int = 0
    metadata_only: int = 0
    hidden: int = 0
    truncated: int = 0  # documents removed by TRUNCATE
    truncated_keys: list[tuple[str, str]] = field(default_factory=list)
    embeddings: int = 0
    embed_calls: int = 0  # calls of the embedder: one per batch unless one fails
    chunks_written: int = 0
    chunks_deleted: int = 0
    # Seconds spent reading + chunking, embedding, and writing (the rest is Kafka and commit).
    plan_seconds: float = 0.0
    embed_seconds: float = 0.0
    write_seconds: float = 0.0
    # (table, source commit time) of every live (non-snapshot) change that took effect.
    committed: list[tuple[str, datetime]] = field(default_factory=list)
    dead: list[Rejected] = field(default_factory=list)
    # Changes of documents too large for this batch (more new embeddings than the writer's
    # `defer_above`), in record order: the caller hands them to the large lane.
    deferred: list[Change] = field(default_factory=list)
    problems: problems.Problems = field(default_factory=problems.Problems)


@dataclass
class _Stored:
    id: int
    version: tuple[int, int]
    topic: str | None
    partition: int | None
    row: dict[str, Any]
    deleted: bool
    hidden: bool


@dataclass
class _Intent:
    """The final state one document must reach in this batch."""

    key: tuple[str, str]
    last: Change  # the change that sets the version
    delete: bool
    row: dict[str, Any] | None = None
    hide: str | None = None  # why the document is hidden instead of served
    document: Document | None = None
    chunks: list[Chunk] = field(default_factory=list)
    kept: dict[int, tuple[int, int]] = field(default_factory=dict)  # new index -> (id, old index)
    to_embed: list[int] = field(default_factory=list)  # new chunk indexes needing a vector
    vectors: dict[int, np.ndarray] = field(default_factory=dict)
    # The same chunks with the shadow model, while `freshet reembed` builds one.
    shadow_vectors: dict[int, np.ndarray] = field(default_factory=dict)
    stale_ids: list[int] = field(default_factory=list)
    skip: bool = False  # nothing to write (the source row is gone; its delete follows)
    changes: list[Change] = field(default_factory=list)  # every change of it in the batch
    commit_times: list[datetime] = field(default_factory=list)  # of the live changes applied


_UPSERT_DOCUMENT = (
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
    " source_row = EXCLUDED.source_row, deleted_at = NULL, hidden_reason = NULL,"
    " indexed_at = now()"
    " RETURNING id"
)
# A deleted or hidden document keeps its row, versioned, so an older replay cannot revive it.
_MARK_DELETED = (
    "INSERT INTO rag.documents (source_table, doc_key, source_lsn, source_seq,"
    " source_txid, source_ts, kafka_topic, kafka_partition, deleted_at, hidden_reason,"
    " source_row)"
    " VALUES (%(table)s, %(key)s, %(lsn)s, %(seq)s, %(txid)s, %(ts)s, %(topic)s,"
    " %(partition)s, now(), %(hidden)s, %(row)s)"
    " ON CONFLICT (source_table, doc_key) DO UPDATE SET"
    " source_lsn = EXCLUDED.source_lsn, source_seq = EXCLUDED.source_seq,"
    " source_txid = EXCLUDED.source_txid, source_ts = EXCLUDED.source_ts,"
    " kafka_topic = EXCLUDED.kafka_topic, kafka_partition = EXCLUDED.kafka_partition,"
    " deleted_at = now(), hidden_reason = EXCLUDED.hidden_reason,"
    " source_row = EXCLUDED.source_row, content_hash = NULL, indexed_at = now()"
)
_TOMBSTONE_DOCUMENTS = (
    "UPDATE rag.documents SET deleted_at = coalesce(deleted_at, now()),"
    " hidden_reason = NULL, source_row = '{}'::jsonb, indexed_at = now()"
    " WHERE id = ANY(%s)"
)
_UPDATE_KEPT_CHUNK = (
    "UPDATE rag.chunks SET chunk_index = %s, metadata = %s, access_groups = %s,"
    " updated_at = now() WHERE id = %s AND (chunk_index <> %s"
    " OR metadata <> %s OR access_groups <> %s)"
)
_CHUNK_COLUMNS = (
    "document_id",
    "source_table",
    "doc_key",
    "chunk_index",
    "text",
    "text_hash",
    "embedding",
    "metadata",
    "access_groups",
    "source_lsn",
    "source_ts",
)
# Their types, for the binary COPY (a vector's text form costs ~7% of a worker's time on short
# rows: 384 floats formatted one by one); the shadow vector, when written, is one more vector.
_CHUNK_TYPES = (
    "bigint",
    "text",
    "text",
    "integer",
    "text",
    "text",
    "vector",
    "jsonb",
    "text[]",
    "bigint",
    "timestamptz",
)


def dead_letter(change: Change, stage: str, exc: BaseException | str) -> Rejected:
    error_type, reason = (
        ("Rejected", exc) if isinstance(exc, str) else (type(exc).__name__, str(exc))
    )
    return Rejected(
        change.position,
        change.raw_key,
        change.raw_value,
        stage,
        error_type,
        reason,
        change.table,
        change.doc_key or None,
    )


def _lock_key(table: str) -> str:
    return "freshet.truncate:" + table


# --- the version decisions, pure ------------------------------------------------------------
def newest_truncates(changes: Sequence[Change]) -> dict[str, int]:
    """The newest TRUNCATE LSN of each table that the batch truncates."""
    truncates: dict[str, int] = {}
    for c in changes:
        if c.kind is Kind.TRUNCATE and c.lsn is not None:
            truncates[c.table] = max(truncates.get(c.table, -1), c.lsn)
    return truncates


def is_stale(version: tuple[int, int], stored: tuple[int, int], truncated_at: int) -> bool:
    """A change that is not newer than the stored version, or older than its table's newest
    TRUNCATE, changes nothing (replays, rebalances, redelivery)."""
    return version <= stored or version[0] < truncated_at


def tombstone_acts(
    position: RecordPosition, last: tuple[str | None, int | None, int] | None, deleted: bool
) -> bool:
    """A tombstone deletes only a document that is not deleted yet, and only when it comes
    after (by offset, on the same topic partition) what set the stored state."""
    newer = last is None or (
        (position.topic, position.partition) == last[:2] and (position.offset or 0) > last[2]
    )
    return newer and not deleted


@dataclass
class Writer:
    embedder: Embedder
    chunker: Chunker
    # Reads a row from the source when an event lacks a column the index never stored.
    source: SourceRows | None = None
    # A document needing more new embeddings than this is not written here but deferred
    # (ApplyStats.deferred), so one huge row cannot hold the batch; None: never.
    defer_above: int | None = None
    # The index's model and the shadow being built (sync/index_models.py), checked at the start
    # of every transaction; None: not checked (a writer that only plans, tests).
    models: IndexModels | None = None

    def apply(
        self,
        conn: psycopg.Connection,
        changes: Sequence[Change],
        on_embedded: Callable[[], None] | None = None,
    ) -> ApplyStats:
        """``on_embedded``: called once the batch's texts are embedded, before it writes (the
        worker starts embedding its next transaction then: sync/prefetch.py)."""
        stats = ApplyStats()
        if not changes:
            return stats
        with conn.transaction():
            started = time.perf_counter()
            if self.models is not None:
                self.models.check(conn)  # raises ModelSwitched: nothing is written
            watermarks = self._truncate(conn, changes, stats)
            rows = [c for c in changes if c.kind is not Kind.TRUNCATE]
            stored = self._load(conn, rows)
            intents = self._resolve(rows, stored, watermarks, stats)
            self._plan(conn, intents, stored, stats)
            planned = time.perf_counter()
            self._embed(intents, stats)
            embedded = time.perf_counter()
            if on_embedded is not None:
                on_embedded()
            self._write_all(conn, intents, stored, stats)
            problems.record(conn, stats.problems)
            stats.plan_seconds = planned - started
            stats.embed_seconds = embedded - planned
        stats.write_seconds = time.perf_counter() - embedded
        return stats

    def pending_texts(self, conn: psycopg.Connection, changes: Sequence[Change]) -> list[str]:
        """The texts ``apply`` would embed for these changes now; writes nothing."""
        with conn.transaction(force_rollback=True):
            rows = [c for c in changes if c.kind is not Kind.TRUNCATE]
            stored = self._load(conn, rows)
            stats = ApplyStats()
            intents = self._resolve(rows, stored, self._watermarks(conn, rows), stats)
            self._plan(conn, intents, stored, stats)
        return [i.chunks[n].text for i in intents if i.document is not None for n in i.to_embed]

    @staticmethod
    def _watermarks(conn: psycopg.Connection, changes: Sequence[Change]) -> dict[str, int]:
        rows = conn.execute(
            "SELECT source_table, source_lsn FROM rag.truncations WHERE source_table = ANY(%s)",
            (sorted({c.table for c in changes}),),
        ).fetchall()
        return {r[0]: r[1] for r in rows}

    # --- TRUNCATE ----------------------------------------------------------------------
    @staticmethod
    def _truncate(
        conn: psycopg.Connection, changes: Sequence[Change], stats: ApplyStats
    ) -> dict[str, int]:
        """Apply the batch's TRUNCATEs; the newest TRUNCATE LSN of every table of the batch.

        A TRUNCATE takes its table's advisory lock exclusively, every other batch shares it, so
        no batch that read the old watermark can commit an older row after the TRUNCATE."""
        truncates = newest_truncates(changes)
        tables = sorted({c.table for c in changes})
        for table in tables:
            conn.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))"
                if table in truncates
                else "SELECT pg_advisory_xact_lock_shared(hashtextextended(%s, 0))",
                (_lock_key(table),),
            )
        for table, lsn in truncates.items():
            conn.execute(
                "INSERT INTO rag.truncations (source_table, source_lsn) VALUES (%s, %s)"
                " ON CONFLICT (source_table) DO UPDATE SET source_lsn = EXCLUDED.source_lsn,"
                " truncated_at = now() WHERE rag.truncations.source_lsn < EXCLUDED.source_lsn",
                (table, lsn),
            )
            removed = conn.execute(
                "WITH gone AS (UPDATE rag.documents SET deleted_at = coalesce(deleted_at, now()),"
                " hidden_reason = NULL, source_row = '{}'::jsonb, content_hash = NULL,"
                " indexed_at = now() WHERE source_table = %s AND source_lsn < %s"
                " AND (deleted_at IS NULL OR hidden_reason IS NOT NULL) RETURNING id, doc_key),"
                " chunks AS (DELETE FROM rag.chunks WHERE document_id IN (SELECT id FROM gone)"
                " RETURNING 1)"
                " SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM chunks),"
                " (SELECT coalesce(array_agg(doc_key), '{}') FROM gone)",
                (table, lsn),
            ).fetchone()
            assert removed is not None
            conn.execute(
                "UPDATE rag.truncations SET documents_removed = documents_removed + %s"
                " WHERE source_table = %s",
                (removed[0], table),
            )
            stats.truncated += removed[0]
            stats.truncated_keys.extend((table, key) for key in removed[2])
            stats.chunks_deleted += removed[1]
            stats.applied += sum(1 for c in changes if c.kind is Kind.TRUNCATE and c.table == table)
            logger.warning(
                "TRUNCATE of %s at LSN %s: removed %d documents (%d chunks)",
                table,
                lsn,
                removed[0],
                removed[1],
            )
        return Writer._watermarks(conn, changes)

    # --- reading the stored state ------------------------------------------------------
    @staticmethod
    def _load(
        conn: psycopg.Connection, changes: Sequence[Change]
    ) -> dict[tuple[str, str], _Stored]:
        keys = sorted({(c.table, c.doc_key) for c in changes})
        if not keys:
            return {}
        rows = conn.execute(
            "SELECT id, source_table, doc_key, source_lsn, source_seq, kafka_topic,"
            " kafka_partition, source_row, deleted_at IS NOT NULL, hidden_reason IS NOT NULL"
            " FROM rag.documents"
            " WHERE (source_table, doc_key) IN (SELECT * FROM unnest(%s::text[], %s::text[]))"
            " ORDER BY id FOR UPDATE",
            ([k[0] for k in keys], [k[1] for k in keys]),
        ).fetchall()
        return {
            (r[1], r[2]): _Stored(r[0], (r[3], r[4]), r[5], r[6], r[7] or {}, r[8], r[9])
            for r in rows
        }

    # --- deciding what each document becomes --------------------------------------------
    @staticmethod
    def _resolve(
        changes: Sequence[Change],
        stored: dict[tuple[str, str], _Stored],
        watermarks: dict[str, int],
        stats: ApplyStats,
    ) -> list[_Intent]:
        by_doc: dict[tuple[str, str], list[Change]] = defaultdict(list)
        for change in changes:
            by_doc[(change.table, change.doc_key)].append(change)
        intents = []
        for key, doc_changes in by_doc.items():
            current = stored.get(key)
            version = current.version if current else (-1, -1)
            deleted = current.deleted if current else True
            # A hidden document keeps its row, so a later event's TOAST gaps can be filled.
            known = current is not None and (not current.deleted or current.hidden)
            row: dict[str, Any] | None = current.row if known and current else None
            last_position = (
                (current.topic, current.partition, current.version[1]) if current else None
            )
            truncated_at = watermarks.get(key[0], -1)
            intent: _Intent | None = None
            commit_times: list[datetime] = []
            for change in doc_changes:
                pos = change.position
                if change.kind is Kind.TOMBSTONE:
                    stats.tombstones += 1
                    if tombstone_acts(pos, last_position, deleted):
                        if intent is not None:
                            stats.superseded += 1
                        intent = _Intent(key, change, delete=True)
                        deleted, row = True, None
                    continue
                if is_stale(change.version, version, truncated_at):
                    stats.stale += 1
                    continue
                if intent is not None:
                    stats.superseded += 1
                version = change.version
                last_position = (pos.topic, pos.partition, pos.offset or 0)
                if change.commit_time is not None and not change.snapshot:
                    commit_times.append(change.commit_time)
                if change.kind is Kind.DELETE:
                    intent = _Intent(key, change, delete=True)
                    deleted, row = True, None
                elif change.kind is Kind.OVERSIZED:
                    reason = (
                        f"the change event of this row is {change.oversized_bytes:,} bytes, over"
                        f" the limit of {change.size_limit:,} (FRESHET_MAX_EVENT_BYTES)"
                    )
                    intent = _Intent(key, change, delete=True, row=row, hide=reason)
                    deleted = True
                else:
                    row = complete_row(change.row or {}, row)
                    intent = _Intent(key, change, delete=False, row=row)
                    deleted = False
            if intent is not None:
                intent.changes = doc_changes
                intent.commit_times = commit_times
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
                if intent.hide:
                    stats.dead.append(dead_letter(intent.last, "size", intent.hide))
                continue
            try:
                self._plan_upsert(intent, old, stats)
            except Exception as exc:
                if transient_db_error(exc):
                    raise
                self._hide_for(intent, old, exc, stats)
                continue
            if self.defer_above is not None and len(intent.to_embed) > self.defer_above:
                intent.skip = True
                stats.deferred.extend(intent.changes)

    def _plan_upsert(
        self, intent: _Intent, old: list[tuple[int, int, str]], stats: ApplyStats
    ) -> None:
        mapping = intent.last.mapping
        assert intent.row is not None
        missing = unavailable_columns(mapping, intent.row)
        if missing and self.source is not None:
            current = self.source.fetch(mapping, intent.row, missing)
            if current is None:
                # The row is gone from the source: its delete is behind this event.
                intent.skip = True
                stats.superseded += 1
                return
            intent.row = {**intent.row, **current}
        intent.document = mapping.map_row(intent.row, doc_key=intent.key[1])
        for column, problem in intent.document.problems:
            stats.problems.add(mapping.table, column, problem, intent.key[1])
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

    @staticmethod
    def _hide_for(
        intent: _Intent, old: list[tuple[int, int, str]], exc: Exception, stats: ApplyStats
    ) -> None:
        """The row cannot be mapped or chunked: a dead letter, and the document is hidden
        (fail closed: stale text or stale access groups are never served)."""
        stats.dead.append(dead_letter(intent.last, "map", exc))
        column = exc.column if isinstance(exc, MappingError) else None
        if column is not None:
            stats.problems.add(intent.key[0], column, str(exc), intent.key[1])
        intent.delete = True
        intent.hide = f"{type(exc).__name__}: {exc}"[:2000]
        intent.document = None
        intent.stale_ids = [chunk_id for chunk_id, _, _ in old]

    def _embed(self, intents: list[_Intent], stats: ApplyStats) -> None:
        """One embedding call for the whole batch; per document again if that call fails."""
        pending = [i for i in intents if i.document is not None and i.to_embed]
        texts = [i.chunks[n].text for i in pending for n in i.to_embed]
        if not texts:
            return
        try:
            stats.embed_calls += 1
            vectors = self.embedder.embed(texts)
        except Exception as exc:  # noqa: BLE001 - isolate the document that fails below
            logger.warning("batch embedding failed (%s); retrying per document", exc)
            for intent in pending:
                try:
                    stats.embed_calls += 1
                    own = self.embedder.embed([intent.chunks[n].text for n in intent.to_embed])
                except Exception as inner:  # noqa: BLE001 - becomes a dead letter
                    stats.dead.append(dead_letter(intent.last, "embed", inner))
                    intent.document = None
                    intent.skip = True
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
        self._embed_shadow(pending, texts)

    def _embed_shadow(self, pending: list[_Intent], texts: list[str]) -> None:
        """While a re-embed builds a shadow: the same texts with its model. A failure leaves
        the shadow vectors empty (`freshet reembed` fills them), never fails the change."""
        shadow = self.models.shadow if self.models is not None else None
        if shadow is None:
            return
        try:
            vectors = shadow.embed(texts)
        except Exception as exc:  # noqa: BLE001 - the re-embed's backfill catches up
            logger.warning("shadow embedding failed (%s); freshet reembed will fill it", exc)
            return
        cursor = 0
        for intent in pending:
            for n in intent.to_embed:
                intent.shadow_vectors[n] = vectors[cursor]
                cursor += 1

    # --- writing ---------------------------------------------------------------------
    def _write_all(
        self,
        conn: psycopg.Connection,
        intents: list[_Intent],
        stored: dict[tuple[str, str], _Stored],
        stats: ApplyStats,
    ) -> None:
        """Every document of the batch in a few statements inside one savepoint; if any of
        them fails, document by document, each in its own savepoint (a dead letter for the one
        that fails)."""
        live = [i for i in intents if not i.skip]
        if len(live) > 1:
            together = ApplyStats()
            try:
                with conn.transaction():  # a savepoint: the whole batch
                    self._write_together(conn, live, stored, together)
            except Exception as exc:
                if transient_db_error(exc):
                    raise
                logger.warning(
                    "writing %d documents together failed (%s: %s); writing them one by one",
                    len(live),
                    type(exc).__name__,
                    str(exc).splitlines()[0] if str(exc) else "",
                )
            else:
                for name in ("applied", "deleted", "hidden", "chunks_written", "chunks_deleted"):
                    setattr(stats, name, getattr(stats, name) + getattr(together, name))
                stats.committed.extend(together.committed)
                return
        for intent in live:
            self._write(conn, intent, stored.get(intent.key), stats)

    def _write_together(
        self,
        conn: psycopg.Connection,
        intents: list[_Intent],
        stored: dict[tuple[str, str], _Stored],
        stats: ApplyStats,
    ) -> None:
        stale = [chunk_id for intent in intents for chunk_id in intent.stale_ids]
        if stale:
            conn.execute("DELETE FROM rag.chunks WHERE id = ANY(%s)", (stale,))
            stats.chunks_deleted += len(stale)
        deletes = [i for i in intents if i.delete]
        gone = [
            current.id
            for i in deletes
            if i.last.kind is Kind.TOMBSTONE and (current := stored.get(i.key)) is not None
        ]
        if gone:
            conn.execute(_TOMBSTONE_DOCUMENTS, (gone,))
        marked = [i for i in deletes if i.last.kind is not Kind.TOMBSTONE]
        if marked:
            conn.cursor().executemany(_MARK_DELETED, [self._delete_params(i) for i in marked])
        for intent in deletes:
            if intent.hide and intent.last.kind is not Kind.TOMBSTONE:
                stats.hidden += 1
            else:
                stats.deleted += 1
        upserts = [i for i in intents if not i.delete]
        kept: list[tuple[Any, ...]] = []
        chunks: list[tuple[Any, ...]] = []
        shadow = any(i.shadow_vectors for i in upserts)
        if upserts:
            params = [self._upsert_params(i) for i in upserts]
            with conn.cursor() as cur:
                cur.executemany(_UPSERT_DOCUMENT, params, returning=True)
                doc_ids = []
                while True:
                    row = cur.fetchone()
                    assert row is not None
                    doc_ids.append(row[0])
                    if not cur.nextset():
                        break
            for intent, doc_id, p in zip(upserts, doc_ids, params, strict=True):
                kept.extend(self._kept_rows(intent, p))
                chunks.extend(self._chunk_rows(intent, doc_id, p, shadow=shadow))
                stats.chunks_written += len(intent.vectors)
        if kept:
            conn.cursor().executemany(_UPDATE_KEPT_CHUNK, kept)
        if chunks:
            columns = _CHUNK_COLUMNS + ((SHADOW_COLUMN,) if shadow else ())
            with (
                conn.cursor() as cur,
                cur.copy(
                    f"COPY rag.chunks ({', '.join(columns)}) FROM STDIN (FORMAT BINARY)"
                ) as copy,
            ):
                copy.set_types(_CHUNK_TYPES + (("vector",) if shadow else ()))
                for chunk in chunks:
                    copy.write_row(chunk)
        for intent in intents:
            stats.applied += 1
            stats.committed.extend((intent.key[0], t) for t in intent.commit_times)

    def _write(
        self, conn: psycopg.Connection, intent: _Intent, current: _Stored | None, stats: ApplyStats
    ) -> None:
        if intent.skip:
            return
        try:
            with conn.transaction():  # a savepoint: this document only
                if intent.delete:
                    self._write_delete(conn, intent, current, stats)
                else:
                    self._write_upsert(conn, intent, stats)
        except Exception as exc:
            if transient_db_error(exc):
                raise
            stats.dead.append(dead_letter(intent.last, "write", exc))
            return
        stats.applied += 1
        stats.committed.extend((intent.key[0], t) for t in intent.commit_times)

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

    def _delete_params(self, intent: _Intent) -> dict[str, Any]:
        """The document row of a deleted or hidden document (not a tombstone's)."""
        params = self._version_params(intent.last)
        mapping = intent.last.mapping
        kept_row = {c: v for c, v in (intent.row or {}).items() if c in mapping.columns}
        params.update(hidden=intent.hide, row=Jsonb(kept_row if intent.hide else {}))
        return params

    def _upsert_params(self, intent: _Intent) -> dict[str, Any]:
        doc = intent.document
        assert doc is not None
        params = self._version_params(intent.last)
        params.update(
            title=doc.title,
            metadata=Jsonb(doc.metadata),
            chunk_metadata=Jsonb(dict(doc.metadata, title=doc.title)),
            groups=list(doc.access_groups),
            hash=hashlib.sha256(doc.text.encode()).hexdigest(),
            row=Jsonb(doc.row),
        )
        return params

    @staticmethod
    def _kept_rows(intent: _Intent, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        """Kept chunks keep their text and vector; index, metadata and groups follow the row."""
        metadata, groups = params["chunk_metadata"], params["groups"]
        return [
            (index, metadata, groups, chunk_id, index, metadata, groups)
            for index, (chunk_id, _) in intent.kept.items()
        ]

    @staticmethod
    def _chunk_rows(
        intent: _Intent, doc_id: int, params: dict[str, Any], *, shadow: bool
    ) -> list[tuple[Any, ...]]:
        """The new chunks' rows (_CHUNK_COLUMNS, then the shadow vector when ``shadow``: a
        document's shadow vectors are written only when it has one for every new chunk)."""
        doc = intent.document
        assert doc is not None
        own_shadow = len(intent.shadow_vectors) == len(intent.vectors)
        return [
            (
                doc_id,
                doc.source_table,
                doc.doc_key,
                n,
                intent.chunks[n].text,
                intent.chunks[n].hash,
                intent.vectors[n],
                params["chunk_metadata"],
                params["groups"],
                params["lsn"],
                params["ts"],
                *((intent.shadow_vectors[n] if own_shadow else None,) if shadow else ()),
            )
            for n in intent.to_embed
        ]

    def _write_delete(
        self, conn: psycopg.Connection, intent: _Intent, current: _Stored | None, stats: ApplyStats
    ) -> None:
        if intent.stale_ids:
            conn.execute("DELETE FROM rag.chunks WHERE id = ANY(%s)", (intent.stale_ids,))
            stats.chunks_deleted += len(intent.stale_ids)
        if intent.last.kind is Kind.TOMBSTONE:
            stats.deleted += 1
            if current is not None:
                conn.execute(_TOMBSTONE_DOCUMENTS, ([current.id],))
            return
        if intent.hide:
            stats.hidden += 1
        else:
            stats.deleted += 1
        conn.execute(_MARK_DELETED, self._delete_params(intent))

    def _write_upsert(self, conn: psycopg.Connection, intent: _Intent, stats: ApplyStats) -> None:
        params = self._upsert_params(intent)
        row = conn.execute(_UPSERT_DOCUMENT, params).fetchone()
        assert row is not None
        doc_id = row[0]
        if intent.stale_ids:
            conn.execute("DELETE FROM rag.chunks WHERE id = ANY(%s)", (intent.stale_ids,))
            stats.chunks_deleted += len(intent.stale_ids)
        if intent.kept:
            conn.cursor().executemany(_UPDATE_KEPT_CHUNK, self._kept_rows(intent, params))
        if intent.vectors:
            shadow = len(intent.shadow_vectors) == len(intent.vectors)
            columns = _CHUNK_COLUMNS + ((SHADOW_COLUMN,) if shadow else ())
            conn.cursor().executemany(
                f"INSERT INTO rag.chunks ({', '.join(columns)})"
                f" VALUES ({', '.join(['%s'] * len(columns))})",
                self._chunk_rows(intent, doc_id, params, shadow=shadow),
            )
            stats.chunks_written += len(intent.vectors)
        elif not intent.stale_ids:
            stats.metadata_only += 1
