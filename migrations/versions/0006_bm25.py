"""BM25 full-text index in plain SQL: postings, term statistics and the search functions.

Every chunk is a BM25 document: the stemmed lexemes of ``to_tsvector('english', text)`` (the
shipped mappings start a document's text with its title, as BEIR's BM25 indexes title + text).
Triggers on rag.chunks keep three tables exact in the transaction that writes the chunks, so
the text index is never staler than the vectors, whoever writes (the sync worker, a TRUNCATE's
removal, a re-snapshot, a repair):

- rag.text_postings: one row per (term, chunk) with the term's frequency in the chunk, the
  chunk's length and an impact (the term's BM25 weight at write time) that orders a term's
  postings best first, so a query reads at most a capped number of them per term;
- rag.text_terms: the document frequency of every term;
- rag.text_corpus: one row, the number of indexed chunks and their total length.

Chunks that existed before this migration have no postings: `freshet reindex-text` builds
them in small transactions, resumable, while search goes on. The tsvector column and its GIN
index (ts_rank_cd ranking) are dropped: BM25 is the one full-text path.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The BM25 parameters the write-time impact is computed with; the query's scores use the
# settings FRESHET_BM25_K1 / FRESHET_BM25_B, which only change the order postings are read in
# (for terms with more postings than the cap) if they differ from these.
IMPACT_K1, IMPACT_B = 0.6, 0.75
# The defaults of the psql functions rag.search_text / rag.search_hybrid: the Settings'
# defaults when this migration was written (tests/unit/test_one_settings.py keeps them equal;
# changing a default means a migration that redefines the functions).
SQL_DEFAULTS = {"k1": 0.6, "b": 0.75, "cap": 1000, "text_weight": 1.2, "rrf_k": 5}


# For psql: BM25 search (rag.search_text; 0012 rescores its candidates exactly).
SEARCH_TEXT = """
        CREATE FUNCTION rag.search_text(query text, k integer, groups text[] DEFAULT NULL,
                                        public boolean DEFAULT true,
                                        k1 double precision DEFAULT {k1},
                                        b double precision DEFAULT {b},
                                        cap integer DEFAULT {cap})
        RETURNS TABLE (id bigint, document_id bigint, source_table text, doc_key text,
                       chunk_index integer, text text, metadata jsonb, access_groups text[],
                       source_lsn bigint, score double precision)
        LANGUAGE sql STABLE
        AS $$
            WITH s AS MATERIALIZED (
                SELECT * FROM rag.text_scores(query, k1, b, cap) AS s
                ORDER BY s.score DESC, s.chunk_id
            )
            SELECT c.id, c.document_id, c.source_table, c.doc_key, c.chunk_index, c.text,
                   c.metadata, c.access_groups, c.source_lsn, s.score
            FROM s CROSS JOIN LATERAL (
                SELECT * FROM rag.chunks AS c
                WHERE c.id = s.chunk_id
                  AND (groups IS NULL OR c.access_groups && groups
                       OR (public AND c.access_groups = '{}'::text[]))
                LIMIT 1
            ) AS c
            ORDER BY s.score DESC, s.chunk_id
            LIMIT k
        $$
        """

# PL/pgSQL, so that its plan is made for its own statements: the corpus statistics are read
# into variables first, then each query term (a handful) is looked up by key and reads its
# postings through the (term, impact) index; a planner estimate of the caller's cannot turn it
# into a scan of every term.
TEXT_SCORES = """
    CREATE OR REPLACE FUNCTION rag.text_scores(query text, k1 double precision,
                                               b double precision, cap integer)
    RETURNS TABLE (chunk_id bigint, score double precision)
    LANGUAGE plpgsql STABLE PARALLEL SAFE ROWS 2000
    AS $$
    DECLARE
        n double precision;
        avgdl double precision;
    BEGIN
        SELECT c.chunks, c.length::float8 / greatest(c.chunks, 1) INTO n, avgdl
        FROM rag.text_corpus AS c;
        IF n IS NULL OR n = 0 THEN
            RETURN;
        END IF;
        RETURN QUERY
        SELECT p.chunk_id,
               sum(q.weight * p.tf * (k1 + 1) / (p.tf + k1 * (1 - b + b * p.dl / avgdl)))
        FROM (
            SELECT t.term, t.tf * ln(1 + (n - s.df + 0.5) / (s.df + 0.5)) AS weight
            FROM rag.text_terms_of(query) AS t
            CROSS JOIN LATERAL (
                SELECT st.df FROM rag.text_terms AS st WHERE st.term = t.term AND st.df > 0
            ) AS s
        ) AS q
        CROSS JOIN LATERAL (
            SELECT tp.chunk_id, tp.tf, tp.dl FROM rag.text_postings AS tp
            WHERE tp.term = q.term ORDER BY tp.impact DESC LIMIT cap
        ) AS p
        GROUP BY p.chunk_id;
    END
    $$
"""


def _with_defaults(statement: str) -> str:
    for name, value in SQL_DEFAULTS.items():
        statement = statement.replace("{" + name + "}", str(value))
    return statement


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE rag.text_postings (
            term      text    NOT NULL,
            chunk_id  bigint  NOT NULL,
            tf        integer NOT NULL,
            dl        integer NOT NULL,
            impact    real    NOT NULL
        )
        """
    )
    # Read path: a term's postings best first, without visiting the heap once vacuumed.
    op.execute(
        "CREATE INDEX ix_text_postings_term ON rag.text_postings"
        " (term, impact DESC) INCLUDE (chunk_id, tf, dl)"
    )
    # Write path: a chunk's postings, when it is deleted or its text changes.
    op.execute("CREATE INDEX ix_text_postings_chunk ON rag.text_postings (chunk_id)")
    op.execute(
        """
        CREATE TABLE rag.text_terms (
            term  text   PRIMARY KEY,
            df    bigint NOT NULL
        )
        """
    )
    op.execute(
        """
        CREATE TABLE rag.text_corpus (
            id      boolean PRIMARY KEY DEFAULT true CHECK (id),
            chunks  bigint  NOT NULL DEFAULT 0,
            length  bigint  NOT NULL DEFAULT 0
        )
        """
    )
    op.execute("INSERT INTO rag.text_corpus DEFAULT VALUES")
    op.execute(
        "COMMENT ON TABLE rag.text_postings IS 'BM25 postings, one per (term, chunk), kept by"
        " triggers on rag.chunks; impact orders a term''s postings best first'"
    )
    op.execute(
        "COMMENT ON TABLE rag.text_terms IS 'BM25 document frequency (chunks) of every term'"
    )
    op.execute(
        "COMMENT ON TABLE rag.text_corpus IS 'BM25 corpus statistics: indexed chunks and their"
        " total length in terms'"
    )

    # The lexemes of a text with their frequencies: the one tokenizer of indexing and queries.
    op.execute(
        """
        CREATE FUNCTION rag.text_terms_of(body text)
        RETURNS TABLE (term text, tf integer)
        LANGUAGE sql IMMUTABLE PARALLEL SAFE
        AS $$
            SELECT w.lexeme, greatest(cardinality(w.positions), 1)
            FROM unnest(to_tsvector('english', body)) AS w
        $$
        """
    )

    # Postings of a set of chunks, with the statistics they add; one statement each way.
    # Both lock the corpus row before touching any term, so concurrent writers (several sync
    # workers, the large lane) take turns from their first chunk write to their commit
    # instead of deadlocking on term rows; the embedding, outside that window, stays parallel.
    op.execute(
        f"""
        CREATE FUNCTION rag.text_index_add(added_ids bigint[])
        RETURNS void
        LANGUAGE plpgsql
        AS $$
        BEGIN
            -- The corpus row first: a writer holds term rows only while it holds this one,
            -- so two writers never wait for each other's terms (no deadlock).
            PERFORM 1 FROM rag.text_corpus FOR UPDATE;
            WITH corpus AS (
                SELECT CASE WHEN chunks > 0 THEN length::float8 / chunks END AS avgdl
                FROM rag.text_corpus
            ), new AS (
                SELECT t.term, c.id AS chunk_id, t.tf,
                       sum(t.tf) OVER (PARTITION BY c.id)::integer AS dl
                FROM rag.chunks AS c, rag.text_terms_of(c.text) AS t
                WHERE c.id = ANY(added_ids)
            ), postings AS (
                INSERT INTO rag.text_postings (term, chunk_id, tf, dl, impact)
                SELECT new.term, new.chunk_id, new.tf, new.dl,
                       new.tf / (new.tf + {IMPACT_K1} * (1 - {IMPACT_B}
                                 + {IMPACT_B} * new.dl / coalesce(corpus.avgdl, new.dl)))
                FROM new, corpus
            ), terms AS (
                INSERT INTO rag.text_terms AS s (term, df)
                SELECT term, count(*) FROM new GROUP BY term ORDER BY term
                ON CONFLICT (term) DO UPDATE SET df = s.df + EXCLUDED.df
            )
            UPDATE rag.text_corpus SET
                chunks = chunks + (SELECT count(DISTINCT chunk_id) FROM new),
                length = length + (SELECT coalesce(sum(tf), 0) FROM new);
        END
        $$
        """
    )
    op.execute(
        """
        CREATE FUNCTION rag.text_index_remove(removed_ids bigint[])
        RETURNS void
        LANGUAGE plpgsql
        AS $$
        DECLARE
            emptied text[];
        BEGIN
            PERFORM 1 FROM rag.text_corpus FOR UPDATE;  -- first, as in rag.text_index_add
            WITH gone AS (
                DELETE FROM rag.text_postings WHERE chunk_id = ANY(removed_ids)
                RETURNING term, chunk_id, tf
            ), per_term AS (
                SELECT term, count(*) AS n FROM gone GROUP BY term
            ), terms AS (
                UPDATE rag.text_terms AS s SET df = s.df - p.n
                FROM per_term AS p WHERE s.term = p.term
                RETURNING s.term, s.df
            ), corpus AS (
                UPDATE rag.text_corpus SET
                    chunks = chunks - (SELECT count(DISTINCT chunk_id) FROM gone),
                    length = length - (SELECT coalesce(sum(tf), 0) FROM gone)
            )
            SELECT array_agg(term) FILTER (WHERE df <= 0) INTO emptied FROM terms;
            IF emptied IS NOT NULL THEN
                DELETE FROM rag.text_terms WHERE term = ANY(emptied) AND df <= 0;
            END IF;
        END
        $$
        """
    )
    op.execute(
        """
        CREATE FUNCTION rag.text_index_on_insert() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM rag.text_index_add(ARRAY(SELECT id FROM added));
            RETURN NULL;
        END
        $$
        """
    )
    op.execute(
        """
        CREATE FUNCTION rag.text_index_on_delete() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM rag.text_index_remove(ARRAY(SELECT id FROM removed));
            RETURN NULL;
        END
        $$
        """
    )
    op.execute(
        """
        CREATE FUNCTION rag.text_index_on_update() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM rag.text_index_remove(ARRAY[OLD.id]);
            PERFORM rag.text_index_add(ARRAY[NEW.id]);
            RETURN NULL;
        END
        $$
        """
    )
    op.execute(
        "CREATE TRIGGER text_index_insert AFTER INSERT ON rag.chunks"
        " REFERENCING NEW TABLE AS added FOR EACH STATEMENT"
        " EXECUTE FUNCTION rag.text_index_on_insert()"
    )
    op.execute(
        "CREATE TRIGGER text_index_delete AFTER DELETE ON rag.chunks"
        " REFERENCING OLD TABLE AS removed FOR EACH STATEMENT"
        " EXECUTE FUNCTION rag.text_index_on_delete()"
    )
    op.execute(
        "CREATE TRIGGER text_index_update AFTER UPDATE OF text ON rag.chunks FOR EACH ROW"
        " WHEN (OLD.text IS DISTINCT FROM NEW.text) EXECUTE FUNCTION rag.text_index_on_update()"
    )

    # Chunks written before the triggers existed have no postings yet: `freshet reindex-text`
    # indexes ids up to `upto`, recording its progress in `done` (resumable). Newer chunks are
    # the triggers' (their ids are larger: every writer waited for this migration's lock).
    op.execute(
        """
        CREATE TABLE rag.text_backfill (
            id           boolean PRIMARY KEY DEFAULT true CHECK (id),
            upto         bigint      NOT NULL,
            done         bigint      NOT NULL DEFAULT 0,
            started_at   timestamptz NOT NULL DEFAULT now(),
            finished_at  timestamptz
        )
        """
    )
    op.execute(
        "INSERT INTO rag.text_backfill (upto, finished_at)"
        " SELECT coalesce(max(id), 0), CASE WHEN max(id) IS NULL THEN now() END FROM rag.chunks"
    )

    # BM25 scores of the chunks that match a query: Okapi BM25 with IDF from the live
    # statistics; each query term reads at most `cap` postings, best impact first, so a query
    # costs its terms, not the corpus.
    op.execute(TEXT_SCORES)

    # For psql: BM25 search, and hybrid (dense + BM25, weighted reciprocal rank fusion). With
    # `groups` they return only chunks of those groups (and public ones when `public`), as the
    # API does; without, every chunk (operators only).
    op.execute(_with_defaults(SEARCH_TEXT))
    op.execute(
        _with_defaults("""
        CREATE FUNCTION rag.search_hybrid(query_vector vector, query text, k integer,
                                          groups text[] DEFAULT NULL,
                                          public boolean DEFAULT true,
                                          text_weight double precision DEFAULT {text_weight},
                                          rrf_k integer DEFAULT {rrf_k})
        RETURNS TABLE (id bigint, document_id bigint, source_table text, doc_key text,
                       chunk_index integer, text text, metadata jsonb, access_groups text[],
                       source_lsn bigint, score double precision)
        LANGUAGE sql STABLE
        AS $$
            WITH dense AS (
                SELECT c.id, row_number() OVER (ORDER BY c.embedding <=> query_vector) AS r
                FROM (SELECT * FROM rag.chunks AS c
                      WHERE groups IS NULL OR c.access_groups && groups
                            OR (public AND c.access_groups = '{}'::text[])
                      ORDER BY c.embedding <=> query_vector
                      LIMIT greatest(2 * k, 20)) AS c
            ), sparse AS (
                SELECT s.id, row_number() OVER (ORDER BY s.score DESC, s.id) AS r
                FROM rag.search_text(query, greatest(2 * k, 20), groups, public) AS s
            ), fused AS (
                SELECT coalesce(d.id, t.id) AS id,
                       coalesce(1.0 / (rrf_k + d.r), 0)
                       + coalesce(text_weight / (rrf_k + t.r), 0) AS score
                FROM dense AS d FULL JOIN sparse AS t ON t.id = d.id
            )
            SELECT c.id, c.document_id, c.source_table, c.doc_key, c.chunk_index, c.text,
                   c.metadata, c.access_groups, c.source_lsn, f.score
            FROM fused AS f JOIN rag.chunks AS c ON c.id = f.id
            ORDER BY f.score DESC, f.id
            LIMIT k
        $$
        """)
    )

    op.execute("DROP INDEX IF EXISTS rag.ix_chunks_tsv")
    op.execute("ALTER TABLE rag.chunks DROP COLUMN IF EXISTS tsv")


def downgrade() -> None:
    op.execute(
        "ALTER TABLE rag.chunks ADD COLUMN tsv tsvector"
        " GENERATED ALWAYS AS (to_tsvector('english', text)) STORED"
    )
    op.execute("CREATE INDEX ix_chunks_tsv ON rag.chunks USING gin (tsv)")
    op.execute(
        "DROP FUNCTION IF EXISTS rag.search_hybrid(vector, text, integer, text[], boolean,"
        " double precision, integer)"
    )
    op.execute(
        "DROP FUNCTION IF EXISTS rag.search_text(text, integer, text[], boolean,"
        " double precision, double precision, integer)"
    )
    op.execute(
        "DROP FUNCTION IF EXISTS rag.text_scores(text, double precision, double precision, integer)"
    )
    op.execute("DROP TRIGGER IF EXISTS text_index_insert ON rag.chunks")
    op.execute("DROP TRIGGER IF EXISTS text_index_delete ON rag.chunks")
    op.execute("DROP TRIGGER IF EXISTS text_index_update ON rag.chunks")
    for function in (
        "text_index_on_insert()",
        "text_index_on_delete()",
        "text_index_on_update()",
        "text_index_add(bigint[])",
        "text_index_remove(bigint[])",
        "text_terms_of(text)",
    ):
        op.execute(f"DROP FUNCTION IF EXISTS rag.{function}")
    op.execute("DROP TABLE IF EXISTS rag.text_backfill")
    op.execute("DROP TABLE IF EXISTS rag.text_corpus")
    op.execute("DROP TABLE IF EXISTS rag.text_terms")
    op.execute("DROP TABLE IF EXISTS rag.text_postings")
