"""BM25 scoring in SQL, before and after migration 0007, interleaved in one run.

    .venv/bin/python -m bench.text_scoring [--chunks 100000] [--queries 200]

On the corpus of bench.query (its cached texts, random vectors: BM25 reads none), in a private
stack kept under FRESHET_HOME/bench/query-text, for the three users of bench.query (`staff`:
95% of the chunks, `research`: 5%, `admin`), each SciFact query is searched twice in turn:

- `0006`: migration 0006's rag.text_scores (the IDF weights evaluated per posting, every
  candidate returned and sorted by the caller), created for this run under another name and
  dropped after it, with the retriever's statement of that time;
- `0007`: the retriever as shipped (rag.text_top: the weights computed once, the best
  candidates returned sorted, every candidate only when too few of the best are visible).

Reported per user: p50/p99 of each in process (no HTTP, the app's pool), their ratio, and the
share of queries whose ten results are identical (the change must not alter a single one).
With --caps (e.g. 1000,2000,4000), the shipped retriever's p50 and recall@10 against BM25
reading every posting, for each FRESHET_BM25_POSTINGS_CAP listed: the cap's trade-off.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from pgvector.psycopg import register_vector
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from bench.common import print_table, private_stack, write_results
from bench.query import USERS, bench_queries, cached_texts, load, prewarm
from freshet.answering.bm25 import BM25
from freshet.answering.retrieval import (
    _CHUNK_COLUMNS,
    NO_FILTERS,
    PgRetriever,
    query_params,
    where_clause,
)
from freshet.answering.users import User
from freshet.db import database_url
from freshet.settings import PROJECT_ROOT, Settings

OLD = "rag.bench_text_scores_0006"


def migration_0006() -> Any:
    path = PROJECT_ROOT / "migrations" / "versions" / "0006_bm25.py"
    spec = importlib.util.spec_from_file_location("migration_0006", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def old_search(pool: ConnectionPool, bm25: BM25, query: str, user: User, limit: int) -> list[int]:
    """The retriever's text search as it was with migration 0006."""
    params = query_params(user, True, NO_FILTERS)
    params.update(query=query, limit=limit, k1=bm25.k1, b=bm25.b, cap=bm25.cap)
    statement = sql.SQL(
        "WITH s AS MATERIALIZED ("
        " SELECT * FROM {old}(%(query)s, %(k1)s, %(b)s, %(cap)s) AS s"
        " ORDER BY s.score DESC, s.chunk_id)"
        " SELECT {cols}, d.title, s.score AS rank FROM s"
        " CROSS JOIN LATERAL (SELECT * FROM rag.chunks AS c"
        "  WHERE c.id = s.chunk_id AND {where} LIMIT 1) AS c"
        " CROSS JOIN LATERAL (SELECT d.title FROM rag.documents AS d"
        "  WHERE d.id = c.document_id AND d.deleted_at IS NULL LIMIT 1) AS d"
        " ORDER BY s.score DESC, s.chunk_id LIMIT %(limit)s"
    ).format(
        old=sql.SQL(OLD),
        cols=_CHUNK_COLUMNS,
        where=where_clause(user, True, NO_FILTERS),
    )
    with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        return [int(r["id"]) for r in cur.execute(statement, params).fetchall()]


def cap_tradeoff(
    pool: ConnectionPool,
    settings: Settings,
    users: dict[str, User],
    queries: list[str],
    cap: int,
) -> dict[str, dict[str, float]]:
    """The shipped retriever with postings cap ``cap``: p50 and recall@10 against no cap."""

    def with_cap(value: int) -> PgRetriever:
        return PgRetriever(
            lambda: pool,
            lambda q: np.zeros(384, dtype=np.float32),
            ef_search=settings.hnsw_ef_search,
            public_documents=True,
            text_weight=settings.hybrid_text_weight,
            rrf_k=settings.rrf_k,
            bm25=BM25(k1=settings.bm25_k1, b=settings.bm25_b, cap=value),
        )

    exact, capped = with_cap(2**31 - 1), with_cap(cap)
    out: dict[str, dict[str, float]] = {}
    for name, user in users.items():
        times: list[float] = []
        recalls: list[float] = []
        for query in queries:
            want = {p.chunk_id for p in exact.text(query, user, 10, NO_FILTERS)}
            started = time.perf_counter()
            got = {p.chunk_id for p in capped.text(query, user, 10, NO_FILTERS)}
            times.append((time.perf_counter() - started) * 1000)
            if want:
                recalls.append(len(got & want) / len(want))
        out[name] = {
            "p50_ms": statistics.median(times),
            "recall_at_10": sum(recalls) / max(len(recalls), 1),
        }
        print(f"  cap {cap}, {name}: {out[name]}", flush=True)
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--caps", default="", help="postings caps to measure recall and p50 for, e.g. 1000,2000"
    )
    parser.add_argument(
        "--home", type=Path, default=PROJECT_ROOT / ".freshet" / "bench" / "query-text"
    )
    args = parser.parse_args()
    queries = bench_queries(args.queries)
    users = {
        name: User(str(e["user"]), tuple(e["groups"]), bool(e.get("admin", False)))
        for name, e in USERS.items()
    }
    with private_stack("bench-text-scoring", keep=args.home) as bench:
        settings: Settings = bench.settings
        texts = cached_texts(settings, args.home / "cache", args.chunks)
        rng = np.random.default_rng(0)
        vectors = rng.normal(size=(len(texts), 384)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        load(settings, texts, vectors, hnsw=False)
        prewarm(settings)
        bm25 = BM25(k1=settings.bm25_k1, b=settings.bm25_b, cap=settings.bm25_postings_cap)
        pool = ConnectionPool(
            database_url(settings), min_size=1, max_size=2, configure=register_vector, open=True
        )
        retriever = PgRetriever(
            lambda: pool,
            lambda q: np.zeros(384, dtype=np.float32),
            ef_search=settings.hnsw_ef_search,
            public_documents=True,
            text_weight=settings.hybrid_text_weight,
            rrf_k=settings.rrf_k,
            bm25=bm25,
        )
        with pool.connection() as conn:
            conn.execute(migration_0006().TEXT_SCORES.replace("rag.text_scores(", OLD + "("))
        per_user: dict[str, dict[str, float]] = {}
        caps: dict[str, dict[str, dict[str, float]]] = {}
        try:
            for cap in [int(c) for c in args.caps.split(",") if c.strip()]:
                caps[str(cap)] = cap_tradeoff(pool, settings, users, queries, cap)
            for name, user in users.items():
                old: list[float] = []
                new: list[float] = []
                same = 0
                for _ in range(args.rounds):
                    for query in queries:
                        started = time.perf_counter()
                        before = old_search(pool, bm25, query, user, 10)
                        old.append((time.perf_counter() - started) * 1000)
                        started = time.perf_counter()
                        after = [p.chunk_id for p in retriever.text(query, user, 10, NO_FILTERS)]
                        new.append((time.perf_counter() - started) * 1000)
                        same += before == after
                per_user[name] = {
                    "0006_p50_ms": statistics.median(old),
                    "0006_p99_ms": pct(old, 0.99),
                    "0007_p50_ms": statistics.median(new),
                    "0007_p99_ms": pct(new, 0.99),
                    "p50_ratio": statistics.median(new) / statistics.median(old),
                    "identical_results": same / len(old),
                }
                print(f"  {name}: {per_user[name]}", flush=True)
        finally:
            with pool.connection() as conn:
                conn.execute(f"DROP FUNCTION IF EXISTS {OLD}(text, float8, float8, integer)")
            pool.close()
        load_avg = os.getloadavg()[0]
    rows = []
    for name, r in per_user.items():
        rows.append(
            (
                f"{name}: p50 / p99, 0006 -> 0007",
                f"{r['0006_p50_ms']:.1f} / {r['0006_p99_ms']:.1f} ms -> "
                f"{r['0007_p50_ms']:.1f} / {r['0007_p99_ms']:.1f} ms"
                f" (x{r['p50_ratio']:.2f}), identical results {r['identical_results']:.3f}",
            )
        )
    for cap_name, by_user in caps.items():
        for name, r in by_user.items():
            rows.append(
                (
                    f"cap {cap_name}, {name}",
                    f"p50 {r['p50_ms']:.1f} ms, recall@10 vs every posting {r['recall_at_10']:.3f}",
                )
            )
    rows.append(("load average (1 min)", f"{load_avg:.2f}"))
    print_table(f"BM25 SQL in process, {len(texts)} chunks, {len(queries)} queries", rows)
    write_results(
        "text_scoring",
        {
            "chunks": len(texts),
            "queries": len(queries),
            "rounds": args.rounds,
            "cap": bm25.cap,
            "users": per_user,
            "caps": caps,
            "load_average_1m": load_avg,
        },
    )


if __name__ == "__main__":
    main()
