"""Alembic migrations of schema `rag` (env.py, versions/): data of the freshet package."""
