"""Row changes in a demo table reach its Kafka topic through Debezium, decodable and in order."""

from __future__ import annotations

import json
import time

import pytest

from freshet.cdc.events import ChangeEvent, Op, Tombstone, decode_record
from freshet.db import connect, source_database_url
from freshet.settings import Settings
from tests.support import RawRecord, TopicTail, key_is, topic_from_start

pytestmark = pytest.mark.integration

ROW_ID = 880001


def decoded(record: RawRecord) -> ChangeEvent | Tombstone:
    return decode_record(record)


def test_insert_update_delete_arrive_within_10s_and_decode(running_stack: Settings) -> None:
    settings = running_stack
    tail = TopicTail(settings.bootstrap_servers, f"{settings.topic_prefix}.app.articles")

    def mine(records: list[RawRecord]) -> list[RawRecord]:
        return [r for r in records if key_is(r, id=ROW_ID)]

    try:
        with connect(source_database_url(settings), autocommit=True) as conn:
            started = time.monotonic()
            conn.execute(
                "INSERT INTO app.articles (id, title, body, access_groups) "
                "VALUES (%s, 'Integration row', 'Original text.', '{support}')",
                (ROW_ID,),
            )
            records = mine(tail.collect(lambda rs: len(mine(rs)) >= 1, timeout=10))
            assert records, "the INSERT did not arrive on the topic within 10 s"
            insert_latency = records[0].received_at - started

            conn.execute("UPDATE app.articles SET body = 'Edited text.' WHERE id = %s", (ROW_ID,))
            records = mine(tail.collect(lambda rs: len(mine(rs)) >= 1, timeout=10))
            assert records, "the UPDATE did not arrive on the topic within 10 s"
            update = records[0]

            conn.execute("DELETE FROM app.articles WHERE id = %s", (ROW_ID,))
            records = mine(tail.collect(lambda rs: len(mine(rs)) >= 2, timeout=10))
            assert len(records) == 2, "the DELETE and its tombstone did not arrive within 10 s"
    finally:
        tail.close()

    assert insert_latency < 10
    first = decoded(update)
    assert isinstance(first, ChangeEvent)
    assert first.op is Op.UPDATE
    assert first.key == {"id": ROW_ID}
    assert first.before is None  # REPLICA IDENTITY DEFAULT
    assert first.after is not None and first.after["body"] == "Edited text."
    assert first.after["access_groups"] == ["support"]
    assert first.position.offset == update.offset

    delete, tombstone = (decoded(r) for r in records)
    assert isinstance(delete, ChangeEvent) and delete.op is Op.DELETE
    assert delete.before is not None and delete.before["id"] == ROW_ID
    assert delete.after is None
    assert isinstance(tombstone, Tombstone) and tombstone.key == {"id": ROW_ID}
    # Same key -> same partition, tombstone right behind its delete.
    assert records[1].partition == records[0].partition
    assert records[1].offset == records[0].offset + 1
    assert first.lsn is not None and delete.lsn is not None and delete.lsn > first.lsn


def test_insert_event_carries_lsn_txid_and_commit_time(running_stack: Settings) -> None:
    settings = running_stack
    tail = TopicTail(settings.bootstrap_servers, f"{settings.topic_prefix}.app.articles")
    try:
        with connect(source_database_url(settings), autocommit=True) as conn:
            row = conn.execute(
                "INSERT INTO app.articles (id, title, body) VALUES (%s, 't', 'b') "
                "RETURNING pg_current_wal_insert_lsn()::text, txid_current(), now()",
                (ROW_ID + 1,),
            ).fetchone()
            assert row is not None
            records = tail.collect(lambda rs: any(key_is(r, id=ROW_ID + 1) for r in rs), timeout=10)
            conn.execute("DELETE FROM app.articles WHERE id = %s", (ROW_ID + 1,))
    finally:
        tail.close()
    (record,) = [r for r in records if key_is(r, id=ROW_ID + 1)]
    event = decoded(record)
    assert isinstance(event, ChangeEvent) and event.op is Op.CREATE
    # The insert position, not pg_current_wal_lsn() (the write position, which can still be
    # behind this statement's own WAL record while it runs).
    hi, lo = row[0].split("/")
    assert event.lsn is not None and event.lsn <= (int(hi, 16) << 32) + int(lo, 16)
    assert event.source.tx_id == row[1]
    assert abs((event.source.commit_time - row[2]).total_seconds()) < 5
    assert json.loads(record.value or "{}")["source"]["table"] == "articles"


def test_demo_tables_were_snapshotted(running_stack: Settings) -> None:
    """Every demo row existed before the connector, so each arrives as a snapshot read."""
    settings = running_stack
    with connect(source_database_url(settings), autocommit=True) as conn:
        expected = conn.execute("SELECT count(*) FROM app.module_docs").fetchone()
    # Every row of the demo table the stack loaded (FRESHET_DEMO_ROWS of them, when set).
    assert expected is not None and expected[0] >= min(settings.demo_rows or 100, 100)
    with topic_from_start(
        settings.bootstrap_servers, f"{settings.topic_prefix}.app.module_docs"
    ) as consumer:
        reads = {
            json.loads(m.key)["name"]
            for m in consumer
            if m.value and json.loads(m.value)["op"] == "r"
        }
    assert len(reads) == expected[0]


def test_heartbeats_keep_the_slot_advancing_while_captured_tables_are_idle(
    running_stack: Settings,
) -> None:
    """WAL written only to tables outside the publication must not stay pinned by the slot."""
    settings = running_stack
    with connect(source_database_url(settings), autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS public.wal_filler (id serial, pad text)")
        conn.execute(
            "INSERT INTO public.wal_filler (pad) "
            "SELECT repeat('x', 1000) FROM generate_series(1, 5000)"
        )
        written = conn.execute("SELECT pg_current_wal_lsn()").fetchone()
        assert written is not None
        deadline = time.monotonic() + 30
        advanced = False
        while time.monotonic() < deadline and not advanced:
            row = conn.execute(
                "SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots "
                "WHERE slot_name = 'freshet_slot'",
                (written[0],),
            ).fetchone()
            advanced = bool(row and row[0])
            time.sleep(0.5)
        conn.execute("DROP TABLE public.wal_filler")
    assert advanced, "the slot's confirmed_flush_lsn did not pass the idle WAL within 30 s"
