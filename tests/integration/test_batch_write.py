"""The sync writer writes a batch's documents together (one COPY for the new chunks, so the
BM25 triggers run once), and when that fails it writes them one by one: the bad document is a
dead letter and every other one is indexed. Real router, writer, embedder and PostgreSQL."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from freshet.embedder import Embedder
from freshet.settings import Settings
from freshet.sync.changes import Router
from freshet.sync.chunking import TokenChunker
from freshet.sync.mapping import Mappings
from freshet.sync.worker import SyncWorker
from tests.integration.sync_support import index
from tests.support import FakeRecord

pytestmark = pytest.mark.integration

TABLE = "batchw.articles"
PARTITION = 98
FIRST = 880_000


def record(topic: str, offset: int, key: int, body: str, groups: list[str]) -> FakeRecord:
    value = {
        "op": "c",
        "after": {"id": key, "title": f"Note {key}", "body": body, "access_groups": groups},
        "source": {"schema": "batchw", "table": "articles", "ts_ms": 1, "lsn": 10 + offset},
    }
    return FakeRecord(
        topic, PARTITION, offset, json.dumps({"id": key}).encode(), json.dumps(value).encode()
    )


def stored(settings: Settings) -> dict[str, Any]:
    with index(settings) as conn:
        docs = conn.execute(
            "SELECT d.doc_key, count(c.id), string_agg(c.text, ' ' ORDER BY c.chunk_index)"
            " FROM rag.documents AS d"
            " LEFT JOIN rag.chunks AS c ON c.document_id = d.id"
            " WHERE d.source_table = %s AND d.deleted_at IS NULL GROUP BY d.doc_key",
            (TABLE,),
        ).fetchall()
        letters = conn.execute(
            "SELECT doc_key, stage FROM rag.dead_letters WHERE partition = %s", (PARTITION,)
        ).fetchall()
        postings = conn.execute(
            "SELECT count(*) FROM rag.text_postings AS p JOIN rag.chunks AS c"
            " ON c.id = p.chunk_id WHERE c.source_table = %s",
            (TABLE,),
        ).fetchone()
    return {
        "docs": {r[0]: (r[1], r[2]) for r in docs},
        "letters": sorted((r[0], r[1]) for r in letters),
        "postings": postings[0] if postings else 0,
    }


def test_a_batch_is_written_together_and_one_bad_document_falls_back_to_one_by_one(
    running_stack: Settings, embedder: Embedder, caplog: pytest.LogCaptureFixture
) -> None:
    worker = SyncWorker(running_stack, embedder, TokenChunker(embedder.tokenizer))  # type: ignore[attr-defined]
    articles = Mappings.load(running_stack.mappings_path).tables["app.articles"]
    worker.router = Router(
        Mappings({TABLE: replace(articles, table=TABLE)}), running_stack.topic_prefix
    )
    worker._conn = index(running_stack)
    topic = f"{running_stack.topic_prefix}.{TABLE}"
    try:
        good = [
            record(topic, n, FIRST + n, f"harbor lantern number {n} glows", ["staff"])
            for n in range(20)
        ]
        worker.process(good)
        assert "one by one" not in caplog.text  # written together
        first = stored(running_stack)
        assert len(first["docs"]) == 20
        assert all("harbor lantern" in text for _, text in first["docs"].values())
        assert first["letters"] == []
        assert first["postings"] > 0

        # One document of the next batch cannot be written: an access group with a NUL byte
        # (PostgreSQL text refuses it). The others are edits and inserts, written one by one.
        batch = [
            record(topic, 100 + n, FIRST + n, f"meadow beacon edit {n}", ["staff"])
            for n in range(10)
        ]
        batch.append(record(topic, 200, FIRST + 50, "poisoned groups", ["st\x00aff"]))
        batch += [
            record(topic, 300 + n, FIRST + 60 + n, f"fresh quartz row {n}", []) for n in range(5)
        ]
        worker.process(batch)
        assert "writing 16 documents together failed (DataError" in caplog.text
        after = stored(running_stack)
        assert after["letters"] == [(str(FIRST + 50), "write")]
        assert str(FIRST + 50) not in after["docs"]
        assert len(after["docs"]) == 25
        for n in range(10):
            text = after["docs"][str(FIRST + n)][1]
            assert f"meadow beacon edit {n}" in text and "harbor" not in text, text
        for n in range(5):
            assert f"fresh quartz row {n}" in after["docs"][str(FIRST + 60 + n)][1]
        counters = worker.metrics.snapshot()["counters"]
        assert counters["applied"] == 35 and counters["dead_letters"] == 1, counters
        chunks = sum(count for count, _ in after["docs"].values())
        assert counters["chunks_written"] == chunks + 10 and counters["chunks_deleted"] == 10
        # The BM25 postings follow the chunks either way: each chunk's terms, none of the old.
        with index(running_stack) as conn:
            orphaned = conn.execute(
                "SELECT count(*) FROM rag.text_postings AS p"
                " WHERE NOT EXISTS (SELECT 1 FROM rag.chunks AS c WHERE c.id = p.chunk_id)"
            ).fetchone()
        assert orphaned == (0,)
    finally:
        with index(running_stack) as conn:
            conn.execute("DELETE FROM rag.chunks WHERE source_table = %s", (TABLE,))
            conn.execute("DELETE FROM rag.documents WHERE source_table = %s", (TABLE,))
            conn.execute("DELETE FROM rag.dead_letters WHERE partition = %s", (PARTITION,))
        worker._close()
