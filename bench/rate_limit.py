"""The web app under abuse: a second user's search latency while one token floods /ask.

    .venv/bin/python -m bench.rate_limit [--searches 200] [--no-unlimited]

A private PostgreSQL (embedded, free port) holding the demo data, chunked and embedded straight
into schema rag (as bench.query loads its corpus; no Kafka, Connect or sync worker runs while
latency is measured), and the web app as it is served in production (`freshet web`: waitress,
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
import hashlib
import multiprocessing
import os
import shutil
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import requests

from bench.common import Bench, print_table, web_process, write_results
from freshet.answering.timing import parse_header
from freshet.cdc.demo import article_rows, module_doc_rows
from freshet.cdc.postgres import EmbeddedPostgres
from freshet.cdc.sandbox import private_home, sandbox_env
from freshet.cdc.stack import migrate
from freshet.db import connect, database_url
from freshet.embedder import TransformersEmbedder
from freshet.settings import PROJECT_ROOT, Settings
from freshet.sync.chunking import TokenChunker

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
    passed); puts the outcome counts on ``out``.

    The flood runs at the lowest CPU priority: an abusive client's own CPU is not the server's
    (it runs elsewhere), and on a machine of two cores its 32 busy threads would otherwise take
    a core from the server and measure the benchmark, not the server. Niced, it still sends as
    fast as the server answers whenever the server leaves a core idle."""
    os.nice(19)
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
    spans: list[dict[str, float]] = field(default_factory=list)
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
            # Medians of the app's own Server-Timing spans: the rest of the latency is spent
            # before the app (waiting for a server thread) or around it (the interpreter).
            "served_p50_ms": {
                name: statistics.median(s.get(name, 0.0) for s in self.spans)
                for name in ("embed", "sql", "text-sql", "app")
                if any(name in s for s in self.spans)
            },
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
        phase.spans.append(parse_header(response.headers.get("Server-Timing", "")))


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


@contextmanager
def private_database(tag: str) -> Iterator[Bench]:
    """An embedded PostgreSQL of its own (free port, private home), migrated, with the demo rows
    chunked and embedded straight into rag.documents/rag.chunks (as bench.query loads its
    corpus): what /search and /ask read, without Kafka, Connect or a sync worker using CPU
    while the latency is measured. Stopped and removed after."""
    home = private_home(tag)
    env = sandbox_env(home, FRESHET_PG_SHARED_BUFFERS="128MB")
    settings = Settings.from_env(env)
    pg = EmbeddedPostgres(settings)
    print(f"starting PostgreSQL in {home} ...", flush=True)
    try:
        pg.start()
        url = database_url(settings)
        migrate(url)
        load_demo_chunks(url)
        yield Bench(settings, env)
    finally:
        pg.stop()
        shutil.rmtree(home, ignore_errors=True)


CACHE = PROJECT_ROOT / ".freshet" / "bench" / "rate_limit"


def demo_vectors(texts: list[str], embedder: TransformersEmbedder) -> np.ndarray:
    """The vectors of ``texts``, embedded once and cached (keyed by the texts) in CACHE."""
    digest = hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16]
    path = CACHE / f"demo-{digest}.npy"
    if path.exists():
        return np.load(path)
    vectors = np.asarray(embedder.embed(texts), dtype=np.float32)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(path, vectors)
    return vectors


def load_demo_chunks(url: str) -> None:
    embedder = TransformersEmbedder()
    chunker = TokenChunker(embedder.tokenizer)
    rows = [("app.articles", str(a.id), a.title, a.body, a.access_groups) for a in article_rows()]
    rows += [
        ("app.module_docs", m.name, m.name, m.body, m.access_groups) for m in module_doc_rows()
    ]
    started, chunks = time.monotonic(), 0
    documents = [chunker.chunk(f"{title}\n\n{body}") for _, _, title, body, _ in rows]
    flat = demo_vectors([c.text for pieces in documents for c in pieces], embedder)
    with connect(url, vector=True) as conn, conn.cursor() as cur:
        for i, ((table, key, title, _, groups), pieces) in enumerate(
            zip(rows, documents, strict=True)
        ):
            vectors, flat = flat[: len(pieces)], flat[len(pieces) :]
            row = cur.execute(
                "INSERT INTO rag.documents (source_table, doc_key, title, access_groups,"
                " content_hash, source_lsn, source_ts) VALUES (%s, %s, %s, %s, 'h', %s, now())"
                " RETURNING id",
                (table, key, title, groups, 1000 + i),
            ).fetchone()
            assert row is not None
            cur.executemany(
                "INSERT INTO rag.chunks (document_id, source_table, doc_key, chunk_index, text,"
                " text_hash, embedding, access_groups, source_lsn, source_ts)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, now())",
                [
                    (row[0], table, key, c.index, c.text, c.hash, v, groups, 1000 + i)
                    for c, v in zip(pieces, vectors, strict=True)
                ],
            )
            chunks += len(pieces)
        conn.commit()
    print(
        f"loaded {len(rows)} demo documents, {chunks} chunks in {time.monotonic() - started:.0f}s",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--searches", type=int, default=200)
    parser.add_argument("--no-unlimited", action="store_true", help="skip the flood without limits")
    args = parser.parse_args()

    phases: list[Phase] = []
    with private_database("bench-rate-limit") as bench:
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
                # Fewer searches: each can take seconds here, which is the point of the phase.
                phases.append(run_phase("unlimited", base, args.searches // 5, flooded=True))

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
                f"{s['search_p50_ms']:.1f} / {s['search_p99_ms']:.1f} ms (served p50 "
                + ", ".join(f"{k} {v:.1f}" for k, v in s["served_p50_ms"].items())
                + f"; load {load})",
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
    # The limits the web processes ran with: the benchmark's Settings (its environment).
    config = bench.settings.app_config()
    limits = {k: config[k] for k in config if k.startswith(("RATE_", "SEARCH_", "ASK_"))}
    write_results(
        "rate_limit",
        {
            "flood_clients": FLOOD_CLIENTS,
            "searches_per_phase": args.searches,
            "search_period_s": SEARCH_PERIOD_S,
            "limits": {**limits, "MAX_CONCURRENT_ASKS": config["MAX_CONCURRENT_ASKS"]},
            "phases": {p.name: p.summary() for p in phases},
            "p50_ratio": ratio_p50,
            "p99_ratio": ratio_p99,
            "target": {"p50_ratio": 2.0},
        },
    )


if __name__ == "__main__":
    main()
