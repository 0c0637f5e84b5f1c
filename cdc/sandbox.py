"""A private stack: its own FRESHET_HOME and free ports, for tests and benchmarks that must not
collide with a running demo."""

from __future__ import annotations

import os
import random
import socket
import tempfile
from pathlib import Path

PASSTHROUGH = ("JAVA_HOME", "FRESHET_JARS", "PATH")


# Below Linux's ephemeral range (32768-60999 by default): a port the kernel hands out for
# outgoing connections could be taken by a client between our check and the server's bind.
_PORTS = range(20000, 32000)
_taken: set[int] = set()


def free_port() -> int:
    """A port nothing listens on, outside the ephemeral range, not handed out before by this
    process."""
    rng = random.Random()
    for _ in range(1000):
        port = rng.choice(_PORTS)
        if port in _taken:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _taken.add(port)
        return port
    raise RuntimeError("no free port found in 20000-32000")


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
