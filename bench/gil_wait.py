"""A query's embedding beside a busy Python thread: what waiting for the GIL costs it.

    .venv/bin/python -m bench.gil_wait [--queries 100] [--rounds 2]

The web app embeds a query on one thread while its other threads (other requests, the hybrid
search's full-text half) run Python. Every torch operator gives up the GIL and takes it back,
and a thread that takes it back while another thread is running Python waits up to the
interpreter's switch interval (5 ms). This embeds SciFact queries with the app's query path
(``embed_query``: the int8 model where it is built) alone, then beside one thread that runs
Python without pause, and splits the time into its steps (tokenizing, the model, pooling);
p50 ms of each, per round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from bench.report import SCIFACT, print_table, write_results
from freshet.embedder import embedder_from_settings
from freshet.settings import Settings


@contextmanager
def busy_thread() -> Iterator[None]:
    """One thread running Python (no I/O, no C call that gives up the GIL) until the block ends."""
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(2000))

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def p50_ms(call: Callable[[int], object], count: int) -> float:
    times = []
    for i in range(count):
        started = time.perf_counter()
        call(i)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with (SCIFACT / "queries.jsonl").open() as handle:
        queries = [json.loads(line)["text"] for line in handle][: args.queries]
    embedder = embedder_from_settings(Settings.from_env())
    embedder.prepare_queries()
    runner = embedder._query_runner or embedder._one_text  # noqa: SLF001
    if runner is None:
        sys.exit("no compiled query path was built: nothing to split into steps")
    for query in queries[:20]:
        embedder.embed_query(query)
    encoded = [embedder._encode([q]) for q in queries]  # noqa: SLF001
    with torch.inference_mode():
        hidden = [runner(e["input_ids"], e["attention_mask"]) for e in encoded]

    def model(i: int) -> None:
        with torch.inference_mode():
            runner(encoded[i]["input_ids"], encoded[i]["attention_mask"])

    steps: dict[str, Callable[[int], object]] = {
        "embed_query (whole)": lambda i: embedder.embed_query(queries[i]),
        "tokenize": lambda i: embedder._encode([queries[i]]),  # noqa: SLF001
        "model": model,
        "pool + normalise": lambda i: embedder._vectors(  # noqa: SLF001
            hidden[i], encoded[i]["attention_mask"]
        ),
    }
    results: dict[str, Any] = {"switch_interval_ms": sys.getswitchinterval() * 1000, "rounds": []}
    rows = []
    for round_ in range(args.rounds):
        figures: dict[str, dict[str, float]] = {}
        for name, call in steps.items():
            alone = p50_ms(call, len(queries))
            with busy_thread():
                beside = p50_ms(call, len(queries))
            figures[name] = {"alone_ms": alone, "beside_busy_thread_ms": beside}
            rows.append((f"round {round_ + 1}: {name}", f"{alone:.2f} alone, {beside:.2f} beside"))
        results["rounds"].append(figures)
    print_table("query embedding, p50 ms, alone / beside a busy Python thread", rows)
    write_results("gil_wait", results)


if __name__ == "__main__":
    main()
