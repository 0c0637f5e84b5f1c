"""Session fixtures: a real stack (embedded PostgreSQL, Kafka, Connect, Debezium) started by
the project's own launcher, in a private FRESHET_HOME on free ports, stopped afterwards."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from freshet.cdc import stack
from freshet.cdc.sandbox import private_home, sandbox_env
from freshet.embedder import Embedder, TransformersEmbedder
from freshet.settings import PROJECT_ROOT, Settings
from freshet.sync.chunking import TokenChunker
from freshet.sync.worker import SyncWorker


def stack_env(home: Path) -> dict[str, str]:
    """A private stack for tests: small memory settings, fast heartbeats, no background
    sync worker, web app or workflow workers (the tests run their own)."""
    return sandbox_env(
        home,
        FRESHET_PG_SHARED_BUFFERS="128MB",
        FRESHET_PG_MAINTENANCE_WORK_MEM="256MB",
        FRESHET_HEARTBEAT_MS="1000",
        FRESHET_START_SYNC="false",
        FRESHET_START_WEB="false",
        FRESHET_START_WORKFLOW="false",
        # Tests stop services on purpose; the fault suite (tests/faults) runs the supervisor.
        FRESHET_SUPERVISE="false",
    )


@pytest.fixture(scope="session")
def make_stack_env() -> Iterator[Callable[[str], dict[str, str]]]:
    homes: list[Path] = []

    def make(tag: str) -> dict[str, str]:
        home = private_home(tag)
        homes.append(home)
        return stack_env(home)

    yield make
    for home in homes:
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def running_stack_env(make_stack_env: Callable[[str], dict[str, str]]) -> dict[str, str]:
    """The environment of the session's stack, for tests that start `freshet` processes."""
    return make_stack_env("it")


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
        *, group: str | None = None, own_embedder: bool = False, worker_id: str | None = None
    ) -> WorkerThread:
        settings = running_stack
        if group is not None:
            settings = settings.with_overrides(sync_group=group)
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


def wait_for(check: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    """Poll until `check()` returns something truthy; returns it, or None on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(interval)
    return None


def freshet(
    env: dict[str, str], *args: str, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run the `freshet` command line as a user would, in ``env``; output captured."""
    return subprocess.run(
        [sys.executable, "-m", "freshet.cli", *args],
        env={**env, "PYTHONWARNINGS": "ignore"},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=PROJECT_ROOT,
    )


@contextmanager
def topic_from_start(bootstrap_servers: str, topic: str) -> Iterator[Any]:
    """A group-less consumer of ``topic`` from its first record; iteration ends after 5 s
    without a new record."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
        consumer_timeout_ms=5000,
    )
    try:
        yield consumer
    finally:
        consumer.close()
