"""Nothing a record contains stops its partition: the decoder, the router and the dead-letter
store turn every malformed record into a dead letter, whatever its bytes or size."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from freshet.cdc.events import DecodeError, Op, decode
from freshet.sync import deadletters
from freshet.sync.changes import Kind, Rejected, Router
from freshet.sync.mapping import DEFAULT_MAPPINGS, Mappings
from freshet.sync.worker import topic_pattern
from tests.support import FakeRecord

FIXTURES = Path(__file__).parent.parent / "fixtures" / "debezium"
TOPIC = "freshet.app.articles"


def insert_envelope() -> dict:
    return json.loads(json.loads((FIXTURES / "insert.json").read_text())["value"])


def router() -> Router:
    return Router(Mappings.load(DEFAULT_MAPPINGS), "freshet")


def route_one(key: bytes | None, value: bytes | None) -> tuple[list, list[Rejected]]:
    routed = router().route([FakeRecord(TOPIC, 0, 7, key, value)])
    return routed.changes, routed.rejected


@pytest.mark.parametrize(
    "value",
    [
        b"[" * 50_000 + b"]" * 50_000,  # JSON nested 50,000 deep
        b'{"op": "c", "after": {"id": 1}, "source": {}, "ts_ms": "x"}',
        b"\x01" * 200_000,
        b"\xff\xfe not utf-8",
        b'{"op": ["c"]}',
        b'{"op": "m", "source": {}}',
    ],
    ids=["deep", "ts_ms-text", "control-bytes", "not-utf8", "op-list", "op-message"],
)
def test_malformed_values_are_decode_errors(value: bytes) -> None:
    with pytest.raises(DecodeError):
        decode(b'{"id": 1}', value)


@pytest.mark.parametrize(
    ("path", "bad"),
    [
        (("source", "ts_us"), 1e30),
        (("source", "ts_us"), "soon"),
        (("source", "lsn"), float("inf")),
        (("source", "lsn"), "0/16B3748"),
        (("source", "txId"), [1]),
        (("ts_ms",), "x"),
        (("source", "sequence"), "[not json"),
    ],
)
def test_malformed_source_fields_are_decode_errors(path: tuple[str, ...], bad: object) -> None:
    envelope = insert_envelope()
    target = envelope
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = bad
    if path == ("ts_ms",):
        envelope.pop("ts_us", None)
    raw = json.dumps(envelope).replace("Infinity", "1e400").encode()
    with pytest.raises(DecodeError):
        decode(b'{"id": 990001}', raw)


def test_router_turns_every_failure_into_a_rejection_with_its_stage() -> None:
    changes, rejected = route_one(b'{"id": 1}', b"[" * 50_000)
    assert changes == []
    assert rejected[0].stage == "decode"
    assert "nested too deeply" in rejected[0].reason
    assert rejected[0].table == "app.articles"
    _, rejected = route_one(b'{"nope": 1}', json.dumps(insert_envelope()).encode())
    assert rejected[0].stage == "map" and "key column 'id'" in rejected[0].reason


def test_truncate_and_oversized_markers_become_changes() -> None:
    envelope = insert_envelope()
    truncate = dict(envelope, op="t", before=None, after=None)
    changes, rejected = route_one(None, json.dumps(truncate).encode())
    assert not rejected and changes[0].kind is Kind.TRUNCATE
    assert changes[0].lsn == envelope["source"]["lsn"]
    marker = {
        "op": "oversized",
        "source": envelope["source"],
        "ts_ms": 1,
        "oversized": {"bytes": 20_000_000, "limit": 16_777_216, "op": "u"},
    }
    decoded = decode(b'{"id": 5}', json.dumps(marker).encode())
    assert decoded.op is Op.OVERSIZED  # type: ignore[union-attr]
    changes, rejected = route_one(b'{"id": 5}', json.dumps(marker).encode())
    assert not rejected
    assert changes[0].kind is Kind.OVERSIZED and changes[0].doc_key == "5"
    assert changes[0].oversized_bytes == 20_000_000


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    key=st.one_of(
        st.none(), st.binary(max_size=64), json_values.map(lambda v: json.dumps(v).encode())
    ),
    value=st.one_of(
        st.none(),
        st.binary(max_size=256),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.fixed_dictionaries(
            {
                "op": st.sampled_from(["c", "u", "d", "r", "t", "oversized", "x"]),
                "source": json_values,
            },
            optional={"after": json_values, "before": json_values, "oversized": json_values},
        ).map(lambda v: json.dumps(v).encode()),
    ),
)
def test_router_never_raises(key: bytes | None, value: bytes | None) -> None:
    routed = router().route([FakeRecord(TOPIC, 1, 3, key, value)])
    assert len(routed.changes) + len(routed.rejected) + routed.ignored == 1


def test_storable_keeps_text_and_makes_anything_else_base64() -> None:
    assert deadletters.storable(b'{"a": 1}', 100).text == '{"a": 1}'
    nul = deadletters.storable(b"a\x00b", 100)
    assert nul.text == "base64:" + base64.b64encode(b"a\x00b").decode()
    assert deadletters.storable(b"\xff", 100).text.startswith("base64:")  # type: ignore[union-attr]
    # A text that looks like our marker is stored as base64 too, so it reads back the same.
    marker = deadletters.storable(b"base64:abc", 100)
    assert deadletters._bytes(marker.text) == b"base64:abc"


def test_storable_cuts_large_records_with_size_and_digest() -> None:
    raw = b"\x01" * 200_000
    stored = deadletters.storable(raw, 1024)
    assert stored.truncated and stored.size == 200_000
    assert stored.sha256 == hashlib.sha256(raw).hexdigest()
    assert len(stored.text or "") < 2000


def test_dlq_message_stays_under_the_default_message_limit() -> None:
    for value in (b"\x01" * 200_000, b"x" * 5_000_000, "é".encode() * 1_000_000):
        letter = Rejected(
            deadletters_position(), b"k" * 100_000, value, "decode", "DecodeError", "why " * 10_000
        )
        key, message = deadletters.dlq_message(letter)
        assert len(message) + len(key or b"") < 1_000_000
        body = json.loads(message)
        assert body["truncated"] is True and body["record_size"] == len(value)


def test_clean_text_removes_nul_and_lone_surrogates() -> None:
    cleaned = deadletters.clean_text("a\x00b\udc80c", 100)
    assert cleaned is not None
    assert "\x00" not in cleaned
    cleaned.encode("utf-8")  # no lone surrogate left


def test_topic_pattern_skips_control_tables_and_the_dead_letter_topic() -> None:
    import re

    pattern = re.compile(topic_pattern("freshet"))
    assert pattern.match("freshet.app.articles")
    assert not pattern.match("freshet.sync.dlq")
    assert not pattern.match("freshet.freshet_cdc.heartbeat")
    assert pattern.match("freshet.sync.dlqs")  # a captured table that only looks alike


def deadletters_position():  # type: ignore[no-untyped-def]
    from freshet.cdc.events import RecordPosition

    return RecordPosition(TOPIC, 0, 1)


def test_an_incremental_snapshot_read_is_ordered_by_its_stream_position() -> None:
    envelope = insert_envelope()
    envelope["op"] = "r"
    envelope["source"].update(snapshot="incremental", lsn=None, sequence='["80531008","80531010"]')
    decoded = decode(b'{"id": 990001}', json.dumps(envelope).encode())
    assert decoded.lsn == 80531010  # type: ignore[union-attr]
    changes, _ = route_one(b'{"id": 990001}', json.dumps(envelope).encode())
    assert changes[0].version == (80531010, 7)
