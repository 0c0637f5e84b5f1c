"""The router (sync/changes.py) without Kafka: which document each record is routed to, as
what kind of change, and which topics it treats as captured tables at all."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest

from freshet.cdc.events import UNAVAILABLE
from freshet.sync.changes import CONTROL_SCHEMA, Kind, Router, table_of_topic
from freshet.sync.mapping import DEFAULT_MAPPINGS, Mappings
from freshet.sync.worker import topic_pattern
from tests.support import FakeRecord

FIXTURES = Path(__file__).parent.parent / "fixtures" / "debezium"


def fixture(name: str) -> FakeRecord:
    """A record captured from the running stack (tests/fixtures/debezium), as Kafka gave it."""
    f = json.loads((FIXTURES / f"{name}.json").read_text())
    return FakeRecord(
        f["topic"],
        f["partition"],
        f["offset"],
        f["key"].encode() if f["key"] is not None else None,
        f["value"].encode() if f["value"] is not None else None,
    )


def envelope(name: str) -> dict[str, Any]:
    value = fixture(name).value
    assert value is not None
    result: dict[str, Any] = json.loads(value)
    return result


def router(prefix: str = "freshet", mappings: Mappings | None = None) -> Router:
    return Router(mappings or Mappings.load(DEFAULT_MAPPINGS), prefix)


def record(topic: str, key: Any, value: Any, offset: int = 7) -> FakeRecord:
    return FakeRecord(
        topic,
        0,
        offset,
        json.dumps(key).encode() if key is not None else None,
        json.dumps(value).encode() if value is not None else None,
    )


# --- which document, as what ---------------------------------------------------------------
def test_an_insert_is_an_upsert_of_the_rows_document_with_its_source_position() -> None:
    insert = fixture("insert")
    source = envelope("insert")["source"]
    routed = router().route([insert])
    assert routed.rejected == [] and routed.ignored == 0
    (change,) = routed.changes
    assert change.kind is Kind.UPSERT
    assert (change.table, change.doc_key) == ("app.articles", "990001")
    assert change.row is not None and change.row["title"] == "Fixture row"
    assert (change.lsn, change.tx_id) == (source["lsn"], source["txId"])
    assert change.commit_time is not None and not change.snapshot
    position = change.position
    assert (position.topic, position.partition, position.offset) == (
        insert.topic,
        insert.partition,
        insert.offset,
    )
    # The record is kept byte for byte, for the dead letters should the change fail later.
    assert (change.raw_key, change.raw_value) == (insert.key, insert.value)


def test_a_delete_routes_by_key_and_carries_no_row() -> None:
    (change,) = router().route([fixture("delete")]).changes
    assert change.kind is Kind.DELETE
    assert change.doc_key == "990001"
    assert change.row is None
    assert change.lsn == envelope("delete")["source"]["lsn"]


def test_the_tombstone_after_a_delete_routes_to_the_same_document_without_a_version() -> None:
    tombstone = fixture("tombstone")
    (change,) = router().route([tombstone]).changes
    assert change.kind is Kind.TOMBSTONE
    assert (change.table, change.doc_key) == ("app.articles", "990001")
    assert change.lsn is None and change.row is None
    assert change.position.offset == tombstone.offset


def test_a_snapshot_read_is_an_upsert_marked_as_snapshot() -> None:
    read = fixture("snapshot_read")
    assert read.key is not None
    (change,) = router().route([read]).changes
    assert change.kind is Kind.UPSERT and change.snapshot
    assert change.doc_key == str(json.loads(read.key)["id"])


def test_an_unchanged_toast_column_reaches_the_writer_as_the_sentinel() -> None:
    (change,) = router().route([fixture("toast_update")]).changes
    assert change.kind is Kind.UPSERT and change.doc_key == "990002"
    assert change.row is not None
    assert change.row["body"] is UNAVAILABLE
    assert change.row["title"] == "Large row, renamed"


def test_records_keep_their_order_and_each_its_own_document() -> None:
    names = ["insert", "update", "delete", "tombstone", "toast_insert", "toast_update"]
    routed = router().route([fixture(n) for n in names])
    assert [(c.kind, c.doc_key) for c in routed.changes] == [
        (Kind.UPSERT, "990001"),
        (Kind.UPSERT, "990001"),
        (Kind.DELETE, "990001"),
        (Kind.TOMBSTONE, "990001"),
        (Kind.UPSERT, "990002"),
        (Kind.UPSERT, "990002"),
    ]
    # Version: source LSN first, then the record's offset; so the events of a row are ordered.
    versions = [c.version for c in routed.changes if c.kind is not Kind.TOMBSTONE]
    assert versions[:3] == sorted(versions[:3])


def test_a_composite_key_is_a_json_list_in_key_order() -> None:
    mappings = Mappings.parse(
        {"tables": {"app.pairs": {"key": ["region", "id"], "text": "{body}"}}}
    )
    value = dict(envelope("insert"), after={"region": "eu", "id": 4, "body": "x"})
    value["source"] = dict(value["source"], table="pairs")
    (change,) = (
        router(mappings=mappings)
        .route([record("freshet.app.pairs", {"region": "eu", "id": 4}, value)])
        .changes
    )
    assert change.doc_key == '["eu",4]'


def test_a_delete_without_a_record_key_is_keyed_by_its_old_row() -> None:
    value = envelope("delete")
    (change,) = router().route([record("freshet.app.articles", None, value)]).changes
    assert change.kind is Kind.DELETE and change.doc_key == "990001"


# --- what is rejected ----------------------------------------------------------------------
def test_an_event_of_another_table_on_a_topic_is_rejected_not_applied() -> None:
    value = envelope("insert")
    value["source"] = dict(value["source"], table="module_docs")
    routed = router().route([record("freshet.app.articles", {"id": 1}, value)])
    assert routed.changes == []
    (rejected,) = routed.rejected
    assert rejected.stage == "map"
    assert "app.module_docs on the topic of app.articles" in rejected.reason
    assert rejected.table == "app.articles"
    assert rejected.position.offset == 7


def test_a_tombstone_without_a_key_is_rejected() -> None:
    routed = router().route([FakeRecord("freshet.app.articles", 0, 3, None, None)])
    assert routed.changes == []
    assert routed.rejected[0].reason == "tombstone without a key"


def test_a_null_key_column_is_rejected_with_the_table() -> None:
    value = dict(envelope("insert"))
    value["after"] = dict(value["after"], id=None)
    routed = router().route([record("freshet.app.articles", {"id": None}, value)])
    assert routed.changes == []
    assert "app.articles: key column is null or unavailable" in routed.rejected[0].reason


def test_one_bad_record_does_not_take_its_neighbours_with_it() -> None:
    bad = FakeRecord("freshet.app.articles", 0, 8, b'{"id": 1}', b"{not json")
    routed = router().route([fixture("insert"), bad, fixture("update")])
    assert [c.kind for c in routed.changes] == [Kind.UPSERT, Kind.UPSERT]
    assert [r.position.offset for r in routed.rejected] == [8]
    assert routed.rejected[0].stage == "decode"


# --- which topics are captured tables --------------------------------------------------------
@pytest.mark.parametrize(
    ("topic", "table"),
    [
        ("freshet.app.articles", "app.articles"),
        ("freshet.freshet_cdc.heartbeat", "freshet_cdc.heartbeat"),
        ("freshet.sync.dlq", "sync.dlq"),
        ("freshet.app", None),  # no table part
        ("freshet.app.articles.extra", None),  # not PREFIX.schema.table
        ("freshetx.app.articles", None),  # another prefix that only starts alike
        ("other.app.articles", None),
        ("rag.requests", None),
        ("app.articles", None),
    ],
)
def test_table_of_topic(topic: str, table: str | None) -> None:
    assert table_of_topic(topic, "freshet") == table


def test_a_changed_topic_prefix_captures_only_its_own_topics() -> None:
    assert table_of_topic("cdc.app.articles", "cdc") == "app.articles"
    assert table_of_topic("freshet.app.articles", "cdc") is None
    assert router("cdc").route([fixture("insert")]).ignored == 1


@pytest.mark.parametrize(
    "topic",
    [
        f"freshet.{CONTROL_SCHEMA}.heartbeat",
        f"freshet.{CONTROL_SCHEMA}.signal",
        "freshet.sync.dlq",  # the worker's own dead letters: never read back as changes
        "rag.workflow.dlq",
        "freshet.app",
    ],
)
def test_control_tables_and_other_topics_are_ignored_not_rejected(topic: str) -> None:
    routed = router().route([record(topic, {"id": 1}, envelope("insert"))])
    assert routed.changes == [] and routed.rejected == []
    assert routed.ignored == 1


def test_a_table_without_a_mapping_is_ignored_and_said_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    value = envelope("insert")
    value["source"] = dict(value["source"], table="orders")
    r = router()
    with caplog.at_level(logging.WARNING, logger="freshet.sync.changes"):
        routed = r.route([record("freshet.app.orders", {"id": n}, value, n) for n in range(3)])
        routed_again = r.route([record("freshet.app.orders", {"id": 9}, value, 9)])
    assert routed.changes == [] and routed.rejected == []
    assert routed.ignored == 3 and routed_again.ignored == 1
    warnings = [m for m in caplog.messages if "app.orders has no mapping" in m]
    assert len(warnings) == 1, caplog.messages


@pytest.mark.parametrize(
    ("topic", "captured"),
    [
        ("freshet.app.articles", True),
        ("freshet.app.module_docs", True),
        ("freshet.sync.dlqs", True),  # a table that only looks like a dead-letter topic
        ("freshet.sync.dlq", False),  # the sync worker's own dead letters
        ("freshet.app.dlq", False),  # no dead-letter topic, whatever its schema
        ("rag.workflow.dlq", False),
        (f"freshet.{CONTROL_SCHEMA}.heartbeat", False),
        (f"freshet.{CONTROL_SCHEMA}.signal", False),
        ("freshet.app", False),
        ("freshet.app.articles.extra", False),
        ("other.app.articles", False),
    ],
)
def test_the_subscription_pattern_captures_table_topics_and_never_a_dead_letter_topic(
    topic: str, captured: bool
) -> None:
    assert bool(re.match(topic_pattern("freshet"), topic)) is captured
    if captured:  # what the consumer subscribes to, the router reads as a table
        table = table_of_topic(topic, "freshet")
        assert table is not None and not table.startswith(CONTROL_SCHEMA + ".")
