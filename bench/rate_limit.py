"""The web app under abuse: a second user's search latency while one token floods /ask.

    .venv/bin/python -m bench.rate_limit [--searches 200] [--no-unlimited]

A private stack with the demo data, indexed by one `freshet sync` process that is stopped before
anything is measured, and the web app as it is served in production (`freshet web`: waitress,
its own process, the default limits of docs/web.md). The second user (token demo-staff) runs
the same sequential searches, paced at 4 per second (within its own limit of 300 per minute),
in each phase:

  baseline   nothing else runs;
  flood      one token (demo-public) fires 32 concurrent POST /api/v1/ask in a loop, ignoring
             429 and Retry-After as an abusive client would, from a process of its own (the
             measuring client shares no interpreter, no GIL, with it);
  unlimited  the same flood against a web app started with FRESHET_RATE_LIMIT_BACKEND=off,
             which shows what the limits buy (skip with --no-unlimited).

Reports the second user's search p50/p99 per phase and the ratio to the baseline (target:
p50 at most 2x under the flood), the flood's outcomes (answered, 429 by reason, errors) and
the machine's load average (os.getloadavg) beside each phase; writes
bench/results/rate_limit.json.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import requests

from bench.common import (
    Bench,
    count_documents,
    print_table,
    private_stack,
    sync_process,
    wait_until,
    web_process,
    write_results,
)
from cdc.demo import article_rows, module_doc_rows
from freshet.settings import PROJECT_ROOT
from web import DEFAULTS
from web.timing import parse_header

FLOOD_TOKEN = "demo-public"
USER_TOKEN = "demo-staff"
FLOOD_CLIENTS = 32
SEARCH_PERIOD_S = 0.25  # 4 searches per second: 240 per minute, under the user's 300
QUERIES = [
    "with statement context manager",
    "exception handling try except finally",
    "generator yield expression",
    "class definition inheritance",
    "lambda expressions",
    "import system modules packages",
    "string formatting literals",
    "comparison operators chaining",
    "global and nonlocal statements",
    "assert statement debugging",
    "for loop else clause",
    "slicing sequences",
    "coroutines async await",
    "decorators functions",
    "integer literals underscores",
    "boolean operations and or not",
]
QUESTIONS = [
    "What does the with statement do?",
    "How does try finally work?",
    "What is a generator function?",
    "How are classes defined?",
    "What is a lambda expression?",
    "How does the import statement find modules?",
    "What does yield return?",
    "How do chained comparisons evaluate?",
]


def flood(base: str, token: str, clients: int, stop: Any, out: Any) -> None:
    """``clients`` threads, each POSTing /ask in a loop until ``stop`` is set (or 15 minutes
    passed); puts the outcome counts on ``out``."""
    counts: Counter[str] = Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + 900

    def client(worker: int) -> None:
        session = requests.Session()
        headers = {"Authorization": f"Bearer {token}"}
        i = worker
        while not stop.is_set() and time.monotonic() < deadline:
            question = QUESTIONS[i % len(QUESTIONS)]
            i += 1
            try:
                response = session.post(
                    f"{base}api/v1/ask", json={"question": question}, headers=headers, timeout=60
                )
                if response.status_code == 429:
                    outcome = "429 " + str(response.json()["error"].get("reason"))
                else:
                    outcome = str(response.status_code)
            except requests.RequestException as exc:
                outcome = f"error {type(exc).__name__}"
            with lock:
                counts[outcome] += 1

    threads = [threading.Thread(target=client, args=(w,), daemon=True) for w in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    out.put(dict(counts))


@dataclass
class Phase:
    name: str
    latencies_ms: list[float] = field(default_factory=list)
    served_ms: list[float] = field(default_factory=list)
    refused: int = 0
    flood: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def summary(self) -> dict[str, Any]:
        total = sum(self.flood.values())
        return {
            "search_p50_ms": self.pct(0.5),
            "search_p99_ms": self.pct(0.99),
            "search_mean_ms": statistics.fmean(self.latencies_ms),
            "served_app_p50_ms": statistics.median(self.served_ms) if self.served_ms else None,
            "searches": len(self.latencies_ms),
            "searches_refused": self.refused,
            "flood_requests": total,
            "flood_per_second": total / self.seconds if self.seconds else 0.0,
            "flood_outcomes": self.flood,
            "flood_429": sum(n for k, n in self.flood.items() if k.startswith("429")),
            "seconds": self.seconds,
            "loadavg_before": self.load_before,
            "loadavg_after": self.load_after,
        }


def searches(base: str, count: int, phase: Phase) -> None:
    """The second user: ``count`` sequential searches, one every SEARCH_PERIOD_S."""
    session = requests.Session()
    headers = {"Authorization": f"Bearer {USER_TOKEN}"}
    next_at = time.monotonic()
    for i in range(count):
        time.sleep(max(0.0, next_at - time.monotonic()))
        next_at += SEARCH_PERIOD_S
        started = time.perf_counter()
        response = session.get(
            f"{base}api/v1/search",
            params={"q": QUERIES[i % len(QUERIES)], "k": "5"},
            headers=headers,
            timeout=120,
        )
        elapsed = (time.perf_counter() - started) * 1000
        if response.status_code == 429:
            phase.refused += 1
            continue
        response.raise_for_status()
        phase.latencies_ms.append(elapsed)
        app = parse_header(response.headers.get("Server-Timing", "")).get("app")
        if app is not None:
            phase.served_ms.append(app)


def run_phase(name: str, base: str, count: int, flooded: bool) -> Phase:
    phase = Phase(name)
    phase.load_before = os.getloadavg()
    print(f"phase {name}: {count} searches{' under the flood' if flooded else ''} ...", flush=True)
    context = multiprocessing.get_context("spawn")
    stop, out = context.Event(), context.Queue()
    process = None
    if flooded:
        process = context.Process(
            target=flood, args=(base, FLOOD_TOKEN, FLOOD_CLIENTS, stop, out), daemon=True
        )
        process.start()
        time.sleep(3.0)  # the flood's interpreter starts and its 32 clients ramp up
    started = time.monotonic()
    try:
        searches(base, count, phase)
    finally:
        phase.seconds = time.monotonic() - started
        if process is not None:
            stop.set()
            phase.flood = out.get(timeout=180)
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
    phase.load_after = os.getloadavg()
    return phase


def index_demo(bench: Bench) -> None:
    """The demo rows, indexed by one `freshet sync` that stops before anything is measured."""
    expected = {"app.articles": len(article_rows()), "app.module_docs": len(module_doc_rows())}
    with sync_process(bench, "bench-rate-limit-sync"):

        def indexed() -> bool:
            return all(count_documents(bench.settings, t) >= n for t, n in expected.items())

        if not wait_until(indexed, timeout=900, interval=2.0):
            raise SystemExit(f"the demo data was not indexed within 15 minutes: {expected}")
    print(f"indexed the demo data: {expected}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--searches", type=int, default=200)
    parser.add_argument("--no-unlimited", action="store_true", help="skip the flood without limits")
    args = parser.parse_args()

    phases: list[Phase] = []
    mappings = str(PROJECT_ROOT / "sync" / "mappings.toml")  # the demo's tables
    with private_stack(
        "bench-rate-limit", FRESHET_LOAD_DEMO="true", FRESHET_MAPPINGS=mappings
    ) as bench:
        index_demo(bench)
        with web_process(bench, "bench-rate-limit-web") as base:
            warm = Phase("warm-up")
            searches(base, 20, warm)
            phases.append(run_phase("baseline", base, args.searches, flooded=False))
            phases.append(run_phase("flood", base, args.searches, flooded=True))
            phases.append(run_phase("after", base, args.searches // 4, flooded=False))
        if not args.no_unlimited:
            unlimited = Bench(bench.settings, {**bench.env, "FRESHET_RATE_LIMIT_BACKEND": "off"})
            with web_process(unlimited, "bench-rate-limit-web-unlimited") as base:
                searches(base, 20, Phase("warm-up"))
                phases.append(run_phase("unlimited", base, args.searches, flooded=True))

    by_name = {p.name: p for p in phases}
    baseline, flooded = by_name["baseline"], by_name["flood"]
    ratio_p50 = flooded.pct(0.5) / baseline.pct(0.5)
    ratio_p99 = flooded.pct(0.99) / baseline.pct(0.99)
    rows: list[tuple[str, str]] = []
    for phase in phases:
        s = phase.summary()
        load = "/".join(f"{x:.2f}" for x in phase.load_after)
        rows.append(
            (
                f"{phase.name}: second user's search p50 / p99",
                f"{s['search_p50_ms']:.1f} / {s['search_p99_ms']:.1f} ms"
                f" (served p50 {s['served_app_p50_ms'] or 0:.1f} ms; load {load})",
            )
        )
        if phase.flood:
            rows.append(
                (
                    f"{phase.name}: flood requests ({s['flood_per_second']:.0f}/s)",
                    ", ".join(f"{k}: {n}" for k, n in sorted(phase.flood.items())),
                )
            )
    rows.append(("p50 ratio flood / baseline (target <= 2x)", f"{ratio_p50:.2f}x"))
    rows.append(("p99 ratio flood / baseline", f"{ratio_p99:.2f}x"))
    if "unlimited" in by_name:
        ratio = by_name["unlimited"].pct(0.5) / baseline.pct(0.5)
        rows.append(("p50 ratio flood without limits / baseline", f"{ratio:.2f}x"))
    print_table(
        f"rate limit: {FLOOD_CLIENTS} concurrent asks from one token, {args.searches} searches"
        f" of another user per phase, {os.cpu_count()} CPUs",
        rows,
    )
    limits = {k: DEFAULTS[k] for k in DEFAULTS if k.startswith(("RATE_", "SEARCH_", "ASK_"))}
    write_results(
        "rate_limit",
        {
            "flood_clients": FLOOD_CLIENTS,
            "searches_per_phase": args.searches,
            "search_period_s": SEARCH_PERIOD_S,
            "limits": {**limits, "MAX_CONCURRENT_ASKS": DEFAULTS["MAX_CONCURRENT_ASKS"]},
            "phases": {p.name: p.summary() for p in phases},
            "p50_ratio": ratio_p50,
            "p99_ratio": ratio_p99,
            "target": {"p50_ratio": 2.0},
        },
    )


if __name__ == "__main__":
    main()
