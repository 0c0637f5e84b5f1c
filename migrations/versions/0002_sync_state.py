"""Sync state on documents: the mapped source row (for TOAST gaps) and the Kafka position of
the event that set the current version; chunk index uniqueness checked at commit.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE rag.documents
            ADD COLUMN source_row      jsonb   NOT NULL DEFAULT '{}'::jsonb,
            ADD COLUMN kafka_topic     text,
            ADD COLUMN kafka_partition integer
        """
    )
    op.execute("COMMENT ON COLUMN rag.documents.source_seq IS 'Kafka offset of the event'")
    # A document's chunks are renumbered in place when a paragraph is inserted or removed;
    # uniqueness of (document_id, chunk_index) holds at commit, not after each statement.
    op.execute("ALTER TABLE rag.chunks DROP CONSTRAINT uq_chunks_document_index")
    op.execute(
        "ALTER TABLE rag.chunks ADD CONSTRAINT uq_chunks_document_index "
        "UNIQUE (document_id, chunk_index) DEFERRABLE INITIALLY DEFERRED"
    )
    op.execute("CREATE INDEX ix_chunks_document_hash ON rag.chunks (document_id, text_hash)")


def downgrade() -> None:
    op.execute("DROP INDEX IF EXISTS rag.ix_chunks_document_hash")
    op.execute("ALTER TABLE rag.chunks DROP CONSTRAINT uq_chunks_document_index")
    op.execute(
        "ALTER TABLE rag.chunks ADD CONSTRAINT uq_chunks_document_index "
        "UNIQUE (document_id, chunk_index)"
    )
    op.execute(
        "ALTER TABLE rag.documents DROP COLUMN source_row, DROP COLUMN kafka_topic, "
        "DROP COLUMN kafka_partition"
    )
