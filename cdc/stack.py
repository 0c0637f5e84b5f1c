"""`freshet up | down | status`: the local stack as one unit.

Order of `up`: PostgreSQL -> migrations -> captured schema + publication (+ demo data) -> Kafka ->
Connect -> Debezium connector. Each step is skipped when its service is external (a URL setting
is given) or already running, so `up` is idempotent. `down` stops, in reverse order, only the
processes whose PID files this launcher wrote.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from typing import Any

import requests
from alembic import command
from alembic.config import Config

from freshet.cdc import readings, supervisor
from freshet.cdc.connect import ConnectClient, LocalConnect, connector_state
from freshet.cdc.connect import register_connector as put_connector
from freshet.cdc.kafka import LocalKafka, describe_kafka, ensure_topic_limits, max_request_bytes
from freshet.cdc.postgres import EmbeddedPostgres
from freshet.cdc.processes import PortTakenError, StackError, pid_alive, port_in_use
from freshet.cdc.services import (
    LocalDriftWatch,
    LocalInference,
    LocalStaleWatch,
    LocalSupervisor,
    LocalSyncWorker,
    LocalValidator,
    LocalWeb,
)
from freshet.cdc.source import (
    connector_values,
    prepare_source,
    slot_status,
    write_connector_secrets,
)
from freshet.db import CDC_ROLE, connect, database_url, redact, source_database_url
from freshet.resources import migrations_dir
from freshet.settings import Settings

logger = logging.getLogger(__name__)

Report = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def migrate(url: str) -> None:
    """Upgrade schema `rag` to the newest Alembic revision."""
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.set_main_option("path_separator", "os")
    config.attributes["url"] = url
    config.attributes["configure_logging"] = False
    command.upgrade(config, "head")


def up(settings: Settings, report: Report = _quiet) -> dict[str, bool]:
    """Start what is not running; returns, per component, whether this call started it."""
    started: dict[str, bool] = {}
    preflight(settings)
    settings.home.mkdir(parents=True, exist_ok=True)
    if settings.embedded_postgres:
        report(f"PostgreSQL: starting (embedded, 127.0.0.1:{settings.pg_port})")
        started["postgres"] = EmbeddedPostgres(settings).start()
    url = database_url(settings)
    report("migrations: upgrading schema rag to head")
    migrate(url)

    source_url = source_database_url(settings)
    source_embedded = settings.embedded_postgres and not settings.source_database_url
    with connect(source_url, autocommit=True) as conn:
        if settings.load_demo:
            from freshet.cdc.demo import load_demo

            inserted = load_demo(conn, limit=settings.demo_rows or None)
            report(f"demo data: {inserted} new rows in schema app")
        prepare_source(conn, cdc_role=CDC_ROLE if source_embedded else None)

    if settings.local_kafka:
        report(f"Kafka: starting (KRaft, 127.0.0.1:{settings.kafka_port})")
        started["kafka"] = LocalKafka(settings).start()
    if settings.local_connect:
        report(f"Kafka Connect: starting ({settings.connect_rest_url})")
        started["connect"] = LocalConnect(settings).start()

    secrets_file = write_connector_secrets(settings, source_url, source_embedded)
    client = ConnectClient(settings.connect_rest_url)
    started["connector"] = put_connector(
        client, connector_values(settings, source_url, secrets_file)
    )
    report(f"connector {settings.connector_name}: waiting for RUNNING")
    wait_for_connector(client, settings.connector_name, settings.startup_timeout)
    try:
        ensure_topic_limits(
            settings.bootstrap_servers, settings.topic_prefix, max_request_bytes(settings)
        )
    except Exception as exc:  # noqa: BLE001 - an external cluster may refuse; say so
        logger.warning(
            "could not raise max.message.bytes of the change topics to %d (%s): rows larger "
            "than the topics' limit will fail the connector task",
            max_request_bytes(settings),
            exc,
        )
    if settings.start_sync:
        report("sync worker: starting (log in FRESHET_HOME/logs/sync.log)")
        started["sync"] = LocalSyncWorker(settings).start()
    if settings.start_workflow:
        report(
            "async answer workflow: starting an inference and a validator worker, and the"
            " stale watcher"
        )
        started["infer"] = LocalInference(settings).start()
        started["validate"] = LocalValidator(settings).start()
        started["stale-watch"] = LocalStaleWatch(settings).start()
    if settings.verify_every_min > 0:
        report(f"drift watcher: `freshet verify` every {settings.verify_every_min:g} min")
        started["drift-watch"] = LocalDriftWatch(settings).start()
    if settings.start_web:
        report(f"web app: starting ({settings.web_url})")
        started["web"] = LocalWeb(settings).start()
    supervisor.want(settings, list(supervisor.services(settings)))
    if settings.supervise:
        started["supervisor"] = LocalSupervisor(settings).start()
    return started


def preflight(settings: Settings) -> None:
    """Fail before starting anything when a port of a service we must start is taken."""
    checks: list[tuple[str, int, str, bool]] = []
    if settings.embedded_postgres:
        running = EmbeddedPostgres(settings).running()
        checks.append(("PostgreSQL", settings.pg_port, "FRESHET_PG_PORT", running))
    if settings.local_kafka:
        running = LocalKafka(settings).running()
        checks.append(("Kafka", settings.kafka_port, "FRESHET_KAFKA_PORT", running))
        checks.append(
            ("Kafka", settings.kafka_controller_port, "FRESHET_KAFKA_CONTROLLER_PORT", running)
        )
    if settings.local_connect:
        running = LocalConnect(settings).running()
        checks.append(("Kafka Connect", settings.connect_port, "FRESHET_CONNECT_PORT", running))
    if settings.start_web:
        running = LocalWeb(settings).running()
        checks.append(("The web app", settings.web_port, "FRESHET_WEB_PORT", running))
    for service, port, setting, ours_running in checks:
        if not ours_running and port_in_use(port):
            raise PortTakenError(service, port, setting)


def wait_for_connector(client: ConnectClient, name: str, timeout: float) -> dict[str, Any]:
    """Until the connector and all its tasks run; a FAILED task raises with its trace."""
    deadline = time.monotonic() + timeout
    status: dict[str, Any] | None = None
    restarted_at: float | None = None
    while time.monotonic() < deadline:
        status = client.status(name)
        state = connector_state(status)
        if state == "RUNNING" and status is not None:
            return status
        if state == "FAILED" and status is not None:
            # A restarted worker first reports the state stored before it stopped, which may
            # be an old failure: restart failed parts once, and believe FAILED only after that.
            if restarted_at is None:
                logger.info("connector %s reports FAILED; restarting failed tasks once", name)
                client.restart(name, include_tasks=True, only_failed=True)
                restarted_at = time.monotonic()
            elif time.monotonic() - restarted_at > 15:
                raise StackError(f"connector {name} FAILED:\n{failure_trace(status)}")
        time.sleep(0.5)
    raise StackError(f"connector {name} not RUNNING after {timeout:.0f}s; last status: {status}")


def failure_trace(status: dict[str, Any]) -> str:
    parts = []
    if status["connector"].get("trace"):
        parts.append(f"connector: {status['connector']['trace']}")
    for task in status.get("tasks", []):
        if task.get("trace"):
            parts.append(f"task {task['id']}: {task['trace']}")
    return "\n".join(parts) or "(no trace reported)"


def down(settings: Settings, report: Report = _quiet) -> dict[str, bool]:
    """Stop what this launcher started, newest first; returns what was running."""
    stopped: dict[str, bool] = {}
    # Nothing is wanted any more: the supervisor must not restart what is being stopped.
    supervisor.want(settings, [])
    stopped["supervisor"] = LocalSupervisor(settings).stop()
    supervisor.clear_state(settings)
    for name, component in (
        ("web", LocalWeb(settings)),
        ("stale-watch", LocalStaleWatch(settings)),
        ("drift-watch", LocalDriftWatch(settings)),
        ("validate", LocalValidator(settings)),
        ("infer", LocalInference(settings)),
        ("sync", LocalSyncWorker(settings)),
        ("connect", LocalConnect(settings)),
        ("kafka", LocalKafka(settings)),
        ("postgres", EmbeddedPostgres(settings)),
    ):
        was_running = component.stop()
        stopped[name] = was_running
        report(f"{name}: {'stopped' if was_running else 'not running'}")
    return stopped


def status(settings: Settings) -> dict[str, Any]:
    """Every component's state, the connector and its tasks, the slot and dead letters."""
    result: dict[str, Any] = {"home": str(settings.home)}
    pg = EmbeddedPostgres(settings)
    postgres: dict[str, Any] = {"embedded": settings.embedded_postgres}
    if settings.embedded_postgres:
        postgres["pid"] = pg.pid()
    try:
        url = database_url(settings)
        postgres["url"] = redact(url)
        with connect(url, autocommit=True) as conn:
            postgres["version"] = readings.server_version(conn)
            postgres["state"] = "RUNNING"
            result["dead_letters"] = readings.dead_letters(conn)
            result["workers"] = _workers(conn)
            result.update(readings.convergence(conn))
            result["text_index"] = readings.text_index(conn)
            result["embedding_model"] = readings.embedding_model(conn)
        with connect(source_database_url(settings), autocommit=True) as conn:
            result["slot"] = slot_status(conn)
    except Exception as exc:  # noqa: BLE001 - status reports, it does not fail
        postgres["state"] = "DOWN"
        postgres["error"] = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
    result["postgres"] = postgres

    kafka = describe_kafka(settings.bootstrap_servers)
    kafka["bootstrap_servers"] = settings.bootstrap_servers
    kafka["local"] = settings.local_kafka
    if settings.local_kafka:
        kafka["pid"] = LocalKafka(settings).process.pid()
    result["kafka"] = kafka
    if kafka.get("state") == "RUNNING":
        topics = kafka.get("topics")
        result["lag"] = _lag(settings, [str(t) for t in topics] if isinstance(topics, list) else [])

    connect_info: dict[str, Any] = {
        "url": settings.connect_rest_url,
        "local": settings.local_connect,
    }
    if settings.local_connect:
        connect_info["pid"] = LocalConnect(settings).process.pid()
    reading = readings.read_connect(
        settings.connect_rest_url, settings.connector_name, timeout=5, version=True
    )
    if reading.version is not None or reading.reachable:
        connect_info["version"] = reading.version
    if reading.reachable:
        connect_info["state"] = "RUNNING"
        result["connector"] = reading.connector()
    else:
        connect_info["state"] = "DOWN"
        connect_info["error"] = reading.error
        result["connector"] = {"name": settings.connector_name, "state": "UNKNOWN"}
    result["connect"] = connect_info
    workflow = {
        name: step.process.pid()
        for name, step in (
            ("infer", LocalInference(settings)),
            ("validate", LocalValidator(settings)),
            ("stale-watch", LocalStaleWatch(settings)),
        )
    }
    if settings.start_workflow or any(workflow.values()):
        result["workflow"] = {
            name: {"pid": pid, "state": "RUNNING" if pid else "DOWN"}
            for name, pid in workflow.items()
        }
    web_pid = LocalWeb(settings).process.pid()
    if web_pid is not None or settings.start_web:
        result["web"] = {"url": settings.web_url, "pid": web_pid, "state": _web_state(settings)}
    result["services"] = _services(settings)
    return result


def _lag(settings: Settings, topics: list[str]) -> dict[str, Any]:
    """Each captured table's changes not yet in the index (the sync group's committed offsets
    to the topic's end) and how long ago the oldest of them was committed; a table over
    FRESHET_LAG_WARNING_S is a warning."""
    import re

    from freshet.sync.changes import topic_pattern
    from freshet.sync.lag import group_lag

    pattern = re.compile(topic_pattern(settings.topic_prefix))
    try:
        tables = group_lag(
            settings.bootstrap_servers,
            settings.sync_group,
            settings.topic_prefix,
            [t for t in topics if pattern.match(t)],
        )
    except Exception as exc:  # noqa: BLE001 - status reports, it does not fail
        return {"error": str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)}
    figures = {t: v.as_dict() for t, v in tables.items()}
    for entry in figures.values():
        entry["warning"] = entry["seconds"] > settings.lag_warning_s
    return {"tables": figures, "warning_s": settings.lag_warning_s}


def _services(settings: Settings) -> dict[str, Any]:
    """Each background service: RUNNING, DIED (wanted by `up`, not running: the supervisor
    restarts it) or STOPPED (by `down`, or never started), with its restart count."""
    wanted = set(supervisor.wanted(settings))
    recorded = supervisor.report(settings)
    watched = recorded.get("services") or {}
    supervisor_pid = LocalSupervisor(settings).process.pid()
    result: dict[str, Any] = {
        "supervisor": {
            "state": "RUNNING" if supervisor_pid else ("DIED" if wanted else "STOPPED"),
            "pid": supervisor_pid,
            "connector_restarts": (recorded.get("connector") or {}).get("restarts", 0),
        }
    }
    for name, service in supervisor.services(settings).items():
        try:
            running = service.running()
        except Exception:  # noqa: BLE001 - status reports, it does not fail
            running = False
        info = watched.get(name) or {}
        result[name] = {
            "state": "RUNNING" if running else ("DIED" if name in wanted else "STOPPED"),
            "restarts": info.get("restarts", 0),
            "last_exit_at": info.get("last_exit_at"),
            "last_error": info.get("last_error"),
        }
    return result


def _web_state(settings: Settings) -> str:
    try:
        response = requests.get(f"{settings.web_url}api/v1/health", timeout=3)
    except requests.RequestException:
        return "DOWN"
    return "RUNNING" if response.status_code == 200 else f"HTTP {response.status_code}"


def _workers(conn: Any) -> list[dict[str, Any]]:
    """Sync workers that sent a heartbeat in the last 10 minutes, with lag and freshness."""
    workers = []
    here = socket.gethostname()
    for row in readings.worker_rows(conn, within_s=600):
        progress = row["progress"] or {}
        age = row["heartbeat_age_s"]
        state = row["state"] if row["state"] in ("stopped", "died") or age < 30 else "silent"
        if (
            state not in ("stopped", "died")
            and row["hostname"] == here
            and not pid_alive(row["pid"])
        ):
            state = "died"  # killed without a word (kill -9, OOM): its process is gone
        workers.append(
            {
                "worker_id": row["worker_id"],
                "group": row["group_id"],
                "state": state,
                "heartbeat_age_s": round(float(age), 1),
                "events_applied": row["events_applied"],
                "events_stale": row["events_skipped"],
                "embeddings": row["embeddings"],
                "events_per_sec": row["events_per_sec"],
                "lag": sum((row["lag"] or {}).values()),
                "lag_by_partition": row["lag"] or {},
                "freshness": progress.get("freshness", {}),
                "dead_letters": progress.get("counters", {}).get("dead_letters", 0),
                "last_error": row["last_error"],
            }
        )
    return workers
