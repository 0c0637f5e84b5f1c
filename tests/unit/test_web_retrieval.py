"""Retrieval logic without a database: RRF fusion, de-duplication and the ACL predicate."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pytest
from psycopg import sql

from freshet.answering.retrieval import (
    NO_FILTERS,
    EmbedThread,
    Filters,
    acl_condition,
    dedupe_by_document,
    fuse,
    query_params,
    rrf,
    where_clause,
)
from freshet.answering.users import User
from freshet.embedder import Embedder
from tests.conftest import wait_for
from tests.unit.web_fakes import passage


def render(composable: sql.Composable) -> str:
    return composable.as_string(None)


def test_rrf_sums_reciprocal_ranks_with_k_60() -> None:
    fused = dict(rrf([[1, 2, 3], [3, 1]], k=60))
    assert fused[1] == 1 / 61 + 1 / 62
    assert fused[3] == 1 / 63 + 1 / 61
    assert fused[2] == 1 / 62


def test_rrf_prefers_items_found_by_both_lists() -> None:
    order = [item for item, _ in rrf([[10, 20, 30], [30, 40, 50]], k=60)]
    assert order[0] == 30  # rank 3 + rank 1 beats rank 1 alone
    assert order[1:4] == [10, 20, 40]  # 20 and 40 tie at 1/62: first-seen order


def test_rrf_ties_are_deterministic() -> None:
    assert rrf([[1], [2]], k=60) == rrf([[1], [2]], k=60)
    assert [i for i, _ in rrf([[1], [2]], k=60)] == [1, 2]


def test_fuse_keeps_both_raw_scores_and_sets_rrf_score() -> None:
    a = replace(passage(1, "a"), distance=0.2, score=0.8)
    b = replace(passage(2, "b"), distance=0.3, score=0.7)
    b_text = replace(passage(2, "b"), text_rank=0.5, score=0.5)
    c_text = replace(passage(3, "c"), text_rank=0.4, score=0.4)
    fused = fuse([a, b], [b_text, c_text], text_weight=1.0, k=60)
    assert [p.chunk_id for p in fused] == [2, 1, 3]
    assert fused[0].distance == 0.3 and fused[0].text_rank == 0.5
    assert fused[0].score == 1 / 62 + 1 / 61


def test_dedupe_keeps_best_chunk_per_document() -> None:
    first = passage(1, "x")
    same_doc = replace(passage(2, "y"), document_id=first.document_id)
    other = passage(3, "z")
    assert dedupe_by_document([first, same_doc, other]) == [first, other]


def test_acl_predicate_is_in_sql_for_users_and_absent_for_admins() -> None:
    user = User("u", ("staff",))
    text = render(acl_condition(user, True))
    assert '"c".access_groups && %(groups)s::text[]' in text
    # Equality with the empty array: the planner estimates it from the column's statistics.
    assert "\"c\".access_groups = '{}'::text[]" in text
    assert "cardinality" not in text
    closed = render(acl_condition(user, False))
    assert "'{}'" not in closed and '"c".access_groups && %(groups)s::text[]' in closed
    assert render(acl_condition(User("root", (), admin=True), True)) == "TRUE"


def test_where_clause_adds_table_and_metadata_filters() -> None:
    user = User("u")
    plain = render(where_clause(user, True, Filters()))
    filtered = render(where_clause(user, True, Filters(("app.articles",), {"lang": "en"})))
    assert "source_table" not in plain and "metadata" not in plain
    assert "c.source_table = ANY(%(tables)s::text[])" in filtered
    assert "c.metadata @> %(metadata)s" in filtered


def test_query_params_carry_groups_and_public_flag() -> None:
    params = query_params(User("u", ("a", "b")), False, Filters(("t",)))
    assert params["groups"] == ["a", "b"] and params["public"] is False
    assert params["tables"] == ["t"]


def test_weighted_rrf_scales_each_list() -> None:
    fused = dict(rrf([[1, 2], [2, 3]], [1.0, 0.5], k=10))
    assert fused[1] == pytest.approx(1 / 11)
    assert fused[2] == pytest.approx(1 / 12 + 0.5 / 11)
    assert fused[3] == pytest.approx(0.5 / 12)
    # Weight 0 leaves the first list's order and adds the other list's items after it.
    assert [i for i, _ in rrf([[5, 6], [7, 5]], [1.0, 0.0], k=10)] == [5, 6, 7]
    with pytest.raises(ValueError, match="one weight per ranking"):
        rrf([[1]], [1.0, 2.0], k=10)


class GatedEmbedder(Embedder):
    """Records each call's texts; the first batch slice waits until the test lets it go."""

    def __init__(self) -> None:
        super().__init__(3)
        self.calls: list[list[str]] = []
        self.started = threading.Event()
        self.release = threading.Event()

    def _embed(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        if len(texts) > 1 and not self.started.is_set():
            self.started.set()
            self.release.wait(10)
        return np.zeros((len(texts), 3), dtype=np.float32)


def test_a_query_waits_for_one_slice_of_an_answers_batch_not_all_of_it() -> None:
    embedder = GatedEmbedder()
    embed = EmbedThread(embedder, slice_size=4)
    with ThreadPoolExecutor(2) as pool:
        batch = pool.submit(embed.many, [f"sentence {i}" for i in range(12)])
        assert embedder.started.wait(10)  # the first slice is running
        query = pool.submit(embed, "the query")
        # Let the running slice finish only once the query is queued beside the other two.
        assert wait_for(lambda: embed._jobs.qsize() == 3, 10, interval=0.01)
        embedder.release.set()
        assert query.result(10).shape == (3,) and batch.result(10).shape == (12, 3)
    sizes = [len(call) for call in embedder.calls]
    assert sizes == [4, 1, 4, 4], sizes  # the query went before the batch's other slices


def test_hybrid_reads_the_hybrid_postings_cap_and_text_mode_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """FRESHET_BM25_HYBRID_POSTINGS_CAP applies to the BM25 half of hybrid search only (0: the
    text cap)."""
    from freshet.answering.bm25 import BM25
    from freshet.answering.retrieval import PgRetriever

    caps: dict[str, int | None] = {}

    def build(hybrid_cap: int) -> PgRetriever:
        retriever = PgRetriever(
            lambda: None,  # type: ignore[arg-type,return-value]
            lambda q: np.zeros(3, dtype=np.float32),
            ef_search=40,
            public_documents=True,
            text_weight=1.0,
            rrf_k=60,
            bm25=BM25(0.9, 0.4, 1000, hybrid_cap),
        )
        monkeypatch.setattr(retriever, "dense", lambda vector, user, limit, filters, **_: [])

        def text(query: str, user: User, limit: int, filters: Filters, *, cap=None):  # type: ignore[no-untyped-def]
            caps[mode] = cap
            return []

        monkeypatch.setattr(retriever, "text", text)
        return retriever

    user = User("u", ("staff",))
    for mode, hybrid_cap, expected in (("hybrid", 4000, 4000), ("hybrid", 0, 1000)):
        build(hybrid_cap).search("q", user, k=5, mode=mode)  # type: ignore[arg-type]
        assert caps[mode] == expected
    mode = "text"
    build(4000).search("q", user, k=5, mode="text")
    assert caps["text"] is None  # text mode: the retriever's own cap


class RecordingPool:
    """A pool whose one connection records what dense search sets and asks for."""

    def __init__(self) -> None:
        self.settings: list[tuple[str, str]] = []
        self.limits: list[int] = []
        self.statements: list[str] = []
        self.autocommit = False

    @property
    def info(self) -> RecordingPool:
        return self

    @property
    def transaction_status(self) -> int:
        from psycopg.pq import TransactionStatus

        return TransactionStatus.IDLE

    def connection(self) -> RecordingPool:
        return self

    def pipeline(self) -> RecordingPool:
        return self

    def cursor(self, **_: object) -> RecordingPool:
        return self

    def __enter__(self) -> RecordingPool:
        return self

    def __exit__(self, *_: object) -> None:
        return None

    def execute(self, statement: object, params: object = None) -> None:
        if params is None:
            assert self.autocommit  # BEGIN and COMMIT are sent in autocommit mode
            self.statements.append(str(statement))
        elif isinstance(params, tuple):
            self.settings.append(params)  # (ef_search, iterative scan)
        else:
            assert isinstance(params, dict)
            self.limits.append(params["limit"])

    def fetchall(self) -> list[object]:
        return []


def test_ef_search_scales_with_the_candidates_wanted_not_with_deduplications_extra() -> None:
    """hnsw.ef_search (FRESHET_HNSW_EF_SEARCH) is set for 10 candidates: hybrid's 20 get twice
    as much; a deduplicating search reads 4x the candidates but wants as many as before; a
    search for more than ef_search allows still gets every row it asks for (ef >= LIMIT)."""
    from freshet.answering.bm25 import BM25
    from freshet.answering.retrieval import PgRetriever

    pool = RecordingPool()
    retriever = PgRetriever(
        lambda: pool,  # type: ignore[arg-type,return-value]
        lambda q: np.zeros(3, dtype=np.float32),
        ef_search=100,
        public_documents=True,
        text_weight=1.0,
        rrf_k=60,
        bm25=BM25(0.9, 0.4, 1000),
    )
    retriever.text = lambda *a, **k: []  # type: ignore[method-assign]
    retriever.indexed_groups = frozenset  # type: ignore[method-assign]  # no group indexes
    user = User("u", ("staff",))
    for mode, k, dedupe in (("dense", 10, False), ("hybrid", 10, False), ("hybrid", 5, True)):
        retriever.search("q", user, k=k, mode=mode, dedupe=dedupe)  # type: ignore[arg-type]
    retriever.dense(np.zeros(3, dtype=np.float32), user, 1000, NO_FILTERS)
    assert [ef for ef, _ in pool.settings] == ["100", "200", "200", "1000"]
    assert pool.limits == [10, 20, 80, 1000]
    # Each search's settings are local to its own transaction, opened and closed in its pipeline.
    assert pool.statements == ["BEGIN", "COMMIT"] * 4
    assert pool.autocommit is False


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("off", ["exact", "exact"]), ("hybrid", ["fast", "exact"]), ("all", ["fast", "fast"])],
)
def test_each_search_mode_embeds_its_query_on_the_path_query_int8_gives_it(
    monkeypatch: pytest.MonkeyPatch, mode: str, expected: list[str]
) -> None:
    """FRESHET_QUERY_INT8 as the factory applies it: `hybrid` sends a hybrid search's query to
    ``embed_hybrid`` and a dense one's to ``embed``; `all` sends both to the fast path; `off`
    neither. Text search embeds nothing."""
    from freshet.answering.bm25 import BM25
    from freshet.answering.retrieval import PgRetriever

    calls: list[str] = []

    def fast(q: str) -> np.ndarray:
        calls.append("fast")
        return np.ones(3, dtype=np.float32)

    def exact(q: str) -> np.ndarray:
        calls.append("exact")
        return np.zeros(3, dtype=np.float32)

    retriever = PgRetriever(
        lambda: None,  # type: ignore[arg-type,return-value]
        exact,
        embed_hybrid=fast if mode != "off" else None,
        embed_dense=fast if mode == "all" else None,
        ef_search=40,
        public_documents=True,
        text_weight=1.0,
        rrf_k=60,
        bm25=BM25(0.9, 0.4, 1000, 0),
    )
    vectors: list[float] = []
    monkeypatch.setattr(
        retriever,
        "dense",
        lambda vector, user, limit, filters, **_: vectors.append(float(vector[0])) or [],
    )
    monkeypatch.setattr(retriever, "text", lambda query, user, limit, filters, **_: [])
    user = User("u", ("staff",))
    retriever.search("q", user, k=5, mode="hybrid")
    retriever.search("q", user, k=5, mode="dense")
    retriever.search("q", user, k=5, mode="text")
    assert calls == expected
    assert vectors == [1.0 if call == "fast" else 0.0 for call in expected]


def test_the_embed_thread_serves_both_query_paths() -> None:
    class Halves(Embedder):
        def _embed(self, texts: list[str]) -> np.ndarray:
            return np.zeros((len(texts), 3), dtype=np.float32)

        def embed_query(self, text: str) -> np.ndarray:
            return np.ones(3, dtype=np.float32)

    embed = EmbedThread(Halves(3))
    assert embed("q").tolist() == [0.0, 0.0, 0.0] and embed.fast("q").tolist() == [1.0, 1.0, 1.0]


def test_closing_the_embed_thread_lets_the_running_call_finish_and_cancels_the_queued() -> None:
    """close(): the call the thread runs now returns its result; calls still queued are
    cancelled, and the thread ends (a process stopping waits for it, not for torch)."""
    started, release = threading.Event(), threading.Event()

    class Slow(Embedder):
        def _embed(self, texts: list[str]) -> np.ndarray:
            started.set()
            assert release.wait(10)
            return np.ones((len(texts), 3), dtype=np.float32)

    embed = EmbedThread(Slow(3))
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(embed, "first")
        assert started.wait(10)
        queued = embed._submit(embed.QUERY, lambda: embed.embedder.embed(["second"]))
        closing = pool.submit(embed.close, 10)
        assert wait_for(lambda: embed._jobs.qsize() == 2, 5, 0.01)  # the stop and "second"
        release.set()
        closing.result(10)
        assert running.result(10).tolist() == [1.0, 1.0, 1.0]
    assert queued.cancelled() and not embed._thread.is_alive()
    embed.close()  # a second close is a no-op
