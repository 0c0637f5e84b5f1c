"""Freshness: time from a source commit to the new text being visible in rag.chunks.

    .venv/bin/python -m bench.freshness [--seconds 60] [--load]

A private stack and one `freshet sync` process on the same 2 cores. Multi-paragraph rows
(SciFact abstracts, read at run time) get one-paragraph edits at 5/s and at 20/s, then
whole-text rewrites at 2/s. Each edit carries a unique marker; a reader polls rag.chunks every
5 ms on its own connection (PostgreSQL answers which pending markers are in their row's
chunks) and stamps when the marker becomes visible. Reports p50/p95/p99/max per phase, the
embeddings the worker computed, and what the reader itself cost (its polls and CPU seconds, in
its thread and its PostgreSQL backend). Targets at 5 edits/s: p50 <= 100 ms, p99 <= 250 ms.

--load runs a noisy neighbour beside the stack for the whole run (bench/load.py: a second
process embedding continuously with one thread); its results go to freshness_load.json.

Beside each phase, the batch baseline (bench/batch_baseline.py): the same edits replayed
through a job that re-embeds the changed rows every 1 and every 5 minutes, with the embedding
time per chunk measured in the same run: its staleness and the embeddings it computes.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench.batch_baseline import Edit, replay
from bench.common import (
    count_documents,
    print_table,
    private_stack,
    scifact_corpus,
    sync_process,
    wait_until,
    write_results,
)
from bench.load import neighbour
from freshet.cdc.demo import create_demo_schema
from freshet.db import connect, database_url, source_database_url
from freshet.embedder import embedder_from_settings
from freshet.settings import Settings

ROWS = 20
# label -> (edits per second, whole-text rewrite instead of a one-paragraph edit)
PHASES = {
    "edit-5/s": (5.0, False),
    "edit-20/s": (20.0, False),
    "rewrite-2/s": (2.0, True),
    "edit-40/s": (40.0, False),
}
# What runs unless --phases says otherwise (40/s has no target: where it saturates, on request).
DEFAULT_PHASES = ("edit-5/s", "edit-20/s", "rewrite-2/s")
PARAGRAPHS = 6
FIRST_ID = 500000
# With the noisy neighbour (--load) and without it.
TARGETS_LOADED = {"edit-5/s": {"p99_ms": 100}, "edit-20/s": {"p50_ms": 100, "p99_ms": 250}}
TARGETS = {"edit-5/s": {"p50_ms": 100, "p99_ms": 250}}
# The batch baseline: a job every 1 and every 5 minutes.
BATCH_INTERVALS_S = {"cron-1min": 60.0, "cron-5min": 300.0}


class Reader(threading.Thread):
    """Polls rag.chunks for the pending markers and stamps each one's first sighting.

    Each poll asks PostgreSQL which pending markers occur in their row's chunks (`strpos` on
    that row's chunks, through the (source_table, doc_key) index) and reads back only those:
    the measuring must not take the CPU it measures. (Reading every benchmark row's chunk
    texts back into Python at each poll took 9.3-9.9 CPU seconds in a 20 edits/s phase, about
    15% of one core; this query 4.1-4.6.)"""

    def __init__(self, settings: Settings) -> None:
        super().__init__(daemon=True)
        self.settings = settings
        self.pending: dict[str, tuple[float, str]] = {}  # marker -> (commit time, doc_key)
        self.seen: dict[str, float] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.error: BaseException | None = None
        # What the measuring costs (it shares the cores with what it measures): its polls,
        # this thread's CPU seconds and its PostgreSQL backend's.
        self.polls = 0
        self.client_cpu = 0.0
        self.backend_pid: int | None = None

    def cost(self) -> dict[str, float]:
        """Polls and CPU seconds so far (subtract two readings for a phase)."""
        return {
            "polls": float(self.polls),
            "client_cpu_s": round(self.client_cpu, 3),
            "backend_cpu_s": round(process_cpu_seconds(self.backend_pid), 3),
        }

    def expect(self, marker: str, committed_at: float, doc_key: str) -> None:
        with self.lock:
            self.pending[marker] = (committed_at, doc_key)

    def run(self) -> None:
        try:
            self._poll()
        except BaseException as exc:
            self.error = exc
            raise

    def _poll(self) -> None:
        with connect(database_url(self.settings), autocommit=True) as conn:
            row = conn.execute("SELECT pg_backend_pid()").fetchone()
            self.backend_pid = int(row[0]) if row else None
            while not self.stop.is_set():
                with self.lock:
                    pending = list(self.pending.items())
                if pending:
                    # Edits superseded before they were indexed stay pending for good: one
                    # index lookup each per poll.
                    visible = conn.execute(
                        "SELECT p.marker FROM unnest(%s::text[], %s::text[]) AS p(marker, key)"
                        " WHERE EXISTS (SELECT 1 FROM rag.chunks c"
                        " WHERE c.source_table = 'app.articles' AND c.doc_key = p.key"
                        " AND strpos(c.text, p.marker) > 0)",
                        ([m for m, _ in pending], [key for _, (_, key) in pending]),
                    ).fetchall()
                    now = time.time()
                    with self.lock:
                        for (marker,) in visible:
                            if marker in self.pending:
                                self.seen[marker] = now - self.pending.pop(marker)[0]
                    self.polls += 1
                    self.client_cpu = time.thread_time()
                time.sleep(0.005)


def process_cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of a local process (0.0 when it cannot be read)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_phase(
    settings: Settings,
    reader: Reader,
    current: list[list[str]],
    rate: float,
    seconds: float,
    rewrite: bool,
    pool: list[str],
    label: str,
    edits: list[Edit],
) -> list[float]:
    """Runs one phase; appends each edit (commit time, row) to ``edits``."""
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
            committed = time.time()
            reader.expect(marker, committed, str(FIRST_ID + row))
            edits.append(Edit(committed, str(FIRST_ID + row)))
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


WORKER_COUNTERS = ("embeddings", "embed_calls", "batches", "events")
WORKER_TIMERS = ("embed_seconds", "write_seconds", "plan_seconds", "batch_seconds")


def worker_progress(settings: Settings) -> dict[str, float]:
    """The worker's counters and timers so far (its heartbeat in rag.workers)."""
    time.sleep(2.5)  # one more heartbeat (every 2 s)
    with connect(database_url(settings), autocommit=True) as conn:
        row = conn.execute(
            "SELECT progress FROM rag.workers ORDER BY heartbeat_at DESC LIMIT 1"
        ).fetchone()
    progress = (row[0] if row else None) or {}
    counters = progress.get("counters") or {}
    timers = progress.get("timers") or {}
    return {
        **{k: float(counters.get(k, 0)) for k in WORKER_COUNTERS},
        **{k: float(timers.get(k, 0.0)) for k in WORKER_TIMERS},
    }


def seconds_per_chunk(settings: Settings, keys: list[str]) -> tuple[dict[str, int], float]:
    """Chunks per benchmark row, and the embedder's seconds per chunk when it embeds every
    row's chunks in one call (what a batch job does), measured now, beside the same load."""
    with connect(database_url(settings), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT doc_key, text FROM rag.chunks WHERE source_table = 'app.articles'"
            " AND doc_key = ANY(%s)",
            (keys,),
        ).fetchall()
    chunks: dict[str, int] = {}
    for key, _ in rows:
        chunks[key] = chunks.get(key, 0) + 1
    embedder = embedder_from_settings(settings)
    texts = [text for _, text in rows]
    embedder.embed(texts[:8])  # warm-up
    started = time.perf_counter()
    embedder.embed(texts)
    return chunks, (time.perf_counter() - started) / max(1, len(texts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument(
        "--phases",
        default=",".join(DEFAULT_PHASES),
        help=f"comma-separated subset of {','.join(PHASES)} (default: {','.join(DEFAULT_PHASES)})",
    )
    parser.add_argument(
        "--load",
        action="store_true",
        help="run a noisy neighbour (a process embedding with one thread) beside the stack",
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
    load: dict[str, Any] = {"neighbour": None}

    with private_stack("bench-fresh", **overrides) as bench, ExitStack() as around:
        settings = bench.settings
        with connect(source_database_url(settings), autocommit=True) as conn:
            create_demo_schema(conn)  # app.articles, without the demo rows
            for i in range(ROWS):
                conn.execute(
                    "INSERT INTO app.articles (id, title, body) VALUES (%s, %s, %s)",
                    (FIRST_ID + i, f"Freshness row {i}", "\n\n".join(paragraphs[i])),
                )
        reader = Reader(settings)
        with sync_process(bench, "bench-fresh-worker"):
            try:
                if not wait_until(lambda: count_documents(settings, "app.articles") >= ROWS, 600):
                    raise SystemExit("the rows were not indexed; see the worker's log")
                noisy = (
                    around.enter_context(neighbour(1, log_dir=settings.logs_dir))
                    if args.load
                    else None
                )
                time.sleep(3)
                reader.start()
                current = [list(p) for p in paragraphs]  # each row's text as it is now
                phases: dict[str, dict[str, Any]] = {}
                edits: dict[str, list[Edit]] = {}
                starts: dict[str, float] = {}
                for label in chosen:
                    rate, rewrite = PHASES[label]
                    print(f"phase {label} for {args.seconds:.0f}s ...", flush=True)
                    before = worker_progress(settings)
                    cost_before = reader.cost()
                    edits[label] = []
                    starts[label] = time.time()
                    latencies = run_phase(
                        settings,
                        reader,
                        current,
                        rate,
                        args.seconds,
                        rewrite,
                        abstracts,
                        label,
                        edits[label],
                    )
                    phases[label] = summary(latencies)
                    phases[label]["edits"] = len(edits[label])
                    after = worker_progress(settings)
                    worker = {k: round(after[k] - before[k], 3) for k in after}
                    phases[label]["embeddings"] = int(worker["embeddings"])
                    phases[label]["loadavg_1m"] = os.getloadavg()[0]  # at the phase's end
                    phases[label]["worker"] = worker
                    cost = reader.cost()
                    phases[label]["reader"] = {k: round(cost[k] - cost_before[k], 3) for k in cost}
            finally:
                reader.stop.set()
            print("the batch baseline: embedding time per chunk ...", flush=True)
            chunks, per_chunk = seconds_per_chunk(settings, keys)
        if noisy is not None:
            around.close()  # stops the neighbour; its figures are complete now
            load = noisy.describe()
    for label in chosen:
        phases[label]["batch_baseline"] = {
            name: replay(edits[label], interval, chunks, per_chunk, starts[label])
            for name, interval in BATCH_INTERVALS_S.items()
        }

    rows = []
    for label, s in phases.items():
        rows.append(
            (
                f"{label} streaming",
                f"n={s['count']:<5} p50 {s['p50_ms']:8.1f} ms  p99 {s['p99_ms']:8.1f} ms"
                f"  max {s['max_ms']:8.1f} ms  embeddings {s['embeddings']}",
            )
        )
        w = s["worker"]
        rows.append(
            (
                f"{label} worker",
                f"load {s['loadavg_1m']:.2f}; {w['batches']:.0f} batches,"
                f" {w['embed_calls']:.0f} embedding calls; seconds"
                f" embedding {w['embed_seconds']:.1f}, writing {w['write_seconds']:.1f},"
                f" planning {w['plan_seconds']:.1f}, in batches {w['batch_seconds']:.1f}",
            )
        )
        r = s["reader"]
        rows.append(
            (
                f"{label} reader",
                f"{r['polls']:.0f} polls; CPU seconds: its thread {r['client_cpu_s']:.1f},"
                f" its PostgreSQL backend {r['backend_cpu_s']:.1f}",
            )
        )
        for name, b in s["batch_baseline"].items():
            rows.append(
                (
                    f"{label} {name}",
                    f"n={b['count']:<5} p50 {b['p50_ms']:8.0f} ms  p99 {b['p99_ms']:8.0f} ms"
                    f"  max {b['max_ms']:8.0f} ms  embeddings {b['embeddings']:.0f}",
                )
            )
    rows.append(("embedding (batch job)", f"{per_chunk * 1000:.1f} ms per chunk"))
    if args.load:
        rows.append(
            (
                "load",
                f"{load['neighbour']}: {load.get('neighbour_texts_per_s', 0):.1f} texts/s;"
                f" 1-min load mean {load['loadavg_1m_mean'] or 0:.2f}",
            )
        )
    print_table(
        "freshness: source commit -> visible in rag.chunks (targets at 5/s: p50 <= 100 "
        "ms, p99 <= 250 ms); cron-N: the same edits through a job every N minutes",
        rows,
    )
    write_results(
        "freshness_load" if args.load else "freshness",
        {
            "phases": phases,
            "rows": ROWS,
            "paragraphs_per_row": PARAGRAPHS,
            "seconds_per_phase": args.seconds,
            "overrides": overrides,
            "load": load,
            "batch_seconds_per_chunk": per_chunk,
            "settings": {
                "cdc_poll_interval_ms": settings.cdc_poll_interval_ms,
                "cdc_linger_ms": settings.cdc_linger_ms,
                "sync_fetch_wait_ms": settings.sync_fetch_wait_ms,
            },
            "targets": TARGETS_LOADED if args.load else TARGETS,
        },
    )


if __name__ == "__main__":
    main()
