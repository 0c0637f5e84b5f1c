"""The SQL search functions walk the HNSW graph until they have k rows.

Rows deleted but not yet vacuumed stay in the HNSW graph and take up hnsw.ef_search's
candidates, and a filtered search (rag.search_hybrid with groups) discards candidates of other
groups: with pgvector's iterative scan off (the server's default), a call could return fewer
than k rows. Each function now sets it for its own execution: rag.search and rag.similar in
strict distance order, rag.search_hybrid's dense half in relaxed order (it ranks its
candidates again itself), as the app's retriever does.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FUNCTIONS = {
    "rag.search(vector, integer)": "strict_order",
    "rag.similar(bigint, integer)": "strict_order",
    "rag.search_hybrid(vector, text, integer, text[], boolean, double precision, integer)": (
        "relaxed_order"
    ),
}


def upgrade() -> None:
    for function, scan in FUNCTIONS.items():
        op.execute(f"ALTER FUNCTION {function} SET hnsw.iterative_scan = '{scan}'")


def downgrade() -> None:
    for function in FUNCTIONS:
        op.execute(f"ALTER FUNCTION {function} RESET hnsw.iterative_scan")
