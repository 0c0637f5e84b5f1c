"""Schema rag: documents, chunks with vector(384) + tsvector, workers, dead letters, search SQL.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("CREATE EXTENSION IF NOT EXISTS vector")
    op.execute("CREATE SCHEMA IF NOT EXISTS rag")

    # One row per source row. The version (source_lsn, source_seq) only moves forward; a
    # deleted document keeps its row (deleted_at set) so an older replayed event cannot
    # bring it back.
    op.execute(
        """
        CREATE TABLE rag.documents (
            id            bigserial PRIMARY KEY,
            source_table  text        NOT NULL,
            doc_key       text        NOT NULL,
            title         text,
            metadata      jsonb       NOT NULL DEFAULT '{}'::jsonb,
            access_groups text[]      NOT NULL DEFAULT '{}',
            content_hash  text,
            source_lsn    bigint      NOT NULL,
            source_seq    bigint      NOT NULL DEFAULT 0,
            source_txid   bigint,
            source_ts     timestamptz,
            deleted_at    timestamptz,
            indexed_at    timestamptz NOT NULL DEFAULT now(),
            CONSTRAINT uq_documents_source_key UNIQUE (source_table, doc_key)
        )
        """
    )

    op.execute(
        """
        CREATE TABLE rag.chunks (
            id            bigserial PRIMARY KEY,
            document_id   bigint      NOT NULL
                          REFERENCES rag.documents (id) ON DELETE CASCADE,
            source_table  text        NOT NULL,
            doc_key       text        NOT NULL,
            chunk_index   integer     NOT NULL,
            text          text        NOT NULL,
            text_hash     text        NOT NULL,
            embedding     vector(384) NOT NULL,
            tsv           tsvector GENERATED ALWAYS AS (to_tsvector('english', text)) STORED,
            metadata      jsonb       NOT NULL DEFAULT '{}'::jsonb,
            access_groups text[]      NOT NULL DEFAULT '{}',
            source_lsn    bigint      NOT NULL,
            source_ts     timestamptz,
            created_at    timestamptz NOT NULL DEFAULT now(),
            updated_at    timestamptz NOT NULL DEFAULT now(),
            CONSTRAINT uq_chunks_document_index UNIQUE (document_id, chunk_index)
        )
        """
    )
    op.execute(
        "CREATE INDEX ix_chunks_embedding_hnsw ON rag.chunks "
        "USING hnsw (embedding vector_cosine_ops) WITH (m = 16, ef_construction = 64)"
    )
    op.execute("CREATE INDEX ix_chunks_tsv ON rag.chunks USING gin (tsv)")
    op.execute("CREATE INDEX ix_chunks_source_key ON rag.chunks (source_table, doc_key)")
    op.execute("CREATE INDEX ix_chunks_access_groups ON rag.chunks USING gin (access_groups)")

    # Each sync worker's heartbeat and progress, read by `freshet status` and the web UI.
    op.execute(
        """
        CREATE TABLE rag.workers (
            worker_id       text PRIMARY KEY,
            group_id        text        NOT NULL,
            hostname        text        NOT NULL,
            pid             integer     NOT NULL,
            state           text        NOT NULL DEFAULT 'starting',
            started_at      timestamptz NOT NULL DEFAULT now(),
            heartbeat_at    timestamptz NOT NULL DEFAULT now(),
            events_applied  bigint      NOT NULL DEFAULT 0,
            events_skipped  bigint      NOT NULL DEFAULT 0,
            embeddings      bigint      NOT NULL DEFAULT 0,
            events_per_sec  double precision NOT NULL DEFAULT 0,
            lag             jsonb       NOT NULL DEFAULT '{}'::jsonb,
            progress        jsonb       NOT NULL DEFAULT '{}'::jsonb,
            last_error      text,
            last_error_at   timestamptz
        )
        """
    )

    # Events that could not be applied, with the original record, so they can be replayed.
    op.execute(
        """
        CREATE TABLE rag.dead_letters (
            id            bigserial PRIMARY KEY,
            topic         text        NOT NULL,
            partition     integer     NOT NULL,
            kafka_offset  bigint      NOT NULL,
            record_key    text,
            record_value  text,
            stage         text        NOT NULL,
            error_type    text        NOT NULL,
            reason        text        NOT NULL,
            created_at    timestamptz NOT NULL DEFAULT now(),
            replay_count  integer     NOT NULL DEFAULT 0,
            replayed_at   timestamptz,
            resolved_at   timestamptz,
            CONSTRAINT uq_dead_letters_position UNIQUE (topic, partition, kafka_offset)
        )
        """
    )

    # Similarity search for analysts in psql; distances are cosine distances (0 = same).
    op.execute(
        """
        CREATE FUNCTION rag.search(query vector, k integer)
        RETURNS TABLE (id bigint, document_id bigint, source_table text, doc_key text,
                       chunk_index integer, text text, metadata jsonb, access_groups text[],
                       source_lsn bigint, distance double precision)
        LANGUAGE sql STABLE PARALLEL SAFE
        AS $$
            SELECT c.id, c.document_id, c.source_table, c.doc_key, c.chunk_index, c.text,
                   c.metadata, c.access_groups, c.source_lsn, c.embedding <=> $1
            FROM rag.chunks AS c
            ORDER BY c.embedding <=> $1
            LIMIT $2
        $$
        """
    )
    op.execute(
        """
        CREATE FUNCTION rag.similar(chunk_id bigint, k integer)
        RETURNS TABLE (id bigint, document_id bigint, source_table text, doc_key text,
                       chunk_index integer, text text, metadata jsonb, access_groups text[],
                       source_lsn bigint, distance double precision)
        LANGUAGE sql STABLE PARALLEL SAFE
        AS $$
            SELECT c.id, c.document_id, c.source_table, c.doc_key, c.chunk_index, c.text,
                   c.metadata, c.access_groups, c.source_lsn,
                   c.embedding <=> (SELECT q.embedding FROM rag.chunks AS q WHERE q.id = $1)
            FROM rag.chunks AS c
            WHERE c.id <> $1
            ORDER BY c.embedding <=> (SELECT q.embedding FROM rag.chunks AS q WHERE q.id = $1)
            LIMIT $2
        $$
        """
    )


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS rag.similar(bigint, integer)")
    op.execute("DROP FUNCTION IF EXISTS rag.search(vector, integer)")
    op.execute("DROP TABLE IF EXISTS rag.dead_letters")
    op.execute("DROP TABLE IF EXISTS rag.workers")
    op.execute("DROP TABLE IF EXISTS rag.chunks")
    op.execute("DROP TABLE IF EXISTS rag.documents")
