"""The web tier under abuse: answer capabilities (anonymous askers never share an identity) and
rate-limit buckets shared by every web process.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # SHA-256 digests only: the secret goes to the asker once, the session lives in their cookie.
    op.execute("ALTER TABLE rag.answers ADD COLUMN secret_hash text, ADD COLUMN session_hash text")
    op.execute(
        "COMMENT ON COLUMN rag.answers.secret_hash IS 'sha256 of the secret an anonymous asker "
        "was given with the answer; with it the answer can be read again'"
    )
    op.execute(
        "COMMENT ON COLUMN rag.answers.session_hash IS 'sha256 of the anonymous asker''s "
        "session cookie; that session can read the answer again'"
    )

    # One token bucket per (route, caller). Unlogged: a bucket is worth a few seconds of
    # history, not WAL; after a crash the table is empty, which means full buckets. No index
    # but the key, and room on each page, so that every update is a HOT update; the pruning
    # DELETE (once a minute per web process) scans a table of recent callers only.
    op.execute(
        """
        CREATE UNLOGGED TABLE rag.rate_limits (
            route       text             NOT NULL,
            caller      text             NOT NULL,
            tokens      double precision NOT NULL,
            admitted    boolean          NOT NULL,
            updated_at  timestamptz      NOT NULL,
            CONSTRAINT pk_rate_limits PRIMARY KEY (route, caller)
        ) WITH (fillfactor = 50)
        """
    )
    op.execute(
        "COMMENT ON TABLE rag.rate_limits IS 'rate-limit token buckets of the web API, shared by "
        "every web process; a row idle long enough to be full again is deleted'"
    )


def downgrade() -> None:
    op.execute("DROP TABLE rag.rate_limits")
    op.execute("ALTER TABLE rag.answers DROP COLUMN session_hash, DROP COLUMN secret_hash")
