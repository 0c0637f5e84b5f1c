"""Overlap without services: the prefetch embeds the next transaction's texts on its own
thread, the worker's embedder serves them from there and embeds only what is missing, and a
prefetch that fails is only a cache miss."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from freshet.embedder import Embedder
from freshet.sync.prefetch import Prefetch, Prefetched


class Counting(Embedder):
    def __init__(self) -> None:
        super().__init__(2)
        self.calls: list[list[str]] = []

    def _embed(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        return np.array([[len(t), 1.0] for t in texts], dtype=np.float32)


def test_the_next_transaction_is_embedded_ahead_and_served_from_there() -> None:
    inner = Counting()
    release = threading.Event()
    threads: list[str] = []

    def pending(conn: Any, changes: Any) -> list[str]:
        threads.append(threading.current_thread().name)
        release.wait(5)
        return ["aa", "bbb", "aa"]

    prefetch = Prefetch(pending, inner.embed, lambda: object())
    served = Prefetched(inner, prefetch)
    prefetch.start(["change"])  # type: ignore[list-item]
    prefetch.start(["again"])  # type: ignore[list-item]  # one at a time: ignored
    release.set()
    prefetch.take()
    assert set(prefetch.cache) == {"aa", "bbb"} and threads[0].startswith("freshet-prefetch")
    vectors = served.embed(["bbb", "c", "aa"])
    assert vectors.tolist() == [[3.0, 1.0], [1.0, 1.0], [2.0, 1.0]]
    assert inner.calls == [["aa", "bbb"], ["c"]]  # only the missing text embedded now
    assert served.served == 2 and prefetch.texts == 2
    prefetch.take()  # nothing in flight: the cache empties
    assert prefetch.cache == {}
    prefetch.close()


def test_a_failing_prefetch_is_a_cache_miss_and_reconnects_next_time() -> None:
    inner = Counting()
    connections: list[object] = []

    class Conn:
        closed = False

        def close(self) -> None:
            self.closed = True

    def connect() -> Conn:
        conn = Conn()
        connections.append(conn)
        return conn

    def broken(conn: Any, changes: Any) -> list[str]:
        raise OSError("the database went away")

    prefetch = Prefetch(broken, inner.embed, connect)
    prefetch.start(["change"])  # type: ignore[list-item]
    prefetch.take()
    assert prefetch.cache == {} and inner.calls == []
    prefetch.start(["change"])  # type: ignore[list-item]
    prefetch.take()
    assert len(connections) == 2 and all(c.closed for c in connections)  # type: ignore[attr-defined]
    assert Prefetched(inner, prefetch).embed(["x"]).shape == (1, 2)
    prefetch.close()
