"""Answers by request id, shared by every web process and the async workflow's steps.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE rag.answers (
            id          text        PRIMARY KEY,
            question    text        NOT NULL,
            asked_by    text        NOT NULL,
            status      text        NOT NULL
                CHECK (status IN ('pending', 'approved', 'rejected', 'failed')),
            answer      jsonb,
            violations  jsonb       NOT NULL DEFAULT '[]'::jsonb,
            error       text,
            created_at  timestamptz NOT NULL DEFAULT now(),
            updated_at  timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    op.execute(
        "COMMENT ON TABLE rag.answers IS 'answers by request id: pending while the async "
        "workflow works, then approved or rejected by the answer rules, or failed'"
    )
    op.execute("CREATE INDEX ix_answers_created_at ON rag.answers (created_at)")


def downgrade() -> None:
    op.execute("DROP TABLE rag.answers")
