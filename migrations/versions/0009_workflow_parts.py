"""Fan-in of declared workflows: the answers to the sub-questions of one request, gathered by
a synthesize step (any of its workers) until every part is there.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE rag.workflow_parts (
            parent      text        NOT NULL,
            part        integer     NOT NULL CHECK (part >= 1),
            parts       integer     NOT NULL CHECK (parts >= part),
            body        jsonb       NOT NULL,
            received_at timestamptz NOT NULL DEFAULT now(),
            CONSTRAINT pk_workflow_parts PRIMARY KEY (parent, part)
        )
        """
    )
    op.execute(
        "COMMENT ON TABLE rag.workflow_parts IS 'the raw answers to the sub-questions of one "
        "request (declared workflows: decompose -> ... -> synthesize); the first copy of a "
        "part is kept, a redelivered one changes nothing'"
    )
    op.execute("CREATE INDEX ix_workflow_parts_received_at ON rag.workflow_parts (received_at)")


def downgrade() -> None:
    op.execute("DROP TABLE rag.workflow_parts")
