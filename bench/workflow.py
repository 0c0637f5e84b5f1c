"""Async asks through the workflow's consumer groups against the synchronous /ask, in one run.

    .venv/bin/python -m bench.workflow [--asks 100] [--workers 1,2,4] [--rows 300]

A private stack indexes --rows SciFact abstracts (read from ../shared/eval at run time). The
synchronous path: POST /api/v1/ask to `freshet web` from 4 concurrent clients. The async
path: one `freshet validate` and N `freshet infer` workers (the default workflow's answer step,
one consumer group sharing the 4 partitions of rag.requests), a burst of --asks requests
published to rag.requests at once; each ask's latency runs from its publication to its row in
rag.answers. Reports asks/s and p50/p99 per configuration. The answer backend is the
extractive one (no model server); every process runs on the same cores as the stack.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any

import requests
from kafka import KafkaProducer

from bench.common import (
    Bench,
    count_documents,
    freshet_process,
    load_scifact,
    print_table,
    private_stack,
    scifact_corpus,
    sync_process,
    wait_until,
    web_process,
    write_results,
)
from freshet.answering.messages import REQUESTS, AnswerRequest
from freshet.answering.retrieval import Filters
from freshet.answering.users import User
from freshet.db import connect, database_url

TOKEN = "bench-admin"
ADMIN = User("bench-admin", (), admin=True)
CLIENTS = 4


def percentiles(latencies: list[float], seconds: float) -> dict[str, Any]:
    ordered = sorted(latencies)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return {
        "asks": len(ordered),
        "asks_per_s": len(ordered) / seconds,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "mean_ms": statistics.fmean(ordered) * 1000,
        "seconds": seconds,
    }


def synchronous(url: str, questions: list[str]) -> dict[str, Any]:
    def one(question: str) -> float:
        started = time.perf_counter()
        response = requests.post(
            f"{url}api/v1/ask",
            json={"question": question, "k": 3},
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=120,
        )
        response.raise_for_status()
        return time.perf_counter() - started

    one(questions[0])  # warm-up
    started = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        latencies = list(pool.map(one, questions))
    return percentiles(latencies, time.perf_counter() - started)


def asynchronous(bench: Bench, questions: list[str], tag: str) -> dict[str, Any]:
    """A burst of asks on rag.requests; latency: publication -> the answer's row."""
    settings = bench.settings
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all")
    ids = [f"{tag}-{i:04d}" for i in range(len(questions))]
    sent: dict[str, float] = {}
    try:
        for rid, question in zip(ids, questions, strict=True):
            request = AnswerRequest(rid, question, 3, ADMIN, Filters())
            producer.send(REQUESTS, key=rid.encode(), value=request.encode())
            sent[rid] = time.time()
        producer.flush()
    finally:
        producer.close()
    done: dict[str, float] = {}
    with connect(database_url(settings), autocommit=True) as conn:
        deadline = time.monotonic() + 900
        while len(done) < len(ids) and time.monotonic() < deadline:
            rows = conn.execute(
                "SELECT id, extract(epoch FROM updated_at)::float8 FROM rag.answers"
                " WHERE id = ANY(%s) AND status <> 'pending'",
                (ids,),
            ).fetchall()
            done.update({rid: stamp for rid, stamp in rows})
            time.sleep(0.05)
    if len(done) < len(ids):
        raise SystemExit(f"{len(ids) - len(done)} asks of {tag} unanswered after 900 s")
    latencies = [done[rid] - sent[rid] for rid in ids]
    return percentiles(latencies, max(done.values()) - min(sent.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--asks", type=int, default=100)
    parser.add_argument("--workers", default="1,2,4", help="answer workers per configuration")
    parser.add_argument("--rows", type=int, default=300)
    args = parser.parse_args()
    counts = [int(n) for n in args.workers.split(",")]
    docs = scifact_corpus(args.rows + args.asks)
    corpus, asked = docs[: args.rows], docs[: args.asks]
    questions = [f"What is known about {d['title'].rstrip('.')}?" for d in asked]

    tokens = {TOKEN: {"user": ADMIN.name, "groups": [], "admin": True}}
    with private_stack(
        "bench-wf", FRESHET_RATE_LIMIT_BACKEND="off", FRESHET_START_WORKFLOW="false"
    ) as bench:
        settings = bench.settings
        tokens_file = settings.home / "tokens.json"
        tokens_file.write_text(json.dumps(tokens))
        bench.env["FRESHET_API_TOKENS_FILE"] = str(tokens_file)
        load_scifact(settings, corpus)
        with sync_process(bench, "bench-wf-sync"):
            print(f"indexing {len(corpus)} SciFact rows ...", flush=True)
            if not wait_until(lambda: count_documents(settings, "app.scifact") >= len(corpus), 900):
                raise SystemExit("the rows were not indexed; see the worker's log")
        results: dict[str, Any] = {}
        with web_process(bench, "bench-wf-web") as url:
            print(f"synchronous /ask, {CLIENTS} clients ...", flush=True)
            results["sync"] = synchronous(url, questions)
        for n in counts:
            with ExitStack() as workers:
                workers.enter_context(freshet_process(bench, "validate", f"bench-wf-validate-{n}"))
                for i in range(n):
                    workers.enter_context(
                        freshet_process(bench, "infer", f"bench-wf-infer-{n}-{i}")
                    )
                print(f"async, {n} answer worker(s): warm-up ...", flush=True)
                asynchronous(bench, questions[:4], f"warm{n}")
                print(f"async, {n} answer worker(s): {len(questions)} asks ...", flush=True)
                results[f"async-{n}"] = asynchronous(bench, questions, f"w{n}")

    rows = [
        (
            name,
            f"{r['asks_per_s']:5.2f} asks/s  p50 {r['p50_ms']:8.0f} ms  p99 {r['p99_ms']:8.0f} ms",
        )
        for name, r in results.items()
    ]
    print_table(
        f"asks: synchronous /ask ({CLIENTS} clients) vs the async workflow (a burst of"
        f" {args.asks}), extractive backend, {args.rows} SciFact rows",
        rows,
    )
    write_results(
        "workflow",
        {"results": results, "asks": args.asks, "rows": args.rows, "clients": CLIENTS},
    )


if __name__ == "__main__":
    main()
