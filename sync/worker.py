"""`freshet sync`: one member of the consumer group `rag-sync`.

Delivery contract, per polled batch (at-least-once delivery + idempotent writes = each change
applied exactly once in effect):
  1. route the records (decode, map); undecodable ones become dead letters;
  2. one database transaction: apply every change (sync/writer.py) and insert the batch's dead
     letters into rag.dead_letters; commit;
  3. produce the dead letters to the topic freshet.sync.dlq and flush the producer;
  4. commit the batch's Kafka offsets.
A crash between 2 and 4 redelivers the batch, which the version check turns into no-ops. Offsets
are only ever committed in step 4, after the data they cover is committed, so a rebalance (which
runs inside poll, between batches) has nothing uncommitted to lose. A transient database error
retries the same batch with jittered exponential backoff; any other error of the batch
transaction re-applies its records one at a time, so one poison record becomes a dead letter
instead of blocking its partition.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata

from freshet.db import connect, database_url
from freshet.embedder import Embedder
from freshet.settings import Settings
from sync import deadletters
from sync.changes import KafkaRecord, Rejected, Router
from sync.chunking import Chunker, TokenChunker
from sync.mapping import Mappings
from sync.metrics import SyncMetrics
from sync.writer import ApplyStats, Writer

logger = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 2.0


def topic_pattern(prefix: str) -> str:
    """Every captured table's topic, not Debezium's control tables or heartbeats."""
    return rf"^{re.escape(prefix)}\.(?!freshet_cdc\.)[^.]+\.[^.]+$"


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, worker: SyncWorker) -> None:
        self.worker = worker

    def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        # Batches are committed before poll() returns control here, so nothing is pending.
        logger.info("partitions revoked: %s", _names(revoked))
        self.worker.metrics.set_assignment([])

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

    def __post_init__(self) -> None:
        self.router = Router(Mappings.load(self.settings.mappings_path), self.settings.topic_prefix)
        self.writer = Writer(self.embedder, self.chunker)
        self.metrics = SyncMetrics(self.worker_id)
        self._conn: psycopg.Connection | None = None
        self._consumer: KafkaConsumer | None = None
        self._producer: KafkaProducer | None = None
        self._last_heartbeat = 0.0
        self._backlog: int | None = None
        self._done = 0

    # --- lifecycle -------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        s = self.settings
        self._consumer = KafkaConsumer(
            bootstrap_servers=s.bootstrap_servers,
            group_id=s.sync_group,
            client_id=self.worker_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=s.sync_batch,
            fetch_max_wait_ms=s.sync_fetch_wait_ms,
            max_poll_interval_ms=600_000,
            metadata_max_age_ms=5_000,  # new captured tables are picked up within seconds
        )
        self._consumer.subscribe(pattern=topic_pattern(s.topic_prefix), listener=_Rebalance(self))
        self._producer = KafkaProducer(bootstrap_servers=s.bootstrap_servers, acks="all")
        self._conn = self._connect(stop)
        logger.info("sync worker %s joined group %s", self.worker_id, s.sync_group)
        try:
            while not stop.is_set():
                polled = self._consumer.poll(timeout_ms=200, max_records=s.sync_batch)
                records = [r for tp in sorted(polled) for r in polled[tp]]
                if records:
                    self.process(records, stop)
                self._heartbeat("running")
        finally:
            self._heartbeat("stopped", force=True)
            self._consumer.close()  # leaves the group: its partitions move at once
            self._producer.close(timeout=5)
            if self._conn is not None:
                self._conn.close()
            logger.info("sync worker %s stopped", self.worker_id)

    def _connect(self, stop: threading.Event) -> psycopg.Connection:
        url = database_url(self.settings)
        delay = 0.5
        deadline = time.monotonic() + 300
        while True:
            try:
                return connect(url, autocommit=True, vector=True)
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline or stop.is_set():
                    raise
                logger.warning("database unreachable (%s); retrying in %.1fs", exc, delay)
                stop.wait(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, 15)

    def on_assigned(self, assigned: list[TopicPartition]) -> None:
        """Size the backlog once, for the initial-snapshot progress bar."""
        if self._backlog is not None or not assigned or self._consumer is None:
            return
        try:
            ends = self._consumer.end_offsets(assigned)
            committed = {tp: self._consumer.committed(tp) or 0 for tp in assigned}
        except Exception as exc:  # noqa: BLE001 - progress is a nicety
            logger.debug("cannot size the backlog: %s", exc)
            return
        self._backlog = sum(max(0, ends[tp] - committed[tp]) for tp in assigned)
        if self._backlog:
            logger.info("backlog of %d records to index", self._backlog)

    # --- one batch -------------------------------------------------------------------
    def process(self, records: Sequence[KafkaRecord], stop: threading.Event | None = None) -> None:
        started = time.perf_counter()
        routed = self.router.route(records)
        stats = self._apply_with_retry(routed.changes, routed.rejected, stop)
        dead = routed.rejected + stats.dead
        committed_at = time.time()
        for table, commit_time in stats.committed:
            self.metrics.observe_freshness(table, committed_at - commit_time.timestamp())
        if dead and self._producer is not None:
            for letter in dead:
                key, value = deadletters.dlq_message(letter)
                self._producer.send(deadletters.DLQ_TOPIC, key=key, value=value)
            self._producer.flush(timeout=30)
        self._commit_offsets(records)
        self.metrics.add(
            events=len(records),
            applied=stats.applied,
            stale=stats.stale,
            superseded=stats.superseded,
            deleted=stats.deleted,
            tombstones=stats.tombstones,
            ignored=routed.ignored,
            dead_letters=len(dead),
            embeddings=stats.embeddings,
            chunks_written=stats.chunks_written,
            chunks_deleted=stats.chunks_deleted,
            metadata_only=stats.metadata_only,
            batches=1,
        )
        self.metrics.time(
            plan_seconds=stats.plan_seconds,
            embed_seconds=stats.embed_seconds,
            write_seconds=stats.write_seconds,
            batch_seconds=time.perf_counter() - started,
        )
        if logger.isEnabledFor(logging.DEBUG):
            self._log_batch(records, routed.changes, stats, started)
        self._done += len(records)
        if self.progress is not None and self._backlog:
            self.progress(min(self._done, self._backlog), self._backlog)

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
        self, changes: list[Any], rejected: list[Rejected], stop: threading.Event | None
    ) -> ApplyStats:
        delay = 0.2
        while True:
            assert self._conn is not None
            try:
                return self._apply(changes, rejected)
            except psycopg.OperationalError as exc:
                self.metrics.last_error = f"database: {exc}"
                logger.warning("database error (%s); retrying the batch in %.1fs", exc, delay)
                if stop is not None and stop.wait(delay * random.uniform(0.5, 1.5)):
                    raise
                delay = min(delay * 2, 15)
                self._conn.close()
                self._conn = self._connect(stop or threading.Event())
            except psycopg.Error as exc:
                if len(changes) <= 1:
                    # One change that the database refuses: it becomes a dead letter.
                    stats = ApplyStats()
                    for change in changes:
                        stats.dead.append(
                            Rejected(
                                change.position,
                                change.raw_key,
                                change.raw_value,
                                "write",
                                type(exc).__name__,
                                str(exc),
                            )
                        )
                    with self._conn.transaction():
                        deadletters.store(self._conn, rejected + stats.dead)
                    return stats
                logger.warning("batch failed (%s); applying its records one at a time", exc)
                total = ApplyStats()
                for i, change in enumerate(changes):
                    part = self._apply_with_retry([change], rejected if i == 0 else [], stop)
                    _merge(total, part)
                return total

    def _apply(self, changes: list[Any], rejected: list[Rejected]) -> ApplyStats:
        assert self._conn is not None
        with self._conn.transaction():
            stats = self.writer.apply(self._conn, changes)
            deadletters.store(self._conn, rejected + stats.dead)
        return stats

    def _commit_offsets(self, records: Sequence[KafkaRecord]) -> None:
        if self._consumer is None:
            return
        last: dict[TopicPartition, int] = {}
        for r in records:
            tp = TopicPartition(r.topic, r.partition)
            last[tp] = max(last.get(tp, -1), r.offset)
        self._consumer.commit({tp: OffsetAndMetadata(o + 1, "", -1) for tp, o in last.items()})

    # --- visibility ------------------------------------------------------------------
    def _heartbeat(self, state: str, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_heartbeat < HEARTBEAT_SECONDS:
            return
        self._last_heartbeat = now
        consumer, conn = self._consumer, self._conn
        if consumer is None or conn is None or conn.closed:
            return
        try:
            assigned = list(consumer.assignment())
            if not assigned:
                self.metrics.lag = {}
            elif state == "running":
                ends = consumer.end_offsets(assigned)
                self.metrics.lag = {
                    f"{tp.topic}[{tp.partition}]": max(0, ends[tp] - consumer.position(tp))
                    for tp in assigned
                }
            snap = self.metrics.snapshot()
            counters = snap["counters"]
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
                        }
                    ),
                    snap["last_error"],
                    snap["last_error"],
                ),
            )
        except (psycopg.Error, Exception) as exc:  # noqa: BLE001 - a heartbeat never kills the worker
            logger.warning("heartbeat failed: %s", exc)


def _merge(total: ApplyStats, part: ApplyStats) -> None:
    for name in (
        "applied",
        "stale",
        "superseded",
        "deleted",
        "tombstones",
        "metadata_only",
        "embeddings",
        "chunks_written",
        "chunks_deleted",
    ):
        setattr(total, name, getattr(total, name) + getattr(part, name))
    total.committed.extend(part.committed)
    total.dead.extend(part.dead)


def build_worker(settings: Settings, embedder: Embedder | None = None) -> SyncWorker:
    """A worker with the configured embedder and a chunker using the model's tokenizer."""
    from freshet.embedder import embedder_from_settings

    embedder = embedder or embedder_from_settings(settings)
    tokenizer = getattr(embedder, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("the embedder has no tokenizer to chunk with")
    return SyncWorker(settings, embedder, TokenChunker(tokenizer))


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

    def log_progress(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] < 10 and done < total:
            return
        last[0] = now
        rate = done / max(now - started, 1e-9)
        eta = (total - done) / rate if rate > 0 else float("inf")
        logger.warning("indexed %d/%d backlog records (%.0f/s, ETA %.0fs)", done, total, rate, eta)

    return log_progress
