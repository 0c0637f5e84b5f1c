"""Workflow step workers as the tests run them: `freshet step NAME` processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

from freshet.settings import PROJECT_ROOT


def start_step(
    env: dict[str, str], name: str, workflow: Path | None, log: Path
) -> subprocess.Popen[bytes]:
    """One worker of step ``name`` of ``workflow`` (None: the shipped default workflow)."""
    chosen = ["--workflow", str(workflow)] if workflow else []
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "freshet.cli", "-v", "step", name, *chosen],
            env={**env, "PYTHONWARNINGS": "ignore"},
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=PROJECT_ROOT,
        )


def stop_all(processes: Iterable[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every step still running, then wait (SIGKILL after 60 s)."""
    running = list(processes)
    for process in running:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in running:
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
