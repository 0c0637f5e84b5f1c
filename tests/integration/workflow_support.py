"""Workflow step workers as the tests run them: `freshet step NAME` processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
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


def settle(
    processes: dict[str, subprocess.Popen[bytes]],
    logs: dict[str, Path],
    restart: Callable[[str], subprocess.Popen[bytes]],
    mark: str,
    timeout: float = 900,
) -> None:
    """Until every step worker's log shows ``mark`` (``partitions assigned: TOPIC``): it holds
    partitions of its topic. A worker that joined its group and still has none a minute later
    is restarted once: kafka-python 3.0.12 was seen (one CI run) stuck after a rebalance, its
    assignment never arriving. Workers that load the model join only after it is loaded
    (minutes on a fresh clone, which compiles it)."""
    joined: dict[str, float] = {}
    restarted: set[str] = set()
    deadline = time.monotonic() + timeout
    waiting = list(logs)
    while time.monotonic() < deadline:
        waiting = [k for k in logs if mark not in logs[k].read_text("utf-8", "replace")]
        if not waiting:
            return
        for key in waiting:
            if "Successfully joined group" not in logs[key].read_text("utf-8", "replace"):
                continue
            since = joined.setdefault(key, time.monotonic())
            if time.monotonic() - since > 60 and key not in restarted:
                print(f"{key}: joined its group 60 s ago and holds no partition; restarting it")
                stop_all([processes[key]])
                processes[key] = restart(key)
                restarted.add(key)
        time.sleep(1)
    raise AssertionError(f"step workers without partitions after {timeout:.0f} s: {waiting}")


def log_tails(logs: dict[str, Path], lines: int = 40) -> str:
    """The last ``lines`` of each worker's log, for an assertion message."""
    parts = []
    for key, log in logs.items():
        text = log.read_text("utf-8", "replace") if log.exists() else "(no log)"
        parts.append(f"--- {key} ({log})\n" + "\n".join(text.splitlines()[-lines:]))
    return "\n".join(parts)
