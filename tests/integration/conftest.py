"""Session fixtures: a real stack (embedded PostgreSQL, Kafka, Connect, Debezium) started by
the project's own launcher, in a private FRESHET_HOME on free ports, stopped afterwards."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cdc import stack
from freshet.settings import Settings

PASSTHROUGH = ("JAVA_HOME", "FRESHET_JARS", "PATH")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stack_env(home: Path) -> dict[str, str]:
    """Environment for a private stack: its own home and ports, nothing shared with a demo."""
    env = {name: os.environ[name] for name in PASSTHROUGH if name in os.environ}
    env.update(
        FRESHET_HOME=str(home),
        FRESHET_PG_PORT=str(free_port()),
        FRESHET_KAFKA_PORT=str(free_port()),
        FRESHET_KAFKA_CONTROLLER_PORT=str(free_port()),
        FRESHET_CONNECT_PORT=str(free_port()),
        FRESHET_PG_SHARED_BUFFERS="128MB",
        FRESHET_PG_MAINTENANCE_WORK_MEM="256MB",
        FRESHET_HEARTBEAT_MS="1000",
    )
    return env


def private_home(tag: str) -> Path:
    # Not under pytest's tmp_path: that is 0700 and PostgreSQL runs as another user when the
    # tests run as root.
    home = Path(tempfile.mkdtemp(prefix=f"freshet-{tag}-"))
    home.chmod(0o755)
    return home


@pytest.fixture(scope="session")
def make_stack_env() -> Iterator[Callable[[str], dict[str, str]]]:
    homes: list[Path] = []

    def make(tag: str) -> dict[str, str]:
        home = private_home(tag)
        homes.append(home)
        return stack_env(home)

    yield make
    for home in homes:
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def running_stack(make_stack_env: Callable[[str], dict[str, str]]) -> Iterator[Settings]:
    """The whole stack, up once for the session; the demo data is loaded and snapshotted."""
    settings = Settings.from_env(make_stack_env("it"))
    try:
        stack.up(settings)
        yield settings
    finally:
        stack.down(settings)
