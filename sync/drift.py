"""Drift on a schedule: `freshet drift-watch` runs `freshet verify` every
FRESHET_VERIFY_EVERY_MIN minutes (`freshet up` starts it when the setting is above 0), so that an
index that diverges from its source is noticed without anyone asking.

Each run is recorded in rag.verify_runs like a run by hand; `freshet status`, the status page
(a small chart) and the sync worker's metrics endpoint show the runs over time (`history`).
Read only: it reports differences and never repairs (`freshet verify --repair` does, on
request). A run that fails (the source or the index away) is logged and tried again at the
next interval.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import psycopg

from freshet.settings import Settings
from freshet.sync.verify import Report, save
from freshet.sync.verify_cli import compare, databases

logger = logging.getLogger(__name__)

# How many runs `history` gives (the status page's chart).
HISTORY = 48
# Seconds a run waits for changes in flight to settle before it reports a difference.
SETTLE_S = 30.0


def run_once(settings: Settings, chunker: Any, settle: float = SETTLE_S) -> Report:
    """One verify of every mapped table, saved to rag.verify_runs."""
    with databases(settings) as (source, index):
        report = compare(settings, source, index, chunker, settle=settle)
        save(index, report)
    return report


def watch(settings: Settings, stop: threading.Event, chunker: Any) -> int:
    """Run every FRESHET_VERIFY_EVERY_MIN minutes until ``stop``; the runs done."""
    every_s = settings.verify_every_min * 60
    runs = 0
    while not stop.is_set():
        started = time.monotonic()
        try:
            # Settling may take a quarter of the interval at most.
            report = run_once(settings, chunker, min(SETTLE_S, every_s / 4))
        except (psycopg.Error, OSError) as exc:
            logger.warning("drift-watch: verify failed (%s); next try in %.0f s", exc, every_s)
        else:
            runs += 1
            differing = {k: v for k, v in report.counts().items() if v}
            logger.info(
                "drift-watch: %d rows checked in %.1f s: %s",
                report.rows_checked,
                time.monotonic() - started,
                "in sync" if report.in_sync else f"differs {differing}",
            )
        stop.wait(max(0.0, every_s - (time.monotonic() - started)))
    return runs


def history(conn: Any, limit: int = HISTORY) -> list[dict[str, Any]]:
    """The newest ``limit`` finished runs, oldest first: when, rows, in sync, differences."""
    rows = conn.execute(
        "SELECT finished_at, rows_checked, counts, in_sync FROM rag.verify_runs"
        " WHERE finished_at IS NOT NULL ORDER BY id DESC LIMIT %s",
        (limit,),
    ).fetchall()
    return [
        {
            "finished_at": r[0].isoformat(),
            "rows_checked": r[1],
            "in_sync": r[3],
            "differences": sum(int(v) for v in (r[2] or {}).values()),
        }
        for r in reversed(rows)
    ]
