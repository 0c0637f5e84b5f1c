"""What maintaining the BM25 index costs the sync writer, against what embedding costs it.

    .venv/bin/python -m bench.text_index_cost [--chunks 2000]

On a private PostgreSQL (migrated as `freshet up` migrates it), real chunks of the query
benchmark's corpus (SciFact abstracts first; `python -m bench.query --embed-only` caches them)
are written as the sync writer writes them: transactions of 50 documents of one chunk each, the
chunks inserted by one COPY per transaction (the BM25 triggers run once per transaction). The
same chunks are written three ways, alternating batch by batch: COPY with the text index's
triggers, COPY with them disabled (what the writer cost before BM25), and one INSERT per chunk
with the triggers (how the writer wrote before it wrote a batch together). The bundled model
embeds the same texts in batches of 50, in the same run. Reported: the writer's milliseconds
per chunk each way, embedding's, and the throughput ratio the pipeline keeps,
(embed + write without) / (embed + write with). Target: >= 0.85.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import psycopg

from bench.common import print_table, write_results
from freshet.cdc.postgres import EmbeddedPostgres
from freshet.cdc.sandbox import free_port
from freshet.cdc.stack import migrate
from freshet.db import connect, database_url
from freshet.embedder import embedder_from_settings
from freshet.settings import PROJECT_ROOT, Settings

BATCH = 50


def write_batch(
    conn: psycopg.Connection,
    tag: str,
    first: int,
    texts: list[str],
    vectors: np.ndarray,
    *,
    copy: bool = True,
) -> float:
    started = time.perf_counter()
    with conn.transaction():
        docs: dict[str, int] = dict(
            conn.execute(
                "INSERT INTO rag.documents (source_table, doc_key, title, source_lsn)"
                " SELECT %s, k, k, 1 FROM unnest(%s::text[]) AS k RETURNING doc_key, id",
                (tag, [str(first + i) for i in range(len(texts))]),
            ).fetchall()
        )
        rows = [
            (docs[str(first + i)], tag, str(first + i), 0, t, str(i), vectors[i], 1)
            for i, t in enumerate(texts)
        ]
        with conn.cursor() as cur:
            if copy:
                with cur.copy(
                    "COPY rag.chunks (document_id, source_table, doc_key, chunk_index, text,"
                    " text_hash, embedding, source_lsn) FROM STDIN (FORMAT BINARY)"
                ) as out:
                    out.set_types(
                        ["bigint", "text", "text", "integer", "text", "text", "vector", "bigint"]
                    )
                    for row in rows:
                        out.write_row(row)
            else:
                cur.executemany(
                    "INSERT INTO rag.chunks (document_id, source_table, doc_key, chunk_index,"
                    " text, text_hash, embedding, source_lsn)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                    rows,
                )
    return time.perf_counter() - started


ARMS = ("with", "without", "one_by_one")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=2000)
    parser.add_argument(
        "--texts",
        type=Path,
        default=PROJECT_ROOT / ".freshet" / "bench" / "query" / "cache" / "texts.jsonl",
    )
    args = parser.parse_args()
    if not args.texts.exists():
        raise SystemExit(f"{args.texts} is missing: run `python -m bench.query --embed-only` first")
    with args.texts.open() as handle:
        texts = [json.loads(line) for _, line in zip(range(args.chunks), handle, strict=False)]
    home = Path(tempfile.mkdtemp(prefix="freshet-textcost-"))
    home.chmod(0o755)
    settings = Settings.from_env(
        {
            "FRESHET_HOME": str(home),
            "FRESHET_PG_PORT": str(free_port()),
            "FRESHET_PG_SHARED_BUFFERS": "256MB",
        }
    )
    embedder = embedder_from_settings(settings)
    pg = EmbeddedPostgres(settings)
    try:
        pg.start()
        url = database_url(settings)
        migrate(url)
        embed_seconds = 0.0
        vectors_all = []
        for first in range(0, len(texts), BATCH):
            started = time.perf_counter()
            vectors_all.append(embedder.embed(texts[first : first + BATCH]))
            embed_seconds += time.perf_counter() - started
        vectors = np.concatenate(vectors_all).astype(np.float32)
        times: dict[str, list[float]] = {arm: [] for arm in ARMS}
        with connect(url, autocommit=True, vector=True) as conn:
            for first in range(0, len(texts), BATCH):
                part, vecs = texts[first : first + BATCH], vectors[first : first + BATCH]
                turn = first // BATCH
                for arm in ARMS[turn % 3 :] + ARMS[: turn % 3]:
                    tag = f"cost.{arm}"
                    if arm == "without":
                        conn.execute("ALTER TABLE rag.chunks DISABLE TRIGGER text_index_insert")
                        times[arm].append(write_batch(conn, tag, first, part, vecs))
                        conn.execute("ALTER TABLE rag.chunks ENABLE TRIGGER text_index_insert")
                    else:
                        times[arm].append(
                            write_batch(conn, tag, first, part, vecs, copy=arm == "with")
                        )
            postings = conn.execute("SELECT count(*) FROM rag.text_postings").fetchone()
    finally:
        pg.stop()
        shutil.rmtree(home, ignore_errors=True)

    per_chunk = {
        "embed_ms": embed_seconds * 1000 / len(texts),
        "write_with_bm25_ms": sum(times["with"]) * 1000 / len(texts),
        "write_without_bm25_ms": sum(times["without"]) * 1000 / len(texts),
        "write_one_insert_per_chunk_ms": sum(times["one_by_one"]) * 1000 / len(texts),
    }
    ratio = (per_chunk["embed_ms"] + per_chunk["write_without_bm25_ms"]) / (
        per_chunk["embed_ms"] + per_chunk["write_with_bm25_ms"]
    )
    load = os.getloadavg()[0]
    print_table(
        f"BM25 maintenance cost: {len(texts)} chunks, transactions of {BATCH}",
        [
            ("embedding, per chunk", f"{per_chunk['embed_ms']:.2f} ms"),
            (
                "write with the BM25 triggers, per chunk",
                f"{per_chunk['write_with_bm25_ms']:.2f} ms",
            ),
            ("write without them, per chunk", f"{per_chunk['write_without_bm25_ms']:.2f} ms"),
            (
                "write with them, one INSERT per chunk (the writer before), per chunk",
                f"{per_chunk['write_one_insert_per_chunk_ms']:.2f} ms",
            ),
            (
                "write per transaction, median with / without / one INSERT per chunk",
                " / ".join(f"{statistics.median(times[arm]) * 1000:.1f}" for arm in ARMS) + " ms",
            ),
            ("postings written", f"{postings[0] if postings else 0:,}"),
            ("throughput kept (target >= 0.85)", f"{ratio:.3f}"),
            ("load average (1 min)", f"{load:.2f}"),
        ],
    )
    write_results(
        "text_index_cost",
        {
            "chunks": len(texts),
            "batch": BATCH,
            "per_chunk": per_chunk,
            "throughput_ratio": ratio,
            "target": 0.85,
            "load_average_1m": load,
        },
    )


if __name__ == "__main__":
    main()
