"""Search latency, throughput and recall at 100,000 chunks of real text, as three kinds of user.

    .venv/bin/python -m bench.query [--chunks 100000] [--mode dense|text|hybrid]

Chunks real text (SciFact abstracts, the PostgreSQL manual when postgresql-doc is installed,
and man pages, read at run time) with the model's tokenizer, embeds it once and caches texts
and vectors under FRESHET_HOME/bench/query (never in git), and loads them into rag.chunks of
a private stack (the HNSW index is built after the load, as a bulk load would; the BM25 postings
are written by the triggers, as the sync writer's transactions write them). 95% of the chunks
belong to group `staff`, 5% to group `research`; `research` and the public chunks get partial
HNSW indexes of their own, as `freshet group-index research` builds them (`--group-index none`:
without). The table and its indexes are read into shared buffers (pg_prewarm: the steady state
of a server that has been answering for a while).

Then, against the real web app served as in production (`freshet web`: waitress, its own
process), over HTTP, for each user: `staff` (the predicate matches 95% of the chunks),
`research` (5%) and `admin` (no predicate):
  - GET /api/v1/search p50/p99 latency, query embedding included, one client, with the medians
    of the app's own Server-Timing spans (embed, dense sql, text sql, app) for the same requests;
  - queries per second with 4 concurrent clients (staff);
  - recall@10 against exact search for each user: the same retrieval in process with an exact
    dense scan (no index) and BM25 reading every posting (no cap), fused the same way.
With --growth, BM25's SQL time (staff) is measured at 25%, 50% and 100% of the chunks as they
are loaded. Targets (hybrid): p50 <= 15 ms, p99 <= 40 ms, recall@10 >= 0.95; text p50 <= 8 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import requests
from pgvector.psycopg import register_vector
from psycopg import sql as psycopg_sql
from psycopg_pool import ConnectionPool

from bench.common import SCIFACT, print_table, private_stack, web_process, write_results
from bench.corpus import documents
from freshet import group_indexes
from freshet.answering.bm25 import BM25
from freshet.answering.retrieval import (
    NO_FILTERS,
    Filters,
    Passage,
    PgRetriever,
    query_params,
    where_clause,
)
from freshet.answering.timing import parse_header
from freshet.answering.users import User
from freshet.db import database_url
from freshet.embedder import Embedder, embedder_from_settings
from freshet.settings import PROJECT_ROOT, Settings
from freshet.sync.chunking import TokenChunker

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


def cached_texts(settings: Settings, cache: Path, target: int) -> list[str]:
    """The corpus's texts only (chunked once and cached, as build_corpus does)."""
    cache.mkdir(parents=True, exist_ok=True)
    texts_file = cache / "texts.jsonl"
    texts = [json.loads(line) for line in texts_file.open()] if texts_file.exists() else []
    if len(texts) < target:
        embedder = embedder_from_settings(settings)
        texts = select_texts(TokenChunker(embedder.tokenizer), target)
        with texts_file.open("w") as handle:
            handle.writelines(json.dumps(text) + "\n" for text in texts)
    return texts[:target]


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


USERS: dict[str, dict[str, Any]] = {
    "staff": {"user": "bench-staff", "groups": ["staff"]},
    "research": {"user": "bench-research", "groups": ["research"]},
    "admin": {"user": "bench-admin", "groups": [], "admin": True},
}
SLICE = 5000


def groups_of(i: int) -> list[str]:
    """Every 20th chunk is research's (5%); the others staff's (95%)."""
    return ["research"] if i % 20 == 0 else ["staff"]


def load(
    settings: Settings,
    texts: list[str],
    vectors: np.ndarray,
    at: Callable[[int], None] = lambda loaded: None,
    checkpoints: tuple[int, ...] = (),
    hnsw: bool = True,
) -> None:
    """COPY the chunks in slices (each one statement: the text index's trigger runs once per
    slice); ``at(n)`` runs when n chunks are loaded, for each n of ``checkpoints``."""
    with psycopg.connect(database_url(settings), autocommit=True) as conn:
        register_vector(conn)
        count = conn.execute(
            "SELECT count(*) FROM rag.chunks WHERE source_table = %s", (TABLE,)
        ).fetchone()
        if count and count[0] == len(texts) and not checkpoints:
            return
        conn.execute("DELETE FROM rag.documents WHERE source_table = %s", (TABLE,))
        conn.execute("DROP INDEX IF EXISTS rag.ix_chunks_embedding_hnsw")
        for group in group_indexes.found(conn):  # built again after the load
            group_indexes.drop(conn, group)
        doc = conn.execute(
            "INSERT INTO rag.documents (source_table, doc_key, title, source_lsn)"
            " VALUES (%s, 'corpus', 'query benchmark corpus', 0) RETURNING id",
            (TABLE,),
        ).fetchone()
        assert doc is not None
        started = time.monotonic()
        for first in range(0, len(texts), SLICE):
            with (
                conn.cursor() as cur,
                cur.copy(
                    "COPY rag.chunks (document_id, source_table, doc_key, chunk_index, text,"
                    " text_hash, embedding, source_lsn, access_groups) FROM STDIN"
                    " WITH (FORMAT BINARY)"
                ) as copy,
            ):
                copy.set_types(
                    ["int8", "text", "text", "int4", "text", "text", "vector", "int8", "text[]"]
                )
                for i in range(first, min(first + SLICE, len(texts))):
                    copy.write_row(
                        (
                            doc[0],
                            TABLE,
                            f"corpus-{i}",
                            i,
                            texts[i],
                            str(i),
                            vectors[i],
                            0,
                            groups_of(i),
                        )
                    )
            loaded = min(first + SLICE, len(texts))
            print(
                f"  loaded {loaded}/{len(texts)} chunks with their BM25 postings"
                f" ({time.monotonic() - started:.0f}s)",
                flush=True,
            )
            if loaded in checkpoints:
                conn.execute("VACUUM ANALYZE rag.text_postings")
                conn.execute("ANALYZE rag.chunks")
                at(loaded)
        print(f"loaded {len(texts)} chunks in {time.monotonic() - started:.0f}s", flush=True)
        if not hnsw:  # BM25 only: a graph of random vectors would measure nothing
            conn.execute("VACUUM ANALYZE rag.chunks")
            conn.execute("VACUUM ANALYZE rag.text_postings")
            return
        started = time.monotonic()
        # The same index as migration 0001 defines.
        conn.execute(
            "CREATE INDEX ix_chunks_embedding_hnsw ON rag.chunks "
            "USING hnsw (embedding vector_cosine_ops) WITH (m = 16, ef_construction = 64)"
        )
        conn.execute("VACUUM ANALYZE rag.chunks")
        conn.execute("VACUUM ANALYZE rag.text_postings")
        print(f"HNSW built in {time.monotonic() - started:.0f}s", flush=True)


def index_groups(settings: Settings, groups: list[str]) -> None:
    """Partial HNSW indexes for ``groups`` (and the public chunks), as `freshet group-index`
    builds them; any other group index is dropped."""
    wanted = [*groups, group_indexes.PUBLIC] if groups and settings.public_documents else groups
    with psycopg.connect(database_url(settings), autocommit=True) as conn:
        for group in group_indexes.found(conn):
            if group not in wanted:
                group_indexes.drop(conn, group)
        for group in wanted:
            started = time.monotonic()
            if group_indexes.build(conn, group):
                print(
                    f"index of {group_indexes.describe(group)} built in"
                    f" {time.monotonic() - started:.1f}s",
                    flush=True,
                )
            conn.execute("SELECT pg_prewarm(%s)", (f"rag.{group_indexes.index_name(group)}",))


def prewarm(settings: Settings) -> None:
    """Read the HNSW index and the chunks into shared buffers, as a server that has been
    answering for a while has them: the stack was just started, and the first queries would
    otherwise measure page reads from the OS cache, not search."""
    with psycopg.connect(database_url(settings), autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_prewarm")
        started = time.monotonic()
        row = conn.execute(
            "SELECT pg_prewarm('rag.chunks') + pg_prewarm('rag.text_postings')"
            " + pg_prewarm('rag.ix_text_postings_term'),"
            " pg_prewarm(coalesce(to_regclass('rag.ix_chunks_embedding_hnsw'), 'rag.chunks')),"
            " pg_size_pretty(pg_relation_size('rag.chunks')),"
            " pg_size_pretty(pg_relation_size(coalesce(to_regclass('rag.ix_chunks_embedding_hnsw'),"
            " 'rag.chunks'))),"
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


class ExactRetriever(PgRetriever):
    """The app's retrieval with exact dense search (a scan of every visible chunk, no index)
    and BM25 reading every posting: the reference recall is measured against."""

    def dense(
        self,
        vector: np.ndarray,
        user: User,
        limit: int,
        filters: Filters,
        *,
        wanted: int | None = None,
        generation: int | None = None,
    ) -> list[Passage]:
        where = where_clause(user, self.public_documents, filters)
        statement = psycopg_sql.SQL(
            "SELECT c.id, c.embedding <=> %(vector)s AS distance FROM rag.chunks AS c"
            " WHERE {where} ORDER BY c.embedding <=> %(vector)s, c.id LIMIT %(limit)s"
        ).format(where=where)
        params = {
            **query_params(user, self.public_documents, filters),
            "vector": vector,
            "limit": limit,
        }
        with self._pool().connection() as conn:
            conn.execute("SET LOCAL enable_indexscan = off")
            rows = conn.execute(statement, params).fetchall()
        return [
            Passage(int(r[0]), 0, TABLE, "", 0, "", score=1 - float(r[1]), distance=float(r[1]))
            for r in rows
        ]


def retrievers(
    settings: Settings, embedder: Embedder
) -> tuple[PgRetriever, PgRetriever, ConnectionPool]:
    """The app's retriever, built as the app builds it, and the exact one, on one pool."""
    app = settings
    pool = ConnectionPool(
        database_url(app), min_size=1, max_size=4, configure=register_vector, open=True
    )

    def build(kind: type[PgRetriever], cap: int) -> PgRetriever:
        return kind(
            lambda: pool,
            lambda query: embedder.embed([query])[0],
            embed_hybrid=embedder.embed_query if app.query_int8 != "off" else None,
            embed_dense=embedder.embed_query if app.query_int8 == "all" else None,
            ef_search=app.hnsw_ef_search,
            public_documents=app.public_documents,
            text_weight=app.hybrid_text_weight,
            rrf_k=app.rrf_k,
            bm25=BM25(
                app.bm25_k1, app.bm25_b, cap, app.bm25_hybrid_postings_cap if cap < 10**9 else 0
            ),
        )

    served, exact = build(PgRetriever, app.bm25_postings_cap), build(ExactRetriever, 10**9)
    return served, exact, pool


def recall_at_10(
    served: PgRetriever, exact: PgRetriever, queries: list[str], user: User, mode: str
) -> float:
    recalls = []
    for query in queries:
        got = {p.chunk_id for p in served.search(query, user, k=10, mode=mode)}  # type: ignore[arg-type]
        want = {p.chunk_id for p in exact.search(query, user, k=10, mode=mode)}  # type: ignore[arg-type]
        if want:
            recalls.append(len(got & want) / len(want))
    return statistics.fmean(recalls) if recalls else 1.0


def text_sql_median(served: PgRetriever, queries: list[str], user: User) -> float:
    """Median milliseconds of BM25's SQL (the text half alone), in process."""
    for query in queries[:10]:
        served.text(query, user, 20, NO_FILTERS)
    times = []
    for query in queries:
        started = time.perf_counter()
        served.text(query, user, 20, NO_FILTERS)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--mode", default="hybrid", choices=("dense", "text", "hybrid"))
    parser.add_argument("--home", type=Path, default=PROJECT_ROOT / ".freshet" / "bench" / "query")
    parser.add_argument(
        "--embed-only", action="store_true", help="build the cached vectors, start no stack"
    )
    parser.add_argument(
        "--random-vectors",
        action="store_true",
        help="load random unit vectors instead of embedding the corpus: for BM25's figures"
        " (--mode text, --growth) only; dense and hybrid figures are then meaningless",
    )
    parser.add_argument(
        "--growth",
        action="store_true",
        help="reload the chunks and measure BM25's SQL time at 25%%, 50%% and 100%% of them",
    )
    parser.add_argument(
        "--group-index",
        action="append",
        default=None,
        metavar="GROUP",
        help="build a partial HNSW index for GROUP, as `freshet group-index GROUP` does"
        " (repeatable; default: research, the 5%% group; `none`: no group index)",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for the private stack and its web app (repeatable), e.g."
        " FRESHET_BM25_POSTINGS_CAP=1000",
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
    args.home.mkdir(parents=True, exist_ok=True)
    tokens_file = args.home / "tokens.json"
    tokens_file.write_text(json.dumps({f"bench-{name}": entry for name, entry in USERS.items()}))
    overrides.setdefault("FRESHET_API_TOKENS_FILE", str(tokens_file))
    # One client asking as fast as it can: the per-caller rate limits would refuse it.
    overrides.setdefault("FRESHET_RATE_LIMIT_BACKEND", "off")
    users = {
        name: User(str(e["user"]), tuple(e["groups"]), bool(e.get("admin", False)))
        for name, e in USERS.items()
    }

    with private_stack("bench-query", keep=args.home, **overrides) as bench:
        settings = bench.settings
        if args.random_vectors:
            if args.mode != "text":
                parser.error("--random-vectors measures BM25 only: use --mode text")
            texts = cached_texts(settings, args.home / "cache", args.chunks)
            rng = np.random.default_rng(0)
            vectors = rng.normal(size=(len(texts), 384)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        else:
            texts, vectors = build_corpus(settings, args.home / "cache", args.chunks)
        embedder = embedder_from_settings(settings)
        served, exact, pool = retrievers(settings, embedder)
        growth: dict[int, float] = {}
        if args.growth:
            steps = tuple(len(texts) * n // 4 // SLICE * SLICE for n in (1, 2)) + (len(texts),)

            def measure(loaded: int) -> None:
                growth[loaded] = text_sql_median(served, queries, users["staff"])
                print(f"  BM25 SQL p50 at {loaded} chunks: {growth[loaded]:.2f} ms", flush=True)

            load(settings, texts, vectors, measure, steps, hnsw=not args.random_vectors)
        else:
            load(settings, texts, vectors, hnsw=not args.random_vectors)
        prewarm(settings)
        indexed = [g for g in (args.group_index or ["research"]) if g != "none"]
        if not args.random_vectors:
            index_groups(settings, indexed)
        load_avg = os.getloadavg()[0]
        ef_search = settings.hnsw_ef_search
        per_user: dict[str, dict[str, Any]] = {}
        # The web app as it is served in production (`freshet web`: waitress), in its own
        # process, so the clients below do not share its interpreter.
        with web_process(bench, "bench-query-web") as base:
            url = f"{base}api/v1/search"

            def one(session: requests.Session, query: str, token: str, spans: list) -> float:
                started = time.perf_counter()
                response = session.get(
                    url,
                    params={"q": query, "k": 10, "mode": args.mode},
                    headers={"Authorization": f"Bearer {token}"},
                    timeout=30,
                )
                response.raise_for_status()
                elapsed = time.perf_counter() - started
                spans.append(parse_header(response.headers.get("Server-Timing", "")))
                return elapsed

            # `freshet web` serves while it builds its int8 query model in the background (a
            # few seconds on every core): a search that embeds waits for it, a text search does
            # not, so one dense search first keeps that build out of every figure below.
            requests.get(
                url,
                params={"q": queries[0], "k": "1", "mode": "dense"},
                headers={"Authorization": "Bearer bench-admin"},
                timeout=300,
            ).raise_for_status()
            for name in users:
                token = f"bench-{name}"
                session = requests.Session()
                spans: list[dict[str, float]] = []
                for query in queries[:20]:  # warm-up: model, pool, caches, prepared plans
                    one(session, query, token, spans)
                spans.clear()
                latencies = sorted(one(session, q, token, spans) for q in queries)
                served_spans = {
                    span: statistics.median(s.get(span, 0.0) for s in spans)
                    for span in ("embed", "sql", "text-sql", "fuse", "app")
                    if any(span in s for s in spans)
                }
                per_user[name] = {
                    "p50_ms": pct(latencies, 0.5),
                    "p99_ms": pct(latencies, 0.99),
                    "served_p50_ms": served_spans,
                }
            total = len(queries) * 2

            def client(worker: int) -> int:
                s, spans = requests.Session(), list[dict[str, float]]()
                for i in range(total // 4):
                    one(s, queries[(worker * 37 + i) % len(queries)], "bench-staff", spans)
                return total // 4

            started = time.perf_counter()
            with ThreadPoolExecutor(4) as workers:
                done = sum(workers.map(client, range(4)))
            qps = done / (time.perf_counter() - started)
        for name, user in users.items():
            per_user[name]["recall_at_10"] = recall_at_10(served, exact, queries, user, args.mode)
        pool.close()

    targets = (
        {"p50_ms": 8} if args.mode == "text" else {"p50_ms": 15, "p99_ms": 40, "recall_at_10": 0.95}
    )
    rows: list[tuple[str, str]] = []
    for name, result in per_user.items():
        rows.append((f"{name}: p50 / p99", f"{result['p50_ms']:.1f} / {result['p99_ms']:.1f} ms"))
        rows.extend(
            (f"  {name}: served {span} p50", f"{ms:.1f} ms")
            for span, ms in result["served_p50_ms"].items()
        )
        rows.append((f"  {name}: recall@10 vs exact", f"{result['recall_at_10']:.3f}"))
    rows.append(("QPS, 4 concurrent clients (staff)", f"{qps:.1f}"))
    rows.extend((f"BM25 SQL p50 at {n} chunks", f"{ms:.2f} ms") for n, ms in growth.items())
    rows.append(("load average (1 min) when measuring", f"{load_avg:.2f}"))
    print_table(
        f"query: {len(texts)} chunks, {len(queries)} queries, mode={args.mode}, "
        f"ef_search={ef_search}, group indexes {indexed or 'none'}, targets {targets}",
        rows,
    )
    write_results(
        f"query_{args.mode}",
        {
            "chunks": len(texts),
            "queries": len(queries),
            "mode": args.mode,
            "random_vectors": args.random_vectors,
            "settings": {k: v for k, v in overrides.items() if k != "FRESHET_API_TOKENS_FILE"},
            "group_indexes": indexed,
            "users": per_user,
            "qps_4_clients": qps,
            "bm25_sql_p50_ms_by_chunks": growth,
            "ef_search": ef_search,
            "load_average_1m": load_avg,
            "targets": targets,
        },
    )


def pct(latencies: list[float], q: float) -> float:
    return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000


if __name__ == "__main__":
    main()
