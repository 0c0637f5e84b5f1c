"""Deadlines and step progress for async answers: a request past its deadline ends as
``timeout`` (not lost), and every step that finished a request is recorded, so GET
/api/v1/answers/<id> and the ask page show the steps as they complete.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("ALTER TABLE rag.answers DROP CONSTRAINT IF EXISTS answers_status_check")
    op.execute(
        "ALTER TABLE rag.answers ADD CONSTRAINT answers_status_check CHECK (status IN"
        " ('pending', 'approved', 'rejected', 'failed', 'timeout'))"
    )
    op.execute("ALTER TABLE rag.answers ADD COLUMN deadline timestamptz")
    op.execute(
        "COMMENT ON COLUMN rag.answers.deadline IS 'when a pending async request ends as "
        "timeout if no step has finished it (null: no deadline)'"
    )
    op.execute(
        "CREATE INDEX ix_answers_pending_deadline ON rag.answers (deadline)"
        " WHERE status = 'pending' AND deadline IS NOT NULL"
    )
    op.execute(
        """
        CREATE TABLE rag.answer_steps (
            request_id  text        NOT NULL,
            step        text        NOT NULL,
            part        integer     NOT NULL DEFAULT 0 CHECK (part >= 0),
            parts       integer     NOT NULL DEFAULT 0 CHECK (parts >= 0),
            done_at     timestamptz NOT NULL DEFAULT now(),
            CONSTRAINT pk_answer_steps PRIMARY KEY (request_id, step, part)
        )
        """
    )
    op.execute(
        "COMMENT ON TABLE rag.answer_steps IS 'the workflow steps that finished each async "
        "request (part: the sub-question, 0 for the whole request); the first time counts'"
    )
    op.execute("CREATE INDEX ix_answer_steps_done_at ON rag.answer_steps (done_at)")


def downgrade() -> None:
    op.execute("DROP TABLE rag.answer_steps")
    op.execute("DROP INDEX rag.ix_answers_pending_deadline")
    op.execute("ALTER TABLE rag.answers DROP COLUMN deadline")
    op.execute("UPDATE rag.answers SET status = 'failed' WHERE status = 'timeout'")
    op.execute("ALTER TABLE rag.answers DROP CONSTRAINT answers_status_check")
    op.execute(
        "ALTER TABLE rag.answers ADD CONSTRAINT answers_status_check CHECK (status IN"
        " ('pending', 'approved', 'rejected', 'failed'))"
    )
