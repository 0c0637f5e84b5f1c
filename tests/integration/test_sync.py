"""The sync worker against the real stack: changes become chunks exactly once in effect."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable

import pytest
from kafka import KafkaProducer

from freshet.cdc.demo import module_doc_rows
from freshet.cdc.events import UNAVAILABLE_PLACEHOLDER
from freshet.embedder import Embedder
from freshet.settings import Settings
from freshet.sync.chunking import TokenChunker
from freshet.sync.deadletters import DLQ_TOPIC
from tests.conftest import freshet, wait_for
from tests.integration.conftest import WorkerThread
from tests.integration.sync_support import (
    caught_up,
    chunk_ids,
    chunk_texts,
    document_version,
    index,
    search_keys,
    source,
)
from tests.support import TopicTail, key_is, topic_from_start

pytestmark = pytest.mark.integration

ARTICLES = "app.articles"
StartWorker = Callable[..., WorkerThread]


def long_body(paragraphs: int = 14) -> list[str]:
    """Real paragraphs from standard-library docstrings."""
    found: list[str] = []
    for row in module_doc_rows():
        found.extend(p for p in row.body.split("\n\n") if len(p) > 120)
        if len(found) >= paragraphs:
            break
    return found[:paragraphs]


def test_insert_update_delete_reach_the_index(
    running_stack: Settings, start_worker: StartWorker, embedder: Embedder
) -> None:
    worker = start_worker()
    caught_up(worker)
    key = 770001
    first = "Quokkas on Rottnest Island are small marsupials that smile at tourists."
    second = "The lighthouse keeper logged every passing ship in a leather-bound ledger."
    with source(running_stack) as src, index(running_stack) as idx:
        started = time.monotonic()
        src.execute(
            "INSERT INTO app.articles (id, title, body) VALUES (%s, 'Island wildlife', %s)",
            (key, first),
        )
        found = wait_for(
            lambda: (ARTICLES, str(key)) in search_keys(idx, embedder, first, k=3), timeout=5
        )
        assert found, "the inserted row was not searchable through rag.search within 5 s"
        insert_seconds = time.monotonic() - started

        src.execute("UPDATE app.articles SET body = %s WHERE id = %s", (second, key))
        assert wait_for(lambda: any(second in t for t in chunk_texts(idx, ARTICLES, key)), 5)
        assert not any(first in t for t in chunk_texts(idx, ARTICLES, key))
        assert (ARTICLES, str(key)) in search_keys(idx, embedder, second, k=3)

        src.execute("DELETE FROM app.articles WHERE id = %s", (key,))
        assert wait_for(lambda: not chunk_texts(idx, ARTICLES, key), 5)
        deleted = idx.execute(
            "SELECT deleted_at IS NOT NULL FROM rag.documents WHERE source_table = %s"
            " AND doc_key = %s",
            (ARTICLES, str(key)),
        ).fetchone()
        assert deleted == (True,)
        assert (ARTICLES, str(key)) not in search_keys(idx, embedder, second, k=10)
    assert insert_seconds < 5


def test_metadata_only_update_embeds_nothing_and_an_edit_embeds_only_changed_chunks(
    running_stack: Settings, start_worker: StartWorker, embedder: Embedder
) -> None:
    worker = start_worker()
    caught_up(worker)
    chunker = TokenChunker(embedder.tokenizer)  # type: ignore[attr-defined]
    key = 770010
    paragraphs = long_body()
    body = "\n\n".join(paragraphs)
    with source(running_stack) as src, index(running_stack) as idx:
        src.execute(
            "INSERT INTO app.articles (id, title, body) VALUES (%s, 'Long row', %s)", (key, body)
        )
        assert wait_for(lambda: chunk_texts(idx, ARTICLES, key), 10)
        version = document_version(idx, ARTICLES, key)
        before_ids = chunk_ids(idx, ARTICLES, key)
        assert len(before_ids) >= 4, "the test row should span several chunks"

        embedded = worker.embeddings
        src.execute("UPDATE app.articles SET updated_at = now() WHERE id = %s", (key,))
        assert wait_for(lambda: document_version(idx, ARTICLES, key) != version, 5)
        assert worker.embeddings == embedded, "a metadata-only update computed embeddings"
        assert chunk_ids(idx, ARTICLES, key) == before_ids

        edited = list(paragraphs)
        edited[7] = edited[7].replace(" ", " really ", 1)
        old_hashes = {c.hash for c in chunker.chunk("Long row\n\n" + body)}
        new_chunks = chunker.chunk("Long row\n\n" + "\n\n".join(edited))
        changed = [c for c in new_chunks if c.hash not in old_hashes]
        assert 0 < len(changed) < len(new_chunks)
        version = document_version(idx, ARTICLES, key)
        src.execute("UPDATE app.articles SET body = %s WHERE id = %s", ("\n\n".join(edited), key))
        assert wait_for(lambda: document_version(idx, ARTICLES, key) != version, 10)
        assert worker.embeddings - embedded == len(changed)
        assert chunk_texts(idx, ARTICLES, key) == [c.text for c in new_chunks]
        src.execute("DELETE FROM app.articles WHERE id = %s", (key,))


def test_replaying_topics_from_offset_zero_changes_nothing(
    running_stack: Settings, start_worker: StartWorker
) -> None:
    worker = start_worker()
    caught_up(worker)
    worker.stop()
    snapshot_sql = (
        "SELECT d.source_table, d.doc_key, d.source_lsn, d.source_seq, d.deleted_at,"
        " d.indexed_at, array_agg(c.id ORDER BY c.id), array_agg(c.updated_at ORDER BY c.id)"
        " FROM rag.documents d LEFT JOIN rag.chunks c ON c.document_id = d.id"
        " GROUP BY d.id ORDER BY d.id"
    )
    with index(running_stack) as idx:
        before = idx.execute(snapshot_sql).fetchall()
    # At least the demo's documents (FRESHET_DEMO_ROWS of each of its two tables).
    assert len(before) >= 2 * min(running_stack.demo_rows or 50, 50)

    replayer = start_worker(group=f"replay-{uuid.uuid4().hex[:8]}")
    caught_up(replayer)
    counters = replayer.worker.metrics.snapshot()["counters"]
    with index(running_stack) as idx:
        after = idx.execute(snapshot_sql).fetchall()
    assert counters["events"] > len(before)
    assert counters["applied"] == 0
    assert counters["embeddings"] == 0
    assert counters["stale"] > 0
    assert after == before


def test_malformed_record_goes_to_dead_letters_and_the_partition_keeps_flowing(
    running_stack: Settings, start_worker: StartWorker, embedder: Embedder
) -> None:
    worker = start_worker()
    caught_up(worker)
    key = 770100
    record_key = json.dumps({"id": key}, separators=(",", ":")).encode()
    producer = KafkaProducer(bootstrap_servers=running_stack.bootstrap_servers)
    topic = f"{running_stack.topic_prefix}.app.articles"
    sent = producer.send(topic, key=record_key, value=b'{"op": "c", "after": {"id": 1')
    metadata = sent.get(timeout=10)
    producer.close()
    text = "A malformed neighbour must not stop this row from being indexed."
    with source(running_stack) as src, index(running_stack) as idx:
        src.execute(
            "INSERT INTO app.articles (id, title, body) VALUES (%s, 'Next good record', %s)",
            (key, text),
        )
        assert wait_for(lambda: chunk_texts(idx, ARTICLES, key), 10)
        letter = idx.execute(
            "SELECT stage, error_type, reason, record_value FROM rag.dead_letters"
            " WHERE topic = %s AND partition = %s AND kafka_offset = %s",
            (topic, metadata.partition, metadata.offset),
        ).fetchone()
        assert letter is not None
        assert letter[0] == "decode" and letter[1] == "DecodeError"
        assert "not JSON" in letter[2]
        assert letter[3] == '{"op": "c", "after": {"id": 1'
        good = idx.execute(
            "SELECT kafka_partition, source_seq FROM rag.documents WHERE source_table = %s"
            " AND doc_key = %s",
            (ARTICLES, str(key)),
        ).fetchone()
        assert good == (metadata.partition, good[1]) and good[1] > metadata.offset  # type: ignore[index]
        src.execute("DELETE FROM app.articles WHERE id = %s", (key,))

    with topic_from_start(running_stack.bootstrap_servers, DLQ_TOPIC) as consumer:
        letters = [json.loads(m.value) for m in consumer]
    assert any(
        d["topic"] == topic and d["offset"] == metadata.offset and d["stage"] == "decode"
        for d in letters
    )


def test_toasted_column_left_unchanged_is_neither_blanked_nor_re_embedded(
    running_stack: Settings, start_worker: StartWorker
) -> None:
    worker = start_worker()
    caught_up(worker)
    key = 770200
    body = "\n\n".join(long_body(40))
    assert len(body) > 8000
    tail = TopicTail(running_stack.bootstrap_servers, f"{running_stack.topic_prefix}.app.articles")
    try:
        with source(running_stack) as src, index(running_stack) as idx:
            src.execute(
                "INSERT INTO app.articles (id, title, body) VALUES (%s, 'Toasted', %s)",
                (key, body),
            )
            assert wait_for(lambda: chunk_texts(idx, ARTICLES, key), 20)
            texts = chunk_texts(idx, ARTICLES, key)
            embedded = worker.embeddings
            version = document_version(idx, ARTICLES, key)

            src.execute("UPDATE app.articles SET updated_at = now() WHERE id = %s", (key,))
            assert wait_for(lambda: document_version(idx, ARTICLES, key) != version, 10)
            assert chunk_texts(idx, ARTICLES, key) == texts
            assert worker.embeddings == embedded

            version = document_version(idx, ARTICLES, key)
            src.execute("UPDATE app.articles SET title = 'Toasted, renamed' WHERE id = %s", (key,))
            assert wait_for(lambda: document_version(idx, ARTICLES, key) != version, 10)
            after = chunk_texts(idx, ARTICLES, key)
            assert after[0].startswith("Toasted, renamed")
            assert after[1:] == texts[1:]  # the body's chunks are intact
            assert worker.embeddings - embedded == 1
            stored = idx.execute(
                "SELECT source_row->>'body' FROM rag.documents WHERE source_table = %s"
                " AND doc_key = %s",
                (ARTICLES, str(key)),
            ).fetchone()
            assert stored == (body,)
            src.execute("DELETE FROM app.articles WHERE id = %s", (key,))
        records = tail.collect(lambda rs: sum(key_is(r, id=key) for r in rs) >= 3, timeout=10)
    finally:
        tail.close()
    updates = [json.loads(r.value) for r in records if key_is(r, id=key) and r.value]
    assert [u["op"] for u in updates[:3]] == ["c", "u", "u"]
    # Debezium really sent the placeholder: the test exercised the TOAST path.
    assert updates[1]["after"]["body"] == UNAVAILABLE_PLACEHOLDER
    assert updates[2]["after"]["body"] == UNAVAILABLE_PLACEHOLDER


def test_dlq_list_and_replay_through_the_cli(
    running_stack: Settings, running_stack_env: dict[str, str], start_worker: StartWorker
) -> None:
    """A dead letter that still fails keeps failing with its reason; one whose record now
    applies is resolved by `freshet dlq replay`."""
    from freshet.cdc.events import RecordPosition
    from freshet.sync import deadletters
    from freshet.sync.changes import Rejected

    worker = start_worker()
    caught_up(worker)
    topic = f"{running_stack.topic_prefix}.app.articles"
    with topic_from_start(running_stack.bootstrap_servers, topic) as consumer:
        good = next(m for m in consumer if m.value and json.loads(m.value)["op"] == "r")
    with index(running_stack) as idx:
        with idx.transaction():
            deadletters.store(
                idx,
                [
                    Rejected(
                        RecordPosition(topic, good.partition, good.offset),
                        good.key,
                        good.value,
                        "write",
                        "OperationalError",
                        "simulated outage",
                    ),
                    Rejected(
                        RecordPosition(topic, 0, 10**9),
                        b'{"id":1}',
                        b"{broken",
                        "decode",
                        "DecodeError",
                        "record value is not JSON",
                    ),
                ],
            )
        ids = [
            r[0]
            for r in idx.execute(
                "SELECT id FROM rag.dead_letters WHERE topic = %s AND kafka_offset IN (%s, %s)"
                " ORDER BY kafka_offset",
                (topic, good.offset, 10**9),
            )
        ]
    assert len(ids) == 2

    listed = freshet(running_stack_env, "dlq", "list", "--json", timeout=300)
    assert listed.returncode == 0, listed.stderr
    assert {d["id"] for d in json.loads(listed.stdout)} >= set(ids)

    replayed = freshet(running_stack_env, "dlq", "replay", *map(str, ids), timeout=300)
    assert replayed.returncode == 1  # one of the two still fails
    assert f"{ids[0]:>6}  resolved" in replayed.stdout
    assert f"{ids[1]:>6}  still failing: record value is not JSON" in replayed.stdout
    with index(running_stack) as idx:
        rows = idx.execute(
            "SELECT id, resolved_at IS NOT NULL, replay_count FROM rag.dead_letters"
            " WHERE id = ANY(%s) ORDER BY id",
            (ids,),
        ).fetchall()
        assert rows == [(ids[0], True, 1), (ids[1], False, 1)]
        idx.execute("DELETE FROM rag.dead_letters WHERE id = ANY(%s)", (ids,))
