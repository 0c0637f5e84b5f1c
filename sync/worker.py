"""`freshet sync`: one member of the consumer group `rag-sync`.

The Kafka side (poll, produce, flush, commit, backoff, stop) is the consumer runtime's
(freshet/consumer.py, `ConsumerRuntime.run` states the contract); this worker is its handler
and its specifics. Per polled batch (at-least-once delivery + idempotent writes = each change
applied exactly once in effect):
  1. route the records (decode, map); a record that cannot be read becomes a dead letter,
     whatever the reason (nothing a record contains can stop its partition);
  2. database transactions of whole documents (a large batch in several, each of about
     FRESHET_SYNC_TXN_SECONDS of embedding: sync/pacing.py): apply every change
     (sync/writer.py) and insert the batch's dead letters into rag.dead_letters; commit. A
     large record goes to the large lane instead (sync/lane.py), with every later change of
     its document;
  3. the runtime produces the dead letters to the topic freshet.sync.dlq (the runtime's
     dead-letter envelope) and flushes the producer;
  4. the runtime commits the batch's Kafka offsets, in each partition only up to its first
     record still in the large lane (`hold`; the rest are committed once the lane has applied
     them, between batches).
A crash between 2 and 4 redelivers the batch, which the version check turns into no-ops. Offsets
are only ever committed in step 4, after the data they cover is committed, so a rebalance (which
runs inside poll, between batches) has nothing uncommitted to lose. Every call to Kafka or
PostgreSQL is retried with jittered backoff until it succeeds or the worker is told to stop
(freshet/retry.py), so an outage of any length is waited out; a database error that is about
the data, not the connection, re-applies the batch's records one at a time, so one poison
record becomes a dead letter instead of blocking its partition.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition

from freshet import embedder as embedding
from freshet import index_model
from freshet.consumer import DLQ_SUFFIX, KAFKA_ERRORS, ConsumerRuntime, Handled, Output
from freshet.db import connect, database_url, source_database_url
from freshet.embedder import Embedder
from freshet.index_model import ModelSwitched
from freshet.retry import Backoff, Stopped, retry, transient_db_error
from freshet.settings import Settings
from freshet.sync import chunk_stream, deadletters, lag
from freshet.sync.changes import Change, KafkaRecord, Kind, Rejected, Router, topic_pattern
from freshet.sync.chunking import Chunker, TokenChunker
from freshet.sync.index_models import IndexModels
from freshet.sync.lane import EmbedGate, LargeLane
from freshet.sync.mapping import Mappings
from freshet.sync.metrics import SyncMetrics
from freshet.sync.pacing import Pacer, documents_in
from freshet.sync.prefetch import Prefetch, Prefetched
from freshet.sync.source_rows import SourceRows
from freshet.sync.verify import last_run as last_verify
from freshet.sync.writer import ApplyStats, Writer, dead_letter

logger = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 2.0


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, worker: SyncWorker) -> None:
        self.worker = worker

    def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        # Batches are committed before poll() returns control here (the runtime has forgotten
        # the partitions' offsets already); what the large lane still holds is not committed,
        # so the partition's next owner applies it again (a no-op if the lane got there first).
        logger.info("partitions revoked: %s", _names(revoked))
        self.worker.on_revoked(list(revoked))

    def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        logger.info("partitions assigned: %s", _names(assigned))
        self.worker.metrics.set_assignment([f"{tp.topic}[{tp.partition}]" for tp in assigned])
        self.worker.on_assigned(list(assigned))


def _names(partitions: Sequence[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(partitions)) or "none"


@dataclass
class SyncWorker:
    settings: Settings
    embedder: Embedder
    chunker: Chunker
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    progress: Callable[[int, int], None] | None = None
    # The model `embedder` is (the index's: freshet/index_model.py); None: EMBEDDING_MODEL.
    model_name: str | None = None

    def __post_init__(self) -> None:
        self.router = Router(Mappings.load(self.settings.mappings_path), self.settings.topic_prefix)
        self.source = SourceRows(
            lambda: connect(source_database_url(self.settings), autocommit=True)
        )
        self.gate = EmbedGate(self.embedder)
        self.prefetch = Prefetch(
            self._pending_texts,
            lambda texts: self.gate.foreground().embed(texts),
            lambda: connect(database_url(self.settings), autocommit=True, vector=True),
        )
        self.models = IndexModels(
            self.settings,
            self.model_name or self.settings.embedding_model,
            lambda name: embedding.embedder_from_settings(self.settings, model=name),
        )
        self.writer = Writer(
            Prefetched(self.gate.foreground(), self.prefetch), self.chunker, self.source
        )
        self.writer.models = self.models
        self._ahead: Writer | None = None
        self.metrics = SyncMetrics(self.worker_id)
        self.pacer = Pacer(self.settings.sync_txn_seconds)
        self.lane: LargeLane | None = None
        self._conn: psycopg.Connection | None = None
        self._stop = threading.Event()
        self._last_heartbeat = 0.0
        self._started = time.monotonic()
        self._backlog: int | None = None
        self._to_size: list[TopicPartition] = []
        self._done = 0
        self._lag_probe: lag.LagProbe | None = None  # dates the lag (freshet.sync.lag)
        s = self.settings
        # Poll, produce, flush, commit: the runtime, with this worker as its handler.
        self.runtime = ConsumerRuntime(
            name="sync",
            bootstrap_servers=s.bootstrap_servers,
            dead_letter_topic=deadletters.DLQ_TOPIC,
            new_consumer=self._new_consumer,
            handler=self._handle,
            pattern=topic_pattern(s.topic_prefix),
            poll_ms=200,
            max_records=s.sync_batch,
            hold=self._held,
            listener=_Rebalance(self),
            after=self._account,
            between=self._between,
            refused_note="; it is kept in rag.dead_letters",
            max_request_bytes=(chunk_stream.MAX_MESSAGE_BYTES if s.publish_chunks else 1_048_576),
            commit_async=True,  # a batch does not wait for the broker to store its offsets
        )

    @property
    def _consumer(self) -> KafkaConsumer | None:
        return self.runtime.consumer

    # --- lifecycle -------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        self._stop = stop
        self._started = time.monotonic()
        s = self.settings
        try:
            self._conn = self._connect(stop)
            self.runtime.connect(stop)
            if s.publish_chunks:
                retry(
                    lambda: chunk_stream.ensure_topic(s.bootstrap_servers),
                    what=f"creating topic {chunk_stream.TOPIC}",
                    stop=stop,
                    transient=KAFKA_ERRORS,
                )
            self._start_lane(stop)
            logger.info("sync worker %s joined group %s", self.worker_id, s.sync_group)
            for table in self.router.mappings.tables:
                if table.endswith(DLQ_SUFFIX):
                    logger.error(
                        "table %s is mapped but never read: a topic ending in %s is a dead-letter"
                        " topic, which no worker subscribes to; rename the table",
                        table,
                        DLQ_SUFFIX,
                    )
            # Poll, process (self._handle, then dead letters and offsets), self._between.
            self.runtime.run(stop)
        except Stopped:
            logger.info("sync worker %s: stopping while waiting for a service", self.worker_id)
        except ModelSwitched as exc:
            logger.warning("sync worker %s: %s; restarting with it", self.worker_id, exc)
            self._heartbeat("restarting", force=True)
            raise
        except BaseException as exc:
            self.metrics.last_error = f"{type(exc).__name__}: {exc}"[:2000]
            self._heartbeat("died", force=True)
            raise
        else:
            self._heartbeat("stopped", force=True)
        finally:
            self._close()
            logger.info("sync worker %s stopped", self.worker_id)

    def _new_consumer(self) -> KafkaConsumer:
        """The group member's consumer; the runtime subscribes it to `topic_pattern`."""
        s = self.settings
        return KafkaConsumer(
            bootstrap_servers=s.bootstrap_servers,
            group_id=s.sync_group,
            # Static membership: a worker restarted within the session timeout (kill -9, a
            # crash, the supervisor) gets its partitions back at once, without a rebalance.
            group_instance_id=s.sync_instance_id or None,
            client_id=self.worker_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=s.sync_batch,
            fetch_max_wait_ms=s.sync_fetch_wait_ms,
            max_poll_interval_ms=600_000,
            # A member that dies (kill -9, a lost machine) gives its partitions up after 10 s
            # instead of kafka-python's 45 s; heartbeats run on their own thread every 3 s.
            session_timeout_ms=10_000,
            heartbeat_interval_ms=3_000,
            metadata_max_age_ms=5_000,  # new captured tables are picked up within seconds
            # A change event may be as large as the pipeline's limit (FRESHET_MAX_EVENT_BYTES).
            max_partition_fetch_bytes=s.max_event_bytes + (1 << 20),
            fetch_max_bytes=max(52_428_800, s.max_event_bytes + (1 << 20)),
        )

    def _start_lane(self, stop: threading.Event) -> None:
        if self.settings.sync_large_event_bytes <= 0 or not hasattr(self.chunker, "tokenizer"):
            return
        # A tokenizer is not safe on two threads: the embedder keeps the model's own (used only
        # through the gate), and each lane chunks with a copy of it.
        self.writer.chunker = _own_tokenizer(self.chunker)
        self.writer.defer_above = self.settings.sync_large_embeddings
        cache: dict[str, Any] = {}
        background = self.gate.background(cache)
        # The lane's writer checks the index's model too, but writes no shadow vectors (the
        # shadow model runs on the main thread only; `freshet reembed` fills those).
        lane_models = IndexModels(self.settings, self.models.active, self.models.load)
        lane_models.shadow_writes = False
        self.lane = LargeLane(
            Writer(background, _own_tokenizer(self.chunker), self.source, models=lane_models),
            cache,
            lambda: connect(database_url(self.settings), autocommit=True, vector=True),
            stop,
        )
        background.abandon = self.lane.superseded
        self.lane.start()

    def _close(self) -> None:
        self.prefetch.close()
        if self.lane is not None:
            self.lane.join(timeout=10)
        # The runtime's consumer leaves the group: its partitions move at once.
        closers: list[Callable[[], object]] = [self.source.close, self.runtime.close]
        if self._lag_probe is not None:
            closers.append(self._lag_probe.close)
        if self._conn is not None:
            closers.append(self._conn.close)
        for close in closers:
            try:
                close()
            except Exception as exc:  # noqa: BLE001 - closing what may be gone already
                logger.debug("closing: %s", exc)
        # Last, once the partitions have moved: a model still loading in the background
        # (a worker stopped within seconds of its start) is waited for, so that the process
        # exits with its own code rather than aborting in torch.
        self.embedder.close()

    def _connect(self, stop: threading.Event) -> psycopg.Connection:
        url = database_url(self.settings)
        return retry(
            lambda: connect(url, autocommit=True, vector=True),
            what="connecting to PostgreSQL",
            stop=stop,
            transient=(psycopg.OperationalError,),
            backoff=Backoff(initial=0.5),
        )

    def on_assigned(self, assigned: list[TopicPartition]) -> None:
        """Note the first assignment; its backlog is sized after the poll returns (`_between`):
        the rebalance listener runs on the Kafka client's I/O thread, where a blocking call
        such as end_offsets fails."""
        if self._backlog is None and assigned and not self._to_size:
            self._to_size = list(assigned)

    def _size_backlog(self) -> None:
        """Size the first assignment's backlog once, for the initial-snapshot progress bar."""
        assigned, self._to_size = self._to_size, []
        if not assigned or self._consumer is None:
            return
        try:
            ends = self._consumer.end_offsets(assigned, timeout_ms=5000)
            committed = {tp: self._consumer.committed(tp, timeout_ms=5000) or 0 for tp in assigned}
        except Exception as exc:  # noqa: BLE001 - progress is a nicety
            logger.debug("cannot size the backlog: %s", exc)
            return
        # Sized after the first batch was applied and committed: count that batch in.
        remaining = sum(max(0, ends[tp] - committed[tp]) for tp in assigned)
        self._backlog = remaining + self._done if remaining else 0
        if self._backlog:
            logger.info("backlog of %d records to index", self._backlog)

    def on_revoked(self, revoked: list[TopicPartition]) -> None:
        self.metrics.set_assignment([])
        if self.lane is not None:
            self.lane.drop((tp.topic, tp.partition) for tp in revoked)

    # --- one batch -------------------------------------------------------------------
    def process(self, records: Sequence[KafkaRecord], stop: threading.Event | None = None) -> None:
        """One batch through the runtime: `_handle`, its dead letters produced and flushed,
        its offsets committed (when the worker is connected), then `_account`."""
        self.runtime.process(records, stop or self._stop)

    def _handle(self, records: Sequence[KafkaRecord], stop: threading.Event) -> Handled:
        """The runtime's handler: route, apply in one transaction, defer large records."""
        routed = self.router.route(records)
        changes = self._keep_or_defer(routed.changes)
        # A large batch goes in several transactions of whole documents (sync/pacing.py), so
        # its first changes are searchable before the last ones are embedded.
        stats = ApplyStats()
        published: list[Output] = []
        parts = self.pacer.split(changes) or [[]]
        overlap = self.settings.sync_overlap and len(parts) > 1
        for i, part in enumerate(parts):
            following = parts[i + 1] if overlap and i + 1 < len(parts) else None
            if overlap:
                self.prefetch.take()  # what was embedded for this part meanwhile

            def ahead(following: list[Change] | None = following) -> None:
                if following:
                    self.prefetch.start(following)

            done = self._apply_with_retry(
                part, routed.rejected if i == 0 else [], stop, on_embedded=ahead
            )
            if self.settings.publish_chunks:  # the chunk stream, after the commit
                later = {(c.table, c.doc_key) for c in done.deferred}
                keys = chunk_stream.touched(part, done.truncated_keys) - later
                published += self._chunk_messages(keys, stop)
            self.pacer.observe(documents_in(part), done.embed_seconds)
            if len(parts) > 1:
                logger.debug(
                    "transaction %d of %d committed: %d documents, embed %.0f ms (%d texts)",
                    i + 1,
                    len(parts),
                    documents_in(part),
                    done.embed_seconds * 1000,
                    done.embeddings,
                )
            for change in done.deferred:  # documents that turned out large: to the lane
                assert self.lane is not None
                self.lane.submit(change)
            self._observe(done)
            _merge(stats, done)
        if overlap:
            self.prefetch.cache = {}
        dead = routed.rejected + stats.dead
        return Handled.all_of(records, published + _letters(dead), detail=(routed, stats))

    def _pending_texts(self, conn: Any, changes: Sequence[Change]) -> list[str]:
        """What the next transaction will embed, asked of a writer of the prefetch thread's
        own (its own tokenizer; no source reads: a row with unavailable TOAST values is left
        to the transaction itself)."""
        if self._ahead is None:
            chunker = (
                _own_tokenizer(self.chunker) if hasattr(self.chunker, "tokenizer") else self.chunker
            )
            self._ahead = Writer(self.gate.foreground(), chunker, None)
        return self._ahead.pending_texts(conn, changes)

    def _chunk_messages(self, keys: set[tuple[str, str]], stop: threading.Event) -> list[Output]:
        """The chunk stream's messages for ``keys``, read back from the index as committed
        (sync/chunk_stream.py); waits out a database that is away."""
        if not keys:
            return []
        model = chunk_stream.Model.of(self.models.active)

        def read() -> list[Output]:
            if self._conn is None or self._conn.closed:
                self._conn = self._connect(stop)
            try:
                return chunk_stream.read_documents(self._conn, keys, model)
            except psycopg.Error as exc:
                if transient_db_error(exc) and self._conn is not None:
                    self._conn.close()
                raise

        return retry(
            read,
            what="reading documents for the chunk stream",
            stop=stop,
            transient=(psycopg.Error,),
            fatal=lambda exc: not transient_db_error(exc),
        )

    def _account(self, records: Sequence[KafkaRecord], handled: Handled, started: float) -> None:
        """After the batch is committed: its figures, and the backlog's progress."""
        routed, stats = handled.detail
        self.metrics.add(
            events=len(records),
            ignored=routed.ignored,
            dead_letters=len(routed.rejected),
            batches=1,
        )
        self.metrics.time(batch_seconds=time.perf_counter() - started)
        if logger.isEnabledFor(logging.DEBUG):
            self._log_batch(records, routed.changes, stats, started)
        before, self._done = self._done, self._done + len(records)
        # Until the first backlog is indexed; later batches are the live stream, not progress.
        if self.progress is not None and self._backlog and before < self._backlog:
            self.progress(min(self._done, self._backlog), self._backlog)

    def _between(self, stop: threading.Event) -> None:
        """After every poll: the first backlog's size, what the large lane finished, and the
        heartbeat."""
        if self._to_size and self._done:  # not before the first batch: that waits for nothing
            self._size_backlog()
        self._finish_lane_work(stop)
        if self._conn is not None and not self._conn.closed:
            try:
                self.models.check_idle(self._conn)  # raises ModelSwitched
            except psycopg.Error as exc:
                logger.debug("reading the index's model: %s", exc)
        self._heartbeat("running")

    def _held(self, tp: TopicPartition) -> int | None:
        """The first offset of the partition the large lane still holds (not committed)."""
        return self.lane.first_pending(tp.topic, tp.partition) if self.lane else None

    def _keep_or_defer(self, changes: list[Change]) -> list[Change]:
        """The changes for the main loop now; large records, and every later change of a
        document already in the large lane, go to the lane (in record order)."""
        if self.lane is None:
            return changes
        limit = self.settings.sync_large_event_bytes
        now = []
        for change in changes:
            large = change.kind is Kind.UPSERT and len(change.raw_value or b"") > limit
            if large or (
                change.kind is not Kind.TRUNCATE and self.lane.holds(change.table, change.doc_key)
            ):
                self.lane.submit(change)
            else:
                now.append(change)
        return now

    def _observe(self, stats: ApplyStats) -> None:
        committed_at = time.time()
        for table, commit_time in stats.committed:
            self.metrics.observe_freshness(table, committed_at - commit_time.timestamp())
        self.metrics.add(
            applied=stats.applied,
            stale=stats.stale,
            superseded=stats.superseded,
            deleted=stats.deleted,
            tombstones=stats.tombstones,
            hidden=stats.hidden,
            truncated=stats.truncated,
            dead_letters=len(stats.dead),
            embeddings=stats.embeddings,
            embed_calls=stats.embed_calls,
            chunks_written=stats.chunks_written,
            chunks_deleted=stats.chunks_deleted,
            metadata_only=stats.metadata_only,
            mapping_problems=len(stats.problems),
        )
        self.metrics.time(
            plan_seconds=stats.plan_seconds,
            embed_seconds=stats.embed_seconds,
            write_seconds=stats.write_seconds,
        )

    def _finish_lane_work(self, stop: threading.Event) -> None:
        """Account for what the large lane applied, and commit the offsets it released."""
        if self.lane is None:
            return
        done = self.lane.completed()
        letters: list[Output] = []
        for item in done:
            self._observe(item.stats)
            letters.extend(_letters(item.stats.dead))
        if done and self.settings.publish_chunks:
            keys = {(item.change.table, item.change.doc_key) for item in done}
            letters = self._chunk_messages(keys, stop) + letters
        if done:
            self.runtime.complete(Handled(letters), stop)

    @staticmethod
    def _log_batch(
        records: Sequence[KafkaRecord], changes: list[Any], stats: ApplyStats, started: float
    ) -> None:
        """Where a batch's time went: source commit -> Kafka -> this worker -> index."""
        now = time.time()
        commits = [c.commit_time.timestamp() for c in changes if c.commit_time is not None]
        # Kafka's append (or producer) time of each record; test doubles may not carry one.
        stamps = [t / 1000 for r in records if (t := getattr(r, "timestamp", None))]
        polled = now - (time.perf_counter() - started)
        logger.debug(
            "batch of %d records: oldest commit %.0f ms before poll (Kafka append after %.0f"
            " ms); plan %.0f ms, embed %.0f ms (%d texts), write %.0f ms",
            len(records),
            (polled - min(commits)) * 1000 if commits else -1,
            (min(stamps) - min(commits)) * 1000 if commits and stamps else -1,
            stats.plan_seconds * 1000,
            stats.embed_seconds * 1000,
            stats.embeddings,
            stats.write_seconds * 1000,
        )

    def _apply_with_retry(
        self,
        changes: list[Change],
        rejected: list[Rejected],
        stop: threading.Event,
        on_embedded: Callable[[], None] | None = None,
    ) -> ApplyStats:
        backoff = Backoff()
        while True:
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = self._connect(stop)
                return self._apply(changes, rejected, on_embedded)
            except ModelSwitched:
                raise  # nothing was written: the rebuilt worker applies the batch again
            except Exception as exc:
                if transient_db_error(exc):
                    self.metrics.last_error = f"database: {exc}"[:2000]
                    logger.warning("database error (%s); retrying the batch", exc)
                    if stop.wait(backoff.delay()):
                        raise Stopped("applying a batch") from exc
                    if self._conn is not None:
                        self._conn.close()
                    self._conn = self._connect(stop)
                    continue
                if len(changes) <= 1:
                    # One change that cannot be applied: it becomes a dead letter.
                    stats = ApplyStats(dead=[dead_letter(c, "write", exc) for c in changes])
                    self._store_only(rejected + stats.dead, stop)
                    return stats
                logger.warning(
                    "batch failed (%s: %s); applying its records one at a time",
                    type(exc).__name__,
                    exc,
                )
                total = ApplyStats()
                for i, change in enumerate(changes):
                    part = self._apply_with_retry([change], rejected if i == 0 else [], stop)
                    _merge(total, part)
                return total

    def _apply(
        self,
        changes: list[Change],
        rejected: list[Rejected],
        on_embedded: Callable[[], None] | None = None,
    ) -> ApplyStats:
        assert self._conn is not None
        with self._conn.transaction():
            stats = self.writer.apply(self._conn, changes, on_embedded)
            deadletters.store(self._conn, rejected + stats.dead)
        return stats

    def _store_only(self, dead: list[Rejected], stop: threading.Event) -> None:
        def store() -> None:
            if self._conn is None or self._conn.closed:
                self._conn = self._connect(stop)
            with self._conn.transaction():
                deadletters.store(self._conn, dead)

        retry(
            store,
            what="storing dead letters",
            stop=stop,
            transient=(psycopg.Error,),
            fatal=lambda exc: not transient_db_error(exc),
        )

    # --- visibility ------------------------------------------------------------------
    def _measure_lag(self, assigned: list[TopicPartition]) -> None:
        """Records behind the end of each assigned partition, now; their tables' lag in
        seconds is dated by the lag probe's thread (freshet.sync.lag.LagProbe), which
        publishes it within a second. While Kafka cannot answer, the last figures stay and the
        heartbeat says why."""
        consumer = self._consumer
        assert consumer is not None
        try:
            ends = consumer.end_offsets(assigned, timeout_ms=2000)
            behind: dict[TopicPartition, int] = {}
            applied: dict[TopicPartition, int] = {}
            for tp in assigned:
                # Records the large lane still holds are not applied yet: count from the first.
                held = self._held(tp)
                applied[tp] = consumer.position(tp, 2000) if held is None else held
                behind[tp] = max(0, ends[tp] - applied[tp])
        except KAFKA_ERRORS as exc:
            self.metrics.last_error = f"Kafka: cannot measure lag: {exc}"[:2000]
            return
        self.metrics.lag = {f"{tp.topic}[{tp.partition}]": n for tp, n in behind.items()}
        if self._lag_probe is None:
            self._lag_probe = lag.LagProbe(
                lambda: lag.peek_consumer(self.settings.bootstrap_servers, self.worker_id),
                self._publish_lag,
                self._lag_failed,
            )
        self._lag_probe.submit(behind, applied)

    def _publish_lag(self, behind: Any, oldest: Any) -> None:
        """The lag probe's figures, per table (called on its thread)."""
        tables = lag.per_table(behind, oldest, self.settings.topic_prefix)
        self.metrics.set_table_lag({t: v.as_dict() for t, v in tables.items()})

    def _lag_failed(self, exc: BaseException) -> None:
        self.metrics.last_error = f"Kafka: cannot measure lag: {exc}"[:2000]

    def _lag_due(self, now: float) -> bool:
        """Whether a heartbeat measures the lag: not before a new worker's first batch (for
        up to a heartbeat's interval), whose partitions' positions are still being read and
        whose first changes wait for nothing else (recovery)."""
        return bool(self._done) or now - self._started >= HEARTBEAT_SECONDS

    def _heartbeat(self, state: str, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_heartbeat < HEARTBEAT_SECONDS:
            return
        self._last_heartbeat = now
        consumer, conn = self._consumer, self._conn
        if conn is None or conn.closed:
            return
        try:
            assigned = list(consumer.assignment()) if consumer is not None else []
            if not assigned:
                self.metrics.lag = {}
                if self._lag_probe is not None:  # after what it may still be reading
                    self._lag_probe.submit({}, {})
                else:
                    self.metrics.set_table_lag({})
            elif state == "running" and self._lag_due(now):
                self._measure_lag(assigned)
            self.metrics.verify = last_verify(conn)
            snap = self.metrics.snapshot()
            counters = snap["counters"]
            lane = self.lane
            conn.execute(
                "INSERT INTO rag.workers (worker_id, group_id, hostname, pid, state,"
                " heartbeat_at, events_applied, events_skipped, embeddings, events_per_sec, lag,"
                " progress, last_error, last_error_at)"
                " VALUES (%s, %s, %s, %s, %s, now(), %s, %s, %s, %s, %s, %s, %s,"
                " CASE WHEN %s::text IS NULL THEN NULL ELSE now() END)"
                " ON CONFLICT (worker_id) DO UPDATE SET state = EXCLUDED.state,"
                " heartbeat_at = now(), events_applied = EXCLUDED.events_applied,"
                " events_skipped = EXCLUDED.events_skipped, embeddings = EXCLUDED.embeddings,"
                " events_per_sec = EXCLUDED.events_per_sec, lag = EXCLUDED.lag,"
                " progress = EXCLUDED.progress, last_error = EXCLUDED.last_error,"
                " last_error_at = coalesce(EXCLUDED.last_error_at, rag.workers.last_error_at)",
                (
                    self.worker_id,
                    self.settings.sync_group,
                    socket.gethostname(),
                    os.getpid(),
                    state,
                    counters["applied"],
                    counters["stale"],
                    counters["embeddings"],
                    snap["events_per_sec"],
                    json.dumps(snap["lag"]),
                    json.dumps(
                        {
                            "counters": counters,
                            "timers": snap["timers"],
                            "freshness": snap["freshness"],
                            "lag_tables": snap["lag_tables"],
                            "large_lane": None
                            if lane is None or lane.current is None
                            else f"{lane.current.table} {lane.current.doc_key}",
                        }
                    ),
                    snap["last_error"],
                    snap["last_error"],
                ),
            )
        except Exception as exc:  # noqa: BLE001 - a heartbeat never kills the worker
            logger.warning("heartbeat failed: %s", exc)


def _letters(dead: Sequence[Rejected]) -> list[Output]:
    """The dead-letter topic's messages for rejected records (the runtime's envelope)."""
    return [
        Output(deadletters.DLQ_TOPIC, *deadletters.dlq_message(r), dead_letter=True) for r in dead
    ]


def _own_tokenizer(chunker: Chunker) -> Chunker:
    """The chunker with a private copy of its tokenizer."""
    clone = copy.copy(chunker)
    clone.tokenizer = copy.deepcopy(chunker.tokenizer)  # type: ignore[attr-defined]
    return clone


def _merge(total: ApplyStats, part: ApplyStats) -> None:
    for name in (
        "applied",
        "stale",
        "superseded",
        "deleted",
        "tombstones",
        "metadata_only",
        "hidden",
        "truncated",
        "embeddings",
        "chunks_written",
        "chunks_deleted",
    ):
        setattr(total, name, getattr(total, name) + getattr(part, name))
    total.committed.extend(part.committed)
    total.embed_calls += part.embed_calls
    total.plan_seconds += part.plan_seconds
    total.embed_seconds += part.embed_seconds
    total.write_seconds += part.write_seconds
    total.dead.extend(part.dead)
    total.deferred.extend(part.deferred)
    total.truncated_keys.extend(part.truncated_keys)
    total.problems.merge(part.problems)


def build_worker(settings: Settings, embedder: Embedder | None = None) -> SyncWorker:
    """A worker with the configured embedder and a chunker using the model's tokenizer."""
    # The index's model: EMBEDDING_MODEL unless `freshet reembed` switched it.
    state = index_model.current(settings)
    name = state.active(settings) if state is not None else settings.embedding_model
    # Consuming starts on the cached compiled model while the full one loads (recovery).
    embedder = embedder or embedding.embedder_from_settings(
        settings, model_in_background=True, model=name
    )
    tokenizer = getattr(embedder, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("the embedder has no tokenizer to chunk with")
    return SyncWorker(settings, embedder, TokenChunker(tokenizer), model_name=name)


def progress_printer() -> Callable[[int, int], None]:
    """A progress bar with ETA on a terminal; a log line every 10 s otherwise."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar: dict[str, Any] = {}

        def update_bar(done: int, total: int) -> None:
            if "bar" not in bar:
                bar["bar"] = tqdm(total=total, unit="rec", desc="indexing backlog")
            bar["bar"].n = done
            bar["bar"].refresh()
            if done >= total:
                bar["bar"].close()

        return update_bar
    last = [0.0]
    started = time.monotonic()
    finished = [False]

    def log_progress(done: int, total: int) -> None:
        now = time.monotonic()
        if finished[0] or (now - last[0] < 10 and done < total):
            return
        last[0], finished[0] = now, done >= total
        rate = done / max(now - started, 1e-9)
        eta = (total - done) / rate if rate > 0 else float("inf")
        logger.warning("indexed %d/%d backlog records (%.0f/s, ETA %.0fs)", done, total, rate, eta)

    return log_progress
