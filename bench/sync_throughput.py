"""Backfill throughput of the whole pipeline versus the raw embedder, in one run.

    .venv/bin/python -m bench.sync_throughput [--rows N] [--workers N] [--set NAME=VALUE]

Inserts the SciFact abstracts (read from ../shared/eval at run time) into a captured source
table of a private stack, runs one `freshet sync` process, and times the backfill from the
first indexed document to the last: rows/s and chunks/s. Then embeds the very same chunks
with the raw embedder (same model, threads and precision, no Kafka, no database) for the
ratio. Target: the pipeline reaches >= 0.95 of the raw embedder's chunks/s. Also reports the
worker's peak RSS. --workers 2 runs two `freshet sync` processes in one consumer group (the
topic's 4 partitions shared between them); the raw embedder stays one process.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from contextlib import ExitStack

from bench.common import (
    count_documents,
    load_scifact,
    peak_rss_mib,
    print_table,
    private_stack,
    scifact_corpus,
    sync_process,
    wait_until,
    write_results,
)
from freshet.db import connect, database_url
from freshet.embedder import embedder_from_settings
from freshet.sync.chunking import TokenChunker
from freshet.sync.mapping import Mappings

TABLE = "app.scifact"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=None, help="default: all 5,183 abstracts")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--workers", type=int, default=1, help="sync processes in the group")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for the private stack, e.g. FRESHET_EMBED_THREADS=1",
    )
    args = parser.parse_args()
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    overrides = dict(item.split("=", 1) for item in args.set)
    docs = scifact_corpus(args.rows)
    rows = len(docs)

    with private_stack("bench-sync", **overrides) as bench:
        settings = bench.settings
        load_scifact(settings, docs)
        with ExitStack() as workers:
            pids = [
                workers.enter_context(sync_process(bench, f"bench-sync-worker-{n}")).pid
                for n in range(args.workers)
            ]
            print(f"backfilling {rows} rows through Debezium -> Kafka -> sync ...", flush=True)
            # Polled slowly: the benchmark must not take CPU from what it measures. The rate
            # comes from the transactions' own start times (rag.documents.indexed_at) below.
            if not wait_until(lambda: count_documents(settings, TABLE) >= rows, args.timeout, 1):
                raise SystemExit(f"backfill incomplete after {args.timeout}s; see the worker log")
            peaks = [p for p in (peak_rss_mib(pid) for pid in pids) if p is not None]
            rss = max(peaks) if peaks else None
            time.sleep(2.5)  # one more heartbeat, so the timers below are complete
            with connect(database_url(settings), autocommit=True) as conn:
                # Every worker's timers, summed (a private stack: only this run's workers).
                found = conn.execute("SELECT progress->'timers' FROM rag.workers").fetchall()
            timers: dict[str, float] = {}
            for (worker_timers,) in found:
                for name, value in (worker_timers or {}).items():
                    timers[name] = timers.get(name, 0.0) + float(value)
        with connect(database_url(settings), autocommit=True) as conn:
            chunk_rows = conn.execute(
                "SELECT c.text, d.doc_key FROM rag.chunks c JOIN rag.documents d"
                " ON d.id = c.document_id WHERE c.source_table = %s",
                (TABLE,),
            ).fetchall()
            # One row per sync transaction: when it began, its documents and chunks.
            batches = conn.execute(
                "SELECT extract(epoch FROM d.indexed_at)::float8, count(DISTINCT d.id),"
                " count(c.id) FROM rag.documents d LEFT JOIN rag.chunks c ON c.document_id = d.id"
                " WHERE d.source_table = %s GROUP BY d.indexed_at ORDER BY d.indexed_at",
                (TABLE,),
            ).fetchall()
        if len(batches) < 2:
            raise SystemExit("the backfill ran in one transaction; use more --rows")
        # From the start of the first transaction to the start of the last one, the worker
        # processed every batch but the last: those rows and chunks, over that time.
        elapsed = batches[-1][0] - batches[0][0]
        timed_rows = sum(b[1] for b in batches[:-1])
        timed_chunks = sum(b[2] for b in batches[:-1])
        pipeline_rows_s = timed_rows / elapsed
        pipeline_chunks_s = timed_chunks / elapsed

        # The raw embedder on the same chunks, same settings, nothing else running.
        embedder = embedder_from_settings(settings)
        chunker = TokenChunker(embedder.tokenizer)
        mapping = Mappings.load(settings.mappings_path).get(TABLE)
        assert mapping is not None
        texts: list[str] = []
        for i, doc in enumerate(docs, start=1):
            source_row = {
                "id": i,
                "corpus_id": doc["_id"],
                "title": doc["title"],
                "abstract": doc["text"],
            }
            texts.extend(c.text for c in chunker.chunk(mapping.map_row(source_row).text))
        stored = sorted(hashlib.sha256(t.encode()).hexdigest() for t, _ in chunk_rows)
        same_chunks = stored == sorted(hashlib.sha256(t.encode()).hexdigest() for t in texts)
        embedder.embed(texts[:64])  # warm-up
        raw_started = time.monotonic()
        embedder.embed(texts)
        raw_elapsed = time.monotonic() - raw_started
        raw_chunks_s = len(texts) / raw_elapsed

    ratio = pipeline_chunks_s / raw_chunks_s
    print_table(
        f"sync throughput: {rows} SciFact rows, {len(texts)} chunks",
        [
            ("pipeline rows/s", f"{pipeline_rows_s:.1f}"),
            ("pipeline chunks/s", f"{pipeline_chunks_s:.1f}"),
            ("raw embedder chunks/s", f"{raw_chunks_s:.1f}"),
            ("ratio (target >= 0.95)", f"{ratio:.3f}"),
            ("sync workers", str(args.workers)),
            ("backfill seconds (timed part)", f"{elapsed:.1f}"),
            ("sync transactions", str(len(batches))),
            ("peak RSS of the largest worker, MiB", f"{rss:.0f}" if rss else "n/a"),
            (
                "worker time: embed / write / read+chunk / whole batches (s)",
                " / ".join(
                    f"{timers.get(k, 0):.0f}"
                    for k in ("embed_seconds", "write_seconds", "plan_seconds", "batch_seconds")
                ),
            ),
            ("indexed chunks == raw chunks", str(same_chunks)),
            ("embedder", f"bf16={embedder.bf16} threads={settings.embed_threads or 'default'}"),
        ],
    )
    write_results(
        "sync_throughput" if args.workers == 1 else f"sync_throughput_{args.workers}_workers",
        {
            "rows": rows,
            "chunks": len(texts),
            "timed_rows": timed_rows,
            "timed_chunks": timed_chunks,
            "backfill_seconds": elapsed,
            "transactions": len(batches),
            "pipeline_rows_per_s": pipeline_rows_s,
            "pipeline_chunks_per_s": pipeline_chunks_s,
            "raw_chunks_per_s": raw_chunks_s,
            "ratio": ratio,
            "target_ratio": 0.95,
            "workers": args.workers,
            "overrides": overrides,
            "worker_peak_rss_mib": rss,
            "worker_timers": timers,
            "same_chunks": same_chunks,
            "bf16": embedder.bf16,
        },
    )


if __name__ == "__main__":
    main()
