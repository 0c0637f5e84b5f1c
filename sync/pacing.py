"""Pacing: a large polled batch is applied in several database transactions of about
FRESHET_SYNC_TXN_SECONDS of embedding each, so its first changes are searchable after about
that long instead of after the whole batch is embedded.

A worker restarted after a kill -9 (or one meeting a burst) polls up to FRESHET_SYNC_BATCH
records at once; applied in one transaction, none of them is visible until every changed chunk
of the batch is embedded (measured by bench.recovery at 40 edits/s: 475 records, 115 texts,
8 s of embedding before the first commit). Split by document, each transaction holds every
change of its documents, so coalescing (the newest version of a document wins, and it is
embedded once) is exactly as in one transaction, and each document's changes stay in order.
How many documents fit in a transaction is learned from the batches applied so far (seconds
of embedding per document, a moving average). Only the first transaction of a batch needs to
be short: each one after it is twice as long as the one before (GROWTH), so a large batch (a
backfill, a long backlog) is applied in a few transactions whose embedding calls are large
enough to stay efficient (bench.sync_throughput, 1,500 SciFact rows: equal parts of about 1 s
reached 0.648 of the raw embedder and a peak RSS of 2.3 GiB, one transaction per batch 0.771
and 1.4 GiB; docs/sync.md, "Pacing").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from freshet.sync.changes import Change, Kind

# Weight of the newest observation in the moving average of seconds per document.
SMOOTHING = 0.3
# Documents in a transaction before anything is measured (a worker's first batch: after a
# restart, its first change is visible as soon as one document is embedded; at 40 edits/s,
# 4 documents held the first commit back by about 0.4 s on 2 cores).
FIRST_DOCUMENTS = 1
# Each transaction of a batch is this many times as long as the one before it.
GROWTH = 2


def by_document(changes: Sequence[Change], per_part: int, growth: int = 1) -> list[list[Change]]:
    """``changes`` in parts of whole documents: the first of at most ``per_part`` documents,
    each later one ``growth`` times as many as the one before; every document's changes in one
    part and in record order, documents in the order of their first change. A TRUNCATE
    concerns every document of its table, so a batch holding one stays whole."""
    if per_part < 1 or growth < 1:
        raise ValueError("per_part and growth must be at least 1")
    if any(c.kind is Kind.TRUNCATE for c in changes):
        return [list(changes)] if changes else []
    documents: dict[tuple[str, str], list[Change]] = {}
    for change in changes:
        documents.setdefault((change.table, change.doc_key), []).append(change)
    groups = list(documents.values())
    parts, start, size = [], 0, per_part
    while start < len(groups):
        parts.append([change for group in groups[start : start + size] for change in group])
        start += size
        size *= growth
    return parts


def documents_in(changes: Sequence[Change]) -> int:
    return len({(c.table, c.doc_key) for c in changes})


@dataclass
class Pacer:
    """Splits batches so that the first transaction embeds for about ``target_seconds`` and
    each later one for twice as long as the one before (0: one transaction per batch)."""

    target_seconds: float
    seconds_per_document: float | None = None

    def split(self, changes: Sequence[Change]) -> list[list[Change]]:
        if not changes:
            return []
        if self.target_seconds <= 0:
            return by_document(changes, len(changes))
        if self.seconds_per_document is None:
            per_part = FIRST_DOCUMENTS
        elif self.seconds_per_document <= 0:
            per_part = len(changes)
        else:
            per_part = max(1, int(self.target_seconds / self.seconds_per_document))
        return by_document(changes, per_part, GROWTH)

    def observe(self, documents: int, embed_seconds: float) -> None:
        """A transaction of ``documents`` documents spent ``embed_seconds`` embedding."""
        if documents <= 0:
            return
        sample = embed_seconds / documents
        if self.seconds_per_document is None:
            self.seconds_per_document = sample
        else:
            self.seconds_per_document += SMOOTHING * (sample - self.seconds_per_document)
