"""Search latency, throughput and HNSW recall at 100,000 chunks of real text.

    .venv/bin/python -m bench.query [--chunks 100000]

Chunks real text (SciFact abstracts, the PostgreSQL manual when postgresql-doc is installed,
and man pages, read at run time) with the model's tokenizer, embeds it once and caches texts
and vectors under FRESHET_HOME/bench/query (never in git), and loads them into rag.chunks of
a private stack (the HNSW index is built after the load, as a bulk load would) and reads the
table and its index into shared buffers (pg_prewarm: the steady state of a server that has been
answering for a while). Then, against the real web app served as in production (`freshet web`:
waitress, its own process), over HTTP:
  - GET /api/v1/search p50/p99 latency, query embedding included, one client, with the medians
    of the app's own Server-Timing spans (embed, sql, app) for the same requests;
  - queries per second with 4 concurrent clients;
  - recall@10 of the HNSW path against exact search for 200 queries, each measured on a fresh
    connection (a prepared statement could otherwise keep a plan made under another setting).
Targets: p50 <= 15 ms, p99 <= 40 ms, recall@10 >= 0.95.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psycopg
import requests
from pgvector.psycopg import register_vector

from bench.common import SCIFACT, print_table, private_stack, web_process, write_results
from bench.corpus import documents
from freshet.answering.timing import parse_header
from freshet.db import database_url
from freshet.embedder import embedder_from_settings
from freshet.settings import PROJECT_ROOT, Settings
from freshet.sync.chunking import TokenChunker
from freshet.web import create_app

TABLE = "bench.query"


def select_texts(chunker: TokenChunker, target: int) -> list[str]:
    """The first ``target`` distinct chunks of the corpus, in a stable order."""
    texts: list[str] = []
    seen: set[str] = set()
    for _, text in documents():
        for chunk in chunker.chunk(text):
            if chunk.hash not in seen and len(chunk.text) > 40:
                seen.add(chunk.hash)
                texts.append(chunk.text)
        if len(texts) >= target:
            break
    if len(texts) < target:
        print(f"the corpus holds only {len(texts)} distinct chunks (asked for {target})")
    return texts[:target]


SHARD = 4096


def build_corpus(settings: Settings, cache: Path, target: int) -> tuple[list[str], np.ndarray]:
    """Texts and their vectors, embedded once: shards of SHARD vectors are cached as they are
    done, so an interrupted run resumes where it stopped."""
    cache.mkdir(parents=True, exist_ok=True)
    texts_file = cache / "texts.jsonl"
    texts = [json.loads(line) for line in texts_file.open()] if texts_file.exists() else []
    embedder = embedder_from_settings(settings)
    if len(texts) < target:
        print(f"chunking the corpus for {target} chunks ...", flush=True)
        texts = select_texts(TokenChunker(embedder.tokenizer), target)
        for stale in cache.glob("vectors-*.npy"):
            stale.unlink()
        with texts_file.open("w") as handle:
            handle.writelines(json.dumps(text) + "\n" for text in texts)
    texts = texts[:target]
    shards: list[np.ndarray] = []
    started, fresh = time.monotonic(), 0
    for first in range(0, len(texts), SHARD):
        path = cache / f"vectors-{first // SHARD:05d}.npy"
        batch = texts[first : first + SHARD]
        if path.exists() and len(np.load(path, mmap_mode="r")) == len(batch):
            shards.append(np.load(path))
            continue
        shards.append(embedder.embed(batch).astype(np.float32))
        np.save(path, shards[-1])
        fresh += len(batch)
        done = first + len(batch)
        rate = fresh / (time.monotonic() - started)
        print(
            f"  embedded {done}/{len(texts)} ({rate:.0f} chunks/s,"
            f" ETA {(len(texts) - done) / rate:.0f} s; cached in {cache})",
            flush=True,
        )
    return texts, np.concatenate(shards)[: len(texts)]


def load(settings: Settings, texts: list[str], vectors: np.ndarray) -> None:
    with psycopg.connect(database_url(settings), autocommit=True) as conn:
        register_vector(conn)
        count = conn.execute(
            "SELECT count(*) FROM rag.chunks WHERE source_table = %s", (TABLE,)
        ).fetchone()
        if count and count[0] == len(texts):
            return
        conn.execute("DELETE FROM rag.documents WHERE source_table = %s", (TABLE,))
        conn.execute("DROP INDEX IF EXISTS rag.ix_chunks_embedding_hnsw")
        doc = conn.execute(
            "INSERT INTO rag.documents (source_table, doc_key, title, source_lsn)"
            " VALUES (%s, 'corpus', 'query benchmark corpus', 0) RETURNING id",
            (TABLE,),
        ).fetchone()
        assert doc is not None
        started = time.monotonic()
        with (
            conn.cursor() as cur,
            cur.copy(
                "COPY rag.chunks (document_id, source_table, doc_key, chunk_index, text, text_hash,"
                " embedding, source_lsn) FROM STDIN WITH (FORMAT BINARY)"
            ) as copy,
        ):
            copy.set_types(["int8", "text", "text", "int4", "text", "text", "vector", "int8"])
            for i, (text, vector) in enumerate(zip(texts, vectors, strict=True)):
                copy.write_row((doc[0], TABLE, f"corpus-{i}", i, text, str(i), vector, 0))
        print(
            f"loaded {len(texts)} chunks in {time.monotonic() - started:.0f}s; building HNSW",
            flush=True,
        )
        started = time.monotonic()
        # The same index as migration 0001 defines.
        conn.execute(
            "CREATE INDEX ix_chunks_embedding_hnsw ON rag.chunks "
            "USING hnsw (embedding vector_cosine_ops) WITH (m = 16, ef_construction = 64)"
        )
        conn.execute("ANALYZE rag.chunks")
        print(f"HNSW built in {time.monotonic() - started:.0f}s", flush=True)


def prewarm(settings: Settings) -> None:
    """Read the HNSW index and the chunks into shared buffers, as a server that has been
    answering for a while has them: the stack was just started, and the first queries would
    otherwise measure page reads from the OS cache, not search."""
    with psycopg.connect(database_url(settings), autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_prewarm")
        started = time.monotonic()
        row = conn.execute(
            "SELECT pg_prewarm('rag.chunks'), pg_prewarm('rag.ix_chunks_embedding_hnsw'),"
            " pg_size_pretty(pg_relation_size('rag.chunks')),"
            " pg_size_pretty(pg_relation_size('rag.ix_chunks_embedding_hnsw')),"
            " current_setting('shared_buffers')"
        ).fetchone()
        assert row is not None
        print(
            f"prewarmed rag.chunks ({row[2]}) and its HNSW index ({row[3]}) into shared_buffers"
            f" ({row[4]}) in {time.monotonic() - started:.1f}s",
            flush=True,
        )


def bench_queries(count: int) -> list[str]:
    with (SCIFACT / "queries.jsonl").open() as handle:
        return [json.loads(line)["text"] for line in handle][:count]


def recall_at_10(settings: Settings, queries: list[str], ef_search: int) -> float:
    embedder = embedder_from_settings(settings)
    vectors = embedder.embed(queries)
    sql = "SELECT id FROM rag.chunks WHERE source_table = %s ORDER BY embedding <=> %s LIMIT 10"
    recalls = []
    for vector in vectors:
        results = []
        for exact in (False, True):
            with psycopg.connect(database_url(settings), autocommit=True) as conn:
                register_vector(conn)
                with conn.transaction():
                    conn.execute("SELECT set_config('hnsw.ef_search', %s, true)", (str(ef_search),))
                    if exact:
                        conn.execute("SET LOCAL enable_indexscan = off")
                    results.append({r[0] for r in conn.execute(sql, (TABLE, vector))})
        recalls.append(len(results[0] & results[1]) / 10)
    return statistics.fmean(recalls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--mode", default="dense", choices=("dense", "text", "hybrid"))
    parser.add_argument("--home", type=Path, default=PROJECT_ROOT / ".freshet" / "bench" / "query")
    parser.add_argument(
        "--embed-only", action="store_true", help="build the cached vectors, start no stack"
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for the private stack and its web app (repeatable), e.g."
        " FRESHET_EMBED_SMALL_CALL_THREADS=2",
    )
    args = parser.parse_args()
    overrides = dict(item.split("=", 1) for item in args.env if "=" in item)
    if len(overrides) != len(args.env):
        parser.error("--env takes NAME=VALUE")
    queries = bench_queries(args.queries)
    if args.embed_only:
        texts, _ = build_corpus(Settings.from_env(), args.home / "cache", args.chunks)
        print(f"{len(texts)} chunks and vectors cached in {args.home / 'cache'}")
        return

    with private_stack("bench-query", keep=args.home, **overrides) as bench:
        settings = bench.settings
        texts, vectors = build_corpus(settings, args.home / "cache", args.chunks)
        load(settings, texts, vectors)
        prewarm(settings)
        ef_search = int(create_app(settings=settings).config["HNSW_EF_SEARCH"])
        # The web app as it is served in production (`freshet web`: waitress), in its own
        # process, so the clients below do not share its interpreter.
        with web_process(bench, "bench-query-web") as base:
            url = f"{base}api/v1/search"

            spans: list[dict[str, float]] = []

            def one(session: requests.Session, query: str) -> float:
                started = time.perf_counter()
                response = session.get(
                    url, params={"q": query, "k": 10, "mode": args.mode}, timeout=30
                )
                response.raise_for_status()
                elapsed = time.perf_counter() - started
                spans.append(parse_header(response.headers.get("Server-Timing", "")))
                return elapsed

            session = requests.Session()
            for query in queries[:20]:  # warm-up: model, pool, caches
                one(session, query)
            spans.clear()
            latencies = sorted(one(session, q) for q in queries)
            served = {
                name: statistics.median(s.get(name, 0.0) for s in spans)
                for name in ("embed", "sql", "text-sql", "app")
                if any(name in s for s in spans)
            }
            total = len(queries) * 2

            def client(worker: int) -> int:
                s = requests.Session()
                for i in range(total // 4):
                    one(s, queries[(worker * 37 + i) % len(queries)])
                return total // 4

            started = time.perf_counter()
            with ThreadPoolExecutor(4) as pool:
                done = sum(pool.map(client, range(4)))
            qps = done / (time.perf_counter() - started)
        recall = recall_at_10(settings, queries, ef_search)

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000

    print_table(
        f"query: {len(texts)} chunks, {len(queries)} queries, mode={args.mode}",
        [
            ("p50 latency (target <= 15 ms)", f"{pct(0.5):.1f} ms"),
            ("p99 latency (target <= 40 ms)", f"{pct(0.99):.1f} ms"),
            *((f"  of which served: {name} p50", f"{ms:.1f} ms") for name, ms in served.items()),
            ("QPS, 4 concurrent clients", f"{qps:.1f}"),
            (f"recall@10 HNSW vs exact, ef_search={ef_search} (target >= 0.95)", f"{recall:.3f}"),
        ],
    )
    write_results(
        "query",
        {
            "chunks": len(texts),
            "queries": len(queries),
            "mode": args.mode,
            "settings": overrides,
            "p50_ms": pct(0.5),
            "p99_ms": pct(0.99),
            # Medians of the app's own Server-Timing spans over the same requests.
            "served_p50_ms": served,
            "qps_4_clients": qps,
            "recall_at_10": recall,
            "ef_search": ef_search,
            "targets": {"p50_ms": 15, "p99_ms": 40, "recall_at_10": 0.95},
        },
    )


if __name__ == "__main__":
    main()
