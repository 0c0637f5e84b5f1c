"""Drift on a schedule on the real stack: `freshet drift-watch` runs `freshet verify` at its
interval, each run lands in rag.verify_runs, and `freshet status` shows the runs over time."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from freshet.db import connect, database_url
from freshet.settings import PROJECT_ROOT, Settings
from tests.conftest import freshet, wait_for
from tests.integration.conftest import WorkerThread
from tests.integration.sync_support import caught_up
from tests.integration.workflow_support import stop_all

pytestmark = pytest.mark.integration


def test_drift_watch_verifies_on_its_schedule_and_status_shows_the_runs(
    running_stack: Settings,
    running_stack_env: dict[str, str],
    start_worker: Callable[..., WorkerThread],
    tmp_path: Path,
) -> None:
    caught_up(start_worker())
    url = database_url(running_stack)

    def runs() -> int:
        with connect(url, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM rag.verify_runs WHERE finished_at IS NOT NULL"
            ).fetchone()
        return int(row[0]) if row else 0

    before = runs()
    env = {**running_stack_env, "FRESHET_VERIFY_EVERY_MIN": "0.05", "PYTHONWARNINGS": "ignore"}
    log = tmp_path / "drift-watch.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "freshet.cli", "-v", "drift-watch"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=PROJECT_ROOT,
        )
    try:
        assert wait_for(lambda: runs() >= before + 2, 240, interval=1), log.read_text()
    finally:
        stop_all([process])
    assert process.returncode == 0, log.read_text()
    assert "rows checked" in log.read_text()
    done = freshet(running_stack_env, "status", "--json")
    report = json.loads(done.stdout)
    assert len(report["history"]) >= 2
    assert {"finished_at", "rows_checked", "in_sync", "differences"} <= set(report["history"][-1])
    assert report["verify"]["runs"] >= before + 2
    text = freshet(running_stack_env, "status").stdout
    assert "drift " in text, text
