"""Session fixtures: a real stack (embedded PostgreSQL, Kafka, Connect, Debezium) started by
the project's own launcher, in a private FRESHET_HOME on free ports, stopped afterwards.

Its environment comes from ``make_stack_env`` in tests/conftest.py, which the fault suite
shares, as it shares ``freshet`` and ``wait_for``."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from freshet.cdc import stack
from freshet.embedder import Embedder, TransformersEmbedder
from freshet.settings import Settings
from freshet.sync.chunking import TokenChunker
from freshet.sync.worker import SyncWorker


@pytest.fixture(scope="session")
def running_stack_env(make_stack_env: Callable[[str], dict[str, str]]) -> dict[str, str]:
    """The environment of the session's stack, for tests that start `freshet` processes.

    It loads 30 rows of each demo table, as the fault suite does: the tests add the rows they
    need, and indexing the whole demo would spend minutes of embedding on 2 cores."""
    env = make_stack_env("it")
    env.update(FRESHET_DEMO_ROWS="30")
    return env


@pytest.fixture(scope="session")
def running_stack(running_stack_env: dict[str, str]) -> Iterator[Settings]:
    """The whole stack, up once for the session; the demo data is loaded and snapshotted."""
    settings = Settings.from_env(running_stack_env)
    try:
        stack.up(settings)
        yield settings
    finally:
        stack.down(settings)


@pytest.fixture(scope="session")
def embedder() -> Embedder:
    """The real bundled model, loaded once."""
    return TransformersEmbedder()


class WorkerThread:
    """An in-process sync worker (the same SyncWorker `freshet sync` runs) on a thread."""

    def __init__(self, worker: SyncWorker) -> None:
        self.worker = worker
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=worker.worker_id, daemon=True)

    def _run(self) -> None:
        try:
            self.worker.run(self.stop_event)
        except BaseException as exc:  # noqa: BLE001 - surfaced by stop()
            self.error = exc

    def start(self) -> WorkerThread:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive(), "the sync worker did not stop within 60 s"
        if self.error is not None:
            raise self.error

    @property
    def embeddings(self) -> int:
        return self.worker.embedder.texts_embedded


@pytest.fixture
def start_worker(
    running_stack: Settings, embedder: Embedder
) -> Iterator[Callable[..., WorkerThread]]:
    """Start in-process sync workers; all are stopped when the test ends."""
    started: list[WorkerThread] = []

    def start(
        *,
        group: str | None = None,
        own_embedder: bool = False,
        worker_id: str | None = None,
        **overrides: Any,
    ) -> WorkerThread:
        settings = running_stack
        if group is not None:
            settings = settings.with_overrides(sync_group=group)
        if overrides:
            settings = settings.with_overrides(**overrides)
        model = TransformersEmbedder() if own_embedder else embedder
        worker = SyncWorker(settings, model, TokenChunker(model.tokenizer))  # type: ignore[attr-defined]
        if worker_id:
            worker.worker_id = worker_id
            worker.metrics.worker_id = worker_id
        thread = WorkerThread(worker).start()
        started.append(thread)
        return thread

    yield start
    for thread in started:
        if thread.thread.is_alive():
            thread.stop()
