"""Freshness: time from a source commit to the new text being visible in rag.chunks.

    .venv/bin/python -m bench.freshness [--seconds 60]

A private stack and one `freshet sync` process on the same 2 cores. Multi-paragraph rows
(SciFact abstracts, read at run time) get one-paragraph edits at 5/s and at 20/s, then
whole-text rewrites at 2/s. Each edit carries a unique marker; a reader polls rag.chunks every
5 ms on its own connection and stamps when the marker becomes visible. Reports
p50/p95/p99/max per phase. Targets at 5 edits/s: p50 <= 100 ms, p99 <= 250 ms.
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import threading
import time
from typing import Any

from bench.common import (
    count_documents,
    print_table,
    private_stack,
    scifact_corpus,
    sync_process,
    wait_until,
    write_results,
)
from freshet.cdc.demo import create_demo_schema
from freshet.db import connect, database_url, source_database_url
from freshet.settings import Settings

ROWS = 20
MARKER = re.compile(r"\[rev-[^\]\s]+\]")
# label -> (edits per second, whole-text rewrite instead of a one-paragraph edit)
PHASES = {"edit-5/s": (5.0, False), "edit-20/s": (20.0, False), "rewrite-2/s": (2.0, True)}
PARAGRAPHS = 6
FIRST_ID = 500000


class Reader(threading.Thread):
    """Polls the chunks of the benchmark rows and stamps each marker's first sighting."""

    def __init__(self, settings: Settings, keys: list[str]) -> None:
        super().__init__(daemon=True)
        self.settings = settings
        self.keys = keys
        self.pending: dict[str, float] = {}  # marker -> commit time
        self.seen: dict[str, float] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def expect(self, marker: str, committed_at: float) -> None:
        with self.lock:
            self.pending[marker] = committed_at

    def run(self) -> None:
        try:
            self._poll()
        except BaseException as exc:
            self.error = exc
            raise

    def _poll(self) -> None:
        with connect(database_url(self.settings), autocommit=True) as conn:
            while not self.stop.is_set():
                with self.lock:
                    markers = list(self.pending)
                if markers:
                    texts = [
                        r[0]
                        for r in conn.execute(
                            "SELECT text FROM rag.chunks WHERE source_table = 'app.articles'"
                            " AND doc_key = ANY(%s) AND text LIKE '%%[rev-%%'",
                            (self.keys,),
                        )
                    ]
                    now = time.time()
                    # One pass over the text, whatever the number of pending markers (edits
                    # superseded before they were indexed stay pending for good).
                    visible = set(MARKER.findall("\n".join(texts)))
                    with self.lock:
                        for marker in visible.intersection(self.pending):
                            self.seen[marker] = now - self.pending.pop(marker)
                time.sleep(0.005)


def run_phase(
    settings: Settings,
    reader: Reader,
    current: list[list[str]],
    rate: float,
    seconds: float,
    rewrite: bool,
    pool: list[str],
    label: str,
) -> list[float]:
    rng = random.Random(label)
    results_before = set(reader.seen)
    markers: list[str] = []
    with connect(source_database_url(settings), autocommit=True) as conn:
        started = time.monotonic()
        n = 0
        while time.monotonic() - started < seconds:
            row = n % ROWS
            marker = f"[rev-{label}-{n}]"
            if rewrite:
                current[row] = [
                    f"{p} {marker}" if i == 0 else p
                    for i, p in enumerate(rng.sample(pool, PARAGRAPHS))
                ]
            else:
                # One paragraph of the row as it is now gets a new marker (in place of the
                # one it may carry): the other paragraphs stay exactly as they are.
                target = rng.randrange(PARAGRAPHS)
                current[row][target] = f"{_unmarked(current[row][target])} {marker}"
            body = "\n\n".join(current[row])
            conn.execute(
                "UPDATE app.articles SET body = %s, updated_at = now() WHERE id = %s",
                (body, FIRST_ID + row),
            )
            reader.expect(marker, time.time())
            markers.append(marker)
            n += 1
            time.sleep(max(0.0, started + n / rate - time.monotonic()))
    wait_until(lambda: all(m in reader.seen for m in markers), 30, 0.05)
    missing = [m for m in markers if m not in reader.seen]
    if missing:
        # A row edited again before the worker read the first edit is applied once, at its
        # newest version; a marker that the newer edit replaced is never indexed.
        print(
            f"  {len(missing)} edits of phase {label} were superseded before indexing", flush=True
        )
    return [reader.seen[m] for m in markers if m in reader.seen and m not in results_before]


def _unmarked(paragraph: str) -> str:
    return paragraph.split(" [rev-", 1)[0]


def summary(latencies: list[float]) -> dict[str, Any]:
    ordered = sorted(latencies)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return {
        "count": len(ordered),
        "p50_ms": pct(0.50),
        "p95_ms": pct(0.95),
        "p99_ms": pct(0.99),
        "max_ms": ordered[-1] * 1000,
        "mean_ms": statistics.fmean(ordered) * 1000,
        "latencies_ms": [round(t * 1000, 2) for t in latencies],  # for the histogram
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument(
        "--phases",
        default=",".join(PHASES),
        help=f"comma-separated subset of {','.join(PHASES)}",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for the private stack, e.g. FRESHET_CDC_POLL_INTERVAL_MS=25",
    )
    args = parser.parse_args()
    chosen = args.phases.split(",")
    if unknown := [p for p in chosen if p not in PHASES]:
        parser.error(f"unknown phase(s) {unknown}; choose from {list(PHASES)}")
    overrides = dict(item.split("=", 1) for item in args.set)
    abstracts = [d["text"] for d in scifact_corpus(ROWS * PARAGRAPHS * 3)]
    paragraphs = [abstracts[i * PARAGRAPHS : (i + 1) * PARAGRAPHS] for i in range(ROWS)]
    keys = [str(FIRST_ID + i) for i in range(ROWS)]

    with private_stack("bench-fresh", **overrides) as bench:
        settings = bench.settings
        with connect(source_database_url(settings), autocommit=True) as conn:
            create_demo_schema(conn)  # app.articles, without the demo rows
            for i in range(ROWS):
                conn.execute(
                    "INSERT INTO app.articles (id, title, body) VALUES (%s, %s, %s)",
                    (FIRST_ID + i, f"Freshness row {i}", "\n\n".join(paragraphs[i])),
                )
        reader = Reader(settings, keys)
        with sync_process(bench, "bench-fresh-worker"):
            try:
                if not wait_until(lambda: count_documents(settings, "app.articles") >= ROWS, 600):
                    raise SystemExit("the rows were not indexed; see the worker's log")
                time.sleep(3)
                reader.start()
                current = [list(p) for p in paragraphs]  # each row's text as it is now
                phases = {}
                for label in chosen:
                    rate, rewrite = PHASES[label]
                    print(f"phase {label} for {args.seconds:.0f}s ...", flush=True)
                    latencies = run_phase(
                        settings, reader, current, rate, args.seconds, rewrite, abstracts, label
                    )
                    phases[label] = summary(latencies)
            finally:
                reader.stop.set()

    rows = []
    for label, s in phases.items():
        rows.append(
            (
                label,
                f"n={s['count']:<5} p50 {s['p50_ms']:6.1f} ms  p95 {s['p95_ms']:6.1f} ms"
                f"  p99 {s['p99_ms']:6.1f} ms  max {s['max_ms']:6.1f} ms",
            )
        )
    print_table(
        "freshness: source commit -> visible in rag.chunks (targets at 5/s: p50 <= 100 "
        "ms, p99 <= 250 ms)",
        rows,
    )
    write_results(
        "freshness",
        {
            "phases": phases,
            "rows": ROWS,
            "paragraphs_per_row": PARAGRAPHS,
            "seconds_per_phase": args.seconds,
            "overrides": overrides,
            "settings": {
                "cdc_poll_interval_ms": settings.cdc_poll_interval_ms,
                "cdc_linger_ms": settings.cdc_linger_ms,
                "sync_fetch_wait_ms": settings.sync_fetch_wait_ms,
            },
            "targets": {"edit-5/s": {"p50_ms": 100, "p99_ms": 250}},
        },
    )


if __name__ == "__main__":
    main()
