"""What maintaining the BM25 index costs the sync writer, against what embedding costs it.

    .venv/bin/python -m bench.text_index_cost [--chunks 2000]

On a private PostgreSQL (migrated as `freshet up` migrates it), real chunks of the query
benchmark's corpus (SciFact abstracts first; `python -m bench.query --embed-only` caches them)
are written as the sync writer writes them: transactions of 50 documents of one chunk each,
the chunks inserted with executemany. The same chunks are written twice, alternating batch by
batch: with the text index's triggers, and with them disabled (what the writer cost before
BM25). The bundled model embeds the same texts in batches of 50, in the same run. Reported: the
writer's milliseconds per chunk both ways, embedding's, and the throughput ratio the pipeline
keeps, (embed + write without) / (embed + write with). Target: >= 0.85.
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
    conn: psycopg.Connection, tag: str, first: int, texts: list[str], vectors: np.ndarray
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
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO rag.chunks (document_id, source_table, doc_key, chunk_index, text,"
                " text_hash, embedding, source_lsn) VALUES (%s, %s, %s, 0, %s, %s, %s, 1)",
                [
                    (docs[str(first + i)], tag, str(first + i), t, str(i), vectors[i])
                    for i, t in enumerate(texts)
                ],
            )
    return time.perf_counter() - started


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
        with_index: list[float] = []
        without: list[float] = []
        with connect(url, autocommit=True, vector=True) as conn:
            for first in range(0, len(texts), BATCH):
                part, vecs = texts[first : first + BATCH], vectors[first : first + BATCH]
                order = ("with", "without") if (first // BATCH) % 2 == 0 else ("without", "with")
                for arm in order:
                    if arm == "without":
                        conn.execute("ALTER TABLE rag.chunks DISABLE TRIGGER text_index_insert")
                        without.append(write_batch(conn, "cost.without", first, part, vecs))
                        conn.execute("ALTER TABLE rag.chunks ENABLE TRIGGER text_index_insert")
                    else:
                        with_index.append(write_batch(conn, "cost.with", first, part, vecs))
            postings = conn.execute("SELECT count(*) FROM rag.text_postings").fetchone()
    finally:
        pg.stop()
        shutil.rmtree(home, ignore_errors=True)

    per_chunk = {
        "embed_ms": embed_seconds * 1000 / len(texts),
        "write_with_bm25_ms": sum(with_index) * 1000 / len(texts),
        "write_without_bm25_ms": sum(without) * 1000 / len(texts),
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
                "write per transaction, median with / without",
                f"{statistics.median(with_index) * 1000:.1f} / "
                f"{statistics.median(without) * 1000:.1f} ms",
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
