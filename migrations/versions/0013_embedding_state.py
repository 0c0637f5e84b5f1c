"""The index's embedding model, and a shadow embedding while `freshet reembed` builds one.

rag.embedding_state has one row: the model whose vectors are in rag.chunks.embedding (NULL:
the EMBEDDING_MODEL setting, an index that never changed model), a generation that grows by one
at each switch, and the shadow being built (rag.chunks.embedding_next, a column `freshet
reembed` adds with the new model's dimension). rag.embedding_generation() lets a search
statement check, in its own snapshot, that the query was embedded with the index's model.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE rag.embedding_state (
            one             boolean     PRIMARY KEY DEFAULT true CHECK (one),
            generation      bigint      NOT NULL DEFAULT 0,
            model           text,
            dim             integer,
            switched_at     timestamptz,
            previous_model  text,
            shadow_model    text,
            shadow_dim      integer,
            shadow_state    text CHECK (shadow_state IN ('building', 'refused')),
            shadow_started  timestamptz,
            gate            jsonb
        )
        """
    )
    op.execute("INSERT INTO rag.embedding_state DEFAULT VALUES")
    op.execute(
        """
        CREATE FUNCTION rag.embedding_generation() RETURNS bigint
        LANGUAGE sql STABLE PARALLEL SAFE
        AS $$ SELECT generation FROM rag.embedding_state $$
        """
    )


def downgrade() -> None:
    op.execute("DROP INDEX IF EXISTS rag.ix_chunks_embedding_next_hnsw")
    op.execute("DROP INDEX IF EXISTS rag.ix_chunks_embedding_previous_hnsw")
    op.execute("ALTER TABLE rag.chunks DROP COLUMN IF EXISTS embedding_next")
    op.execute("ALTER TABLE rag.chunks DROP COLUMN IF EXISTS embedding_previous")
    op.execute("DROP FUNCTION IF EXISTS rag.embedding_generation()")
    op.execute("DROP TABLE IF EXISTS rag.embedding_state")
