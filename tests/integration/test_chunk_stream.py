"""The enriched stream as a data product, on the real stack: `freshet publish-chunks` backfills
every indexed document to the compacted topic freshet.chunks, the sync worker
(FRESHET_PUBLISH_CHUNKS=true) publishes every document it changes, a delete as a tombstone, and
a consumer that reads the topic from the beginning rebuilds an identical index in a second
schema: the same chunks with the same vectors."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from kafka import KafkaConsumer

from freshet.db import connect, database_url
from freshet.settings import Settings
from freshet.sync.chunk_stream import TOPIC
from tests.conftest import freshet, wait_for
from tests.integration.conftest import WorkerThread
from tests.integration.sync_support import caught_up, chunk_texts, index, source

pytestmark = pytest.mark.integration

LIVE = """
SELECT c.source_table, c.doc_key, c.chunk_index, c.text, c.embedding
FROM rag.chunks c JOIN rag.documents d ON d.id = c.document_id
WHERE d.deleted_at IS NULL AND d.hidden_reason IS NULL
"""


def read_topic(settings: Settings) -> dict[bytes, dict[str, Any] | None]:
    """The topic from its start, the newest value per key (what compaction keeps)."""
    consumer = KafkaConsumer(
        TOPIC,
        bootstrap_servers=settings.bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
        consumer_timeout_ms=5000,
        max_partition_fetch_bytes=64 * 1024 * 1024,
        fetch_max_bytes=64 * 1024 * 1024,
    )
    state: dict[bytes, dict[str, Any] | None] = {}
    try:
        for record in consumer:
            state[record.key] = json.loads(record.value) if record.value is not None else None
    finally:
        consumer.close()
    return state


def test_a_consumer_of_the_chunk_stream_rebuilds_an_identical_index(
    running_stack: Settings,
    running_stack_env: dict[str, str],
    start_worker: Callable[..., WorkerThread],
) -> None:
    first = start_worker()
    caught_up(first)  # whatever earlier tests left is indexed first
    first.stop()  # one worker from here on: the one that publishes
    backfill = freshet(running_stack_env, "publish-chunks", "--batch", "50")
    assert backfill.returncode == 0, backfill.stdout + backfill.stderr
    assert "published" in backfill.stdout + backfill.stderr
    worker = start_worker(publish_chunks=True)
    base = 860_000_000 + uuid.uuid4().int % 10_000_000
    keys = [base, base + 1, base + 2]
    long_body = "\n\n".join(
        f"Paragraph {n} about the Ostmark tide tables and the pilot boats of harbour {n}. " * 6
        for n in range(8)
    )
    tag = uuid.uuid4().hex[:8]
    schema = f"rebuilt_{tag}"
    with source(running_stack) as src, index(running_stack) as idx:
        try:
            for key in keys:
                src.execute(
                    "INSERT INTO app.articles (id, title, body) VALUES (%s, %s, %s)",
                    (key, f"Ostmark {key}", long_body),
                )
            src.execute(
                "UPDATE app.articles SET body = 'Rewritten: one short text.' WHERE id = %s",
                (keys[1],),
            )
            src.execute("DELETE FROM app.articles WHERE id = %s", (keys[2],))

            def rewritten() -> bool:
                texts = " ".join(chunk_texts(idx, "app.articles", keys[1]))
                return "Rewritten" in texts and "Paragraph" not in texts

            assert wait_for(rewritten, 120)
            assert wait_for(lambda: not chunk_texts(idx, "app.articles", keys[2]), 120)
            caught_up(worker)  # every change applied, so every message produced

            state = read_topic(running_stack)
            assert state[f"app.articles/{keys[2]}".encode()] is None  # the delete: a tombstone
            kept = state[f"app.articles/{keys[0]}".encode()]
            assert kept is not None and kept["format"] == 1 and len(kept["chunks"]) > 1
            assert kept["model"]["dim"] == 384 and kept["model"]["name"]
            assert kept["source_lsn"] > 0 and kept["access_groups"] == []

            # Rebuild in a schema of its own, from the topic alone.
            with connect(database_url(running_stack), autocommit=True) as db:
                db.execute(f"CREATE SCHEMA {schema}")
                db.execute(
                    f"CREATE TABLE {schema}.chunks (source_table text, doc_key text,"
                    " chunk_index integer, text text, embedding vector(384))"
                )
                rows = [
                    (
                        doc["source_table"],
                        doc["doc_key"],
                        c["chunk_index"],
                        c["text"],
                        str(c["embedding"]),
                    )
                    for doc in state.values()
                    if doc is not None
                    for c in doc["chunks"]
                ]
                with db.cursor() as cur:
                    cur.executemany(
                        f"INSERT INTO {schema}.chunks VALUES (%s, %s, %s, %s, %s::vector)", rows
                    )
                missing = db.execute(f"{LIVE} EXCEPT SELECT * FROM {schema}.chunks").fetchall()
                extra = db.execute(f"SELECT * FROM {schema}.chunks EXCEPT {LIVE}").fetchall()
                live = db.execute(f"SELECT count(*) FROM ({LIVE}) AS l").fetchone()
                print(f"rebuilt {len(rows)} chunks of {live} live from {len(state)} keys")
                assert not missing and not extra, (len(missing), len(extra))
                assert live == (len(rows),)
        finally:
            src.execute("DELETE FROM app.articles WHERE id = ANY(%s)", (keys,))
            with connect(database_url(running_stack), autocommit=True) as db:
                db.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
