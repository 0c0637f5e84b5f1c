"""Retrieval over schema rag: dense (pgvector HNSW), full text (BM25) and their RRF fusion.

Access control is part of every SQL statement (design rule 8), never a filter applied
afterwards, so a user's k results are k results they may see. All SQL is composed with
psycopg.sql; values travel as parameters.

The access predicate is written so that the planner can estimate it (``access_groups = '{}'``
has the column's statistics; ``cardinality(access_groups) = 0`` has none and was estimated at
0.5% of the rows), and dense search pins its plan to the HNSW index besides: an ordered index
scan with pgvector's iterative scan returns k rows the user may see for any selectivity, so
the plan never depends on the estimate, for an admin, a group member or an anonymous user.
"""

from __future__ import annotations

import contextvars
import itertools
import logging
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import partial
from typing import Any, Literal, TypeVar

import numpy as np
import psycopg
from psycopg import Connection, sql
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from freshet import group_indexes
from freshet.answering import timing
from freshet.answering.bm25 import BM25
from freshet.answering.users import User
from freshet.embedder import Embedder
from freshet.index_model import IndexModel

logger = logging.getLogger(__name__)

Mode = Literal["dense", "text", "hybrid"]
MODES: tuple[str, ...] = ("dense", "text", "hybrid")
T = TypeVar("T")
MAX_CANDIDATES = 1000  # hnsw.ef_search cannot exceed 1000
# How long a search trusts its last read of which access groups have an index of their own.
GROUP_INDEXES_TTL_S = 30.0
# BM25 candidates read per result wanted (rag.text_top's cut): enough for a user whose groups
# hold 5% of the corpus; a search that finds fewer visible reads every candidate instead.
TEXT_CANDIDATES_PER_RESULT = 50
MIN_TEXT_CANDIDATES = 500
# Visible BM25 candidates scored again exactly per result wanted (rag.text_rescore), at most
# MAX_RESCORED unless more results are wanted (every result returned has its exact score).
# Measured at 100,000 chunks, 20 results, cap 4000: recall@20 against uncapped BM25
# 0.969 -> 0.999 for 100 rescored, +1.5 ms.
RESCORED_PER_RESULT = 5
MAX_RESCORED = 200

_CHUNK_COLUMNS = sql.SQL(
    "c.id, c.document_id, c.source_table, c.doc_key, c.chunk_index, c.text, c.metadata, "
    "c.access_groups, c.source_lsn, c.source_ts"
)


@dataclass(frozen=True)
class Passage:
    """One retrieved chunk with where it came from and how it scored."""

    chunk_id: int
    document_id: int
    source_table: str
    doc_key: str
    chunk_index: int
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)
    access_groups: tuple[str, ...] = ()
    source_lsn: int = 0
    source_ts: datetime | None = None
    title: str | None = None
    score: float = 0.0
    distance: float | None = None
    text_rank: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "chunk_id": self.chunk_id,
            "document_id": self.document_id,
            "source_table": self.source_table,
            "doc_key": self.doc_key,
            "chunk_index": self.chunk_index,
            "title": self.title,
            "text": self.text,
            "metadata": self.metadata,
            "access_groups": list(self.access_groups),
            "source_lsn": self.source_lsn,
            "source_ts": self.source_ts.isoformat() if self.source_ts else None,
            "score": self.score,
            "distance": self.distance,
            "text_rank": self.text_rank,
        }


@dataclass(frozen=True)
class Filters:
    """Restrictions on a search: source tables (any of) and metadata (jsonb containment)."""

    tables: tuple[str, ...] = ()
    metadata: Mapping[str, Any] | None = None

    @property
    def active(self) -> bool:
        return bool(self.tables or self.metadata)


@dataclass(frozen=True)
class Document:
    """A document as a user may see it: its fields and the text of its visible chunks."""

    id: int
    source_table: str
    doc_key: str
    title: str | None
    metadata: dict[str, Any]
    access_groups: tuple[str, ...]
    source_lsn: int
    source_ts: datetime | None
    indexed_at: datetime | None
    chunks: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "source_table": self.source_table,
            "doc_key": self.doc_key,
            "title": self.title,
            "metadata": self.metadata,
            "access_groups": list(self.access_groups),
            "source_lsn": self.source_lsn,
            "source_ts": self.source_ts.isoformat() if self.source_ts else None,
            "indexed_at": self.indexed_at.isoformat() if self.indexed_at else None,
            "chunks": self.chunks,
        }


NO_FILTERS = Filters()


class Retriever(ABC):
    """What the API needs from retrieval; the app's is PgRetriever, tests inject fakes."""

    @abstractmethod
    def search(
        self,
        query: str,
        user: User,
        *,
        k: int = 5,
        mode: Mode = "hybrid",
        filters: Filters = NO_FILTERS,
        dedupe: bool = False,
    ) -> list[Passage]:
        """Up to k passages the user may see, best first."""

    @abstractmethod
    def document(self, source_table: str, doc_key: str, user: User) -> Document | None:
        """The document with its visible chunks; None when unknown, deleted or not visible."""


def rrf(
    rankings: Sequence[Sequence[T]],
    weights: Sequence[float] | None = None,
    *,
    k: int,
) -> list[tuple[T, float]]:
    """Weighted reciprocal rank fusion: score(id) = sum of weight / (k + rank), rank from 1;
    every ranking weighs 1 unless ``weights`` says otherwise. The app's k is FRESHET_RRF_K.

    Ties keep the order in which ids were first seen, so the result is deterministic.
    """
    weights = [1.0] * len(rankings) if weights is None else weights
    if len(weights) != len(rankings):
        raise ValueError("one weight per ranking")
    scores: dict[T, float] = {}
    for ranking, weight in zip(rankings, weights, strict=True):
        for rank, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + weight / (k + rank)
    order = {item: i for i, item in enumerate(scores)}
    return sorted(scores.items(), key=lambda kv: (-kv[1], order[kv[0]]))


def dedupe_by_document(passages: Iterable[Passage]) -> list[Passage]:
    """Keep the first (best) passage of each document."""
    seen: set[int] = set()
    out: list[Passage] = []
    for p in passages:
        if p.document_id not in seen:
            seen.add(p.document_id)
            out.append(p)
    return out


def acl_condition(user: User, public_documents: bool, alias: str = "c") -> sql.Composable:
    """The access predicate for rows of ``alias``; binds %(groups)s. Public documents (no
    access groups) are matched by equality with the empty array, which the planner estimates
    from the column's statistics."""
    if user.admin:
        return sql.SQL("TRUE")
    if not public_documents:
        return sql.SQL("{a}.access_groups && %(groups)s::text[]").format(a=sql.Identifier(alias))
    return sql.SQL(
        "({a}.access_groups && %(groups)s::text[] OR {a}.access_groups = '{{}}'::text[])"
    ).format(a=sql.Identifier(alias))


def filter_conditions(filters: Filters) -> list[sql.Composable]:
    """The filters' conditions for chunks aliased ``c``; bind %(tables)s and %(metadata)s."""
    parts: list[sql.Composable] = []
    if filters.tables:
        parts.append(sql.SQL("c.source_table = ANY(%(tables)s::text[])"))
    if filters.metadata:
        parts.append(sql.SQL("c.metadata @> %(metadata)s"))
    return parts


def where_clause(user: User, public_documents: bool, filters: Filters) -> sql.Composed:
    """ACL plus filters, joined with AND, for chunks aliased ``c``."""
    return sql.SQL(" AND ").join(
        [acl_condition(user, public_documents), *filter_conditions(filters)]
    )


def query_params(user: User, public_documents: bool, filters: Filters) -> dict[str, Any]:
    return {
        "groups": list(user.groups),
        "public": public_documents,
        "tables": list(filters.tables),
        "metadata": Jsonb(dict(filters.metadata or {})),
    }


@contextmanager
def reading(pool: ConnectionPool) -> Iterator[Connection[Any]]:
    """A pool connection in autocommit mode for a search's reads: a statement runs in its
    own implicit transaction, so no COMMIT follows it and a read costs one round trip (a
    statement that needs transaction-local settings sends BEGIN and COMMIT in its pipeline).
    The connection goes back to the pool as it came, with no transaction open."""
    with pool.connection() as conn:
        before = conn.autocommit
        conn.autocommit = True
        try:
            yield conn
        finally:
            if conn.info.transaction_status != TransactionStatus.IDLE:
                conn.rollback()
            conn.autocommit = before


def _passage(row: Mapping[str, Any], **scores: Any) -> Passage:
    return Passage(
        chunk_id=int(row["id"]),
        document_id=int(row["document_id"]),
        source_table=row["source_table"],
        doc_key=row["doc_key"],
        chunk_index=int(row["chunk_index"]),
        text=row["text"],
        metadata=dict(row["metadata"] or {}),
        access_groups=tuple(row["access_groups"] or ()),
        source_lsn=int(row["source_lsn"]),
        source_ts=row["source_ts"],
        title=row.get("title"),
        **scores,
    )


class PgRetriever(Retriever):
    """Retrieval against PostgreSQL + pgvector through the app's pool."""

    def __init__(
        self,
        pool: Callable[[], ConnectionPool],
        embed: Callable[[str], np.ndarray],
        *,
        ef_search: int,
        public_documents: bool,
        text_weight: float,
        rrf_k: int,
        bm25: BM25,
        embed_hybrid: Callable[[str], np.ndarray] | None = None,
        embed_dense: Callable[[str], np.ndarray] | None = None,
    ) -> None:
        """``embed``: a query's vector (the model the index follows: its ``generation`` and
        ``follow``); ``embed_hybrid``, ``embed_dense``: the vector for a hybrid search's dense
        half and for a dense search (the app's: int8 by FRESHET_QUERY_INT8), ``embed`` if None.
        The others are settings (FRESHET_HNSW_EF_SEARCH, FRESHET_PUBLIC_DOCUMENTS,
        FRESHET_HYBRID_TEXT_WEIGHT, FRESHET_RRF_K, FRESHET_BM25_*): the Answering factory
        passes them."""
        self._pool = pool
        self._embed = embed
        self._embed_hybrid = embed_hybrid or embed
        self._embed_dense = embed_dense or embed
        self.ef_search = ef_search
        self.text_weight = text_weight
        self.rrf_k = rrf_k
        self.bm25 = bm25
        self.public_documents = public_documents
        # (read at, groups): the access groups with a partial HNSW index of their own.
        self._group_indexes: tuple[float, frozenset[str]] = (-GROUP_INDEXES_TTL_S, frozenset())
        # Runs a hybrid search's full-text query beside its dense one.
        self._side = ThreadPoolExecutor(max_workers=8, thread_name_prefix="freshet-text")

    def search(
        self,
        query: str,
        user: User,
        *,
        k: int = 5,
        mode: Mode = "hybrid",
        filters: Filters = NO_FILTERS,
        dedupe: bool = False,
    ) -> list[Passage]:
        if mode not in MODES:
            raise ValueError(f"unknown search mode {mode!r}")
        limit = k if mode != "hybrid" else max(2 * k, 20)
        vector: np.ndarray | None = None
        generation: int | None = None
        follows = 0
        while True:
            fetch = min(limit * (4 if dedupe else 1), MAX_CANDIDATES)
            # Hybrid: the full-text query runs in PostgreSQL while this thread embeds the query
            # and runs the dense one (its spans are timed into this request's record).
            # It may read more postings than text mode does (FRESHET_BM25_HYBRID_POSTINGS_CAP):
            # it runs while the query is embedded, so the extra reading costs no latency.
            pending = (
                self._side.submit(
                    contextvars.copy_context().run,
                    self.text,
                    query,
                    user,
                    fetch,
                    filters,
                    cap=self.bm25.hybrid_cap or self.bm25.cap,
                )
                if mode == "hybrid"
                else None
            )
            dense: list[Passage] = []
            if mode != "text":
                if vector is None:
                    # Read before embedding: a switch in between makes the statement's check
                    # fail (and the search run again), never pass with the other model's vector.
                    generation = getattr(self._embed, "generation", None)
                    with timing.span("embed"):
                        vector = (self._embed_hybrid if mode == "hybrid" else self._embed_dense)(
                            query
                        )
                dense = self.dense(
                    vector, user, fetch, filters, wanted=limit, generation=generation
                )
                if not dense and follows < 2 and self._follow():
                    follows += 1  # the index switched model: embed the query with the new one
                    vector = None
                    if pending is not None:
                        pending.cancel()
                    continue
            if pending is not None:
                text = pending.result()
            else:
                text = self.text(query, user, fetch, filters) if mode == "text" else []
            if mode == "hybrid":
                with timing.span("fuse"):
                    results = fuse(dense, text, self.text_weight, self.rrf_k)
            else:
                results = dense or text
            if dedupe:
                results = dedupe_by_document(results)
            exhausted = len(dense) < fetch and len(text) < fetch
            if len(results) >= k or exhausted or fetch >= MAX_CANDIDATES:
                return results[:k]
            limit *= 4  # duplicates of one document crowded the candidates out

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
        """Chunks nearest to the query ``vector`` by cosine distance through the HNSW index:
        ``limit`` of them, of which the best ``wanted`` (default: all) are the ones that
        matter (a deduplicating search reads more, so that duplicates do not crowd them out);
        ``hnsw.ef_search`` scales with ``wanted``. ``generation``: the index model generation
        the vector was embedded for (freshet/index_model.py); none are returned if the index
        has switched model since."""
        with timing.span("sql"):
            rows = self._run_dense(
                vector, user, limit, filters, wanted=wanted, generation=generation
            )
        return [
            _passage(r, score=1.0 - float(r["distance"]), distance=float(r["distance"]))
            for r in rows
        ]

    def explain_dense(
        self, vector: np.ndarray, user: User, limit: int, filters: Filters = NO_FILTERS
    ) -> str:
        """The plan PostgreSQL runs dense search with for this user (EXPLAIN ANALYZE, text)."""
        rows = self._run_dense(vector, user, limit, filters, explain=True)
        return "\n".join(str(next(iter(r.values()))) for r in rows)

    def _run_dense(
        self,
        vector: np.ndarray,
        user: User,
        limit: int,
        filters: Filters,
        *,
        wanted: int | None = None,
        explain: bool = False,
        generation: int | None = None,
    ) -> list[dict[str, Any]]:
        params = query_params(user, self.public_documents, filters)
        params.update(vector=vector, limit=limit, generation=generation)
        # A one-time filter: the statement's own snapshot has the query's model.
        model = sql.SQL(
            "" if generation is None else " AND rag.embedding_generation() = %(generation)s"
        )
        union = (
            None
            if user.admin
            else group_indexes.branches(user.groups, self.public_documents, self.indexed_groups())
        )
        if union is None:
            hits = sql.SQL(
                "SELECT {cols}, c.embedding <=> %(vector)s AS distance"
                " FROM rag.chunks AS c WHERE {where}{model}"
                " ORDER BY c.embedding <=> %(vector)s LIMIT %(limit)s"
            ).format(
                cols=_CHUNK_COLUMNS,
                where=where_clause(user, self.public_documents, filters),
                model=model,
            )
        else:
            # Each of the user's groups (and the public chunks) has its own partial index
            # (freshet/group_indexes.py): the union of their top-k scans, each branch's
            # condition written as its index's predicate. A chunk in two of the user's groups
            # comes from both branches with the same distance: DISTINCT ON keeps one.
            scans = []
            for i, group in enumerate(union):
                params[f"group_{i}"] = [group]
                condition = (
                    sql.SQL("c.access_groups = '{}'::text[]")
                    if group == group_indexes.PUBLIC
                    else sql.SQL("c.access_groups && {}::text[]").format(
                        sql.Placeholder(f"group_{i}")
                    )
                )
                scans.append(
                    sql.SQL(
                        "(SELECT {cols}, c.embedding <=> %(vector)s AS distance"
                        " FROM rag.chunks AS c WHERE {where}{model}"
                        " ORDER BY c.embedding <=> %(vector)s LIMIT %(limit)s)"
                    ).format(
                        cols=_CHUNK_COLUMNS,
                        where=sql.SQL(" AND ").join([condition, *filter_conditions(filters)]),
                        model=model,
                    )
                )
            hits = sql.SQL(
                "SELECT DISTINCT ON (u.distance, u.id) u.* FROM ({scans}) AS u"
                " ORDER BY u.distance, u.id LIMIT %(limit)s"
            ).format(scans=sql.SQL(" UNION ALL ").join(scans))
        statement = sql.SQL(
            "{explain}WITH hits AS MATERIALIZED ({hits})"
            " SELECT h.*, d.title FROM hits AS h"
            " JOIN rag.documents AS d ON d.id = h.document_id AND d.deleted_at IS NULL"
            " ORDER BY h.distance, h.id"
        ).format(explain=sql.SQL("EXPLAIN (ANALYZE, COSTS) " if explain else ""), hits=hits)
        # ef_search is set for 10 candidates and grows with the count wanted: HNSW's recall of
        # the top 20 at the ef that gives 0.96 for the top 10 is 0.87 (100,000 chunks, ef
        # 100); hybrid's 20 at ef 200: 0.91, fused recall@10 0.96. Never below LIMIT, which
        # would cut results short.
        wanted = min(wanted or limit, limit)
        ef = min(max(self.ef_search * -(-wanted // 10), limit), MAX_CANDIDATES)
        # pgvector >= 0.8: with a filter, keep scanning the graph until LIMIT rows pass it
        # instead of silently returning fewer; relaxed order is re-sorted above. Without one
        # (an admin), in strict order: rows deleted but not yet vacuumed still fill ef_search's
        # candidates, and a scan that stopped there would return fewer than LIMIT live rows.
        scan = "relaxed_order" if filters.active or not user.admin else "strict_order"
        # The settings, local to this transaction, the query and the COMMIT go in one round
        # trip. With sequential and bitmap scans off, the HNSW index is the one path left that
        # yields rows in distance order, whatever the planner estimates the predicate to match.
        # Each statement has its own cursor: a pipelined cursor takes whichever of its results
        # arrive, so the query's cursor must have issued the query alone.
        with (
            reading(self._pool()) as conn,
            conn.pipeline(),
            conn.cursor(row_factory=dict_row) as cur,
        ):
            conn.execute("BEGIN")
            conn.execute(
                "SELECT set_config('hnsw.ef_search', %s, true),"
                " set_config('hnsw.iterative_scan', %s, true),"
                " set_config('enable_seqscan', 'off', true),"
                " set_config('enable_bitmapscan', 'off', true)",
                (str(ef), scan),
            )
            cur.execute(statement, params)
            conn.execute("COMMIT")
            return cur.fetchall()

    def indexed_groups(self) -> frozenset[str]:
        """The access groups with a usable partial index (freshet/group_indexes.py), read from
        the catalog at most every GROUP_INDEXES_TTL_S seconds."""
        now = time.monotonic()
        at, groups = self._group_indexes
        if now - at < GROUP_INDEXES_TTL_S:
            return groups
        try:
            with reading(self._pool()) as conn:
                groups = group_indexes.usable(conn)
        except psycopg.Error as exc:  # the search itself will say what is wrong
            logger.debug("could not read the group indexes: %s", exc)
            groups = frozenset()
        self._group_indexes = (now, groups)
        return groups

    def _follow(self) -> bool:
        """After a dense search returned nothing: if the index switched model, the query
        embedder follows it (True: search again)."""
        follow = getattr(self._embed, "follow", None)
        if follow is None or not getattr(self._embed, "follows_index", False):
            return False
        from freshet.index_model import read

        with self._pool().connection() as conn:
            state = read(conn)
        return bool(follow(state))

    def text(
        self, query: str, user: User, limit: int, filters: Filters, *, cap: int | None = None
    ) -> list[Passage]:
        """Chunks ranked by BM25 (rag.text_top: each query term reads its best postings, at
        most FRESHET_BM25_POSTINGS_CAP), the user's access and the filters applied to the
        candidates in the same statement, best first.

        rag.text_top returns the best ``TEXT_CANDIDATES_PER_RESULT * limit`` candidates (at
        least ``MIN_TEXT_CANDIDATES``), sorted; should fewer than ``limit`` of those be visible
        (a small group, a narrow filter), the statement runs again over every candidate, so
        the result never depends on that cut.

        A capped read scores a chunk without the common terms whose postings lie past the cap,
        so the best ``RESCORED_PER_RESULT * limit`` visible candidates are scored again exactly
        (rag.text_rescore: every posting of every query term in each of them) and the result is
        cut from those: every score returned is the exact BM25."""
        params = query_params(user, self.public_documents, filters)
        params.update(query=query, limit=limit, k1=self.bm25.k1, b=self.bm25.b)
        params.update(cap=cap or self.bm25.cap)
        # The candidates best first, then each one's chunk looked up by key (LIMIT 1 keeps each
        # lookup an index probe), so that reading stops at the k-th visible chunk: a user whose
        # groups hold 5% of the corpus reads about 20 candidates per result.
        statement = sql.SQL(
            "WITH s AS MATERIALIZED ("
            " SELECT * FROM rag.text_top(%(query)s, %(k1)s, %(b)s, %(cap)s, %(top)s) AS s"
            # Sorted again (already in order, so cheap), for the planner: the CTE's order is what
            # lets the probes below stop at the limit instead of probing every candidate.
            " ORDER BY s.score DESC, s.chunk_id),"
            " v AS MATERIALIZED ("
            " SELECT {cols}, d.title, s.score AS capped FROM s"
            " CROSS JOIN LATERAL (SELECT * FROM rag.chunks AS c"
            "  WHERE c.id = s.chunk_id AND {where} LIMIT 1) AS c"
            " CROSS JOIN LATERAL (SELECT d.title FROM rag.documents AS d"
            "  WHERE d.id = c.document_id AND d.deleted_at IS NULL LIMIT 1) AS d"
            " ORDER BY s.score DESC, s.chunk_id LIMIT %(rescored)s)"
            " SELECT v.*, coalesce(r.score, v.capped) AS rank FROM v"
            " LEFT JOIN rag.text_rescore(%(query)s, %(k1)s, %(b)s, ARRAY(SELECT v.id FROM v))"
            "  AS r ON r.chunk_id = v.id"
            " ORDER BY rank DESC, v.id LIMIT %(limit)s"
        ).format(cols=_CHUNK_COLUMNS, where=where_clause(user, self.public_documents, filters))
        top = max(TEXT_CANDIDATES_PER_RESULT * limit, MIN_TEXT_CANDIDATES)
        params["rescored"] = max(limit, min(RESCORED_PER_RESULT * limit, MAX_RESCORED))
        with (
            timing.span("text-sql"),
            reading(self._pool()) as conn,
            conn.cursor(row_factory=dict_row) as cur,
        ):
            rows = cur.execute(statement, {**params, "top": top}).fetchall()
            if len(rows) < limit:  # the cut may have hidden visible chunks: every candidate
                rows = cur.execute(statement, {**params, "top": None}).fetchall()
        return [_passage(r, score=float(r["rank"]), text_rank=float(r["rank"])) for r in rows]

    def document(self, source_table: str, doc_key: str, user: User) -> Document | None:
        params = query_params(user, self.public_documents, NO_FILTERS)
        params.update(source_table=source_table, doc_key=doc_key)
        doc_sql = sql.SQL(
            "SELECT d.id, d.source_table, d.doc_key, d.title, d.metadata, d.access_groups,"
            " d.source_lsn, d.source_ts, d.indexed_at FROM rag.documents AS d"
            " WHERE d.source_table = %(source_table)s AND d.doc_key = %(doc_key)s"
            " AND d.deleted_at IS NULL AND {acl}"
        ).format(acl=acl_condition(user, self.public_documents, "d"))
        chunk_sql = sql.SQL(
            "SELECT c.id AS chunk_id, c.chunk_index, c.text, c.source_lsn, c.source_ts"
            " FROM rag.chunks AS c WHERE c.document_id = %(document_id)s AND {acl}"
            " ORDER BY c.chunk_index"
        ).format(acl=acl_condition(user, self.public_documents, "c"))
        with reading(self._pool()) as conn, conn.cursor(row_factory=dict_row) as cur:
            row = cur.execute(doc_sql, params).fetchone()
            if row is None:
                return None
            chunks = cur.execute(chunk_sql, {**params, "document_id": row["id"]}).fetchall()
        return Document(
            id=int(row["id"]),
            source_table=row["source_table"],
            doc_key=row["doc_key"],
            title=row["title"],
            metadata=dict(row["metadata"] or {}),
            access_groups=tuple(row["access_groups"] or ()),
            source_lsn=int(row["source_lsn"]),
            source_ts=row["source_ts"],
            indexed_at=row["indexed_at"],
            chunks=[
                {**c, "source_ts": c["source_ts"].isoformat() if c["source_ts"] else None}
                for c in chunks
            ],
        )


def fuse(
    dense: Sequence[Passage],
    text: Sequence[Passage],
    text_weight: float,
    k: int,
) -> list[Passage]:
    """Weighted RRF of the dense and text lists; each passage keeps both of its raw scores."""
    by_id: dict[int, Passage] = {}
    for p in dense:
        by_id[p.chunk_id] = p
    for p in text:
        known = by_id.get(p.chunk_id)
        by_id[p.chunk_id] = replace(known, text_rank=p.text_rank) if known else p
    fused = rrf([[p.chunk_id for p in dense], [p.chunk_id for p in text]], [1.0, text_weight], k=k)
    return [replace(by_id[i], score=score) for i, score in fused]


def _STOP() -> None:
    """The job that ends an EmbedThread's loop (EmbedThread.close)."""


class EmbedThread:
    """Query embedding through a shared Embedder, on one thread that owns the model.

    Fast tokenizers are not safe to call from several threads at once ("Already borrowed"),
    and torch runs a model markedly slower from a thread other than the one that loaded it
    (measured here: one query p50 ~8 ms on the loading thread, ~15 ms from another one).
    So the model is loaded on this thread and every call runs there, one at a time, whichever
    server thread asks.

    One at a time, but not first come, first served: a search's query (one text) goes before
    the batches of an answer (the extractive backend embeds every candidate sentence), and a
    batch runs in slices of ``slice_size`` texts, so a query waits for one slice at most, never
    for a whole answer, however many answers are being composed. The default slice is one
    text: it runs through the Embedder's compiled one-text graph on one torch thread. Larger
    slices were measured slower for the search behind them under a flood of asks on 2 shared
    cores: a slice of 16 on all threads stalled at every parallel region for its slowest
    (preempted) thread, search p50 1.5 s; slices of 4 on one thread, 170 ms; of 1, 40 ms of
    embedding (bench.rate_limit).
    """

    QUERY, BATCH = 0, 1

    def __init__(
        self,
        embedder: Embedder | Callable[[], Embedder],
        *,
        slice_size: int = 1,
        generation: int | None = None,
        model_name: str | None = None,
        model_for: Callable[[IndexModel], tuple[str, Callable[[], Embedder]]] | None = None,
    ) -> None:
        """``generation``, ``model_name``: the index model the embedder is
        (freshet/index_model.py); ``model_for``: the name and builder of a state's model, so
        that ``follow`` can switch to it."""
        self.slice_size = slice_size
        self.generation = generation
        self.model_name = model_name
        self._model_for = model_for
        self._switching = threading.Lock()
        self._jobs: queue.PriorityQueue[tuple[int, int, Callable[[], Any], Future[Any]]]
        self._jobs = queue.PriorityQueue()
        self._order = itertools.count()
        self._thread = threading.Thread(target=self._work, name="freshet-embed", daemon=True)
        self._thread.start()
        build = embedder if callable(embedder) else (lambda: embedder)
        try:
            self.embedder: Embedder = self._submit(self.QUERY, build).result()
        except BaseException:  # a model that cannot load, or Ctrl+C while it loads
            self.close()
            raise
        # Queries' own path (int8 on CPU) is built before any query is taken, not by the first.
        self._submit(self.QUERY, self.embedder.prepare_queries)

    def _submit(self, priority: int, call: Callable[[], T]) -> Future[T]:
        future: Future[T] = Future()
        self._jobs.put((priority, next(self._order), call, future))
        return future

    def _work(self) -> None:
        while True:
            _, _, call, future = self._jobs.get()
            if call is _STOP:
                self._cancel_queued()
                future.set_result(None)
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(call())
            except BaseException as exc:  # noqa: BLE001 - the caller's to handle
                future.set_exception(exc)

    def _cancel_queued(self) -> None:
        while True:
            try:
                _, _, _, future = self._jobs.get_nowait()
            except queue.Empty:
                return
            future.cancel()

    def close(self, timeout: float = 120.0) -> None:
        """Stop the thread once the call it runs now returns (one still queued is cancelled),
        so that a process leaving mid-call (Ctrl+C while the int8 query model builds) exits
        with its own code: torch aborts the process ("terminate called without an active
        exception", signal 6) when the interpreter ends under a daemon thread still in it."""
        if not self._thread.is_alive():
            return
        self._jobs.put((-1, next(self._order), _STOP, Future()))
        self._thread.join(0.5)
        if self._thread.is_alive():
            logger.info("waiting for the query embedding thread's current call to finish")
            self._thread.join(timeout)

    @property
    def follows_index(self) -> bool:
        """Whether ``follow`` can switch models (the app's thread; not a test's fixed one)."""
        return self._model_for is not None

    def follow(self, state: IndexModel) -> bool:
        """Embed with ``state``'s model from now on, if it is another (loaded on the embedding
        thread; a search waits for it once). True if anything changed."""
        if self._model_for is None or not state.present or state.generation == self.generation:
            return False
        with self._switching:
            if state.generation == self.generation:
                return True  # another request switched meanwhile
            name, build = self._model_for(state)
            if name != self.model_name:
                logger.warning("the index switched its embedding model to %s: loading it", name)
                self.embedder = self._submit(self.QUERY, build).result()
                self._submit(self.QUERY, self.embedder.prepare_queries)
                self.model_name = name
            # After the embedder: a request that reads the new generation embeds with it.
            self.generation = state.generation
        return True

    def __call__(self, text: str) -> np.ndarray:
        return self._submit(self.QUERY, lambda: self.embedder.embed([text])).result()[0]

    def fast(self, text: str) -> np.ndarray:
        """A query's vector on the embedder's fast query path (Embedder.embed_query)."""
        return self._submit(self.QUERY, lambda: self.embedder.embed_query(text)).result()

    def many(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        if len(texts) <= 1:
            return self._submit(self.QUERY, lambda: self.embedder.embed(texts)).result()
        slices = [texts[i : i + self.slice_size] for i in range(0, len(texts), self.slice_size)]
        parts = [self._submit(self.BATCH, partial(self.embedder.embed, part)) for part in slices]
        return np.concatenate([part.result() for part in parts])
