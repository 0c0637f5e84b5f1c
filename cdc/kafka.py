"""The local Kafka broker in KRaft mode: format its storage once, then start it."""

from __future__ import annotations

import base64
import logging
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

from cdc.jvm import java_command
from cdc.processes import StackError, port_in_use
from cdc.service import LocalService
from cdc.templates import write_rendered

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalKafka(LocalService):
    service_name = "Kafka"
    file_stem = "kafka"

    @property
    def root(self) -> Path:
        return self.settings.home / "kafka"

    @property
    def marker(self) -> str:
        return str(self.root / "server.properties")

    def _config(self) -> Path:
        s = self.settings
        return write_rendered(
            "kafka-server.properties",
            {
                "KAFKA_PORT": str(s.kafka_port),
                "KAFKA_CONTROLLER_PORT": str(s.kafka_controller_port),
                "KAFKA_DATA_DIR": str(self.root / "data"),
            },
            self.root / "server.properties",
        )

    def _format(self, config: Path) -> None:
        """Format KRaft storage once; the cluster id is kept beside the data."""
        if (self.root / "data" / "meta.properties").exists():
            return
        cluster_id_file = self.root / "cluster.id"
        if not cluster_id_file.exists():
            # A KRaft cluster id is a base64url UUID of 22 characters.
            raw = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
            cluster_id_file.write_text(raw)
        cluster_id = cluster_id_file.read_text().strip()
        argv = java_command(
            self.settings,
            "256m",
            "kafka.tools.StorageTool",
            "format",
            "-t",
            cluster_id,
            "-c",
            str(config),
            "--ignore-formatted",
        )
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise StackError(
                f"formatting Kafka storage failed: {result.stdout.strip()} {result.stderr.strip()}"
            )

    def start(self) -> bool:
        """Start the broker; False when ours was already running."""
        if self.running():
            return False
        s = self.settings
        self.check_ports(
            (s.kafka_port, "FRESHET_KAFKA_PORT"),
            (s.kafka_controller_port, "FRESHET_KAFKA_CONTROLLER_PORT"),
        )
        self.root.mkdir(parents=True, exist_ok=True)
        config = self._config()
        self._format(config)
        self.launch(
            java_command(s, s.kafka_heap, "kafka.Kafka", str(config)),
            ready=lambda: broker_ready(s.bootstrap_servers),
            what=f"Kafka (127.0.0.1:{s.kafka_port})",
        )
        return True


def _reachable(bootstrap_servers: str) -> bool:
    """Some bootstrap address accepts TCP (checked before a client is built: kafka-python
    leaves sockets open when its first connection is refused)."""
    for address in bootstrap_servers.split(","):
        host, _, port = address.strip().rpartition(":")
        if host and port.isdigit() and port_in_use(int(port), host=host.strip("[]")):
            return True
    return False


def broker_ready(bootstrap_servers: str) -> bool:
    """True when the cluster answers a metadata request."""
    from kafka import KafkaAdminClient

    if not _reachable(bootstrap_servers):
        return False

    admin = KafkaAdminClient(
        bootstrap_servers=bootstrap_servers,
        client_id="freshet-health",
        request_timeout_ms=3000,
    )
    try:
        admin.list_topics()
        return True
    finally:
        admin.close()


def describe_kafka(bootstrap_servers: str) -> dict[str, object]:
    """Broker reachability and topics, for `freshet status`."""
    from kafka import KafkaAdminClient

    if not _reachable(bootstrap_servers):
        return {"state": "DOWN", "error": f"nothing listens at {bootstrap_servers}"}
    try:
        admin = KafkaAdminClient(
            bootstrap_servers=bootstrap_servers,
            client_id="freshet-status",
            request_timeout_ms=3000,
        )
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return {"state": "DOWN", "error": str(exc)}
    try:
        topics = sorted(t for t in admin.list_topics() if not t.startswith("__"))
        return {"state": "RUNNING", "topics": topics}
    except Exception as exc:  # noqa: BLE001
        return {"state": "DOWN", "error": str(exc)}
    finally:
        admin.close()
