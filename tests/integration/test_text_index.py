"""The BM25 text index against real components.

- Through the whole pipeline (source table -> Debezium -> Kafka -> sync worker): a row's new
  word is findable by ``mode=text`` once its update is indexed and its old word is not; a delete
  and a TRUNCATE remove its postings; after a mixed workload of 500 changes the postings, the
  document frequencies and the corpus statistics equal a recount from the chunks' text.
- On a private PostgreSQL: rag.text_scores() equals the Python reference (freshet.answering.bm25)
  on a 5-document corpus; rag.text_top() is the same scores best first, and the retriever's
  cut of its candidates never changes a result; dense search uses the HNSW index for every
  kind of user on a table where the access predicate matches most rows; concurrent searches
  through one pool get their own results and leave its connections as they found them; a
  backfill of chunks written before the index existed is resumable and exact.
"""

from __future__ import annotations

import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import psycopg
import pytest
from psycopg_pool import ConnectionPool

from freshet import group_indexes
from freshet.answering.bm25 import BM25, Corpus, score
from freshet.answering.retrieval import NO_FILTERS, Filters, PgRetriever, reading
from freshet.answering.users import ANONYMOUS, User
from freshet.cdc.postgres import EmbeddedPostgres
from freshet.cdc.sandbox import free_port
from freshet.cdc.stack import migrate
from freshet.db import connect, database_url, source_database_url
from freshet.embedder import Embedder
from freshet.settings import Settings
from freshet.sync import text_index
from freshet.sync.chunking import TokenChunker
from freshet.sync.worker import SyncWorker
from tests.conftest import wait_for
from tests.integration.conftest import WorkerThread
from tests.integration.sync_support import caught_up, chunk_ids, document_version

pytestmark = pytest.mark.integration

PROBE = "app.bm25_probe"
PARAMS = BM25(k1=0.9, b=0.4, cap=2000)
ADMIN = User("root", (), admin=True)


def retriever(url: str, *, public: bool = True) -> tuple[PgRetriever, ConnectionPool]:
    from pgvector.psycopg import register_vector

    pool = ConnectionPool(url, min_size=1, max_size=2, configure=register_vector, open=True)

    def no_embedding(text: str) -> np.ndarray:
        raise AssertionError("text search embedded the query")

    found = PgRetriever(
        lambda: pool,
        no_embedding,
        ef_search=40,
        public_documents=public,
        text_weight=0.3,
        rrf_k=10,
        bm25=PARAMS,
    )
    return found, pool


def text_keys(found: PgRetriever, query: str) -> set[str]:
    return {
        p.doc_key for p in found.search(query, ADMIN, k=10, mode="text") if p.source_table == PROBE
    }


# --- through the pipeline ------------------------------------------------------------------
@pytest.fixture
def probe_worker(
    running_stack: Settings, embedder: Embedder, tmp_path: Path
) -> Iterator[Callable[[], WorkerThread]]:
    """A captured table of its own (so a TRUNCATE touches no other test's rows) and a sync
    worker, in a consumer group of its own, that maps that table only (the demo tables' events
    are skipped, whether or not another worker indexed them already)."""
    mappings = tmp_path / "mappings.toml"
    mappings.write_text(
        f'[tables."{PROBE}"]\nkey = ["id"]\ntitle = "{{title}}"\n'
        'text = "{title}\\n\\n{body}"\naccess_groups = "access_groups"\n'
    )
    with connect(source_database_url(running_stack), autocommit=True) as src:
        src.execute(
            f"CREATE TABLE IF NOT EXISTS {PROBE} (id int PRIMARY KEY, title text NOT NULL,"
            " body text NOT NULL, access_groups text[] NOT NULL DEFAULT '{}')"
        )
        src.execute(
            f"INSERT INTO {PROBE} VALUES (0, 'Probe', 'the first row') ON CONFLICT DO NOTHING"
        )
    settings = running_stack.with_overrides(
        mappings_path=mappings, sync_group=f"bm25-probe-{time.monotonic_ns()}"
    )
    started: list[WorkerThread] = []

    def start() -> WorkerThread:
        model = embedder
        worker = SyncWorker(settings, model, TokenChunker(model.tokenizer))  # type: ignore[attr-defined]
        thread = WorkerThread(worker).start()
        started.append(thread)
        return thread

    yield start
    for thread in started:
        if thread.thread.is_alive():
            thread.stop()


def probe_indexed(idx: psycopg.Connection, key: int, version: object) -> bool:
    return document_version(idx, PROBE, key) != version


def test_text_index_follows_updates_deletes_truncates_and_a_mixed_workload(
    running_stack: Settings, probe_worker: Callable[[], WorkerThread]
) -> None:
    url = database_url(running_stack)
    found, pool = retriever(url)
    src = connect(source_database_url(running_stack), autocommit=True)
    idx = connect(url, autocommit=True)
    try:
        assert wait_for(
            lambda: idx.execute("SELECT 1 FROM pg_class WHERE relname = 'bm25_probe'").fetchone(),
            10,
        )
        worker = probe_worker()
        assert wait_for(lambda: document_version(idx, PROBE, 0) is not None, 120), (
            "the probe table's first row was not indexed"
        )
        caught_up(worker)

        # A new word is findable once its update is indexed, the old one no longer.
        src.execute(
            f"INSERT INTO {PROBE} (id, title, body) VALUES (1, 'Marsupials',"
            " 'A quokkazyx smiles at the tourists on the island.')"
        )
        assert wait_for(lambda: "1" in text_keys(found, "quokkazyx"), 10)
        version = document_version(idx, PROBE, 1)
        src.execute(
            f"UPDATE {PROBE} SET body = 'A wombatzyx digs a burrow under the island.' WHERE id = 1"
        )
        assert wait_for(lambda: probe_indexed(idx, 1, version), 10)
        assert "1" in text_keys(found, "wombatzyx")
        assert "1" not in text_keys(found, "quokkazyx")
        assert "1" in text_keys(found, "island burrow")

        # A delete removes the chunk's postings.
        ids = chunk_ids(idx, PROBE, 1)
        assert (
            idx.execute(
                "SELECT count(*) FROM rag.text_postings WHERE chunk_id = ANY(%s)", (ids,)
            ).fetchone()[0]
            > 0
        )  # type: ignore[index]
        src.execute(f"DELETE FROM {PROBE} WHERE id = 1")
        assert wait_for(lambda: not chunk_ids(idx, PROBE, 1), 10)
        assert idx.execute(
            "SELECT count(*) FROM rag.text_postings WHERE chunk_id = ANY(%s)", (ids,)
        ).fetchone() == (0,)
        assert "1" not in text_keys(found, "wombatzyx")
        assert idx.execute(
            "SELECT count(*) FROM rag.text_terms WHERE term = 'wombatzyx'"
        ).fetchone() == (0,)

        # A mixed workload of 500 changes: inserts, body and title updates, deletes.
        rng = random.Random(11)
        words = [
            "river",
            "stone",
            "maple",
            "lantern",
            "harbor",
            "copper",
            "meadow",
            "falcon",
            "violet",
            "orchard",
            "glacier",
            "ember",
            "willow",
            "canyon",
            "saffron",
            "tundra",
            "lagoon",
            "basalt",
            "cedar",
            "thistle",
        ]
        live: set[int] = {0}
        for _ in range(500):
            key = rng.randint(100, 260)
            body = " ".join(rng.choices(words, k=rng.randint(3, 40)))
            action = rng.random()
            if key in live and action < 0.25:
                src.execute(f"DELETE FROM {PROBE} WHERE id = %s", (key,))
                live.discard(key)
            elif key in live and action < 0.45:
                src.execute(
                    f"UPDATE {PROBE} SET title = %s WHERE id = %s", (rng.choice(words), key)
                )
            else:
                src.execute(
                    f"INSERT INTO {PROBE} (id, title, body) VALUES (%s, %s, %s)"
                    " ON CONFLICT (id) DO UPDATE SET body = EXCLUDED.body",
                    (key, rng.choice(words), body),
                )
                live.add(key)
        last = max(live)
        src.execute(f"UPDATE {PROBE} SET body = 'the last change' WHERE id = %s", (last,))

        # Order holds per row, not across rows: a paced batch (docs/sync.md, "Pacing") may
        # commit the last change's document before other documents of the same batch, so the
        # test waits for the whole expected state, not for the last change alone.
        def indexed() -> tuple[int, set[str]]:
            (last_seen,) = idx.execute(
                "SELECT count(*) FROM rag.chunks WHERE source_table = %s AND text LIKE %s",
                (PROBE, "%the last change"),
            ).fetchone()  # type: ignore[misc]
            keys = idx.execute(
                "SELECT doc_key FROM rag.documents WHERE source_table = %s AND deleted_at IS NULL",
                (PROBE,),
            ).fetchall()
            return last_seen, {k for (k,) in keys}

        expected = (1, {str(k) for k in live})
        assert wait_for(lambda: indexed() == expected, 180), (
            f"the workload was not indexed within 180 s: {indexed()} (last change, live"
            f" documents), expected {expected}"
        )
        assert text_index.recount_differences(idx) == {
            "terms": 0,
            "chunks": 0,
            "corpus_chunks": 0,
            "corpus_length": 0,
        }

        # A TRUNCATE removes every posting of the table's chunks.
        probe_chunks = [
            r[0] for r in idx.execute("SELECT id FROM rag.chunks WHERE source_table = %s", (PROBE,))
        ]
        assert probe_chunks
        src.execute(f"TRUNCATE {PROBE}")
        assert wait_for(
            lambda: (
                idx.execute(
                    "SELECT count(*) FROM rag.chunks WHERE source_table = %s", (PROBE,)
                ).fetchone()
                == (0,)
            ),
            30,
        )
        assert idx.execute(
            "SELECT count(*) FROM rag.text_postings WHERE chunk_id = ANY(%s)", (probe_chunks,)
        ).fetchone() == (0,)
        assert not text_keys(found, " ".join(words))
        assert not any(text_index.recount_differences(idx).values())
    finally:
        src.execute(f"DROP TABLE IF EXISTS {PROBE}")
        src.close()
        idx.close()
        pool.close()


# --- on a private PostgreSQL -----------------------------------------------------------------
@pytest.fixture(scope="module")
def private_db() -> Iterator[str]:
    home = Path(tempfile.mkdtemp(prefix="freshet-text-"))
    home.chmod(0o755)  # PostgreSQL runs as user freshet when the tests run as root
    settings = Settings.from_env(
        {
            "FRESHET_HOME": str(home),
            "FRESHET_PG_PORT": str(free_port()),
            "FRESHET_PG_SHARED_BUFFERS": "128MB",
            "FRESHET_PG_MAINTENANCE_WORK_MEM": "256MB",
        }
    )
    pg = EmbeddedPostgres(settings)
    try:
        pg.start()
        url = database_url(settings)
        migrate(url)
        yield url
    finally:
        pg.stop()
        shutil.rmtree(home, ignore_errors=True)


def insert_chunks(
    conn: psycopg.Connection,
    table: str,
    texts: list[str],
    groups: list[list[str]] | None = None,
    vectors: np.ndarray | None = None,
) -> list[int]:
    """Documents of one chunk each, written as the sync writer writes them (in one
    transaction; the triggers index them)."""
    rng = np.random.default_rng(len(texts))
    if vectors is None:
        vectors = rng.normal(size=(len(texts), 384)).astype(np.float32)
    access = groups or [[] for _ in texts]
    with conn.transaction():
        docs = dict(
            conn.execute(
                "INSERT INTO rag.documents (source_table, doc_key, title, access_groups,"
                " source_lsn) SELECT %s, k, 'doc ' || k, g::text[], 1"
                " FROM unnest(%s::text[], %s::text[]) AS u(k, g) RETURNING doc_key, id",
                (table, [str(i) for i in range(len(texts))], [_array(g) for g in access]),
            ).fetchall()
        )
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO rag.chunks (document_id, source_table, doc_key, chunk_index, text,"
                " text_hash, embedding, access_groups, source_lsn)"
                " VALUES (%s, %s, %s, 0, %s, %s, %s, %s, 1) RETURNING id",
                [
                    (docs[str(i)], table, str(i), text, str(i), vectors[i], access[i])
                    for i, text in enumerate(texts)
                ],
                returning=True,
            )
            ids = []
            while True:
                row = cur.fetchone()
                assert row is not None
                ids.append(row[0])
                if not cur.nextset():
                    break
    return ids


def _array(groups: list[str]) -> str:
    return "{" + ",".join(groups) + "}"


def test_sql_scores_equal_the_reference_bm25(private_db: str) -> None:
    texts = [
        "The cat sat on the mat.",
        "A dog sat on a log.",
        "Cats and cats chase a dog.",
        "Birds fly south.",
        "The cat, the dog, the bird and the fish sat near the mat.",
    ]
    with connect(private_db, autocommit=True, vector=True) as conn:
        conn.execute("DELETE FROM rag.documents")
        ids = insert_chunks(conn, "test.five", texts)
        tokenized = [
            [
                t
                for t, tf in conn.execute("SELECT * FROM rag.text_terms_of(%s)", (x,))
                for _ in range(tf)
            ]
            for x in texts
        ]
        assert tokenized[2].count("cat") == 2  # stemmed: cats -> cat
        reference = Corpus.of(tokenized)
        stats = conn.execute("SELECT chunks, length FROM rag.text_corpus").fetchone()
        assert stats == (reference.chunks, reference.length)
        for query in ("cat mat", "dog", "cats sat near the fish", "fly fly birds"):
            q = [
                t
                for t, tf in conn.execute("SELECT * FROM rag.text_terms_of(%s)", (query,))
                for _ in range(tf)
            ]
            expected = {
                ids[i]: score(q, doc, reference, k1=0.9, b=0.4) for i, doc in enumerate(tokenized)
            }
            got = dict(
                conn.execute(
                    "SELECT chunk_id, score FROM rag.text_scores(%s, 0.9, 0.4, 1000)", (query,)
                ).fetchall()
            )
            assert got == pytest.approx({k: v for k, v in expected.items() if v > 0}, rel=1e-9)
        # The psql function ranks the same way.
        ranked = [
            r[0]
            for r in conn.execute(
                "SELECT id FROM rag.search_text('cat mat', 3, k1 => 0.9, b => 0.4)"
            )
        ]
        q = ["cat", "mat"]
        by_score = sorted(
            ids, key=lambda i: (-score(q, tokenized[ids.index(i)], reference, k1=0.9, b=0.4), i)
        )
        assert ranked == by_score[:3]
        conn.execute("DELETE FROM rag.documents")
        assert conn.execute("SELECT chunks, length FROM rag.text_corpus").fetchone() == (0, 0)
        assert conn.execute("SELECT count(*) FROM rag.text_terms").fetchone() == (0,)


def test_text_top_is_the_sorted_scores_and_the_cut_never_changes_a_result(
    private_db: str,
) -> None:
    """rag.text_top is rag.text_scores best first (ties by chunk id), cut at `top`; a user
    whose visible chunks all rank below the retriever's cut still gets the best of them (the
    retriever reads every candidate when the cut holds too few visible ones)."""
    count = 600
    # Every chunk matches "alpha"; the later a chunk, the more often it says it and the
    # better it scores. Only the 30 worst-scoring chunks are group research's.
    texts = [" ".join(["alpha"] * (1 + i // 20) + ["filler"] * 5) for i in range(count)]
    groups = [["research"] if i < 30 else ["staff"] for i in range(count)]
    with connect(private_db, autocommit=True, vector=True) as conn:
        conn.execute("DELETE FROM rag.documents")
        ids = insert_chunks(conn, "test.cut", texts, groups)
        scores = conn.execute(
            "SELECT chunk_id, score FROM rag.text_scores('alpha', 0.9, 0.4, 2000)"
        ).fetchall()
        ranked = sorted(scores, key=lambda r: (-r[1], r[0]))
        assert len(ranked) == count
        top = conn.execute("SELECT * FROM rag.text_top('alpha', 0.9, 0.4, 2000, 50)").fetchall()
        assert top == ranked[:50]
        every = conn.execute("SELECT * FROM rag.text_top('alpha', 0.9, 0.4, 2000)").fetchall()
        assert every == ranked
        assert conn.execute("SELECT * FROM rag.text_top('zzz', 0.9, 0.4, 2000, 5)").fetchall() == []
    found, pool = retriever(private_db)
    research = User("r", ("research",))
    try:
        got = [p.chunk_id for p in found.text("alpha", research, 5, NO_FILTERS)]
        visible = [chunk for chunk, _ in ranked if chunk in set(ids[:30])]
        assert got == visible[:5]  # ranked below the cut of 500 candidates
        staff = [p.chunk_id for p in found.text("alpha", User("s", ("staff",)), 5, NO_FILTERS)]
        assert staff == [chunk for chunk, _ in ranked if chunk not in set(ids[:30])][:5]
    finally:
        pool.close()
        with connect(private_db, autocommit=True) as conn:
            conn.execute("DELETE FROM rag.documents")


def test_candidates_past_the_postings_cap_are_rescored_exactly(private_db: str) -> None:
    """A chunk whose posting of a query term lies past the cap is scored without that term by
    rag.text_top; the retriever rescores its best candidates (rag.text_rescore), so it ranks
    and scores them as BM25 reading every posting does."""
    # "common" is in 10 short chunks that say it three times (its best postings) and in chunk
    # A, once, in a longer text; "rare" is in A and in the shorter chunk B.
    texts = ["common common common"] * 10 + ["unrelated zeta words"] * 60
    texts += ["rare common filler filler filler filler", "rare filler filler filler"]
    a_index, b_index = len(texts) - 2, len(texts) - 1
    with connect(private_db, autocommit=True, vector=True) as conn:
        conn.execute("DELETE FROM rag.documents")
        ids = insert_chunks(conn, "test.rescore", texts)
        a, b = ids[a_index], ids[b_index]
        exact = dict(
            conn.execute("SELECT * FROM rag.text_scores('rare common', 0.9, 0.4, 1000000)")
        )
        capped = dict(conn.execute("SELECT * FROM rag.text_top('rare common', 0.9, 0.4, 5)"))
        assert exact[a] > exact[b] and capped[b] > capped[a]  # the cap reverses them
        rescored = dict(
            conn.execute(
                "SELECT * FROM rag.text_rescore('rare common', 0.9, 0.4, %s)", ([a, b, ids[0]],)
            )
        )
        assert rescored == pytest.approx({i: exact[i] for i in (a, b, ids[0])}, rel=1e-9)
        # The psql function ranks as the retriever does.
        by_sql = conn.execute(
            "SELECT id, score FROM rag.search_text('rare common', 2, k1 => 0.9, b => 0.4, cap => 5)"
        ).fetchall()
        assert [i for i, _ in by_sql] == [a, b]
        assert [x for _, x in by_sql] == pytest.approx([exact[a], exact[b]], rel=1e-9)
        assert (
            conn.execute("SELECT * FROM rag.text_rescore('zzz', 0.9, 0.4, %s)", ([a],)).fetchall()
            == []
        )
    found, pool = retriever(private_db)
    found.bm25 = BM25(k1=0.9, b=0.4, cap=5)
    try:
        got = found.text("rare common", ADMIN, 2, NO_FILTERS)
        assert [p.chunk_id for p in got] == [a, b]
        assert [p.text_rank for p in got] == pytest.approx([exact[a], exact[b]], rel=1e-9)
    finally:
        pool.close()
        with connect(private_db, autocommit=True) as conn:
            conn.execute("DELETE FROM rag.documents")


def test_dense_search_uses_hnsw_for_every_kind_of_user(private_db: str) -> None:
    """On a table where the access predicate matches 95% of the chunks (public ones) and a
    group holds the other 5%, every user's dense search is an HNSW index scan, and returns
    only what the user may see."""
    rng = random.Random(5)
    count = 2000
    groups = [["staff"] if rng.random() < 0.05 else [] for _ in range(count)]
    texts = [f"chunk number {i}" for i in range(count)]
    with connect(private_db, autocommit=True, vector=True) as conn:
        conn.execute("DELETE FROM rag.documents")
        insert_chunks(conn, "test.plan", texts, groups)
        conn.execute("ANALYZE rag.chunks")
        conn.execute("ANALYZE rag.documents")
    found, pool = retriever(private_db)
    closed, closed_pool = retriever(private_db, public=False)
    vector = np.random.default_rng(1).normal(size=384).astype(np.float32)
    try:
        staff = User("u", ("staff",))
        cases = [(found, ANONYMOUS), (found, staff), (found, ADMIN), (closed, staff)]
        for which, user in cases:
            plan = which.explain_dense(vector, user, 20)
            assert "Index Scan using ix_chunks_embedding_hnsw" in plan, plan
            assert "Seq Scan on chunks" not in plan, plan
            hits = which.dense(vector, user, 20, NO_FILTERS)
            assert len(hits) == 20
            if not user.admin:
                visible = set(user.groups)
                assert all(
                    set(h.access_groups) & visible or (not h.access_groups and which is found)
                    for h in hits
                )
    finally:
        pool.close()
        closed_pool.close()
        with connect(private_db, autocommit=True) as conn:
            conn.execute("DELETE FROM rag.documents")


def test_a_small_group_searches_its_own_partial_index_and_sees_only_its_chunks(
    private_db: str,
) -> None:
    """With a partial HNSW index for group `research` (5% of the chunks) and one for the
    public chunks, a research member's dense search is the union of those two index scans and
    returns what the filtered scan of the whole index returns (against an exact scan); a
    `secret` chunk never appears. A user with a group that has no index, and an admin, keep the
    one scan of the whole index; an index dropped stops being used."""
    count = 2000
    groups = [
        ["research"] if i % 20 == 0 else ["secret"] if i % 20 == 1 else [] for i in range(count)
    ]
    texts = [f"chunk number {i}" for i in range(count)]
    vectors = np.random.default_rng(11).normal(size=(count, 384)).astype(np.float32)
    with connect(private_db, autocommit=True, vector=True) as conn:
        conn.execute("DELETE FROM rag.documents")
        conn.execute("VACUUM rag.chunks")
        ids = insert_chunks(conn, "test.groups", texts, groups, vectors=vectors)
        conn.execute("ANALYZE rag.chunks")
        assert group_indexes.build(conn, "research")
        assert group_indexes.build(conn, group_indexes.PUBLIC)
        assert not group_indexes.build(conn, "research")  # there already
        assert group_indexes.usable(conn) == {"research", group_indexes.PUBLIC}
    found, pool = retriever(private_db)
    closed, closed_pool = retriever(private_db, public=False)
    research = User("r", ("research",))
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    query = vectors[40] + vectors[41] + 0.5 * vectors[60]
    distance = 1.0 - unit @ (query / np.linalg.norm(query))

    def exact(visible: Callable[[list[str]], bool]) -> set[int]:
        order = [i for i in np.argsort(distance) if visible(groups[i])]
        return {ids[i] for i in order[:20]}

    try:
        for which, expected in (
            (found, exact(lambda g: g in (["research"], []))),
            (closed, exact(lambda g: g == ["research"])),
        ):
            plan = which.explain_dense(query, research, 20)
            assert "Index Scan using " + group_indexes.index_name("research") in plan, plan
            assert (group_indexes.index_name(group_indexes.PUBLIC) in plan) == (which is found)
            assert "ix_chunks_embedding_hnsw" not in plan, plan
            assert "Seq Scan on chunks" not in plan, plan
            hits = which.dense(query, research, 20, NO_FILTERS)
            assert len(hits) == 20
            assert all(h.access_groups in (("research",), ()) for h in hits)
            assert [h.distance for h in hits] == sorted(h.distance for h in hits)
            assert len({h.chunk_id for h in hits} & expected) >= 18, (hits, expected)
            which._group_indexes = (time.monotonic(), frozenset())  # the plain plan
            plain = which.dense(query, research, 20, NO_FILTERS)
            assert len({h.chunk_id for h in plain} & expected) >= 18
            which._group_indexes = (0.0, frozenset())  # read the catalog again
        for user in (User("m", ("research", "secret")), ADMIN):
            assert "ix_chunks_embedding_hnsw" in found.explain_dense(query, user, 20)
        # A filter goes into every branch.
        table = Filters(tables=("test.groups",))
        assert group_indexes.index_name("research") in found.explain_dense(
            query, research, 20, table
        )
        filtered = found.dense(query, research, 20, table)
        assert [h.chunk_id for h in filtered] == [
            h.chunk_id for h in found.dense(query, research, 20, NO_FILTERS)
        ]
        assert found.dense(query, research, 20, Filters(tables=("test.none",))) == []
        # After a model switch the indexes are on the previous model's column: not used, stale.
        with connect(private_db, autocommit=True) as conn, conn.transaction(force_rollback=True):
            conn.execute("ALTER TABLE rag.chunks RENAME COLUMN embedding TO embedding_previous")
            conn.execute("ALTER TABLE rag.chunks ADD COLUMN embedding vector(384)")
            assert group_indexes.usable(conn) == frozenset()
            assert group_indexes.stale(conn) == [group_indexes.PUBLIC, "research"]
        with connect(private_db, autocommit=True) as conn:
            assert group_indexes.drop(conn, "research")
            assert group_indexes.usable(conn) == {group_indexes.PUBLIC}
        found._group_indexes = (0.0, frozenset())
        assert "ix_chunks_embedding_hnsw" in found.explain_dense(query, research, 20)
    finally:
        pool.close()
        closed_pool.close()
        with connect(private_db, autocommit=True) as conn:
            for group in group_indexes.found(conn):
                group_indexes.drop(conn, group)
            conn.execute("DELETE FROM rag.documents")


def test_freshet_group_index_builds_lists_and_drops_group_indexes(
    private_db: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`freshet group-index research` builds research's index and the public chunks' one and
    lists each group's share; `--drop` removes research's; an invalid index (a build killed
    half-way) is built again by `--rebuild`."""
    from freshet.cli import main

    groups = [["research"] if i % 20 == 0 else [] for i in range(400)]
    with connect(private_db, autocommit=True, vector=True) as conn:
        conn.execute("DELETE FROM rag.documents")
        insert_chunks(conn, "test.cli", [f"chunk {i}" for i in range(400)], groups)
    monkeypatch.setenv("DATABASE_URL", private_db)
    try:
        assert main(["group-index", "research"]) == 0
        out = capsys.readouterr().out
        assert "built the index of group 'research'" in out, out
        assert "built the index of public documents" in out, out
        listing = {line.split()[0]: line for line in out.splitlines() if "%" in line}
        assert "20" in listing["research"] and "5.0%" in listing["research"], out
        assert group_indexes.index_name("research") in listing["research"], out
        assert "95.0%" in listing["(public"], out
        with connect(private_db, autocommit=True) as conn:
            assert group_indexes.usable(conn) == {"research", group_indexes.PUBLIC}
            conn.execute(
                "UPDATE pg_index SET indisvalid = false WHERE indexrelid = %s::regclass",
                (f"rag.{group_indexes.index_name(group_indexes.PUBLIC)}",),
            )
            assert group_indexes.stale(conn) == [group_indexes.PUBLIC]
        assert main(["group-index"]) == 0
        assert "STALE: run --rebuild" in capsys.readouterr().out
        assert main(["group-index", "--rebuild"]) == 0
        assert "built the index of public documents" in capsys.readouterr().out
        assert main(["group-index", "--drop", "research"]) == 0
        assert "dropped the index of group 'research'" in capsys.readouterr().out
        with connect(private_db, autocommit=True) as conn:
            assert group_indexes.usable(conn) == {group_indexes.PUBLIC}
    finally:
        with connect(private_db, autocommit=True) as conn:
            for group in group_indexes.found(conn):
                group_indexes.drop(conn, group)
            conn.execute("DELETE FROM rag.documents")


def test_concurrent_searches_read_in_one_round_trip_and_leave_connections_clean(
    private_db: str,
) -> None:
    """A search's reads run in autocommit (no COMMIT round trip); dense search pipelines
    BEGIN, its transaction-local settings, the query and COMMIT. Four threads sharing a pool of
    two connections get, every time, exactly the result a lone search gets, and every connection
    goes back idle, in its own autocommit mode, with no setting left behind; a failed read too."""
    count = 300
    texts = [f"alpha beta gamma chunk {i} " + ("delta " * (i % 7)) for i in range(count)]
    vectors = np.random.default_rng(3).normal(size=(count, 384)).astype(np.float32)
    with connect(private_db, autocommit=True, vector=True) as conn:
        conn.execute("DELETE FROM rag.documents")
        conn.execute("VACUUM rag.chunks")  # an earlier test's dead tuples would fill HNSW's ef
        insert_chunks(conn, "test.concurrent", texts, vectors=vectors)
    found, pool = retriever(private_db)
    query = vectors[7] + 0.1 * vectors[8]
    found._embed = found._embed_hybrid = found._embed_dense = lambda text: query  # type: ignore[method-assign]
    expected = {
        mode: [p.chunk_id for p in found.search("delta gamma", ADMIN, k=10, mode=mode)]
        for mode in ("dense", "text", "hybrid")
    }
    assert all(len(ids) == 10 for ids in expected.values()), expected
    wrong: list[str] = []

    def client(mode: str) -> None:
        for _ in range(60):
            got = [p.chunk_id for p in found.search("delta gamma", ADMIN, k=10, mode=mode)]
            if got != expected[mode]:
                wrong.append(f"{mode}: {got}")

    threads = [threading.Thread(target=client, args=(m,)) for m in ("hybrid", "dense", "text")]
    threads.append(threading.Thread(target=client, args=("hybrid",)))
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not wrong, wrong[:3]
        with pytest.raises(psycopg.errors.DivisionByZero), reading(pool) as conn:
            conn.execute("BEGIN")
            conn.execute("SELECT 1 / 0")
        for _ in range(2):  # both connections of the pool
            with pool.connection() as conn:
                assert conn.autocommit is False
                assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
                row = conn.execute(
                    "SELECT current_setting('enable_seqscan'), current_setting('hnsw.ef_search')"
                ).fetchone()
                assert row == ("on", "40"), row
                conn.rollback()
    finally:
        pool.close()
        with connect(private_db, autocommit=True) as conn:
            conn.execute("DELETE FROM rag.documents")


def test_dense_search_finds_k_live_chunks_among_deleted_ones(private_db: str) -> None:
    """Chunks deleted but not yet vacuumed still sit in the HNSW graph and take up ef_search's
    candidates: every user's dense search (an admin's too, who has no predicate) keeps walking
    the graph until it has k live chunks, and so do the SQL functions for psql users on the
    server's default settings (migration 0014)."""
    count, kept = 2000, 300
    rng = np.random.default_rng(11)
    vectors = rng.normal(size=(count + kept, 384)).astype(np.float32)
    with connect(private_db, autocommit=True, vector=True) as conn:
        conn.execute("DELETE FROM rag.documents")
        conn.execute("VACUUM rag.chunks")
        insert_chunks(conn, "test.deleted", [f"old {i}" for i in range(count)], vectors=vectors)
        conn.execute("DELETE FROM rag.documents WHERE source_table = 'test.deleted'")
        insert_chunks(
            conn, "test.kept", [f"kept {i}" for i in range(kept)], vectors=vectors[count:]
        )
    found, pool = retriever(private_db)  # ef_search 40
    try:
        for user in (ADMIN, User("u", ("staff",)), ANONYMOUS):
            for i in range(5):
                hits = found.dense(vectors[i], user, 10, NO_FILTERS)
                assert len(hits) == 10, (user, i, len(hits))
                assert {h.source_table for h in hits} == {"test.kept"}
        with connect(private_db, autocommit=True, vector=True) as conn:
            chunk = conn.execute(
                "SELECT min(id) FROM rag.chunks WHERE source_table = 'test.kept'"
            ).fetchone()
            assert chunk is not None
            for i in range(5):
                calls = {
                    "rag.search": ("SELECT id FROM rag.search(%s, 10)", (vectors[i],)),
                    "rag.similar": ("SELECT id FROM rag.similar(%s, 10)", (chunk[0] + i,)),
                    "rag.search_hybrid": (
                        "SELECT id FROM rag.search_hybrid(%s, 'zzqqxx', 10)",
                        (vectors[i],),
                    ),
                }
                for name, (statement, args) in calls.items():
                    rows = conn.execute(statement, args).fetchall()
                    assert len(rows) == 10, (name, i, len(rows))
    finally:
        pool.close()
        with connect(private_db, autocommit=True) as conn:
            conn.execute("DELETE FROM rag.documents")


def test_backfill_indexes_older_chunks_resumably_and_exactly(private_db: str) -> None:
    """Chunks written before the text index existed (no postings) are indexed by
    `freshet reindex-text`'s backfill, batch by batch; a stopped backfill resumes."""
    with connect(private_db, autocommit=True, vector=True) as conn:
        conn.execute("DELETE FROM rag.documents")
        conn.execute("ALTER TABLE rag.chunks DISABLE TRIGGER text_index_insert")
        try:
            ids = insert_chunks(
                conn, "test.old", [f"old chunk {i} about lanterns" for i in range(60)]
            )
        finally:
            conn.execute("ALTER TABLE rag.chunks ENABLE TRIGGER text_index_insert")
        conn.execute(
            "UPDATE rag.text_backfill SET upto = %s, done = %s, finished_at = NULL",
            (max(ids), min(ids) - 1),
        )
        assert text_index.state(conn).remaining == 60
        stops = iter([False, True])
        indexed = text_index.backfill(conn, batch=25, stop=lambda: next(stops, True))
        assert indexed == 25 and text_index.state(conn).remaining == 35
        # A chunk deleted and one added while the backfill is stopped.
        conn.execute("DELETE FROM rag.chunks WHERE id = %s", (ids[-1],))
        insert_chunks(conn, "test.new", ["a new chunk about lanterns"])
        seen: list[tuple[int, int]] = []
        indexed = text_index.backfill(conn, batch=25, progress=lambda d, t: seen.append((d, t)))
        assert indexed == 34 and seen[-1] == (34, 34)
        assert text_index.state(conn).finished
        assert not any(text_index.recount_differences(conn).values())
        # A rebuild starts over and ends equal to the recount too.
        text_index.rebuild(conn)
        assert text_index.state(conn).remaining == 60
        text_index.backfill(conn)
        assert not any(text_index.recount_differences(conn).values())
        conn.execute("DELETE FROM rag.documents")


def test_concurrent_writers_neither_deadlock_nor_drift(private_db: str) -> None:
    """Two writers adding and removing chunks over the same words at once (as two sync
    workers, or a worker and its large lane, do): no deadlock, and the statistics stay exact."""
    import threading

    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "iota", "kappa"]
    errors: list[BaseException] = []

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        try:
            with connect(private_db, autocommit=True, vector=True) as conn:
                for round_ in range(25):
                    texts = [" ".join(rng.sample(words, 6)) for _ in range(4)]
                    ids = insert_chunks(conn, f"test.concurrent{seed}.{round_}", texts)
                    if rng.random() < 0.5:
                        conn.execute("DELETE FROM rag.chunks WHERE id = %s", (ids[0],))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    with connect(private_db, autocommit=True) as conn:
        conn.execute("DELETE FROM rag.documents")
    threads = [threading.Thread(target=writer, args=(seed,)) for seed in (1, 2, 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    with connect(private_db, autocommit=True) as conn:
        assert not any(text_index.recount_differences(conn).values())
        conn.execute("DELETE FROM rag.documents")
