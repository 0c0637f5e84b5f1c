"""Local service processes: PID files, port checks, health waits and clean stops.

Every process the launcher starts gets a PID file under FRESHET_HOME/run and a log under
FRESHET_HOME/logs; `down` stops exactly the processes named by those PID files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from freshet.errors import FreshetError

logger = logging.getLogger(__name__)

# The shell forks the service into the background in a new session and prints its PID; the
# shell exits at once, so the service is re-parented to init and is never our child.
_DAEMONIZE = 'setsid "$@" >>"$FRESHET_LOG" 2>&1 </dev/null & echo $!'


class StackError(FreshetError, RuntimeError):
    """A service could not be started or reached; the message says which and what to do."""


class PortTakenError(StackError):
    def __init__(self, service: str, port: int, setting: str) -> None:
        super().__init__(
            f"{service} cannot start: port {port} on 127.0.0.1 is already in use by another "
            f"program. Stop that program, or choose another port with {setting}=<port> "
            f"(for example `{setting}={port + 100} freshet up`)."
        )
        self.service = service
        self.port = port
        self.setting = setting


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True when something accepts TCP connections on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log file, for error messages."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 16384))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); treat it as gone.
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


def _cmdline(pid: int, settle: float = 2.0) -> str:
    """The process's command line, "" when it is gone.

    A process in the middle of an exec (the launcher's sh -> setsid -> program chain, just after
    a start) reads as an empty command line for a moment: measured here, 198 of 200 fresh
    launches showed one within their first 50 ms. So an empty read is retried for up to
    ``settle`` seconds while the process lives, instead of taking a starting service for a
    dead one (and removing its PID file).
    """
    deadline = time.monotonic() + settle
    while True:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                raw = handle.read()
        except OSError:
            return ""
        if raw or time.monotonic() >= deadline or not pid_alive(pid):
            return raw.replace(b"\0", b" ").decode("utf-8", errors="replace")
        time.sleep(0.01)


@dataclass(frozen=True)
class ManagedProcess:
    """One long-running process started by the launcher, identified by its PID file."""

    name: str
    pid_file: Path
    log_file: Path
    # A string that the process's command line contains: guards against a recycled PID.
    marker: str

    def pid(self) -> int | None:
        """The PID of our running process, or None (a stale PID file is removed)."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        if pid_alive(pid) and self.marker in _cmdline(pid):
            return pid
        with contextlib.suppress(OSError):
            self.pid_file.unlink()
        return None

    def start(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> int:
        """Start `argv` as a daemon: its own session, not our child (so it outlives us, leaves
        no zombie, and Ctrl+C in this terminal does not reach it; `down` stops it)."""
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            log.write(f"\n--- freshet: starting {self.name} at {time.ctime()} ---\n".encode())
        launch_env = dict(os.environ if env is None else env, FRESHET_LOG=str(self.log_file))
        launched = subprocess.run(  # noqa: S603 - argv is built by the launcher
            ["/bin/sh", "-c", _DAEMONIZE, "freshet-launch", *argv],
            env=launch_env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if launched.returncode != 0 or not launched.stdout.strip().isdigit():
            raise StackError(f"could not start {self.name}: {launched.stderr.strip()}")
        pid = int(launched.stdout.strip())
        self.pid_file.write_text(f"{pid}\n")
        logger.info("started %s pid=%s log=%s", self.name, pid, self.log_file)
        return pid

    def stop(self, timeout: float = 30.0) -> bool:
        """SIGTERM, wait, then SIGKILL; True when a process of ours was running."""
        pid = self.pid()
        if pid is None:
            return False
        logger.info("stopping %s pid=%s", self.name, pid)
        _signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and pid_alive(pid):
            time.sleep(0.2)
        if pid_alive(pid):
            logger.warning("%s pid=%s ignored SIGTERM for %.0fs; killing", self.name, pid, timeout)
            _signal_group(pid, signal.SIGKILL)
            for _ in range(50):
                if not pid_alive(pid):
                    break
                time.sleep(0.1)
        with contextlib.suppress(OSError):
            self.pid_file.unlink()
        return True


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def wait_until(
    check: Callable[[], bool],
    *,
    what: str,
    timeout: float,
    log_file: Path | None = None,
    alive: Callable[[], bool] | None = None,
    interval: float = 0.5,
) -> None:
    """Poll `check` until it is true; on timeout or process death raise a StackError that
    names the service and shows the end of its log."""
    deadline = time.monotonic() + timeout
    last_error = ""
    while True:
        try:
            if check():
                return
        except Exception as exc:  # noqa: BLE001 - a failing probe just means "not yet"
            last_error = f" (last probe: {exc.__class__.__name__}: {exc})"
            logger.debug("%s not ready yet: %s", what, exc)
        if alive is not None and not alive():
            raise StackError(_failure(f"{what} exited during startup", log_file))
        if time.monotonic() >= deadline:
            headline = f"{what} did not become healthy in {timeout:.0f}s{last_error}"
            raise StackError(_failure(headline, log_file))
        time.sleep(interval)


def _failure(headline: str, log_file: Path | None) -> str:
    if log_file is None:
        return headline
    return f"{headline}. Its log is {log_file}; last lines:\n{tail(log_file)}"
