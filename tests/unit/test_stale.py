"""The stale watcher's pure parts: which change events can make a citation stale, the newest
change per row, and the event it publishes."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from freshet.answering.answers import StoredAnswer
from freshet.answering.messages import STALE
from freshet.answering.users import User
from freshet.cdc.events import RecordPosition
from freshet.sync.changes import Change, Kind
from freshet.sync.mapping import Mappings
from freshet.workflow.stale import RowChange, event, newest_per_row

MAPPING = Mappings.load().get("app.articles")
WHEN = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)


def change(kind: Kind, lsn: int | None = 100, snapshot: bool = False, key: str = "7") -> Change:
    assert MAPPING is not None
    return Change(
        kind,
        MAPPING,
        key,
        RecordPosition("freshet.app.articles", 0, 1),
        lsn=lsn,
        commit_time=WHEN,
        snapshot=snapshot,
    )


def test_updates_deletes_oversized_rows_and_truncates_can_make_a_citation_stale() -> None:
    assert RowChange.of(change(Kind.UPSERT)) == RowChange("app.articles", "7", 100, "update", WHEN)
    assert RowChange.of(change(Kind.DELETE)).op == "delete"  # type: ignore[union-attr]
    assert RowChange.of(change(Kind.OVERSIZED)).op == "oversized"  # type: ignore[union-attr]
    truncate = RowChange.of(change(Kind.TRUNCATE, key=""))
    assert truncate is not None and (truncate.doc_key, truncate.op) == ("", "truncate")


def test_snapshot_reads_tombstones_and_events_without_a_position_are_not_changes() -> None:
    assert RowChange.of(change(Kind.UPSERT, snapshot=True)) is None  # a re-snapshot reads all
    assert RowChange.of(change(Kind.TOMBSTONE, lsn=None)) is None  # follows its delete
    assert RowChange.of(change(Kind.UPSERT, lsn=None)) is None


def test_the_newest_change_of_each_row_is_kept() -> None:
    rows = [
        RowChange("app.articles", "7", 100, "update", WHEN),
        RowChange("app.articles", "7", 300, "delete", WHEN),
        RowChange("app.articles", "7", 200, "update", WHEN),
        RowChange("app.articles", "8", 150, "update", WHEN),
    ]
    assert sorted((r.doc_key, r.lsn) for r in newest_per_row(rows)) == [("7", 300), ("8", 150)]


def test_the_event_is_keyed_by_answer_and_says_what_changed() -> None:
    out = event(("a1", "app.articles", "7", 90, 100, "update", WHEN, WHEN))
    assert (out.topic, out.key) == (STALE, b"a1")
    assert json.loads(out.value) == {
        "format": 1,
        "answer_id": "a1",
        "source_table": "app.articles",
        "doc_key": "7",
        "cited_lsn": 90,
        "changed_lsn": 100,
        "op": "update",
        "committed_at": WHEN.isoformat(),
        "detected_at": WHEN.isoformat(),
    }


def test_a_stale_answer_says_since_when_and_what_changed() -> None:
    change_ = {"source_table": "app.articles", "doc_key": "7", "op": "delete"}
    answer = StoredAnswer(
        "a1", "q", User("ann"), "approved", {"answer": "x"}, stale_at=WHEN, stale=(change_,)
    )
    assert answer.to_dict()["stale"] == {"since": WHEN.isoformat(), "changes": [change_]}
    assert "stale" not in StoredAnswer("a2", "q", User("ann"), "approved", {}).to_dict()
