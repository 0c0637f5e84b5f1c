"""What every process that the launcher starts has in common: a PID file and a log under
FRESHET_HOME, a marker that tells our process from a recycled PID, ports checked before the
start, and a readiness probe that fails with the end of the log."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

from freshet.cdc.processes import ManagedProcess, PortTakenError, port_in_use, wait_until
from freshet.settings import Settings


@dataclass(frozen=True)
class LocalService:
    """Base of the stack's services; subclasses name themselves and implement ``start``."""

    settings: Settings

    service_name: ClassVar[str]  # as messages name it: "Kafka", "web app"
    file_stem: ClassVar[str]  # run/<stem>.pid and logs/<stem>.log
    stop_timeout: ClassVar[float] = 60.0

    @property
    def marker(self) -> str:
        """A string that this service's command line, and no other's, contains."""
        raise NotImplementedError

    @property
    def process(self) -> ManagedProcess:
        return ManagedProcess(
            name=self.service_name,
            pid_file=self.settings.run_dir / f"{self.file_stem}.pid",
            log_file=self.settings.logs_dir / f"{self.file_stem}.log",
            marker=self.marker,
        )

    def running(self) -> bool:
        return self.process.pid() is not None

    def stop(self) -> bool:
        """Stop it; True when a process of ours was running."""
        return self.process.stop(timeout=self.stop_timeout)

    def check_ports(self, *ports: tuple[int, str]) -> None:
        """Refuse to start when one of the (port, setting) pairs is taken by anything."""
        for port, setting in ports:
            if port_in_use(port):
                raise PortTakenError(self.service_name, port, setting)

    def launch(
        self,
        argv: Sequence[str],
        *,
        ready: Callable[[], bool],
        what: str,
        env: Mapping[str, str] | None = None,
        interval: float = 0.5,
        timeout: float | None = None,
    ) -> int:
        """Start ``argv`` as this service and wait until ``ready()`` holds; its pid."""
        process = self.process
        pid = process.start(argv, env=env)
        wait_until(
            ready,
            what=f"{what} (pid {pid})",
            timeout=self.settings.startup_timeout if timeout is None else timeout,
            log_file=process.log_file,
            alive=lambda: process.pid() is not None,
            interval=interval,
        )
        return pid
