"""`freshet up | status | down` on a private stack: idempotent up, clean down, clear port errors."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from freshet.cdc import stack
from freshet.cdc.connect import ConnectClient, LocalConnect
from freshet.cdc.kafka import LocalKafka
from freshet.cdc.postgres import EmbeddedPostgres
from freshet.cdc.services import LocalSupervisor, LocalSyncWorker, LocalWeb
from freshet.settings import Settings
from tests.conftest import freshet, wait_for

pytestmark = pytest.mark.integration


def our_processes(home: Path) -> list[str]:
    """Command lines of live processes that name this stack's home."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().split(") ", 1)[1][0]
        except (OSError, IndexError):
            continue
        if str(home) in cmdline and state != "Z" and int(entry.name) != os.getpid():
            found.append(cmdline)
    return found


def pids(settings: Settings) -> dict[str, int | None]:
    return {
        "postgres": EmbeddedPostgres(settings).pid(),
        "kafka": LocalKafka(settings).process.pid(),
        "connect": LocalConnect(settings).process.pid(),
        "sync": LocalSyncWorker(settings).process.pid(),
        "web": LocalWeb(settings).process.pid(),
        "supervisor": LocalSupervisor(settings).process.pid(),
    }


def test_up_twice_changes_nothing_and_down_leaves_no_process(
    make_stack_env: Callable[[str], dict[str, str]],
) -> None:
    env = make_stack_env("lifecycle")
    # The whole of `up`: the sync worker and the web app run in the background too.
    env.update(FRESHET_START_SYNC="true", FRESHET_START_WEB="true", FRESHET_SUPERVISE="true")
    settings = Settings.from_env(env)
    home = settings.home
    try:
        first = freshet(env, "up")
        assert first.returncode == 0, first.stderr
        report = json.loads(freshet(env, "status", "--json").stdout)
        for component in ("postgres", "kafka", "connect", "connector"):
            assert report[component]["state"] == "RUNNING", report
        assert [t["state"] for t in report["connector"]["tasks"]] == ["RUNNING"]
        before = pids(settings)
        assert all(before.values()), before
        client = ConnectClient(settings.connect_rest_url)
        config_before = client.config(settings.connector_name)

        second = freshet(env, "up")
        assert second.returncode == 0, second.stderr
        assert "started: nothing (all already running)" in second.stdout
        assert pids(settings) == before
        assert client.config(settings.connector_name) == config_before
        assert [t["state"] for t in client.status(settings.connector_name)["tasks"]] == [  # type: ignore[index]
            "RUNNING"
        ]
    finally:
        down = freshet(env, "down")
    assert down.returncode == 0, down.stderr
    assert our_processes(home) == []
    assert not list((home / "run").glob("*.pid"))
    status = freshet(env, "status", "--json")
    assert status.returncode == 3
    report = json.loads(status.stdout)
    assert report["kafka"]["state"] == "DOWN"
    assert report["connect"]["state"] == "DOWN"


@pytest.mark.parametrize(
    ("setting", "service"),
    [("FRESHET_CONNECT_PORT", "Kafka Connect"), ("FRESHET_KAFKA_PORT", "Kafka")],
)
def test_taken_port_gives_a_clear_message_and_starts_nothing(
    make_stack_env: Callable[[str], dict[str, str]], setting: str, service: str
) -> None:
    env = make_stack_env("ports")
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        env[setting] = str(port)
        result = freshet(env, "up")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"{service} cannot start: port {port}" in result.stderr
    assert f"{setting}=<port>" in result.stderr
    assert our_processes(Path(env["FRESHET_HOME"])) == []


def test_status_reports_every_component(running_stack: Settings) -> None:
    # `up` returns once the connector runs; the snapshot creates the topics and streaming
    # (an active slot) begins after it, which takes longer on a loaded machine.
    settled = wait_for(
        lambda: (r := stack.status(running_stack))["slot"].get("active") and r,
        timeout=60,
        interval=1,
    )
    report = settled or stack.status(running_stack)
    assert report["postgres"]["state"] == "RUNNING"
    assert report["postgres"]["version"].startswith("18")
    assert report["kafka"]["state"] == "RUNNING"
    assert f"{running_stack.topic_prefix}.app.articles" in report["kafka"]["topics"]
    assert report["connect"]["state"] == "RUNNING"
    assert report["connect"]["version"] == "4.4.0"
    assert report["connector"]["state"] == "RUNNING"
    assert report["slot"]["active"] is True
    assert report["dead_letters"] == 0
