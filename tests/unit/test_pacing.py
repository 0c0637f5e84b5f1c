"""Pacing (sync/pacing.py): a large batch in transactions of whole documents, sized from the
embedding time measured so far."""

from __future__ import annotations

import pytest

from freshet.cdc.events import RecordPosition
from freshet.sync.changes import Change, Kind
from freshet.sync.mapping import DEFAULT_MAPPINGS, Mappings
from freshet.sync.pacing import Pacer, by_document, documents_in

ARTICLES = Mappings.load(DEFAULT_MAPPINGS).tables["app.articles"]


def change(key: str, offset: int, kind: Kind = Kind.UPSERT) -> Change:
    return Change(
        kind, ARTICLES, key, RecordPosition("freshet.app.articles", 0, offset), lsn=offset
    )


def keys_of(parts: list[list[Change]]) -> list[list[tuple[str, int]]]:
    return [[(c.doc_key, c.position.offset) for c in part] for part in parts]


def test_every_document_stays_whole_in_one_part_in_record_order() -> None:
    batch = [change("a", 1), change("b", 2), change("a", 3), change("c", 4), change("b", 5)]
    assert keys_of(by_document(batch, 2)) == [
        [("a", 1), ("a", 3), ("b", 2), ("b", 5)],
        [("c", 4)],
    ]
    assert keys_of(by_document(batch, 10)) == [[("a", 1), ("a", 3), ("b", 2), ("b", 5), ("c", 4)]]
    # Nothing lost, nothing repeated, for any part size.
    for size in range(1, 5):
        flat = [c for part in by_document(batch, size) for c in part]
        assert sorted(c.position.offset for c in flat) == [1, 2, 3, 4, 5]
        assert all(documents_in(part) <= size for part in by_document(batch, size))


def test_a_batch_with_a_truncate_is_never_split() -> None:
    batch = [change("a", 1), change("", 2, Kind.TRUNCATE), change("b", 3)]
    assert by_document(batch, 1) == [batch]
    assert by_document([], 1) == []
    with pytest.raises(ValueError):
        by_document(batch, 0)


def test_the_pacer_starts_small_then_sizes_parts_from_measured_embedding_time() -> None:
    batch = [change(str(i), i) for i in range(40)]
    pacer = Pacer(target_seconds=1.0)
    # The first part is short; each later one twice as long as the one before.
    assert [documents_in(p) for p in pacer.split(batch)] == [1, 2, 4, 8, 16, 9]
    pacer.observe(documents=4, embed_seconds=0.8)  # 0.2 s per document: 5 per second
    assert [documents_in(p) for p in pacer.split(batch)] == [5, 10, 20, 5]
    for _ in range(20):  # slower now (a busy machine): 0.5 s per document
        pacer.observe(documents=5, embed_seconds=2.5)
    assert [documents_in(p) for p in pacer.split(batch)] == [2, 4, 8, 16, 10]
    pacer.observe(documents=3, embed_seconds=0.0)  # stale or metadata-only changes
    assert documents_in(pacer.split(batch)[0]) >= 2


def test_parts_grow_and_nothing_is_lost() -> None:
    batch = [change(str(i % 13), i) for i in range(60)]
    for first in range(1, 6):
        parts = by_document(batch, first, 2)
        sizes = [documents_in(p) for p in parts]
        assert sizes[0] == min(first, 13)
        assert all(b <= 2 * a for a, b in zip(sizes, sizes[1:], strict=False))
        assert sorted(c.position.offset for p in parts for c in p) == list(range(60))


def test_a_zero_target_keeps_one_transaction_per_batch() -> None:
    batch = [change(str(i), i) for i in range(40)]
    assert Pacer(target_seconds=0).split(batch) == [batch]
    assert Pacer(target_seconds=1.0).split([]) == []
