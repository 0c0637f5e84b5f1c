"""Overlap: the embeddings of a batch's next transaction are computed while the current one
writes and commits, so the embedder does not sit idle during the database's share of the work.

The sync worker applies a large batch in several transactions of whole documents
(sync/pacing.py). Once transaction N has embedded what it needs, `Prefetch.start` asks a second
writer (its own tokenizer, its own read-only connection) which texts transaction N+1 would
embed, as `Writer.pending_texts` decides it (new chunks only: a metadata-only change embeds
nothing), and embeds them on a background thread while N writes and commits. Before N+1 opens,
`Prefetch.take` waits for that thread and hands its vectors to the worker's embedder
(`Prefetched`), which serves a text from them and embeds only what is missing.

Nothing about correctness moves: N+1's own transaction still reads, locks, resolves and plans
its documents as always; the vectors made ahead are only a cache keyed by the exact chunk text
(the same model, so the same vector up to batch padding), and whatever N+1 needs that is not in
it is embedded then. Offsets are committed after the database commit as before. A prefetch
that fails (the database away, a row that does not map) just leaves the cache empty.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from freshet.embedder import Embedder
from freshet.sync.changes import Change

logger = logging.getLogger(__name__)


class Prefetched(Embedder):
    """``inner``, serving texts the prefetch already embedded from its vectors."""

    def __init__(self, inner: Embedder, prefetch: Prefetch) -> None:
        super().__init__(inner.dim)
        self.inner = inner
        self.prefetch = prefetch
        self.served = 0

    def _embed(self, texts: list[str]) -> np.ndarray:
        ready = self.prefetch.cache
        found = {t: ready[t] for t in dict.fromkeys(texts) if t in ready}
        todo = [t for t in dict.fromkeys(texts) if t not in found]
        if todo:
            found.update(zip(todo, self.inner.embed(todo), strict=True))
        self.served += len(texts) - len(todo)
        return np.stack([found[t] for t in texts]).astype(np.float32, copy=False)


class Prefetch:
    """One background embedding of the next transaction's new chunks at a time."""

    def __init__(
        self,
        pending_texts: Callable[[Any, Sequence[Change]], list[str]],
        embed: Callable[[list[str]], np.ndarray],
        connect: Callable[[], Any],
    ) -> None:
        self._pending_texts = pending_texts
        self._embed = embed
        self._connect = connect
        self._conn: Any = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="freshet-prefetch")
        self._running: Future[dict[str, np.ndarray]] | None = None
        self._lock = threading.Lock()
        self.cache: dict[str, np.ndarray] = {}
        self.texts = 0
        self.calls = 0
        self.seconds = 0.0

    def start(self, changes: Sequence[Change]) -> None:
        """Begin embedding what ``changes`` will need (after the current transaction has
        embedded its own: the model is free while the database writes)."""
        with self._lock:
            if self._running is None and changes:
                self._running = self._pool.submit(self._run, list(changes))

    def take(self) -> None:
        """Wait for the prefetch in flight, if any, and make its vectors the cache (the
        previous transaction's leftovers go)."""
        with self._lock:
            running, self._running = self._running, None
        self.cache = running.result() if running is not None else {}

    def _run(self, changes: list[Change]) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        try:
            if self._conn is None or self._conn.closed:
                self._conn = self._connect()
            texts = list(dict.fromkeys(self._pending_texts(self._conn, changes)))
            if not texts:
                return {}
            self.calls += 1
            vectors = self._embed(texts)
        except Exception as exc:  # noqa: BLE001 - a cache miss, never a failure
            logger.info("prefetch skipped (%s: %s)", type(exc).__name__, exc)
            self._drop()
            return {}
        self.texts += len(texts)
        self.seconds += time.perf_counter() - started
        return dict(zip(texts, vectors, strict=True))

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):  # closing what may be gone
                self._conn.close()
            self._conn = None

    def close(self) -> None:
        self.take_quietly()
        self._pool.shutdown(wait=True)
        self._drop()

    def take_quietly(self) -> None:
        try:
            self.take()
        except Exception:  # noqa: BLE001 - shutting down
            self.cache = {}
