"""Stale citations: the rows each approved answer cited, the newest change of each source row
the stale watcher has seen, and the changes that made an answer stale (an outbox: each is
published once to rag.answers.stale).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE rag.answer_citations (
            answer_id    text   NOT NULL,
            source_table text   NOT NULL,
            doc_key      text   NOT NULL,
            source_lsn   bigint NOT NULL,
            CONSTRAINT pk_answer_citations PRIMARY KEY (answer_id, source_table, doc_key)
        )
        """
    )
    op.execute(
        "CREATE INDEX ix_answer_citations_row ON rag.answer_citations (source_table, doc_key)"
    )
    op.execute(
        "COMMENT ON TABLE rag.answer_citations IS 'the source rows (table, key, LSN) each "
        "approved answer cited: the stale watcher marks the answer stale when one changes'"
    )
    op.execute(
        """
        CREATE TABLE rag.source_changes (
            source_table text        NOT NULL,
            doc_key      text        NOT NULL,
            lsn          bigint      NOT NULL,
            op           text        NOT NULL,
            committed_at timestamptz,
            seen_at      timestamptz NOT NULL DEFAULT now(),
            CONSTRAINT pk_source_changes PRIMARY KEY (source_table, doc_key)
        )
        """
    )
    op.execute(
        "COMMENT ON TABLE rag.source_changes IS 'the newest change of each source row seen on "
        "the change topics (doc_key empty: a TRUNCATE of the whole table), so that an answer "
        "kept after the change it missed is stale at once'"
    )
    op.execute(
        """
        CREATE TABLE rag.answer_stale (
            answer_id    text        NOT NULL,
            source_table text        NOT NULL,
            doc_key      text        NOT NULL,
            cited_lsn    bigint      NOT NULL,
            changed_lsn  bigint      NOT NULL,
            op           text        NOT NULL,
            committed_at timestamptz,
            detected_at  timestamptz NOT NULL DEFAULT now(),
            published_at timestamptz,
            CONSTRAINT pk_answer_stale PRIMARY KEY (answer_id, source_table, doc_key, changed_lsn)
        )
        """
    )
    op.execute(
        "CREATE INDEX ix_answer_stale_unpublished ON rag.answer_stale (detected_at)"
        " WHERE published_at IS NULL"
    )
    op.execute(
        "COMMENT ON TABLE rag.answer_stale IS 'each change of a cited row after an answer cited "
        "it (one row per answer and change); published_at: when its event went to "
        "rag.answers.stale'"
    )
    op.execute("ALTER TABLE rag.answers ADD COLUMN stale_at timestamptz")
    op.execute(
        "COMMENT ON COLUMN rag.answers.stale_at IS 'when a row the answer cited first changed "
        "after it was cited (null: every citation is current)'"
    )


def downgrade() -> None:
    op.execute("ALTER TABLE rag.answers DROP COLUMN stale_at")
    op.execute("DROP TABLE rag.answer_stale")
    op.execute("DROP TABLE rag.source_changes")
    op.execute("DROP TABLE rag.answer_citations")
