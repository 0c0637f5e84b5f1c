"""What a failed test on a real stack reports about the stack's own processes: the end of each
service's log and, where py-spy is installed, the Python stack of every thread of each Freshet
process (a worker that is alive but does nothing shows where it waits).

The report goes into the failed test's output (tests/conftest.py, ``pytest_runtest_makereport``),
so a failure in CI on another machine can be read without the stack's home, which the session
removes when it ends.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# Freshet's own Python processes (run/<stem>.pid): py-spy dumps their threads.
PYTHON_SERVICES = ("infer", "validate", "stale-watch", "sync", "web", "supervise", "drift-watch")
LOG_LINES = 60


def homes_of(values: Iterable[Any]) -> list[Path]:
    """The FRESHET_HOME of each stack among a test's fixture values (Settings objects or
    environments), each once."""
    found: list[Path] = []
    for value in values:
        home: Any = None
        if isinstance(value, dict):
            home = value.get("FRESHET_HOME")
        else:
            home = getattr(value, "home", None)
            if getattr(value, "logs_dir", None) is None:
                home = None
        if home is not None and Path(home) not in found:
            found.append(Path(home))
    return found


def tail(path: Path, lines: int = LOG_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"({exc})"
    return "\n".join(text.splitlines()[-lines:])


def stacks(pid: int, timeout: float = 20.0) -> str:
    """py-spy's dump of every thread of ``pid`` (empty when py-spy is not installed)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        return ""
    try:
        done = subprocess.run(
            [spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=timeout
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"(py-spy: {exc})"
    return (done.stdout + done.stderr).strip()


def report(home: Path) -> str:
    """The stack's logs (the last LOG_LINES lines of each) and its Python processes' stacks."""
    parts = [f"stack home {home}"]
    logs = sorted((home / "logs").glob("*.log")) if (home / "logs").is_dir() else []
    for log in logs:
        parts.append(f"--- {log.name} (last {LOG_LINES} lines) ---\n{tail(log)}")
    for stem in PYTHON_SERVICES:
        try:
            pid = int((home / "run" / f"{stem}.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        dump = stacks(pid)
        if dump:
            parts.append(f"--- py-spy dump of {stem} (pid {pid}) ---\n{dump}")
    return "\n".join(parts)
