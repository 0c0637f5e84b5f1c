"""Freshet's own long-running processes, started in the background by `freshet up`."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from cdc.processes import ManagedProcess, wait_until
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
