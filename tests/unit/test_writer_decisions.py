"""The writer's version and tombstone decisions (sync/writer.py) without a database: which
change of a document takes effect, given what the index stores and the table's TRUNCATEs.

The predicates are pure functions; ``Writer._resolve`` combines them over a batch and, given
the stored state (what ``Writer._load`` reads), is pure too, so it is tested here directly.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest

from freshet.cdc.events import UNAVAILABLE, RecordPosition
from freshet.sync.changes import Change, Kind
from freshet.sync.mapping import DEFAULT_MAPPINGS, Mappings
from freshet.sync.writer import (
    ApplyStats,
    Writer,
    _Intent,
    _Stored,
    is_stale,
    newest_truncates,
    tombstone_acts,
)

ARTICLES = Mappings.load(DEFAULT_MAPPINGS).tables["app.articles"]
TOPIC = "freshet.app.articles"
KEY = ("app.articles", "1")


def change(
    kind: Kind,
    lsn: int | None,
    offset: int,
    *,
    partition: int = 0,
    key: str = "1",
    snapshot: bool = False,
    **row: Any,
) -> Change:
    return Change(
        kind,
        ARTICLES,
        key,
        RecordPosition(TOPIC, partition, offset),
        row={"id": int(key), "title": "T", "body": "B", "access_groups": [], **row}
        if kind is Kind.UPSERT
        else None,
        lsn=lsn,
        snapshot=snapshot,
        oversized_bytes=20_000_000 if kind is Kind.OVERSIZED else None,
        size_limit=16_777_216 if kind is Kind.OVERSIZED else None,
    )


def stored(
    lsn: int,
    offset: int,
    *,
    partition: int = 0,
    deleted: bool = False,
    hidden: bool = False,
    **row: Any,
) -> dict[tuple[str, str], _Stored]:
    return {KEY: _Stored(1, (lsn, offset), TOPIC, partition, dict(row), deleted, hidden)}


def resolve(
    changes: list[Change],
    current: dict[tuple[str, str], _Stored] | None = None,
    watermarks: dict[str, int] | None = None,
) -> tuple[list[_Intent], ApplyStats]:
    stats = ApplyStats()
    return Writer._resolve(changes, current or {}, watermarks or {}, stats), stats


# --- the predicates ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("version", "current", "truncated_at", "stale"),
    [
        ((400, 9), (500, 1), -1, True),  # an older LSN never overwrites a newer version
        ((500, 1), (500, 1), -1, True),  # the same record again (redelivery, rebalance)
        ((500, 0), (500, 1), -1, True),  # same LSN, earlier offset
        ((500, 2), (500, 1), -1, False),  # same LSN, later event of the row
        ((600, 0), (500, 9), -1, False),  # newer
        ((600, 0), (-1, -1), -1, False),  # never stored
        ((600, 0), (-1, -1), 700, True),  # older than the table's newest TRUNCATE
        ((700, 0), (-1, -1), 700, False),  # at the TRUNCATE's LSN: after it
        ((-1, 5), (-1, -1), -1, False),  # a snapshot read without an LSN, nothing stored
        ((-1, 5), (500, 1), -1, True),  # ... never beats a streamed change
    ],
)
def test_is_stale(
    version: tuple[int, int], current: tuple[int, int], truncated_at: int, stale: bool
) -> None:
    assert is_stale(version, current, truncated_at) is stale


@pytest.mark.parametrize(
    ("offset", "partition", "last", "deleted", "acts"),
    [
        (19, 0, (TOPIC, 0, 18), False, True),  # after what set the state: deletes
        (19, 0, (TOPIC, 0, 18), True, False),  # after a delete: a no-op
        (18, 0, (TOPIC, 0, 18), False, False),  # the same record's position: not after it
        (17, 0, (TOPIC, 0, 18), False, False),  # an old tombstone replayed after a re-insert
        (19, 1, (TOPIC, 0, 18), False, False),  # another partition: no order to compare
        (19, 0, ("freshet.app.other", 0, 18), False, False),  # another topic
        (19, 0, None, False, True),  # nothing stored, a live document of this batch
        (19, 0, None, True, False),  # nothing stored at all
    ],
)
def test_tombstone_acts(
    offset: int,
    partition: int,
    last: tuple[str, int, int] | None,
    deleted: bool,
    acts: bool,
) -> None:
    assert tombstone_acts(RecordPosition(TOPIC, partition, offset), last, deleted) is acts


def test_newest_truncates_keeps_the_newest_lsn_of_each_table_only() -> None:
    other = Mappings.load(DEFAULT_MAPPINGS).tables["app.module_docs"]
    changes = [
        change(Kind.TRUNCATE, 300, 1),
        change(Kind.TRUNCATE, 900, 2),
        change(Kind.TRUNCATE, 500, 3),
        change(Kind.UPSERT, 2000, 4),  # not a TRUNCATE
        Change(Kind.TRUNCATE, other, "", RecordPosition("t", 0, 1), lsn=50),
        Change(Kind.TRUNCATE, other, "", RecordPosition("t", 0, 2), lsn=None),
    ]
    assert newest_truncates(changes) == {"app.articles": 900, "app.module_docs": 50}
    assert newest_truncates([change(Kind.UPSERT, 1, 1)]) == {}


# --- one document over a batch -------------------------------------------------------------
def test_an_older_lsn_never_overwrites_the_stored_newer_version() -> None:
    intents, stats = resolve([change(Kind.UPSERT, 400, 50, body="old")], stored(500, 10))
    assert intents == []
    assert stats.stale == 1


def test_within_a_batch_the_newest_version_wins_whatever_the_arrival_order() -> None:
    intents, stats = resolve(
        [
            change(Kind.UPSERT, 600, 11, body="newest"),
            change(Kind.UPSERT, 550, 12, body="older, arrived later"),
        ],
        stored(500, 10),
    )
    (intent,) = intents
    assert intent.row is not None and intent.row["body"] == "newest"
    assert intent.last.version == (600, 11)
    assert stats.stale == 1 and stats.superseded == 0


def test_a_redelivered_batch_changes_nothing() -> None:
    batch = [change(Kind.UPSERT, 600, 11), change(Kind.DELETE, 700, 12)]
    intents, stats = resolve(batch, stored(700, 12, deleted=True))
    assert intents == []
    assert stats.stale == 2


def test_a_tombstone_after_a_delete_in_the_same_batch_is_a_no_op() -> None:
    intents, stats = resolve(
        [change(Kind.DELETE, 700, 18), change(Kind.TOMBSTONE, None, 19)], stored(500, 10)
    )
    (intent,) = intents
    assert intent.delete and intent.last.kind is Kind.DELETE
    assert stats.tombstones == 1 and stats.superseded == 0


def test_a_tombstone_after_a_stored_delete_is_a_no_op() -> None:
    intents, stats = resolve([change(Kind.TOMBSTONE, None, 19)], stored(700, 18, deleted=True))
    assert intents == []
    assert stats.tombstones == 1


def test_a_tombstone_for_a_document_never_stored_is_a_no_op() -> None:
    intents, _ = resolve([change(Kind.TOMBSTONE, None, 19)])
    assert intents == []


def test_a_newer_tombstone_deletes_a_live_document() -> None:
    # The delete event itself was lost to the index (a dead letter, say): its tombstone acts.
    (intent,), _ = resolve([change(Kind.TOMBSTONE, None, 19)], stored(500, 10))
    assert intent.delete and intent.last.kind is Kind.TOMBSTONE and intent.hide is None


def test_an_old_tombstone_never_deletes_a_reinserted_document() -> None:
    intents, _ = resolve([change(Kind.TOMBSTONE, None, 19)], stored(800, 25))
    assert intents == []
    # Nor one from another partition (the key moved partitions): no offset order holds.
    intents, _ = resolve([change(Kind.TOMBSTONE, None, 30, partition=1)], stored(800, 25))
    assert intents == []


def test_delete_tombstone_and_reinsert_in_one_batch_end_live() -> None:
    intents, stats = resolve(
        [
            change(Kind.DELETE, 700, 18),
            change(Kind.TOMBSTONE, None, 19),
            change(Kind.UPSERT, 800, 20, body="back"),
        ],
        stored(500, 10, body="before"),
    )
    (intent,) = intents
    assert not intent.delete
    assert intent.row is not None and intent.row["body"] == "back"
    assert stats.superseded == 1 and stats.tombstones == 1


def test_a_change_older_than_the_tables_truncate_is_stale_even_when_never_stored() -> None:
    intents, stats = resolve(
        [change(Kind.UPSERT, 600, 1), change(Kind.UPSERT, 950, 2, body="after")],
        watermarks={"app.articles": 900},
    )
    (intent,) = intents
    assert intent.last.lsn == 950
    assert stats.stale == 1


def test_a_toast_gap_is_filled_from_a_live_or_hidden_stored_row_only() -> None:
    gap = change(Kind.UPSERT, 600, 11, body=UNAVAILABLE)
    (intent,), _ = resolve([gap], stored(500, 10, body="stored body"))
    assert intent.row is not None and intent.row["body"] == "stored body"
    (intent,), _ = resolve([gap], stored(500, 10, deleted=True, hidden=True, body="kept"))
    assert intent.row is not None and intent.row["body"] == "kept"
    # A deleted document's row is gone: the gap stays for the source read or a dead letter.
    (intent,), _ = resolve([gap], stored(500, 10, deleted=True, body="deleted"))
    assert intent.row is not None and intent.row["body"] is UNAVAILABLE


def test_an_oversized_marker_hides_the_document_and_keeps_its_row() -> None:
    (intent,), _ = resolve([change(Kind.OVERSIZED, 600, 11)], stored(500, 10, body="stored"))
    assert intent.delete
    assert intent.hide is not None and "20,000,000 bytes" in intent.hide
    assert intent.row == {"body": "stored"}


def test_only_live_changes_that_take_effect_count_as_committed() -> None:
    at = [datetime(2026, 1, 1, 0, 0, s, tzinfo=UTC) for s in range(3)]
    live = replace(change(Kind.UPSERT, 600, 11), commit_time=at[0])
    snapshot = replace(change(Kind.UPSERT, 700, 12, snapshot=True), commit_time=at[1])
    stale = replace(change(Kind.UPSERT, 300, 13), commit_time=at[2])
    (intent,), _ = resolve([live, snapshot, stale], stored(500, 1))
    assert intent.commit_times == [at[0]]


def test_each_document_is_decided_on_its_own() -> None:
    intents, stats = resolve(
        [
            change(Kind.UPSERT, 400, 1, key="1"),  # stale against the stored (500, 10)
            change(Kind.UPSERT, 400, 2, key="2"),  # never stored: applied
        ],
        stored(500, 10),
    )
    assert [i.key for i in intents] == [("app.articles", "2")]
    assert stats.stale == 1
