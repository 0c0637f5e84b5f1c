"""Freshet's own long-running processes, started in the background by `freshet up`."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import requests

from cdc.processes import ManagedProcess, PortTakenError, port_in_use, wait_until
from freshet.settings import Settings


@dataclass(frozen=True)
class LocalSyncWorker:
    """One `freshet sync` process (more members can join the group from anywhere)."""

    settings: Settings

    @property
    def process(self) -> ManagedProcess:
        return ManagedProcess(
            name="sync worker",
            pid_file=self.settings.run_dir / "sync.pid",
            log_file=self.settings.logs_dir / "sync.log",
            marker=self.tag,
        )

    @property
    def tag(self) -> str:
        return f"freshet-sync:{self.settings.home}"

    def running(self) -> bool:
        return self.process.pid() is not None

    def start(self) -> bool:
        process = self.process
        if process.pid() is not None:
            return False
        env = dict(os.environ, FRESHET_HOME=str(self.settings.home), PYTHONUNBUFFERED="1")
        process.start([sys.executable, "-m", "freshet.cli", "sync", "--tag", self.tag], env=env)
        # The worker loads the model before it joins the group; dying early is what matters.
        wait_until(
            lambda: True,
            what="sync worker",
            timeout=1,
            log_file=process.log_file,
            alive=lambda: process.pid() is not None,
        )
        return True

    def stop(self) -> bool:
        return self.process.stop(timeout=60)


@dataclass(frozen=True)
class LocalWeb:
    """The Flask app (web UI + REST API), served on 127.0.0.1:FRESHET_WEB_PORT."""

    settings: Settings

    @property
    def process(self) -> ManagedProcess:
        return ManagedProcess(
            name="web app",
            pid_file=self.settings.run_dir / "web.pid",
            log_file=self.settings.logs_dir / "web.log",
            marker=self.tag,
        )

    @property
    def tag(self) -> str:
        return f"freshet-web:{self.settings.home}"

    def running(self) -> bool:
        return self.process.pid() is not None

    def start(self) -> bool:
        process = self.process
        if process.pid() is not None:
            return False
        if port_in_use(self.settings.web_port):
            raise PortTakenError("The web app", self.settings.web_port, "FRESHET_WEB_PORT")
        env = dict(os.environ, FRESHET_HOME=str(self.settings.home), PYTHONUNBUFFERED="1")
        process.start([sys.executable, "-m", "freshet.cli", "web", "--tag", self.tag], env=env)
        url = f"{self.settings.web_url}api/v1/health"
        wait_until(
            lambda: requests.get(url, timeout=2).status_code == 200,
            what=f"the web app ({self.settings.web_url})",
            timeout=self.settings.startup_timeout,
            log_file=process.log_file,
            alive=lambda: process.pid() is not None,
        )
        return True

    def stop(self) -> bool:
        return self.process.stop(timeout=30)
