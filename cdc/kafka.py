"""The local Kafka broker in KRaft mode: format its storage once, then start it."""

from __future__ import annotations

import base64
import logging
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

from freshet.cdc.jvm import java_command
from freshet.cdc.processes import StackError, port_in_use
from freshet.cdc.service import LocalService
from freshet.cdc.templates import write_rendered
from freshet.errors import ServiceUnavailable
from freshet.settings import Settings

logger = logging.getLogger(__name__)


class KafkaUnavailable(ServiceUnavailable):
    """No bootstrap address of the Kafka cluster accepts a connection."""

    def __init__(self, bootstrap_servers: str) -> None:
        super().__init__(
            "Kafka",
            bootstrap_servers,
            "Start it with `freshet up`, or set KAFKA_BOOTSTRAP_SERVERS to a running cluster.",
            "nothing listens there",
        )


def max_request_bytes(settings: Settings) -> int:
    """The broker's and producers' per-message limit: the largest change event plus headroom
    for its key, headers and batch framing (the event limit counts the value only)."""
    return settings.max_event_bytes + (1 << 20)


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
                "MAX_REQUEST_BYTES": str(max_request_bytes(s)),
            },
            self.root / "server.properties",
        )

    def _format(self, config: Path) -> None:
        """Format KRaft storage once; the cluster id is kept beside the data."""
        if (self.root / "data" / "meta.properties").exists():
            return
        cluster_id_file = self.root / "cluster.id"
        known = cluster_id_file.read_text().strip() if cluster_id_file.exists() else ""
        if not known or known.startswith("-"):  # not formatted yet: a bad id can go
            cluster_id_file.write_text(new_cluster_id())
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


def require_broker(bootstrap_servers: str) -> None:
    """Raise KafkaUnavailable unless some bootstrap address accepts TCP."""
    if not _reachable(bootstrap_servers):
        raise KafkaUnavailable(bootstrap_servers)


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


def new_cluster_id() -> str:
    """A KRaft cluster id: a base64url UUID of 22 characters that does not start with '-'
    (as Kafka's own Uuid.randomUuid() ensures): the storage tool would read such an id as an
    option, and one fresh stack in 64 failed to format."""
    while True:
        raw = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not raw.startswith("-"):
            return raw


def ensure_topic_limits(bootstrap_servers: str, prefix: str, limit: int) -> list[str]:
    """Raise max.message.bytes of the existing change topics (PREFIX.*) to ``limit``, so a
    topic created before the limit was raised (or by another tool) accepts what the connector
    sends; topics the connector creates later get it from its topic.creation settings. Returns
    the topics changed."""
    from kafka import KafkaAdminClient
    from kafka.admin import ConfigResource, ConfigResourceType

    admin = KafkaAdminClient(
        bootstrap_servers=bootstrap_servers, client_id="freshet-limits", request_timeout_ms=10000
    )
    try:
        topics = sorted(t for t in admin.list_topics() if t.startswith(prefix + "."))
        if not topics:
            return []
        described = admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, t, ["max.message.bytes"]) for t in topics],
            config_filter="all",
        )
        low = []
        for by_name in described.values():
            for name, configs in by_name.items():
                entry = configs.get("max.message.bytes")
                value = entry.get("value") if isinstance(entry, dict) else entry
                if value is not None and int(value) < limit:
                    low.append(name)
        if low:
            admin.alter_configs(
                [
                    ConfigResource(ConfigResourceType.TOPIC, t, {"max.message.bytes": str(limit)})
                    for t in low
                ]
            )
            logger.info("raised max.message.bytes to %d on %s", limit, ", ".join(low))
        return low
    finally:
        admin.close()
