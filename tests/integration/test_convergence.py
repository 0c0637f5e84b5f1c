"""`freshet verify` against the real stack: it finds planted differences of each kind, and
`--repair` fixes them through the pipeline (Debezium's signal table, version-guarded removals);
and 10,000 generated records through the real router and writer never stop the worker."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from freshet.embedder import Embedder
from freshet.settings import Settings
from freshet.sync.changes import Router
from freshet.sync.chunking import TokenChunker
from freshet.sync.mapping import Mappings
from freshet.sync.worker import SyncWorker
from tests.conftest import freshet, wait_for
from tests.integration.conftest import WorkerThread
from tests.integration.sync_support import caught_up, index, source
from tests.support import FakeRecord

pytestmark = pytest.mark.integration

StartWorker = Callable[..., WorkerThread]
KEYS = {"missing": 771101, "stale": 771102, "acl": 771103, "duplicated": 771104}
ORPHAN = "771199"


def verify(env: dict[str, str], *args: str) -> tuple[int, dict[str, Any]]:
    result = freshet(env, "verify", "--table", "app.articles", "--json", "--settle", "3", *args)
    assert result.stdout.strip(), result.stderr
    return result.returncode, json.loads(result.stdout)


def keys_of(report: dict[str, Any], kind: str) -> set[str]:
    samples = report["tables"]["app.articles"]["samples"].get(kind, [])
    return {s["key"] for s in samples}


def versions(settings: Settings, keys: list[str]) -> dict[str, tuple[int, int]]:
    with index(settings) as conn:
        rows = conn.execute(
            "SELECT doc_key, source_lsn, source_seq FROM rag.documents"
            " WHERE source_table = 'app.articles' AND doc_key = ANY(%s)",
            (keys,),
        ).fetchall()
    return {r[0]: (r[1], r[2]) for r in rows}


def test_verify_finds_each_planted_difference_and_repair_fixes_them_through_the_pipeline(
    running_stack: Settings, running_stack_env: dict[str, str], start_worker: StartWorker
) -> None:
    worker = start_worker()
    with source(running_stack) as src:
        for kind, key in KEYS.items():
            src.execute(
                "INSERT INTO app.articles (id, title, body, access_groups) VALUES (%s, %s, %s, %s)",
                (
                    key,
                    f"Planted {kind}",
                    f"A row planted to test verify: {kind}.\n\nIts second paragraph.",
                    ["staff"],
                ),
            )
    caught_up(worker)
    assert wait_for(lambda: len(versions(running_stack, [str(k) for k in KEYS.values()])) == 4, 60)
    code, report = verify(running_stack_env)
    assert code == 0, json.dumps(report["tables"], indent=1)
    before = versions(running_stack, [str(k) for k in KEYS.values()])

    # Damage the index behind the pipeline's back, one kind of difference per row.
    with index(running_stack) as idx:
        idx.execute(
            "DELETE FROM rag.documents WHERE source_table = 'app.articles' AND doc_key = %s",
            (str(KEYS["missing"]),),
        )
        idx.execute(
            "UPDATE rag.chunks SET text_hash = 'stale' WHERE source_table = 'app.articles'"
            " AND doc_key = %s AND chunk_index = 0",
            (str(KEYS["stale"]),),
        )
        idx.execute(
            "UPDATE rag.chunks SET access_groups = '{}' WHERE source_table = 'app.articles'"
            " AND doc_key = %s",
            (str(KEYS["acl"]),),
        )
        idx.execute(
            "INSERT INTO rag.chunks (document_id, source_table, doc_key, chunk_index, text,"
            " text_hash, embedding, metadata, access_groups, source_lsn)"
            " SELECT document_id, source_table, doc_key, chunk_index + 100, text, text_hash,"
            " embedding, metadata, access_groups, source_lsn FROM rag.chunks"
            " WHERE source_table = 'app.articles' AND doc_key = %s",
            (str(KEYS["duplicated"]),),
        )
        doc = idx.execute(
            "INSERT INTO rag.documents (source_table, doc_key, title, access_groups,"
            " content_hash, source_lsn) VALUES ('app.articles', %s, 'orphan', '{}', 'x', 1)"
            " RETURNING id",
            (ORPHAN,),
        ).fetchone()
        assert doc is not None
        idx.execute(
            "INSERT INTO rag.chunks (document_id, source_table, doc_key, chunk_index, text,"
            " text_hash, embedding, source_lsn) SELECT %s, 'app.articles', %s, 0, 'orphan text',"
            " 'h', embedding, 1 FROM rag.chunks LIMIT 1",
            (doc[0], ORPHAN),
        )

    code, report = verify(running_stack_env)
    assert code == 1
    assert keys_of(report, "missing") == {str(KEYS["missing"])}
    assert keys_of(report, "stale") == {str(KEYS["stale"])}
    assert keys_of(report, "acl") == {str(KEYS["acl"])}
    assert keys_of(report, "duplicated") == {str(KEYS["duplicated"])}
    assert keys_of(report, "orphaned") == {ORPHAN}
    status = json.loads(freshet(running_stack_env, "status", "--json").stdout)
    assert status["verify"]["in_sync"] is False
    assert status["verify"]["counts"]["orphaned"] == 1

    code, report = verify(running_stack_env, "--repair", "--wait", "180")
    assert code == 0, report
    assert report["in_sync"] is True
    assert report["repair"]["resnapshot"] == 4 and report["repair"]["orphans_removed"] == 1
    # The repaired rows came back through Debezium: new change events set their versions.
    after = versions(running_stack, [str(k) for k in KEYS.values()])
    for kind in ("stale", "acl", "duplicated"):
        assert after[str(KEYS[kind])] > before[str(KEYS[kind])], kind
    with index(running_stack) as idx:
        gone = idx.execute(
            "SELECT deleted_at IS NOT NULL, source_lsn > 1 FROM rag.documents"
            " WHERE source_table = 'app.articles' AND doc_key = %s",
            (ORPHAN,),
        ).fetchone()
        chunks = idx.execute(
            "SELECT count(*) FROM rag.chunks WHERE source_table = 'app.articles' AND doc_key = %s",
            (ORPHAN,),
        ).fetchone()
    assert gone == (True, True), "the orphan is a versioned delete marker"
    assert chunks == (0,)
    status = json.loads(freshet(running_stack_env, "status", "--json").stdout)
    assert status["verify"]["in_sync"] is True
    with source(running_stack) as src:
        src.execute("DELETE FROM app.articles WHERE id >= 771100 AND id < 771200")
    caught_up(worker)


# --- fuzzing the real path ---------------------------------------------------------------------
# The fuzz writes documents of a table of its own (no such table in the source: reading a row
# back fails too), so a generated TRUNCATE or delete cannot touch another test's rows.
FUZZ_TABLE = "fuzz.articles"
FUZZ_PARTITION = 99
nasty_text = st.text(max_size=40) | st.sampled_from(
    ["", "\x00", "\ud800", "a\x00b", "\x01" * 50, "[" * 30, "é" * 20, "base64:AAAA"]
)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | nasty_text
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(nasty_text, inner, max_size=3),
    max_leaves=8,
)
row_ids = st.integers(min_value=600_000, max_value=600_050) | json_values
rows = st.fixed_dictionaries(
    {"id": row_ids},
    optional={
        "title": nasty_text | json_values,
        "body": nasty_text | json_values | st.just("__debezium_unavailable_value"),
        "access_groups": st.lists(nasty_text, max_size=3) | json_values,
        "updated_at": json_values,
    },
)
sources = st.fixed_dictionaries(
    {"schema": st.just("fuzz") | nasty_text, "table": st.just("articles") | nasty_text},
    optional={
        "ts_ms": st.integers(min_value=0, max_value=2**62) | json_values,
        "ts_us": st.integers(min_value=0, max_value=2**70) | st.floats(),
        "lsn": st.integers(min_value=0, max_value=2**63) | json_values,
        "txId": json_values,
        "snapshot": st.sampled_from(["false", "true", "incremental", "last"]) | nasty_text,
        "sequence": nasty_text | st.just('["1","2"]'),
    },
)
envelopes = st.fixed_dictionaries(
    {"op": st.sampled_from(["c", "u", "d", "r", "t", "oversized", "m"]) | json_values},
    optional={
        "after": rows | json_values,
        "before": rows | json_values,
        "source": sources | json_values,
        "ts_ms": json_values,
        "oversized": st.fixed_dictionaries({"bytes": json_values, "limit": json_values}),
    },
)


def _encode(value: Any) -> bytes:
    return json.dumps(value).encode()  # ASCII: lone surrogates and NUL travel as \u escapes


# Events that look right, with nasty content: most of them reach the writer and the database.
plausible = st.builds(
    lambda op, key, title, body, groups, lsn: (
        _encode({"id": key}),
        _encode(
            {
                "op": op,
                "after": {"id": key, "title": title, "body": body, "access_groups": groups},
                "before": {"id": key},
                "source": {"schema": "fuzz", "table": "articles", "ts_ms": 1, "lsn": lsn},
            }
        ),
    ),
    st.sampled_from(["c", "u", "r", "d"]),
    st.integers(min_value=600_000, max_value=600_050),
    nasty_text,
    nasty_text | st.text(min_size=100, max_size=400),
    st.lists(nasty_text, max_size=3),
    st.integers(min_value=1, max_value=2**40),
)
records = plausible | st.tuples(
    st.none() | st.binary(max_size=30) | rows.map(lambda r: _encode({"id": r["id"]})),
    st.none()
    | st.binary(max_size=200)
    | envelopes.map(_encode)
    | st.sampled_from([b"[" * 20_000, b'{"op": "c", "source": {"ts_us": 1e30}}']),
)
FUZZED: list[int] = []


def test_10000_generated_records_through_the_real_router_and_writer_never_raise(
    running_stack: Settings, embedder: Embedder
) -> None:
    worker = SyncWorker(running_stack, embedder, TokenChunker(embedder.tokenizer))  # type: ignore[attr-defined]
    articles = Mappings.load(running_stack.mappings_path).tables["app.articles"]
    worker.router = Router(
        Mappings({FUZZ_TABLE: replace(articles, table=FUZZ_TABLE)}), running_stack.topic_prefix
    )
    worker._conn = index(running_stack)
    offsets = iter(range(10**9))
    topic = f"{running_stack.topic_prefix}.{FUZZ_TABLE}"

    @settings(
        max_examples=400,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(batch=st.lists(records, min_size=20, max_size=40))
    def run(batch: list[tuple[bytes | None, bytes | None]]) -> None:
        worker.process(
            [FakeRecord(topic, FUZZ_PARTITION, next(offsets), key, value) for key, value in batch]
        )
        FUZZED.append(len(batch))

    try:
        run()
    finally:
        with index(running_stack) as conn:
            conn.execute("DELETE FROM rag.documents WHERE source_table = %s", (FUZZ_TABLE,))
            conn.execute("DELETE FROM rag.dead_letters WHERE partition = %s", (FUZZ_PARTITION,))
            conn.execute("DELETE FROM rag.truncations WHERE source_table = %s", (FUZZ_TABLE,))
            conn.execute("DELETE FROM rag.mapping_problems WHERE source_table = %s", (FUZZ_TABLE,))
        worker._close()
    assert sum(FUZZED) >= 10_000, f"only {sum(FUZZED)} records were generated"
    counters = worker.metrics.snapshot()["counters"]
    assert counters["events"] == sum(FUZZED)
    # Both ends of the path were exercised: records written and records dead-lettered.
    assert counters["dead_letters"] > 1000, counters
    assert counters["applied"] > 100, counters


def test_up_raises_the_message_limit_of_existing_change_topics(running_stack: Settings) -> None:
    """A change topic made before the limit was raised (or by another tool) accepts events up
    to FRESHET_MAX_EVENT_BYTES again after `freshet up`."""
    from kafka import KafkaAdminClient
    from kafka.admin import ConfigResource, ConfigResourceType

    from freshet.cdc.kafka import ensure_topic_limits, max_request_bytes

    topic = f"{running_stack.topic_prefix}.app.module_docs"
    admin = KafkaAdminClient(bootstrap_servers=running_stack.bootstrap_servers)
    try:
        admin.alter_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic, {"max.message.bytes": "1048588"})]
        )
        limit = max_request_bytes(running_stack)
        changed = ensure_topic_limits(
            running_stack.bootstrap_servers, running_stack.topic_prefix, limit
        )
        assert topic in changed
        described = admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic, ["max.message.bytes"])],
            config_filter="all",
        )
        value = next(iter(described.values()))[topic]["max.message.bytes"]["value"]
        assert int(value) == limit
        assert (
            ensure_topic_limits(running_stack.bootstrap_servers, running_stack.topic_prefix, limit)
            == []
        )
    finally:
        admin.close()
