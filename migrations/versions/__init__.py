"""Alembic revisions of schema `rag`, oldest first."""
