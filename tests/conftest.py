"""What more than one test suite shares, in one place.

- ``stack_env`` and the ``make_stack_env`` fixture: the environment of a private stack (its own
  FRESHET_HOME and free ports) with test-sized settings; tests/integration and tests/faults
  start their stacks from it.
- ``freshet``: the command line run as a user runs it.
- ``wait_for``: poll a condition until it holds or a deadline passes.

A fixture or helper that one suite alone uses stays in that suite: tests/integration/conftest.py
(the session stack, in-process sync workers), tests/faults/conftest.py (the workload, the
convergence check, RELIABILITY.md), tests/unit/web_fakes.py (a retriever without a database).
Kafka record helpers, which the fixture-capture script uses too, are in tests/support.py.
Helpers are imported from here: ``from tests.conftest import wait_for``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from freshet.cdc.sandbox import private_home, sandbox_env
from freshet.settings import PROJECT_ROOT


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
    """``make(tag)``: the ``stack_env`` of a fresh private home; every home is removed at the
    end of the session."""
    homes: list[Path] = []

    def make(tag: str) -> dict[str, str]:
        home = private_home(tag)
        homes.append(home)
        return stack_env(home)

    yield make
    for home in homes:
        shutil.rmtree(home, ignore_errors=True)


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


def wait_for(check: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    """Poll until `check()` returns something truthy; returns it, or None on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(interval)
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A test that fails on a real stack reports the stack's logs and its Freshet processes'
    thread stacks (tests/diagnostics.py): on a CI machine they are gone once the session ends."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.when != "call" or not report.failed:
        return
    from tests.diagnostics import homes_of
    from tests.diagnostics import report as stack_report

    for home in homes_of(getattr(item, "funcargs", {}).values()):
        report.sections.append((f"freshet stack {home.name}", stack_report(home)))
