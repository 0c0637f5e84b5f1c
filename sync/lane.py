"""The large lane: changes whose records are large (a row of a million characters) are chunked
and embedded on a thread of their own, in small slices, while the partition's other documents
keep flowing through the main loop.

Order per document holds: once a document is in the lane, its later changes follow it there.
Order of offsets holds: the worker commits a partition's offsets only up to the first record
still in the lane (sync/worker.py). A large change is embedded before its transaction opens, so
the transaction, and the row and advisory locks it takes, stay short; embedding yields to the
main loop between slices (EmbedGate), so a small change waits at most one slice.

A large change that a later change of its document makes moot (a delete, or an upsert that
carries every mapped column) is not embedded to the end: the lane skips it, or stops its
embedding at the next slice, and applies the later change instead.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import psycopg

from freshet.embedder import Embedder
from freshet.index_model import ModelSwitched
from freshet.retry import Backoff, Stopped, transient_db_error
from freshet.sync import deadletters
from freshet.sync.changes import Change, Kind
from freshet.sync.mapping import unavailable_columns
from freshet.sync.writer import ApplyStats, Writer, dead_letter

logger = logging.getLogger(__name__)

# Texts per slice of a large document's embedding: the main loop can run between two slices.
# One text is a "small call" for the embedder: it runs on one thread, so the other core stays
# free for Debezium, Kafka, PostgreSQL and the main loop; it runs through the eager model, which
# releases the GIL in every operator (the compiled one-text path would hold it ~100 ms a call,
# stalling the main loop's Python meanwhile): ~9 chunks/s on one thread.
SLICE = 1


class Superseded(Exception):
    """A later change of the document makes the one being embedded moot."""


def supersedes(later: Change, earlier: Change) -> bool:
    """Whether `later` decides its document without anything `earlier` would have stored:
    a delete, or an upsert none of whose mapped columns is an unavailable (TOAST) value (an
    upsert that has one completes it from the stored row, which needs `earlier` applied)."""
    if (later.table, later.doc_key) != (earlier.table, earlier.doc_key):
        return False
    if later.kind in (Kind.DELETE, Kind.TOMBSTONE):
        return True
    return (
        later.kind is Kind.UPSERT
        and later.row is not None
        and not unavailable_columns(later.mapping, later.row)
    )


class EmbedGate:
    """One embedder shared by two threads: the main loop's calls go first; the lane's run in
    slices, each only when no main-loop call waits. (The model and its tokenizer are not safe
    to call from two threads at once, and torch's thread count is process-wide.)"""

    def __init__(self, inner: Embedder) -> None:
        self.inner = inner
        self._cond = threading.Condition()
        self._busy = False
        self._waiting = 0

    def _acquire(self, foreground: bool) -> None:
        with self._cond:
            if foreground:
                self._waiting += 1
            try:
                self._cond.wait_for(lambda: not self._busy and (foreground or self._waiting == 0))
            finally:
                if foreground:
                    self._waiting -= 1
            self._busy = True

    def _release(self) -> None:
        with self._cond:
            self._busy = False
            self._cond.notify_all()

    def run(self, texts: Sequence[str], foreground: bool) -> np.ndarray:
        self._acquire(foreground)
        try:
            if foreground:
                return self.inner.embed(texts)
            # The lane's calls leave the GIL to the main loop while the model runs.
            with self.inner.sharing_the_interpreter():
                return self.inner.embed(texts)
        finally:
            self._release()

    def foreground(self) -> Embedder:
        return _GatedEmbedder(self, foreground=True)

    def background(
        self, cache: dict[str, np.ndarray], abandon: Callable[[], bool] | None = None
    ) -> _GatedEmbedder:
        return _GatedEmbedder(self, foreground=False, cache=cache, abandon=abandon)


class _GatedEmbedder(Embedder):
    def __init__(
        self,
        gate: EmbedGate,
        foreground: bool,
        cache: dict[str, np.ndarray] | None = None,
        abandon: Callable[[], bool] | None = None,
    ) -> None:
        super().__init__(gate.inner.dim)
        self.gate = gate
        self.is_foreground = foreground
        self.cache = cache
        self.abandon = abandon

    def _embed(self, texts: list[str]) -> np.ndarray:
        if self.is_foreground:
            return self.gate.run(texts, foreground=True)
        cache = self.cache if self.cache is not None else {}
        todo = [t for t in dict.fromkeys(texts) if t not in cache]
        logged = time.monotonic()
        for start in range(0, len(todo), SLICE):
            if self.abandon is not None and self.abandon():
                raise Superseded(f"{start} of {len(todo)} texts embedded")
            part = todo[start : start + SLICE]
            for text, vector in zip(part, self.gate.run(part, foreground=False), strict=True):
                cache[text] = vector
            if time.monotonic() - logged > 10:
                logged = time.monotonic()
                logger.warning("large lane: %d of %d texts embedded", start + len(part), len(todo))
        return np.stack([cache[t] for t in texts]).astype(np.float32, copy=False)


# How much nicer than the rest of the worker the lane's thread runs: on a machine with few
# cores, the lane's one busy core would otherwise slow PostgreSQL, Kafka, Connect and the main
# loop it shares the machine with; niced, it embeds with the CPU they leave idle.
LANE_NICENESS = 10


def _lower_priority() -> None:
    """Lower the calling thread's scheduling priority (Linux schedules each thread on its own;
    a one-thread embedding call runs on the calling thread)."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + LANE_NICENESS)
    except (AttributeError, OSError) as exc:  # not Linux, or not permitted: run as it is
        logger.info("large lane: priority left as it is (%s)", exc)


@dataclass
class Done:
    change: Change
    stats: ApplyStats


@dataclass
class LargeLane:
    """A FIFO of large changes applied by one background thread with its own connection."""

    writer: Writer
    cache: dict[str, np.ndarray]
    connect: Callable[[], psycopg.Connection]
    stop: threading.Event
    _queue: deque[Change] = field(default_factory=deque)
    _docs: Counter[tuple[str, str]] = field(default_factory=Counter)
    _offsets: dict[tuple[str, int], Counter[int]] = field(default_factory=dict)
    _done: deque[Done] = field(default_factory=deque)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _thread: threading.Thread | None = None
    _conn: psycopg.Connection | None = None
    current: Change | None = None

    # --- called by the main loop -------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="large-lane", daemon=True)
        self._thread.start()

    def submit(self, change: Change) -> None:
        with self._cond:
            self._queue.append(change)
            self._docs[(change.table, change.doc_key)] += 1
            tp = (change.position.topic or "", change.position.partition or 0)
            self._offsets.setdefault(tp, Counter())[change.position.offset or 0] += 1
            self._cond.notify_all()
        logger.info(
            "large change of %s key=%s (%d bytes) goes to the large lane (%d queued)",
            change.table,
            change.doc_key,
            len(change.raw_value or b""),
            len(self._queue),
        )

    def holds(self, table: str, doc_key: str) -> bool:
        with self._cond:
            return self._docs[(table, doc_key)] > 0

    def first_pending(self, topic: str, partition: int) -> int | None:
        """The lowest offset of this partition still in the lane."""
        with self._cond:
            pending = self._offsets.get((topic, partition))
            return min(pending) if pending else None

    def completed(self) -> list[Done]:
        with self._cond:
            done = list(self._done)
            self._done.clear()
        return done

    def drop(self, partitions: Iterable[tuple[str, int]]) -> None:
        """Forget queued (not started) changes of revoked partitions; the new owner has them."""
        revoked = set(partitions)
        with self._cond:
            kept: deque[Change] = deque()
            for change in self._queue:
                tp = (change.position.topic or "", change.position.partition or 0)
                if tp in revoked:
                    self._forget(change)
                else:
                    kept.append(change)
            self._queue = kept

    def idle(self) -> bool:
        with self._cond:
            return not self._queue and self.current is None

    def join(self, timeout: float) -> None:
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._conn is not None:
            self._conn.close()

    def superseded(self) -> bool:
        """Whether a change queued behind the current one makes it moot (checked by the lane's
        embedder between slices, too)."""
        with self._cond:
            current = self.current
            return current is not None and any(supersedes(c, current) for c in self._queue)

    # --- the lane's thread -------------------------------------------------------------
    def _forget(self, change: Change) -> None:
        key = (change.table, change.doc_key)
        self._docs[key] -= 1
        if self._docs[key] <= 0:
            del self._docs[key]
        tp = (change.position.topic or "", change.position.partition or 0)
        offsets = self._offsets.get(tp)
        if offsets is not None:
            offsets[change.position.offset or 0] -= 1
            if offsets[change.position.offset or 0] <= 0:
                del offsets[change.position.offset or 0]

    def _run(self) -> None:
        _lower_priority()
        while not self.stop.is_set():
            with self._cond:
                if not self._queue:
                    self._cond.wait(timeout=0.5)
                    continue
                self.current = self._queue.popleft()
            change = self.current
            try:
                stats = ApplyStats(superseded=1) if self.superseded() else self._apply(change)
            except (Stopped, ModelSwitched):
                return  # a switch: the rebuilt worker's lane applies the change again
            except Superseded as exc:
                logger.warning(
                    "large lane: %s key=%s superseded by a later change (%s); not applied",
                    change.table,
                    change.doc_key,
                    exc,
                )
                stats = ApplyStats(superseded=1)
            with self._cond:
                self._forget(change)
                self.current = None
                self._done.append(Done(change, stats))

    def _apply(self, change: Change) -> ApplyStats:
        """Embed (outside any transaction), then apply in one short transaction; wait out a
        database outage; any other failure makes the record a dead letter."""
        backoff = Backoff()
        failure: Exception | None = None
        try:
            while True:
                try:
                    conn = self._connection()
                    if failure is not None:
                        stats = ApplyStats(dead=[dead_letter(change, "write", failure)])
                        with conn.transaction():
                            deadletters.store(conn, stats.dead)
                        return stats
                    return self._embed_and_apply(conn, change)
                except (Superseded, ModelSwitched):
                    raise
                except Exception as exc:
                    if self.stop.is_set():
                        raise Stopped("large lane") from exc
                    if not transient_db_error(exc):
                        if failure is not None:
                            raise
                        logger.exception(
                            "large lane: %s key=%s failed", change.table, change.doc_key
                        )
                        failure = exc
                        continue
                    logger.warning("large lane: database unavailable (%s); retrying", exc)
                    if self._conn is not None:
                        self._conn.close()
                        self._conn = None
                    if self.stop.wait(backoff.delay()):
                        raise Stopped("large lane") from exc
        finally:
            self.cache.clear()

    def _embed_and_apply(self, conn: psycopg.Connection, change: Change) -> ApplyStats:
        started = time.perf_counter()
        texts = self.writer.pending_texts(conn, [change])
        self.writer.embedder.embed(texts)  # in slices, into the cache
        embedded = time.perf_counter()
        with conn.transaction():
            stats = self.writer.apply(conn, [change])
            deadletters.store(conn, stats.dead)
        stats.embed_seconds += embedded - started
        logger.info(
            "large lane applied %s key=%s: %d texts embedded in %.1fs",
            change.table,
            change.doc_key,
            len(texts),
            embedded - started,
        )
        return stats

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = self.connect()
        return self._conn
