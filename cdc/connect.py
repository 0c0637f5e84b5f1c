"""Kafka Connect: the local distributed-mode worker, and a client for its REST API."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from freshet.cdc.jvm import java_command, plugin_dir
from freshet.cdc.processes import StackError
from freshet.cdc.service import LocalService
from freshet.cdc.templates import render_file, write_rendered
from freshet.errors import ServiceUnavailable

logger = logging.getLogger(__name__)

DEBEZIUM_CLASS = "io.debezium.connector.postgresql.PostgresConnector"


class ConnectError(StackError):
    """The Connect REST API refused a request; carries its status and message."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ConnectUnavailable(ConnectError, ServiceUnavailable):
    """The Kafka Connect REST API does not answer at all."""

    def __init__(self, url: str, detail: str) -> None:
        ServiceUnavailable.__init__(
            self,
            "Kafka Connect",
            url,
            "Start it with `freshet up`, or set CONNECT_URL to a running worker.",
            detail,
        )
        self.status = None


@dataclass(frozen=True)
class ConnectClient:
    """Thin client for the Kafka Connect REST API."""

    url: str
    timeout: float = 10.0

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        try:
            response = requests.request(
                method, f"{self.url}{path}", json=body, timeout=self.timeout
            )
        except requests.RequestException as exc:
            raise ConnectUnavailable(self.url, exc.__class__.__name__) from None
        if response.status_code >= 400:
            try:
                message = response.json().get("message", response.text)
            except ValueError:
                message = response.text
            raise ConnectError(
                f"{method} {path} -> {response.status_code}: {message}", response.status_code
            )
        if not response.content:
            return None
        return response.json()

    def info(self) -> dict[str, Any]:
        result: dict[str, Any] = self._request("GET", "/")
        return result

    def ready(self) -> bool:
        """The worker has joined its group and serves the connectors endpoint."""
        self._request("GET", "/connectors")
        return True

    def plugins(self) -> list[str]:
        return [p["class"] for p in self._request("GET", "/connector-plugins")]

    def connectors(self) -> list[str]:
        result: list[str] = self._request("GET", "/connectors")
        return result

    def config(self, name: str) -> dict[str, str] | None:
        try:
            result: dict[str, str] = self._request("GET", f"/connectors/{name}/config")
        except ConnectError as exc:
            if exc.status == 404:
                return None
            raise
        return result

    def put_config(self, name: str, config: dict[str, str]) -> bool:
        """Create or update a connector; False when the stored config was already equal."""
        current = self.config(name)
        wanted = dict(config, name=name)
        if current == wanted:
            return False
        self._request("PUT", f"/connectors/{name}/config", config)
        return True

    def status(self, name: str) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = self._request("GET", f"/connectors/{name}/status")
        except ConnectError as exc:
            if exc.status == 404:
                return None
            raise
        return result

    def pause(self, name: str) -> None:
        self._request("PUT", f"/connectors/{name}/pause")

    def resume(self, name: str) -> None:
        self._request("PUT", f"/connectors/{name}/resume")

    def restart(self, name: str, include_tasks: bool = True, only_failed: bool = False) -> None:
        tasks = "true" if include_tasks else "false"
        failed = "true" if only_failed else "false"
        self._request(
            "POST", f"/connectors/{name}/restart?includeTasks={tasks}&onlyFailed={failed}"
        )

    def delete(self, name: str) -> None:
        self._request("DELETE", f"/connectors/{name}")


def connector_state(status: dict[str, Any] | None) -> str:
    """One word for a connector and its tasks: RUNNING only when all of them run."""
    if status is None:
        return "MISSING"
    states = [status["connector"]["state"]] + [t["state"] for t in status.get("tasks", [])]
    if not status.get("tasks"):
        return "NO_TASKS" if states[0] == "RUNNING" else states[0]
    for state in ("FAILED", "PAUSED", "UNASSIGNED", "RESTARTING"):
        if state in states:
            return state
    return "RUNNING"


@dataclass(frozen=True)
class LocalConnect(LocalService):
    service_name = "Kafka Connect"
    file_stem = "connect"

    @property
    def root(self) -> Path:
        return self.settings.home / "connect"

    @property
    def marker(self) -> str:
        return str(self.root / "worker.properties")

    def start(self) -> bool:
        """Start the distributed worker; False when ours was already running."""
        if self.running():
            return False
        s = self.settings
        self.check_ports((s.connect_port, "FRESHET_CONNECT_PORT"))
        config = write_rendered(
            "connect-distributed.properties",
            {
                "BOOTSTRAP_SERVERS": s.bootstrap_servers,
                "CONNECT_PORT": str(s.connect_port),
                "PLUGIN_PATH": str(plugin_dir(s)),
            },
            self.root / "worker.properties",
        )
        self.launch(
            java_command(
                s, s.connect_heap, "org.apache.kafka.connect.cli.ConnectDistributed", str(config)
            ),
            ready=ConnectClient(s.connect_rest_url, timeout=3).ready,
            what=f"Kafka Connect ({s.connect_rest_url})",
            interval=1.0,
        )
        return True


def connector_config(values: dict[str, str]) -> tuple[str, dict[str, str]]:
    """The Debezium connector's name and config, from connectors/postgres-source.json."""
    document = json.loads(render_file("postgres-source.json", values))
    return document["name"], document["config"]


def register_connector(client: ConnectClient, values: dict[str, str]) -> bool:
    """PUT the connector config (idempotent); True when it was created or changed."""
    if DEBEZIUM_CLASS not in client.plugins():
        raise StackError(
            f"Kafka Connect at {client.url} has no Debezium PostgreSQL plugin: its plugin.path "
            f"must contain debezium-connector-postgres (run `make jars`)"
        )
    name, config = connector_config(values)
    changed = client.put_config(name, config)
    logger.info("connector %s %s", name, "registered" if changed else "unchanged")
    return changed
