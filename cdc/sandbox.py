"""A private stack: its own FRESHET_HOME and free ports, for tests and benchmarks that must not
collide with a running demo."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

PASSTHROUGH = ("JAVA_HOME", "FRESHET_JARS", "PATH")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def private_home(tag: str) -> Path:
    """A fresh state folder. Not under pytest's tmp_path: that is 0700, and PostgreSQL runs as
    another user when the launcher runs as root."""
    home = Path(tempfile.mkdtemp(prefix=f"freshet-{tag}-"))
    home.chmod(0o755)
    return home


def sandbox_env(home: Path, **overrides: str) -> dict[str, str]:
    """Environment for a private stack: its own home and ports; nothing shared with a demo."""
    env = {name: os.environ[name] for name in PASSTHROUGH if name in os.environ}
    env.update(
        FRESHET_HOME=str(home),
        FRESHET_PG_PORT=str(free_port()),
        FRESHET_KAFKA_PORT=str(free_port()),
        FRESHET_KAFKA_CONTROLLER_PORT=str(free_port()),
        FRESHET_CONNECT_PORT=str(free_port()),
        FRESHET_WEB_PORT=str(free_port()),
        FRESHET_METRICS_PORT="0",
    )
    env.update(overrides)
    return env
