"""Recovery: a `freshet sync` worker killed with SIGKILL during a steady stream of edits.

    .venv/bin/python -m bench.recovery [--rate 40] [--before 15] [--after 30] [--set NAME=VALUE]

A private stack, ROWS multi-paragraph rows of app.articles, and one `freshet sync` process. A
writer makes one-paragraph edits at ``--rate`` per second, each with a unique marker, for
``--before`` seconds; then the worker is killed with SIGKILL and a new one is started at once
(as `freshet up`'s supervisor does), while the edits go on for ``--after`` seconds more. A reader
polls rag.chunks and stamps when each marker becomes visible. Reported, from the restart:

  - process up: the new worker's log says it joined the group (model loaded, Kafka and
    PostgreSQL connected);
  - partitions assigned: the group gave the new worker its partitions (its log);
  - consuming: the first change the new worker made visible in rag.chunks;
  - caught up: the new worker applied a batch whose oldest change is no older than the
    killed worker's usual (p90 over its last 10 s, at least 1 s): the outage's backlog is
    worked off;
  - consistent: after the edits stop, every row's chunks carry exactly the markers of its
    source text.

Two trials in one run, each in a consumer group of its own: dynamic group membership (a new
member joins; the dead one's partitions move after its session times out and the group
rebalances) and static membership (FRESHET_SYNC_INSTANCE_ID, as `freshet up` runs its worker:
the restarted process takes the dead one's place and its partitions at once).

It also reports the freshness (commit -> visible) of the edits made after the worker was back.
Targets (issue "keep up under load"): consuming <= 5 s after the restart, consistent <= 15 s.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.common import (
    Bench,
    print_table,
    private_stack,
    scifact_corpus,
    wait_until,
    write_results,
)
from bench.freshness import PARAGRAPHS, Reader, _unmarked
from freshet.cdc.demo import create_demo_schema
from freshet.db import connect, database_url, source_database_url
from freshet.settings import PROJECT_ROOT

ROWS = 20
MODES = ("dynamic", "static", "static-unpaced")
FIRST_ID = 600000
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")


def start_worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """`freshet -v sync` (its log says when it joined the group and got its partitions)."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "freshet.cli", "-v", "sync"],
            env={**env, "PYTHONWARNINGS": "ignore"},
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=PROJECT_ROOT,
        )


BATCH = re.compile(r"batch of (\d+) records: oldest commit (-?\d+) ms before poll")


def batches(log: Path) -> list[tuple[float, int, float]]:
    """(when, records, oldest change's age in seconds at poll) of each batch the worker applied
    (its debug log, `freshet -v sync`)."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if (m := BATCH.search(line)) and (t := LOG_TIME.match(line)):
            when = datetime.strptime(t.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            out.append((when, int(m.group(1)), int(m.group(2)) / 1000))
    return out


def first_log_time(log: Path, needle: str) -> float | None:
    """The wall-clock time (epoch seconds) of the first log line containing ``needle``."""
    for line in log.read_text(errors="replace").splitlines():
        if needle in line and (m := LOG_TIME.match(line)):
            return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return None


class Writer(threading.Thread):
    """One-paragraph edits at a fixed rate; remembers each marker's commit time and row."""

    def __init__(
        self, bench: Bench, reader: Reader, current: list[list[str]], rate: float, prefix: str
    ) -> None:
        super().__init__(daemon=True)
        self.bench, self.reader, self.current, self.rate = bench, reader, current, rate
        self.prefix = prefix
        self.stop = threading.Event()
        self.markers: list[tuple[str, int, float]] = []  # marker, row, commit time
        self.rng = random.Random(7)
        self.n = 0
        self.last_commit = 0.0
        self.conn = connect(source_database_url(bench.settings), autocommit=True)

    def edit_once(self, row: int) -> str:
        """One paragraph of ``row`` gets a new marker; returns the marker."""
        marker = f"[rev-{self.prefix}{self.n}]"
        self.n += 1
        paragraph = self.rng.randrange(PARAGRAPHS)
        text = self.current[row][paragraph]
        self.current[row][paragraph] = f"{_unmarked(text)} {marker}"
        self.conn.execute(
            "UPDATE app.articles SET body = %s, updated_at = now() WHERE id = %s",
            ("\n\n".join(self.current[row]), FIRST_ID + row),
        )
        self.last_commit = time.time()
        self.reader.expect(marker, self.last_commit, str(FIRST_ID + row))
        return marker

    def run(self) -> None:
        started, n = time.monotonic(), 0
        try:
            while not self.stop.is_set():
                row = self.rng.randrange(ROWS)
                marker = self.edit_once(row)
                self.markers.append((marker, row, self.last_commit))
                n += 1
                time.sleep(max(0.0, started + n / self.rate - time.monotonic()))
        finally:
            self.conn.close()


MARKER = re.compile(r"\[rev-[a-z-]+\d+\]")


def index_equals_source(bench: Bench) -> bool:
    """Every row's indexed chunks carry exactly the markers its source text carries now."""
    keys = [str(FIRST_ID + i) for i in range(ROWS)]
    with connect(source_database_url(bench.settings), autocommit=True) as conn:
        source = {
            str(r[0]): set(MARKER.findall(r[1]))
            for r in conn.execute(
                "SELECT id, body FROM app.articles WHERE id >= %s AND id < %s",
                (FIRST_ID, FIRST_ID + ROWS),
            )
        }
    with connect(database_url(bench.settings), autocommit=True) as conn:
        indexed: dict[str, set[str]] = {k: set() for k in keys}
        for key, text in conn.execute(
            "SELECT doc_key, text FROM rag.chunks WHERE source_table = 'app.articles'"
            " AND doc_key = ANY(%s)",
            (keys,),
        ):
            indexed[key].update(MARKER.findall(text))
    return source == indexed


def trial(
    bench: Bench, reader: Reader, current: list[list[str]], args: argparse.Namespace, mode: str
) -> dict[str, Any]:
    """One kill -9 and restart, with dynamic or static group membership, in a group of its own."""
    env = {
        **bench.env,
        "FRESHET_SYNC_GROUP": f"bench-recovery-{mode}",
        "FRESHET_SYNC_INSTANCE_ID": "" if mode == "dynamic" else "bench-recovery-worker-1",
    }
    if mode == "static-unpaced":  # one transaction per polled batch
        env["FRESHET_SYNC_TXN_SECONDS"] = "0"
    logs = bench.settings.logs_dir
    logs.mkdir(parents=True, exist_ok=True)
    first_log, second_log = logs / f"recovery-{mode}-1.log", logs / f"recovery-{mode}-2.log"
    worker = start_worker(env, first_log)
    writer = Writer(bench, reader, current, args.rate, prefix=mode)
    second: subprocess.Popen[bytes] | None = None
    try:
        # The group starts at the topic's beginning: once a fresh edit of every row is
        # visible, everything before it is applied.
        ready = [writer.edit_once(row) for row in range(ROWS)]
        if not wait_until(lambda: all(m in reader.seen for m in ready), 900, 0.1):
            raise SystemExit(f"the worker did not catch up; see {first_log}")
        time.sleep(2)
        writer.start()
        print(f"[{mode}] edits at {args.rate:g}/s for {args.before:g} s, then SIGKILL", flush=True)
        time.sleep(args.before)
        killed = time.time()
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
        restarted = time.time()
        second = start_worker(env, second_log)
        time.sleep(args.after)
        writer.stop.set()
        writer.join()
        stopped = time.time()
        consistent = (
            time.time() if wait_until(lambda: index_equals_source(bench), 180, 0.1) else None
        )
        with reader.lock:  # the first sighting of an edit made after the kill
            seen_at = [
                c + reader.seen[m] for m, _, c in writer.markers if c > killed and m in reader.seen
            ]
        first_new_visible = min(seen_at) if seen_at else None
    finally:
        writer.stop.set()
        for process in (worker, second):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=120)
        # The private stack's home goes when the run ends: keep the workers' logs.
        kept = Path(tempfile.gettempdir()) / "freshet-bench-recovery-logs"
        kept.mkdir(exist_ok=True)
        for log in (first_log, second_log):
            if log.exists():
                shutil.copy(log, kept / log.name)
        print(f"[{mode}] the workers' logs: {kept}", flush=True)

    # Steady state: the age of the oldest change in each batch over the 10 s before the kill.
    before = sorted(age for when, _, age in batches(first_log) if killed - 10 <= when < killed)
    usual = max(before[int(0.9 * (len(before) - 1))] if before else 0.0, 1.0)
    applied = batches(second_log)
    # The first change the new worker made visible (it needs seconds to start, so nothing seen
    # half a second after the restart was applied by the killed one).
    with reader.lock:
        sightings = [c + reader.seen[m] for m, _, c in writer.markers if m in reader.seen]
    consuming = min((t for t in sightings if t > restarted + 0.5), default=None)
    caught_up = next((when for when, _, age in applied if age <= usual), None)
    after = [
        reader.seen[m]
        for m, _, c in writer.markers
        if m in reader.seen and caught_up is not None and c > caught_up
    ]

    def since(t: float | None, origin: float = restarted) -> float | None:
        return None if t is None else t - origin

    return {
        "process_up_s": since(first_log_time(second_log, "joined group")),
        "partitions_assigned_s": since(first_log_time(second_log, "partitions assigned")),
        "consuming_s": since(consuming),
        "first_new_edit_visible_s": since(first_new_visible),
        "caught_up_s": since(caught_up),
        "lag_before_kill_p90_s": usual,
        "consistent_after_edits_stopped_s": since(consistent, stopped),
        "consistent_s": since(consistent),
        "edits": len(writer.markers),
        "after_recovery_freshness_p50_ms": statistics.median(after) * 1000 if after else None,
        "after_recovery_freshness_max_ms": max(after) * 1000 if after else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=40.0, help="edits per second")
    parser.add_argument("--before", type=float, default=15.0, help="seconds of edits before")
    parser.add_argument("--after", type=float, default=30.0, help="seconds of edits after")
    parser.add_argument(
        "--modes", default="dynamic,static", help="group membership of the trials, in order"
    )
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    args = parser.parse_args()
    modes = args.modes.split(",")
    if unknown := [m for m in modes if m not in MODES]:
        parser.error(f"unknown mode(s) {unknown}: {', '.join(MODES)}")
    overrides = dict(item.split("=", 1) for item in args.set)
    abstracts = [d["text"] for d in scifact_corpus(ROWS * PARAGRAPHS)]
    paragraphs = [abstracts[i * PARAGRAPHS : (i + 1) * PARAGRAPHS] for i in range(ROWS)]
    results: dict[str, dict[str, Any]] = {}

    with private_stack("bench-recovery", **overrides) as bench:
        with connect(source_database_url(bench.settings), autocommit=True) as conn:
            create_demo_schema(conn)
            for i in range(ROWS):
                conn.execute(
                    "INSERT INTO app.articles (id, title, body) VALUES (%s, %s, %s)",
                    (FIRST_ID + i, f"Recovery row {i}", "\n\n".join(paragraphs[i])),
                )
        reader = Reader(bench.settings)
        reader.start()
        current = [list(p) for p in paragraphs]
        try:
            for mode in modes:
                results[mode] = trial(bench, reader, current, args, mode)
                results[mode]["load_average_1m"] = os.getloadavg()[0]
        finally:
            reader.stop.set()

    def fmt(v: float | None, unit: str = "s") -> str:
        return "never" if v is None else f"{v:.2f} {unit}"

    rows: list[tuple[str, str]] = []
    for mode, r in results.items():
        rows += [
            (f"{mode}: restart -> process up (joined the group)", fmt(r["process_up_s"])),
            (f"{mode}: restart -> partitions assigned", fmt(r["partitions_assigned_s"])),
            (f"{mode}: restart -> consuming (its first change visible)", fmt(r["consuming_s"])),
            (
                f"{mode}: restart -> caught up (a batch's oldest change no older than before"
                f" the kill, p90 {r['lag_before_kill_p90_s']:.2f} s)",
                fmt(r["caught_up_s"]),
            ),
            (
                f"{mode}: restart -> an edit made after the kill visible",
                fmt(r["first_new_edit_visible_s"]),
            ),
            (
                f"{mode}: edits stopped -> index equals source",
                fmt(r["consistent_after_edits_stopped_s"]),
            ),
            (
                f"{mode}: freshness after recovery p50 / max",
                f"{fmt(r['after_recovery_freshness_p50_ms'], 'ms')} /"
                f" {fmt(r['after_recovery_freshness_max_ms'], 'ms')}",
            ),
            (
                f"{mode}: edits made; load average (1 min)",
                f"{r['edits']}; {r['load_average_1m']:.2f}",
            ),
        ]
    print_table(
        f"recovery: SIGKILL of the sync worker at {args.rate:g} edits/s, restarted at once"
        " (targets: consuming <= 5 s, consistent <= 15 s)",
        rows,
    )
    write_results(
        "recovery",
        {
            "trials": results,
            "rate": args.rate,
            "overrides": overrides,
            "rows": ROWS,
            "before_s": args.before,
            "after_s": args.after,
        },
    )


if __name__ == "__main__":
    main()
