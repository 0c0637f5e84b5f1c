"""The Debezium event decoder, on real payloads captured from the running stack."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from freshet.cdc.events import UNAVAILABLE, ChangeEvent, DecodeError, Op, Tombstone, decode

FIXTURES = Path(__file__).parent.parent / "fixtures" / "debezium"


def load(name: str) -> dict[str, Any]:
    fixture: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text())
    return fixture


def decode_fixture(name: str) -> ChangeEvent | Tombstone:
    f = load(name)
    return decode(
        f["key"], f["value"], topic=f["topic"], partition=f["partition"], offset=f["offset"]
    )


def event(name: str) -> ChangeEvent:
    decoded = decode_fixture(name)
    assert isinstance(decoded, ChangeEvent)
    return decoded


def test_insert_decodes_op_key_after_and_source_position() -> None:
    e = event("insert")
    assert e.op is Op.CREATE
    assert e.key == {"id": 990001}
    assert e.before is None
    assert e.after is not None
    assert e.after["title"] == "Fixture row"
    assert e.after["access_groups"] == ["staff"]
    assert e.table == "app.articles"
    assert e.lsn is not None and e.lsn > 0
    assert e.source.tx_id is not None
    assert e.source.commit_time.tzinfo is UTC
    assert not e.source.is_snapshot
    assert e.position.topic == "freshet.app.articles"
    assert e.position.offset == load("insert")["offset"]


def test_update_with_replica_identity_default_has_no_before() -> None:
    e = event("update")
    assert e.op is Op.UPDATE
    assert e.before is None  # REPLICA IDENTITY DEFAULT sends only the new row
    assert e.after is not None
    assert e.after["body"].endswith("edited.")
    assert e.lsn is not None and e.lsn > event("insert").lsn  # type: ignore[operator]
    assert e.source.last_commit_lsn is not None
    assert e.unavailable_columns == frozenset()


def test_delete_carries_old_key_and_is_followed_by_tombstone() -> None:
    e = event("delete")
    assert e.op is Op.DELETE
    assert e.after is None
    assert e.before is not None and e.before["id"] == 990001
    assert e.row == e.before
    t = decode_fixture("tombstone")
    assert isinstance(t, Tombstone)
    assert t.key == {"id": 990001}
    assert t.position.offset == load("delete")["offset"] + 1


def test_toast_placeholder_is_a_sentinel_never_text() -> None:
    e = event("toast_update")
    assert e.op is Op.UPDATE
    assert e.after is not None
    assert e.after["body"] is UNAVAILABLE
    assert not isinstance(e.after["body"], str)
    assert e.unavailable_columns == frozenset({"body"})
    assert e.after["title"] == "Large row, renamed"
    inserted = event("toast_insert")
    assert inserted.after is not None and isinstance(inserted.after["body"], str)


def test_snapshot_read() -> None:
    e = event("snapshot_read")
    assert e.op is Op.READ
    assert e.source.is_snapshot
    assert e.after is not None and e.after["title"]


def test_commit_time_prefers_microseconds() -> None:
    e = event("insert")
    source = json.loads(load("insert")["value"])["source"]
    assert e.source.commit_time == datetime.fromtimestamp(source["ts_us"] / 1e6, tz=UTC)


def test_unavailable_array_placeholder() -> None:
    value = json.loads(load("toast_update")["value"])
    value["after"]["access_groups"] = ["__debezium_unavailable_value"]
    e = decode(load("toast_update")["key"], json.dumps(value))
    assert isinstance(e, ChangeEvent) and e.after is not None
    assert e.after["access_groups"] is UNAVAILABLE


def test_schema_wrapped_envelope_is_unwrapped() -> None:
    value = json.loads(load("insert")["value"])
    e = decode(load("insert")["key"], json.dumps({"schema": {}, "payload": value}))
    assert isinstance(e, ChangeEvent) and e.op is Op.CREATE


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        (b'{"id":1}', b"not json", "not JSON"),
        (b'{"id":1}', b"\xff\xfe", "not JSON"),
        (b"[1]", b"{}", "key is not a JSON object"),
        (b'{"id":1}', b"[]", "not a JSON object"),
        (b'{"id":1}', b'{"after": {}}', "no 'op'"),
        (b'{"id":1}', b'{"op": "x", "source": {}}', "unknown op"),
        (b'{"id":1}', b'{"op": "c", "after": {"id": 1}}', "no 'source'"),
        (b'{"id":1}', b'{"op": "c", "after": {"id": 1}, "source": {"ts_ms": 1}}', "lacks"),
        (b'{"id":1}', b'{"op": "c", "after": null, "source": {}}', "without 'after'"),
    ],
)
def test_malformed_records_raise_decode_error(key: bytes, value: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        decode(key, value)


def test_delete_without_before_is_malformed() -> None:
    value = json.loads(load("delete")["value"])
    value["before"] = None
    with pytest.raises(DecodeError, match="without 'before'"):
        decode(load("delete")["key"], json.dumps(value))
