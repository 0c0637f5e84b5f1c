"""The backlog's progress line (a log line when stderr is not a terminal)."""

from __future__ import annotations

import logging

import pytest

from freshet.sync.worker import progress_printer


def test_progress_is_logged_every_10_s_and_the_end_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker that indexed its first backlog must not log "indexed N/N" again for every
    later batch of the live stream (it did, one WARNING per batch)."""
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    clock = [100.0]
    monkeypatch.setattr("freshet.sync.worker.time.monotonic", lambda: clock[0])
    report = progress_printer()
    with caplog.at_level(logging.WARNING, logger="freshet.sync.worker"):
        report(5, 20)  # the first call logs
        clock[0] += 3
        report(10, 20)  # 3 s later: quiet
        clock[0] += 8
        report(15, 20)  # 11 s after the first: logs
        clock[0] += 1
        report(20, 20)  # the end: logs at once
        for _ in range(5):
            clock[0] += 30
            report(20, 20)  # later batches: quiet
    lines = [r.getMessage() for r in caplog.records if "backlog records" in r.getMessage()]
    assert [line.split()[1] for line in lines] == ["5/20", "15/20", "20/20"]
