"""Lag per table, in records and seconds, on the real stack (Debezium -> Kafka -> sync worker).

A captured table of its own and a consumer group of its own: while no worker runs, `freshet
status` (cdc.stack.status) counts the table's changes not yet applied and dates the oldest from
its source commit, and warns over FRESHET_LAG_WARNING_S; a worker that catches up slowly (its
embedding calls made slow, 5 records per poll) reports the same in its metrics while it is
behind; once it has caught up both say 0.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from freshet.cdc import stack
from freshet.cdc.commands import render_status
from freshet.db import connect, database_url, source_database_url
from freshet.embedder import Embedder
from freshet.settings import Settings
from freshet.sync.chunking import TokenChunker
from freshet.sync.worker import SyncWorker
from tests.conftest import wait_for
from tests.integration.conftest import WorkerThread
from tests.integration.sync_support import document_version, probe_table

pytestmark = pytest.mark.integration

PROBE = "app.lag_probe"


class SlowEmbedder(Embedder):
    """The real model, each call made to last at least ``seconds``."""

    def __init__(self, model: Embedder, seconds: float) -> None:
        super().__init__(model.dim)
        self.model, self.seconds = model, seconds
        self.tokenizer = model.tokenizer  # type: ignore[attr-defined]

    def _embed(self, texts: list[str]) -> np.ndarray:
        time.sleep(self.seconds)
        return self.model.embed(texts)


@pytest.fixture
def probe(running_stack: Settings, tmp_path: Path) -> Iterator[Settings]:
    mappings = probe_table(running_stack, PROBE, tmp_path)
    yield running_stack.with_overrides(
        mappings_path=mappings,
        sync_group=f"lag-probe-{time.monotonic_ns()}",
        sync_batch=5,
        lag_warning_s=1.0,
    )


def table_lag(settings: Settings) -> dict[str, Any] | None:
    reading = stack.status(settings).get("lag") or {}
    return (reading.get("tables") or {}).get(PROBE)


def insert(settings: Settings, first: int, rows: Sequence[int]) -> datetime:
    """Rows ``first + n`` in one transaction each; returns the first one's commit time."""
    with connect(source_database_url(settings), autocommit=True) as src:
        committed = datetime.now(UTC)
        for n in rows:
            src.execute(
                f"INSERT INTO {PROBE} VALUES (%s, %s, %s)",
                (first + n, f"Row {first + n}", f"lag probe row number {first + n}"),
            )
    return committed


def test_status_and_the_worker_report_lag_per_table_in_records_and_seconds(
    probe: Settings, embedder: Embedder
) -> None:
    # Nothing consumed by this group yet: the table's first change is behind.
    insert(probe, 0, [0])
    first = wait_for(lambda: (table_lag(probe) or {}).get("records") == 1, 60, interval=0.5)
    assert first, f"status never counted the first change: {stack.status(probe).get('lag')}"

    # 20 changes while no worker of the group runs: all behind, dated from the first commit.
    before = insert(probe, 1, range(20))
    time.sleep(1.5)  # past FRESHET_LAG_WARNING_S=1 of this test
    # status gives the oldest commit time up when its peek at the record takes over 3 s (a
    # busy machine); it reads it on a later call.
    reading = wait_for(
        lambda: (r := table_lag(probe)) and r["records"] == 21 and r["oldest_commit"] and r,
        60,
        interval=0.5,
    )
    assert reading, f"status never counted 21 changes behind with a time: {table_lag(probe)}"
    oldest = datetime.fromisoformat(reading["oldest_commit"])
    # The oldest pending change is row 0's, committed before the 20 others.
    assert oldest <= before
    assert reading["seconds"] >= 1.5
    assert reading["warning"] is True
    text = render_status(stack.status(probe))
    assert f"lag           WARNING   {PROBE}: 21 changes not yet applied" in text, text

    # A worker that takes a while: 5 records per poll, each embedding call 1 s.
    slow = SlowEmbedder(embedder, 1.0)
    worker = WorkerThread(SyncWorker(probe, slow, TokenChunker(slow.tokenizer))).start()
    seen: list[dict[str, Any]] = []
    try:

        def behind_in_metrics() -> bool:
            figures = worker.worker.metrics.snapshot()["lag_tables"].get(PROBE)
            if figures:
                seen.append(figures)
            return bool(figures and 0 < figures["records"] < 21 and figures["seconds"] > 0)

        assert wait_for(behind_in_metrics, 120, interval=0.1), (
            f"the worker's metrics never showed it behind: {seen[-3:]}"
        )
        text = worker.worker.metrics.prometheus()
        label = f'worker="{worker.worker.worker_id}",table="{PROBE}"'
        assert f"freshet_sync_lag_records{{{label}}}" in text

        def caught_up() -> bool:
            figures = worker.worker.metrics.snapshot()["lag_tables"].get(PROBE)
            return bool(figures and figures["records"] == 0 and figures["seconds"] == 0)

        assert wait_for(caught_up, 180, interval=0.5), f"not caught up: {seen[-3:]}"
        with connect(database_url(probe), autocommit=True) as idx:
            assert all(document_version(idx, PROBE, key) for key in range(21))
        after = wait_for(
            lambda: (r := table_lag(probe)) and r["records"] == 0 and r, 60, interval=0.5
        )
        assert after and after["seconds"] == 0 and after["warning"] is False
        lag_lines = [
            line
            for line in render_status(stack.status(probe)).splitlines()
            if line.startswith("lag ")
        ]
        assert not any(f" {PROBE}:" in line for line in lag_lines), lag_lines
    finally:
        worker.stop()
