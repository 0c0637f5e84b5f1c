"""Freshet's own long-running processes, started in the background by `freshet up`."""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import requests

from freshet.cdc.service import LocalService
from freshet.settings import Settings

# A worker that survives this long got past imports and settings; loading the model and
# joining the group take longer, and `freshet status` shows its heartbeat once it has.
SYNC_SURVIVAL_S = 3.0


@dataclass(frozen=True)
class FreshetCommand(LocalService):
    """A `freshet <command> --tag <marker>` process serving this FRESHET_HOME."""

    command: ClassVar[str]

    @property
    def marker(self) -> str:
        return f"freshet-{self.command}:{self.settings.home}"

    def launch_command(
        self, ready: Callable[[], bool], what: str, timeout: float | None = None
    ) -> int:
        # PYTHONFAULTHANDLER: a crash in native code (torch, a compiled model) writes the
        # Python stack of every thread to the service's log instead of dying silently.
        env = dict(
            os.environ,
            FRESHET_HOME=str(self.settings.home),
            PYTHONUNBUFFERED="1",
            PYTHONFAULTHANDLER="1",
            **self.extra_env(),
        )
        argv = [sys.executable, "-m", "freshet.cli", self.command, "--tag", self.marker]
        return self.launch(argv, ready=ready, what=what, env=env, timeout=timeout)

    def extra_env(self) -> dict[str, str]:
        """Variables this service's process gets beyond the caller's environment."""
        return {}


@dataclass(frozen=True)
class LocalWorker(FreshetCommand):
    """A consumer-group member started in the background; more can join from anywhere."""

    # Seconds the process must survive to count as started.
    survival_s: ClassVar[float] = SYNC_SURVIVAL_S

    def start(self) -> bool:
        if self.running():
            return False
        started = time.monotonic()
        self.launch_command(
            lambda: time.monotonic() - started >= self.survival_s,
            what=self.service_name,
            timeout=self.survival_s + 5,
        )
        return True


@dataclass(frozen=True)
class LocalSyncWorker(LocalWorker):
    """One `freshet sync` process of group rag-sync."""

    service_name = "sync worker"
    file_stem = "sync"
    command = "sync"

    def extra_env(self) -> dict[str, str]:
        # Static group membership: when this worker dies and the supervisor restarts it, the
        # group hands the new process the same partitions at once instead of waiting out the
        # dead member's session and rebalancing. The id names this host and FRESHET_HOME, of
        # which `up` runs one sync worker; a worker started by hand keeps dynamic membership.
        return {"FRESHET_SYNC_INSTANCE_ID": sync_instance_id(self.settings)}


def sync_instance_id(settings: Settings) -> str:
    """The static group.instance.id of `freshet up`'s sync worker (FRESHET_SYNC_INSTANCE_ID
    when set)."""
    if settings.sync_instance_id:
        return settings.sync_instance_id
    home = hashlib.sha256(str(settings.home).encode()).hexdigest()[:10]
    return f"freshet-sync-{socket.gethostname()[:200]}-{home}"


@dataclass(frozen=True)
class LocalWeb(FreshetCommand):
    """The Flask app (web UI + REST API), served on 127.0.0.1:FRESHET_WEB_PORT."""

    service_name = "web app"
    file_stem = "web"
    command = "web"
    stop_timeout = 30.0

    def start(self) -> bool:
        if self.running():
            return False
        self.check_ports((self.settings.web_port, "FRESHET_WEB_PORT"))
        url = f"{self.settings.web_url}api/v1/health"
        self.launch_command(
            lambda: requests.get(url, timeout=2).status_code == 200,
            what=f"the web app ({self.settings.web_url})",
        )
        return True


@dataclass(frozen=True)
class LocalInference(LocalWorker):
    """`freshet infer`: rag.requests -> retrieve + answer -> rag.answers.raw."""

    service_name = "inference worker"
    file_stem = "infer"
    command = "infer"


@dataclass(frozen=True)
class LocalValidator(LocalWorker):
    """`freshet validate`: rag.answers.raw -> answer rules -> rag.answers / .rejected."""

    service_name = "validator worker"
    file_stem = "validate"
    command = "validate"


@dataclass(frozen=True)
class LocalStaleWatch(LocalWorker):
    """`freshet stale-watch`: change topics -> answers whose cited rows changed -> stale."""

    service_name = "stale watcher"
    file_stem = "stale-watch"
    command = "stale-watch"


@dataclass(frozen=True)
class LocalDriftWatch(LocalWorker):
    """`freshet drift-watch`: `freshet verify` every FRESHET_VERIFY_EVERY_MIN minutes."""

    service_name = "drift watcher"
    file_stem = "drift-watch"
    command = "drift-watch"


@dataclass(frozen=True)
class LocalSupervisor(LocalWorker):
    """`freshet supervise`: restarts what `up` started when it dies (cdc/supervisor.py)."""

    service_name = "supervisor"
    file_stem = "supervise"
    command = "supervise"
    stop_timeout = 15.0
    survival_s = 1.0
