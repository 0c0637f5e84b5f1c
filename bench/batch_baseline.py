"""The usual alternative to streaming, as a baseline: a job that runs every N minutes and
re-embeds every row changed since its last run (whole rows: a cron job sees that a row changed,
not which of its paragraphs).

bench.freshness replays the very edits of its streaming phase through this schedule: an edit
committed at t is in the index when the first run after t has embedded its rows, so its
staleness is (run time - t) + that run's embedding time. The embedding time per chunk is
measured with the real embedder in the same run; where the schedule's runs fall relative to the
edits is chance, so the staleness is pooled over several evenly spread offsets of the schedule.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

OFFSETS = 12


@dataclass(frozen=True)
class Edit:
    committed_at: float  # seconds (any clock, the same as the phase's)
    row: str


def replay(
    edits: Sequence[Edit],
    interval_s: float,
    chunks_per_row: Mapping[str, int],
    seconds_per_chunk: float,
    start: float,
    offsets: int = OFFSETS,
) -> dict[str, Any]:
    """Staleness of each edit and embeddings computed under a job every ``interval_s``
    seconds whose first run is at ``start`` + offset, pooled over ``offsets`` offsets."""
    if interval_s <= 0 or offsets < 1:
        raise ValueError("interval_s and offsets must be positive")
    if not edits:
        return {"count": 0, "runs": 0, "embeddings": 0.0}
    staleness: list[float] = []
    embeddings = 0
    runs = 0
    for k in range(offsets):
        first = start + interval_s * (k + 1) / offsets
        by_run: dict[int, list[Edit]] = {}
        for edit in edits:
            # The first run at or after the commit.
            m = max(0, math.ceil((edit.committed_at - first) / interval_s))
            by_run.setdefault(m, []).append(edit)
        for m, window in by_run.items():
            chunks = sum(chunks_per_row.get(row, 1) for row in {e.row for e in window})
            done = first + m * interval_s + chunks * seconds_per_chunk
            staleness.extend(done - e.committed_at for e in window)
            embeddings += chunks
            runs += 1
    ordered_s = sorted(staleness)

    def pct(q: float) -> float:
        return ordered_s[min(len(ordered_s) - 1, int(q * len(ordered_s)))] * 1000

    return {
        "count": len(edits),
        "p50_ms": pct(0.50),
        "p95_ms": pct(0.95),
        "p99_ms": pct(0.99),
        "max_ms": ordered_s[-1] * 1000,
        "mean_ms": sum(ordered_s) / len(ordered_s) * 1000,
        "runs": runs / offsets,  # per schedule
        "embeddings": embeddings / offsets,  # per schedule, over the same edits
    }
