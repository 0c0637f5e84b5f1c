"""Retrieval quality on BEIR SciFact through the whole pipeline and the REST API.

    .venv/bin/python -m bench.quality [--split test]

The corpus (read from ../shared/eval/scifact at run time) is inserted into the captured table
app.scifact of a private stack kept in FRESHET_HOME/bench/scifact, so it flows through Debezium,
Kafka and the sync worker once; later runs reuse that index. The split's queries go to
GET /api/v1/search of the real web app over HTTP, in each mode (dense, text, hybrid), with
one result per document (chunk hits folded to each document's best rank). Reports nDCG@10 and
recall@100. Published figures: all-MiniLM-L6-v2 nDCG@10 = 0.645 (MTEB, whole documents cut at
256 tokens); BM25 0.665 (BEIR). Targets: dense unchanged (0.679), text >= 0.65, hybrid >= 0.71.
--tune-bm25 (train) grid-searches k1 and b; --tune (train) the fusion's text weight and RRF k.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import threading
import time
from collections import defaultdict
from pathlib import Path

import requests
from werkzeug.serving import make_server

from bench.common import (
    SCIFACT,
    Bench,
    count_documents,
    load_scifact,
    print_table,
    private_stack,
    scifact_corpus,
    sync_process,
    wait_until,
    write_results,
)
from freshet.answering.retrieval import rrf
from freshet.db import connect, database_url
from freshet.settings import PROJECT_ROOT
from freshet.sync.model_gate import ndcg_at
from freshet.web import create_app

TABLE = "app.scifact"
MODES = ("dense", "text", "hybrid")


def qrels(split: str) -> dict[str, dict[str, int]]:
    relevant: dict[str, dict[str, int]] = defaultdict(dict)
    with (SCIFACT / "qrels" / f"{split}.tsv").open() as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            relevant[row["query-id"]][row["corpus-id"]] = int(row["score"])
    return relevant


def queries() -> dict[str, str]:
    with (SCIFACT / "queries.jsonl").open() as handle:
        return {q["_id"]: q["text"] for q in map(json.loads, handle)}


def recall_at(ranked: list[str], relevant: dict[str, int], k: int = 100) -> float:
    hits = sum(1 for doc in ranked[:k] if doc in relevant)
    return hits / len(relevant) if relevant else 0.0


def ranked_documents(
    session: requests.Session, url: str, query: str, mode: str, corpus_ids: list[str]
) -> list[str]:
    """SciFact document ids in the order /api/v1/search ranks them (best chunk per document)."""
    params: dict[str, str | int] = {
        "q": query,
        "k": 100,
        "mode": mode,
        "dedupe": "true",
        "table": TABLE,
    }
    response = session.get(url, params=params, timeout=60)
    response.raise_for_status()
    ranked: list[str] = []
    for hit in response.json()["results"]:
        doc = corpus_ids[int(hit["doc_key"]) - 1]
        if doc not in ranked:
            ranked.append(doc)
    return ranked


def evaluate(ranked: dict[str, list[str]], relevant: dict[str, dict[str, int]]) -> dict[str, float]:
    ndcgs = [ndcg_at(ranked[qid], rels) for qid, rels in relevant.items()]
    recalls = [recall_at(ranked[qid], rels) for qid, rels in relevant.items()]
    return {"ndcg@10": sum(ndcgs) / len(ndcgs), "recall@100": sum(recalls) / len(recalls)}


def tune_fusion(
    lists: dict[str, dict[str, list[str]]], relevant: dict[str, dict[str, int]], split: str
) -> None:
    """Weighted RRF of the dense and text document rankings over a grid of text weights and
    RRF k, as the web app fuses them (FRESHET_HYBRID_TEXT_WEIGHT, FRESHET_RRF_K)."""
    grid: list[tuple[float, int, float]] = []
    for rrf_k in (5, 10, 20, 30, 60, 100):
        for weight in (0.0, 0.2, 0.3, 0.5, 0.7, 0.85, 1.0, 1.2, 1.5, 2.0):
            fused = {
                qid: [
                    doc
                    for doc, _ in rrf(
                        [lists["dense"][qid], lists["text"][qid]], [1.0, weight], k=rrf_k
                    )
                ]
                for qid in relevant
            }
            grid.append((weight, rrf_k, evaluate(fused, relevant)["ndcg@10"]))
    best = max(grid, key=lambda g: g[2])
    print_table(
        f"fusion on SciFact {split}: nDCG@10 by text weight (dense weight 1) and RRF k",
        [(f"text weight {w:.1f}, k {k}", f"{score:.4f}") for w, k, score in grid]
        + [("best", f"text weight {best[0]}, k {best[1]}: {best[2]:.4f}")],
    )
    write_results(
        f"fusion_{split}",
        {"grid": [{"text_weight": w, "rrf_k": k, "ndcg@10": v} for w, k, v in grid]},
    )


def tune_bm25(
    bench: Bench,
    texts: dict[str, str],
    relevant: dict[str, dict[str, int]],
    corpus_ids: list[str],
    split: str,
) -> None:
    """nDCG@10 of BM25 alone over a grid of k1 and b (and the postings cap), scored by
    rag.text_scores() as `mode=text` scores, one result per document (its best chunk)."""
    statement = (
        "SELECT c.doc_key, max(s.score) AS score FROM rag.text_scores(%s, %s, %s, %s) AS s"
        " JOIN rag.chunks AS c ON c.id = s.chunk_id WHERE c.source_table = %s"
        " GROUP BY c.doc_key ORDER BY score DESC, c.doc_key LIMIT 100"
    )
    grid: list[tuple[float, float, int, float]] = []
    with connect(database_url(bench.settings), autocommit=True) as conn:

        def ranked(k1: float, b: float, cap: int) -> dict[str, list[str]]:
            return {
                qid: [
                    corpus_ids[int(key) - 1]
                    for key, _ in conn.execute(statement, (texts[qid], k1, b, cap, TABLE))
                ]
                for qid in relevant
            }

        for k1 in (0.6, 0.9, 1.2, 1.5):
            for b in (0.3, 0.4, 0.5, 0.6, 0.75, 0.9):
                grid.append((k1, b, 2000, evaluate(ranked(k1, b, 2000), relevant)["ndcg@10"]))
                print(f"  k1 {k1} b {b}: nDCG@10 {grid[-1][3]:.4f}", flush=True)
        best = max(grid, key=lambda g: g[3])
        for cap in (100, 250, 500, 1000, 10**9):
            grid.append(
                (
                    best[0],
                    best[1],
                    cap,
                    evaluate(ranked(best[0], best[1], cap), relevant)["ndcg@10"],
                )
            )
    print_table(
        f"BM25 on SciFact {split}: nDCG@10 by k1, b and postings cap",
        [(f"k1 {k1}, b {b}, cap {cap}", f"{score:.4f}") for k1, b, cap, score in grid]
        + [("best (cap 2000)", f"k1 {best[0]}, b {best[1]}: {best[3]:.4f}")],
    )
    write_results(
        f"bm25_{split}",
        {"grid": [{"k1": k1, "b": b, "cap": cap, "ndcg@10": v} for k1, b, cap, v in grid]},
    )


def ensure_indexed(bench: Bench) -> None:
    settings = bench.settings
    docs = scifact_corpus()
    if count_documents(settings, TABLE) >= len(docs):
        print(f"reusing the indexed corpus in {settings.home}", flush=True)
        return
    load_scifact(settings, docs)
    with sync_process(bench, "bench-quality-worker"):
        print(f"indexing {len(docs)} SciFact documents through the pipeline ...", flush=True)
        if not wait_until(lambda: count_documents(settings, TABLE) >= len(docs), 3600, 2):
            raise SystemExit("indexing did not finish; see the worker's log")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", default="test", choices=("test", "train"))
    parser.add_argument(
        "--tune",
        action="store_true",
        help="grid-search the hybrid fusion's text weight and RRF k (use --split train)",
    )
    parser.add_argument(
        "--tune-bm25",
        action="store_true",
        help="grid-search BM25's k1 and b and the postings cap (use --split train)",
    )
    parser.add_argument(
        "--home", type=Path, default=PROJECT_ROOT / ".freshet" / "bench" / "scifact"
    )
    parser.add_argument(
        "--app",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a web setting for the app under test by its Flask config name, e.g."
        " BM25_HYBRID_POSTINGS_CAP=1000 (repeatable)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for the private stack that indexes the corpus, e.g."
        " FRESHET_EMBED_INT8=true (repeatable; give such an index its own --home)",
    )
    args = parser.parse_args()
    overrides = dict(item.split("=", 1) for item in args.set)
    config: dict[str, object] = {"RATE_LIMIT_BACKEND": "off"}
    for item in args.app:
        name, _, value = item.partition("=")
        config[name] = int(value) if value.lstrip("-").isdigit() else value
    corpus_ids = [d["_id"] for d in scifact_corpus()]  # row id i <-> corpus_ids[i - 1]
    relevant = qrels(args.split)
    texts = queries()

    with private_stack("bench-quality", keep=args.home, **overrides) as bench:
        ensure_indexed(bench)
        if args.tune_bm25:
            tune_bm25(bench, texts, relevant, corpus_ids, args.split)
            return
        # One client asking as fast as it can: the per-caller rate limits would refuse it.
        app = create_app(config, settings=bench.settings)
        # werkzeug logs every request at INFO: thousands of lines in the benchmark's output.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        server = make_server("127.0.0.1", 0, app, threaded=True)
        port = server.server_port
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{port}/api/v1/search"
        scores: dict[str, dict[str, float]] = {}
        timings: dict[str, float] = {}
        lists: dict[str, dict[str, list[str]]] = {}
        try:
            session = requests.Session()
            for mode in ("dense", "text") if args.tune else MODES:
                started = time.monotonic()
                lists[mode] = {
                    qid: ranked_documents(session, url, texts[qid], mode, corpus_ids)
                    for qid in relevant
                }
                timings[mode] = time.monotonic() - started
                scores[mode] = evaluate(lists[mode], relevant)
                print(f"{mode}: nDCG@10 {scores[mode]['ndcg@10']:.4f}", flush=True)
        finally:
            server.shutdown()

    if args.tune:
        tune_fusion(lists, relevant, args.split)
        return
    targets = {"dense": 0.63, "text": 0.65, "hybrid": 0.71}
    print_table(
        f"SciFact {args.split} ({len(relevant)} queries) via /api/v1/search",
        [
            (
                mode,
                f"nDCG@10 {s['ndcg@10']:.4f}   recall@100 {s['recall@100']:.4f}"
                + (f"   (target >= {targets[mode]})" if mode in targets else ""),
            )
            for mode, s in scores.items()
        ],
    )
    write_results(
        f"quality_{args.split}",
        {
            "split": args.split,
            "queries": len(relevant),
            # The app settings given with --app (by Flask config name), besides the defaults.
            "app": {k: v for k, v in config.items() if k != "RATE_LIMIT_BACKEND"},
            # The stack's settings given with --set (they apply to an index built by this run).
            "overrides": overrides,
            "scores": scores,
            "targets": targets,
            "seconds_per_mode": timings,
            "published_minilm_ndcg10": 0.645,
            "published_bm25_ndcg10": 0.665,
        },
    )


if __name__ == "__main__":
    main()
