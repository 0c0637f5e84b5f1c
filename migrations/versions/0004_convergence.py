"""Convergence: hidden documents, TRUNCATE watermarks, storable dead letters, mapping problems,
and the results of `freshet verify`.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A document whose source row exists but cannot be served as it is now (a row over the
    # event size limit, a mapping that no longer fits the table): it keeps its version, has no
    # chunks and stays out of every read (deleted_at is set) until the cause is fixed.
    op.execute("ALTER TABLE rag.documents ADD COLUMN hidden_reason text")
    op.execute(
        "COMMENT ON COLUMN rag.documents.hidden_reason IS 'why a row that exists in the source "
        "is not served (fail closed); NULL for a served or deleted document'"
    )

    # The newest TRUNCATE of each captured table: an upsert of that table older than it (by
    # source LSN) changes nothing, whatever partition it comes from and whenever it is read.
    op.execute(
        """
        CREATE TABLE rag.truncations (
            source_table      text        PRIMARY KEY,
            source_lsn        bigint      NOT NULL,
            truncated_at      timestamptz NOT NULL DEFAULT now(),
            documents_removed bigint      NOT NULL DEFAULT 0
        )
        """
    )

    # Dead letters keep what the record was even when its bytes cannot be stored as they are:
    # size and digest of the original, and whether the stored copy was cut.
    op.execute(
        """
        ALTER TABLE rag.dead_letters
            ADD COLUMN record_size   bigint,
            ADD COLUMN record_sha256 text,
            ADD COLUMN truncated     boolean NOT NULL DEFAULT false,
            ADD COLUMN source_table  text,
            ADD COLUMN doc_key       text
        """
    )
    op.execute(
        "CREATE INDEX ix_dead_letters_open ON rag.dead_letters (source_table, doc_key)"
        " WHERE resolved_at IS NULL"
    )

    # A mapping that no longer fits its table (a renamed, dropped or retyped column), one row
    # per table and column, for `freshet status`, the metrics endpoint and the status page.
    op.execute(
        """
        CREATE TABLE rag.mapping_problems (
            source_table  text        NOT NULL,
            column_name   text        NOT NULL,
            problem       text        NOT NULL,
            occurrences   bigint      NOT NULL DEFAULT 1,
            sample_key    text,
            first_seen_at timestamptz NOT NULL DEFAULT now(),
            last_seen_at  timestamptz NOT NULL DEFAULT now(),
            CONSTRAINT pk_mapping_problems PRIMARY KEY (source_table, column_name)
        )
        """
    )

    # Each run of `freshet verify`: what it compared and what differed.
    op.execute(
        """
        CREATE TABLE rag.verify_runs (
            id           bigserial   PRIMARY KEY,
            started_at   timestamptz NOT NULL DEFAULT now(),
            finished_at  timestamptz,
            tables       text[]      NOT NULL DEFAULT '{}',
            rows_checked bigint      NOT NULL DEFAULT 0,
            counts       jsonb       NOT NULL DEFAULT '{}'::jsonb,
            samples      jsonb       NOT NULL DEFAULT '{}'::jsonb,
            in_sync      boolean,
            repair       jsonb
        )
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS rag.verify_runs")
    op.execute("DROP TABLE IF EXISTS rag.mapping_problems")
    op.execute("DROP INDEX IF EXISTS rag.ix_dead_letters_open")
    op.execute(
        "ALTER TABLE rag.dead_letters DROP COLUMN record_size, DROP COLUMN record_sha256,"
        " DROP COLUMN truncated, DROP COLUMN source_table, DROP COLUMN doc_key"
    )
    op.execute("DROP TABLE IF EXISTS rag.truncations")
    op.execute("ALTER TABLE rag.documents DROP COLUMN hidden_reason")
