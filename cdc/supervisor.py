"""`freshet supervise`: keeps the background set of `freshet up` running.

`up` records which services it runs (run/stack.json: the wanted set) and starts this process;
`down` clears the wanted set and stops it first. Every few seconds it checks each wanted
service and restarts one that died (with jittered backoff per service, so a crash loop does not
spin), and it restarts a FAILED Debezium connector or task (a task fails for good on some errors,
for example a broker outage longer than its producer waits, and Kafka Connect never restarts it
by itself). What it did is kept in run/supervisor.json: restarts per service, last exit, and
the connector restarts, which `freshet status` shows.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from freshet.cdc.connect import ConnectClient, ConnectError, LocalConnect
from freshet.cdc.kafka import LocalKafka
from freshet.cdc.postgres import EmbeddedPostgres
from freshet.cdc.processes import StackError
from freshet.cdc.services import (
    LocalDriftWatch,
    LocalInference,
    LocalStaleWatch,
    LocalSyncWorker,
    LocalValidator,
    LocalWeb,
)
from freshet.retry import Backoff
from freshet.settings import Settings

logger = logging.getLogger(__name__)

CHECK_SECONDS = 2.0
CONNECTOR_CHECK_SECONDS = 5.0


class Service(Protocol):
    def start(self) -> bool: ...
    def running(self) -> bool: ...


def services(settings: Settings) -> dict[str, Service]:
    """Every service `up` runs for these settings, in start order."""
    found: dict[str, Service] = {}
    if settings.embedded_postgres:
        found["postgres"] = EmbeddedPostgres(settings)
    if settings.local_kafka:
        found["kafka"] = LocalKafka(settings)
    if settings.local_connect:
        found["connect"] = LocalConnect(settings)
    if settings.start_sync:
        found["sync"] = LocalSyncWorker(settings)
    if settings.start_workflow:
        found["infer"] = LocalInference(settings)
        found["validate"] = LocalValidator(settings)
        found["stale-watch"] = LocalStaleWatch(settings)
    if settings.verify_every_min > 0:
        found["drift-watch"] = LocalDriftWatch(settings)
    if settings.start_web:
        found["web"] = LocalWeb(settings)
    return found


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def stack_file(settings: Settings) -> Path:
    return settings.run_dir / "stack.json"


def state_file(settings: Settings) -> Path:
    return settings.run_dir / "supervisor.json"


def want(settings: Settings, names: list[str]) -> None:
    """Record the wanted set: `up` with what it runs, `down` with nothing."""
    _write_json(stack_file(settings), {"wanted": names, "at": time.time()})


def wanted(settings: Settings) -> list[str]:
    names = _read_json(stack_file(settings)).get("wanted", [])
    return [n for n in names if isinstance(n, str)]


def report(settings: Settings) -> dict[str, Any]:
    """What the supervisor recorded (empty when it never ran)."""
    return _read_json(state_file(settings))


@dataclass
class _Watch:
    backoff: Backoff = field(default_factory=lambda: Backoff(initial=1.0, cap=60.0))
    next_try: float = 0.0
    restarts: int = 0
    failures: int = 0
    last_exit_at: float | None = None
    last_error: str | None = None
    state: str = "running"


@dataclass
class Supervisor:
    settings: Settings
    clock: Callable[[], float] = time.monotonic
    watches: dict[str, _Watch] = field(default_factory=dict)
    connector_restarts: int = 0
    connector_last_restart: float | None = None
    connector_last_trace: str | None = None
    _next_connector_check: float = 0.0

    def __post_init__(self) -> None:
        """Carry the counts of an earlier supervisor of the same `up` (cleared by `down`)."""
        previous = report(self.settings)
        for name, data in (previous.get("services") or {}).items():
            if isinstance(data, dict):
                self.watches[name] = _Watch(
                    restarts=int(data.get("restarts") or 0),
                    failures=int(data.get("failed_restarts") or 0),
                    last_exit_at=data.get("last_exit_at"),
                    last_error=data.get("last_error"),
                )
        connector = previous.get("connector") or {}
        self.connector_restarts = int(connector.get("restarts") or 0)
        self.connector_last_restart = connector.get("last_restart_at")

    def run(self, stop: threading.Event) -> None:
        logger.info("supervising %s", ", ".join(wanted(self.settings)) or "nothing")
        while not stop.is_set():
            self.check_once(stop)
            stop.wait(CHECK_SECONDS)
        self._save(stopping=True)

    def check_once(self, stop: threading.Event | None = None) -> None:
        names = wanted(self.settings)
        available = services(self.settings)
        for name in names:
            service = available.get(name)
            if service is None or (stop is not None and stop.is_set()):
                continue
            self._check(name, service)
        if "connect" in names or not self.settings.local_connect:
            self._check_connector()
        self._save()

    def _check(self, name: str, service: Service) -> None:
        watch = self.watches.setdefault(name, _Watch())
        try:
            alive = service.running()
        except Exception as exc:  # noqa: BLE001 - a probe that fails says nothing
            logger.debug("%s: cannot tell whether it runs: %s", name, exc)
            return
        if alive:
            if watch.state != "running":
                watch.backoff.reset()
            watch.state = "running"
            return
        now = self.clock()
        if watch.state == "running":
            watch.last_exit_at = time.time()
            logger.warning("%s is not running: restarting it", name)
            watch.state = "restarting"
            watch.next_try = now
        if now < watch.next_try:
            return
        try:
            service.start()
        except (StackError, OSError) as exc:
            watch.failures += 1
            watch.last_error = str(exc).splitlines()[0][:500] if str(exc) else repr(exc)
            delay = watch.backoff.delay()
            watch.next_try = self.clock() + delay
            logger.warning("%s: restart failed (%s); next try in %.0fs", name, exc, delay)
            return
        watch.restarts += 1
        watch.state = "running"
        logger.warning("%s restarted (%d restarts so far)", name, watch.restarts)

    def _check_connector(self) -> None:
        now = self.clock()
        if now < self._next_connector_check:
            return
        self._next_connector_check = now + CONNECTOR_CHECK_SECONDS
        client = ConnectClient(self.settings.connect_rest_url, timeout=5)
        name = self.settings.connector_name
        try:
            status = client.status(name)
            if status is None:
                return
            failed = status["connector"]["state"] == "FAILED" or any(
                t.get("state") == "FAILED" for t in status.get("tasks", [])
            )
            if not failed:
                return
            traces = [status["connector"].get("trace")] + [
                t.get("trace") for t in status.get("tasks", [])
            ]
            self.connector_last_trace = next((t for t in traces if t), None)
            first_line = (self.connector_last_trace or "").splitlines()[:1]
            logger.warning("connector %s FAILED (%s): restarting it", name, first_line)
            client.restart(name, include_tasks=True, only_failed=True)
            self.connector_restarts += 1
            self.connector_last_restart = time.time()
            # Give a restarted task time to fail again before the next restart.
            self._next_connector_check = now + 30
        except ConnectError as exc:
            logger.debug("connector check: %s", exc)

    def _save(self, stopping: bool = False) -> None:
        _write_json(
            state_file(self.settings),
            {
                "pid": os.getpid(),
                "state": "stopped" if stopping else "running",
                "at": time.time(),
                "services": {
                    name: {
                        "state": w.state,
                        "restarts": w.restarts,
                        "failed_restarts": w.failures,
                        "last_exit_at": w.last_exit_at,
                        "last_error": w.last_error,
                    }
                    for name, w in self.watches.items()
                },
                "connector": {
                    "restarts": self.connector_restarts,
                    "last_restart_at": self.connector_last_restart,
                    "last_trace": (self.connector_last_trace or "")[:2000] or None,
                },
            },
        )


def clear_state(settings: Settings) -> None:
    with contextlib.suppress(OSError):
        state_file(settings).unlink()
