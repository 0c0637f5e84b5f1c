"""The quality gate of a model change: a fixed query set with judged documents, searched in the
index with the current model (rag.chunks.embedding) and with the new one (embedding_next), each
scored by nDCG@10.

A query set names the table its judged documents are rows of and how a judgement identifies
a document: its key (``doc_key``) or a metadata column (``metadata:NAME``). The default is BEIR
SciFact's train split (queries and judgements read from FRESHET_EVAL_DIR at run time) over the
table app.scifact, whose rows carry the SciFact id in the metadata column corpus_id. Your own:
a JSON Lines file, one query per line::

    {"query": "how do I rotate the keys?", "relevant": {"42": 1, "97": 2}}

where the keys of ``relevant`` are document keys (or the metadata values) and the values are
graded judgements (BEIR's convention: 1 relevant, 2 highly relevant).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from freshet.embedder import Embedder
from freshet.errors import FreshetError

# Chunks read per query: a document's best chunk ranks it, so more chunks than documents.
CHUNKS_PER_QUERY = 100
K = 10


class GateError(FreshetError):
    """The gate cannot be run as asked (no query set, its documents are not in the index)."""


@dataclass(frozen=True)
class Query:
    id: str
    text: str
    relevant: dict[str, int]


@dataclass(frozen=True)
class QuerySet:
    name: str
    table: str
    match: str  # "doc_key" or "metadata:NAME"
    queries: list[Query] = field(default_factory=list)

    def key_expression(self) -> sql.Composable:
        if self.match == "doc_key":
            return sql.SQL("c.doc_key")
        if self.match.startswith("metadata:") and len(self.match) > len("metadata:"):
            return sql.SQL("c.metadata ->> {}").format(sql.Literal(self.match[len("metadata:") :]))
        raise GateError(f"--match {self.match!r}: use doc_key or metadata:NAME")


def ndcg_at(ranked: list[str], relevant: dict[str, int], k: int = K) -> float:
    """nDCG@k with graded gains (BEIR's, as trec_eval computes it)."""
    dcg = sum(relevant.get(doc, 0) / math.log2(i + 2) for i, doc in enumerate(ranked[:k]))
    ideal = sorted(relevant.values(), reverse=True)[:k]
    idcg = sum(rel / math.log2(i + 2) for i, rel in enumerate(ideal))
    return dcg / idcg if idcg else 0.0


def scifact_train(eval_dir: Path) -> QuerySet:
    """BEIR SciFact's train queries and judgements, over app.scifact (metadata corpus_id)."""
    folder = eval_dir / "scifact"
    qrels = folder / "qrels" / "train.tsv"
    if not qrels.is_file():
        raise GateError(
            f"{qrels} is missing: the default gate reads SciFact from FRESHET_EVAL_DIR; pass"
            " --queries FILE with your own judged queries"
        )
    relevant: dict[str, dict[str, int]] = {}
    with qrels.open(encoding="utf-8") as handle:
        next(handle)  # header
        for line in handle:
            qid, doc, score = line.rstrip("\n").split("\t")
            if int(score) > 0:
                relevant.setdefault(qid, {})[doc] = int(score)
    texts: dict[str, str] = {}
    with (folder / "queries.jsonl").open(encoding="utf-8") as handle:
        for line in handle:
            item = json.loads(line)
            if item["_id"] in relevant:
                texts[item["_id"]] = item["text"]
    queries = [Query(qid, texts[qid], rels) for qid, rels in relevant.items() if qid in texts]
    return QuerySet("SciFact train", "app.scifact", "metadata:corpus_id", queries)


def from_file(path: Path, table: str, match: str = "doc_key") -> QuerySet:
    """A JSON Lines file of {"query": ..., "relevant": {key: grade}} (module docstring)."""
    queries = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise GateError(f"cannot read the query set {path}: {exc}") from exc
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            text = str(item["query"])
            relevant = {str(k): int(v) for k, v in dict(item["relevant"]).items()}
        except (ValueError, KeyError, TypeError) as exc:
            raise GateError(
                f'{path}:{number}: expected {{"query": TEXT, "relevant": {{KEY: GRADE}}}} ({exc})'
            ) from exc
        if relevant:
            queries.append(Query(str(number), text, relevant))
    if not queries:
        raise GateError(f"{path} has no query with a judged document")
    return QuerySet(path.name, table, match, queries)


@dataclass(frozen=True)
class Score:
    ndcg: float
    queries: int


def judged_in_index(conn: psycopg.Connection[Any], query_set: QuerySet) -> tuple[int, int]:
    """How many of the judged documents the index holds, of how many."""
    wanted = {doc for q in query_set.queries for doc in q.relevant}
    statement = sql.SQL(
        "SELECT count(DISTINCT {key}) FROM rag.chunks AS c"
        " WHERE c.source_table = %s AND {key} = ANY(%s)"
    ).format(key=query_set.key_expression())
    row = conn.execute(statement, (query_set.table, sorted(wanted))).fetchone()
    return (int(row[0]) if row else 0), len(wanted)


def evaluate(
    conn: psycopg.Connection[Any],
    query_set: QuerySet,
    embedder: Embedder,
    column: str,
    *,
    ef_search: int = 100,
    progress: Callable[[int, int], None] | None = None,
) -> Score:
    """nDCG@10 of the query set, searching ``column`` through its HNSW index as search does
    (iterative scan, the table's chunks only, a document ranked by its best chunk)."""
    statement = sql.SQL(
        "SELECT key FROM (SELECT {key} AS key, c.{column} <=> %(v)s AS distance"
        " FROM rag.chunks AS c WHERE c.source_table = %(table)s"
        " ORDER BY c.{column} <=> %(v)s LIMIT %(n)s) AS hits"
        " GROUP BY key ORDER BY min(distance) LIMIT %(k)s"
    ).format(key=query_set.key_expression(), column=sql.Identifier(column))
    vectors = embedder.embed([q.text for q in query_set.queries])
    total = 0.0
    with conn.transaction():
        conn.execute(
            "SELECT set_config('hnsw.ef_search', %s, true),"
            " set_config('hnsw.iterative_scan', 'relaxed_order', true),"
            " set_config('enable_seqscan', 'off', true)",
            (str(max(ef_search, CHUNKS_PER_QUERY)),),
        )
        for done, (query, vector) in enumerate(zip(query_set.queries, vectors, strict=True)):
            rows = conn.execute(
                statement,
                {"v": vector, "table": query_set.table, "n": CHUNKS_PER_QUERY, "k": K},
            ).fetchall()
            total += ndcg_at([str(r[0]) for r in rows], query.relevant)
            if progress is not None:
                progress(done + 1, len(query_set.queries))
    return Score(total / len(query_set.queries), len(query_set.queries))
