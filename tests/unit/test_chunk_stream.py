"""The chunk stream's pure parts: which documents a transaction touched, the message key, the
value or tombstone of a document, and the JSON Schema the docs publish for it."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import jsonschema_rs
import numpy as np

from freshet.cdc.events import RecordPosition
from freshet.settings import PROJECT_ROOT
from freshet.sync.changes import Change, Kind
from freshet.sync.chunk_stream import TOPIC, Model, document_key, read_documents, touched
from freshet.sync.mapping import Mappings

MAPPING = Mappings.load().get("app.articles")
WHEN = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
SCHEMA = json.loads((PROJECT_ROOT / "docs" / "chunks.schema.json").read_text())


class FakeConn:
    """Answers the read-back query with fixed rows."""

    def __init__(self, rows: list[tuple[Any, ...]]) -> None:
        self.rows = rows

    def execute(self, sql: str, params: Any) -> FakeConn:
        self.params = params
        return self

    def fetchall(self) -> list[tuple[Any, ...]]:
        return self.rows


def row(key: str, index: int | None, gone: bool = False) -> tuple[Any, ...]:
    vector = np.array([0.1, -0.25, 1 / 3], dtype=np.float32) if index is not None else None
    text = f"chunk {index}" if index is not None else None
    return ("app.articles", key, "T", {"a": 1}, ["staff"], 42, WHEN, gone, index, text, "h", vector)


def test_every_changed_document_and_every_truncated_one_is_touched() -> None:
    assert MAPPING is not None
    pos = RecordPosition("t", 0, 0)
    changes = [
        Change(Kind.UPSERT, MAPPING, "1", pos),
        Change(Kind.DELETE, MAPPING, "2", pos),
        Change(Kind.TRUNCATE, MAPPING, "", pos),  # the table, not a document
    ]
    assert touched(changes, [("app.articles", "9")]) == {
        ("app.articles", "1"),
        ("app.articles", "2"),
        ("app.articles", "9"),
    }


def test_a_served_document_is_one_message_with_its_chunks_and_exact_vectors() -> None:
    conn = FakeConn([row("1", 0), row("1", 1)])
    [out] = read_documents(conn, [("app.articles", "1")], Model("m", "1.0"))
    assert (
        (out.topic, out.key)
        == (TOPIC, b"app.articles/1")
        == (TOPIC, document_key("app.articles", "1"))
    )
    assert out.value is not None
    body = json.loads(out.value)
    jsonschema_rs.validate(SCHEMA, body)  # the documented schema holds
    assert [c["chunk_index"] for c in body["chunks"]] == [0, 1]
    assert body["model"] == {"name": "m", "version": "1.0", "dim": 3}
    assert body["access_groups"] == ["staff"] and body["source_ts"] == WHEN.isoformat()
    # float32 -> JSON -> float32 gives the stored vector back bit for bit.
    back = np.array(body["chunks"][0]["embedding"], dtype=np.float32)
    assert back.tobytes() == np.array([0.1, -0.25, 1 / 3], dtype=np.float32).tobytes()


def test_a_deleted_hidden_unknown_or_empty_document_is_a_tombstone() -> None:
    rows = [row("2", None, gone=True), row("3", None)]  # 2: deleted; 3: no chunks; 4: unknown
    outs = read_documents(
        FakeConn(rows), [("app.articles", k) for k in ("2", "3", "4")], Model("m", "1")
    )
    assert [(o.key, o.value) for o in outs] == [
        (b"app.articles/2", None),
        (b"app.articles/3", None),
        (b"app.articles/4", None),
    ]
