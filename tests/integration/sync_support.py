"""Helpers for the sync worker's integration tests: source writes and index inspection."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import psycopg

from freshet.db import connect, database_url, source_database_url
from freshet.embedder import Embedder
from freshet.settings import Settings
from freshet.sync.chunking import Chunker
from freshet.sync.mapping import Mappings
from tests.conftest import wait_for
from tests.integration.conftest import WorkerThread


def source(settings: Settings) -> psycopg.Connection:
    return connect(source_database_url(settings), autocommit=True)


def index(settings: Settings) -> psycopg.Connection:
    return connect(database_url(settings), autocommit=True, vector=True)


def chunk_texts(conn: psycopg.Connection, table: str, key: Any) -> list[str]:
    rows = conn.execute(
        "SELECT text FROM rag.chunks WHERE source_table = %s AND doc_key = %s ORDER BY chunk_index",
        (table, str(key)),
    ).fetchall()
    return [r[0] for r in rows]


def chunk_ids(conn: psycopg.Connection, table: str, key: Any) -> list[int]:
    rows = conn.execute(
        "SELECT id FROM rag.chunks WHERE source_table = %s AND doc_key = %s ORDER BY chunk_index",
        (table, str(key)),
    ).fetchall()
    return [r[0] for r in rows]


def document_version(conn: psycopg.Connection, table: str, key: Any) -> tuple[int, int] | None:
    row = conn.execute(
        "SELECT source_lsn, source_seq FROM rag.documents WHERE source_table = %s AND doc_key = %s",
        (table, str(key)),
    ).fetchone()
    return None if row is None else (row[0], row[1])


def search_keys(
    conn: psycopg.Connection, embedder: Embedder, query: str, k: int = 5
) -> list[tuple[str, str]]:
    vector = embedder.embed([query])[0]
    rows = conn.execute(
        "SELECT source_table, doc_key FROM rag.search(%s, %s)", (vector, k)
    ).fetchall()
    return [(r[0], r[1]) for r in rows]


def caught_up(worker: WorkerThread, timeout: float = 600) -> None:
    """Until the worker has an assignment and no lag (its heartbeat measures lag every 2 s)."""

    def done() -> bool:
        lag = worker.worker.metrics.lag
        return bool(lag) and sum(lag.values()) == 0

    assert wait_for(done, timeout, interval=0.5), (
        f"worker not caught up: {worker.worker.metrics.lag}"
    )


def expected_index(
    settings: Settings, chunker: Chunker, table: str, where: str, params: tuple[Any, ...]
) -> dict[str, tuple[str, list[str]]]:
    """doc_key -> (content hash, chunk hashes) computed from the source rows right now."""
    mapping = Mappings.load(settings.mappings_path).get(table)
    assert mapping is not None
    schema, name = table.split(".")
    with source(settings) as conn:
        cur = conn.cursor(row_factory=psycopg.rows.dict_row)
        query = psycopg.sql.SQL("SELECT * FROM {}.{} WHERE ").format(
            psycopg.sql.Identifier(schema), psycopg.sql.Identifier(name)
        ) + psycopg.sql.SQL(where)  # type: ignore[arg-type]
        rows = cur.execute(query, params).fetchall()
    result = {}
    for row in rows:
        doc = mapping.map_row(row)
        result[doc.doc_key] = (
            hashlib.sha256(doc.text.encode()).hexdigest(),
            [c.hash for c in chunker.chunk(doc.text)],
        )
    return result


def indexed(settings: Settings, table: str, keys: list[str]) -> dict[str, tuple[str, list[str]]]:
    """doc_key -> (content hash, chunk hashes by index) as stored in the index."""
    with index(settings) as conn:
        rows = conn.execute(
            "SELECT d.doc_key, d.content_hash,"
            " coalesce(array_agg(c.text_hash ORDER BY c.chunk_index)"
            "   FILTER (WHERE c.id IS NOT NULL), '{}')"
            " FROM rag.documents d LEFT JOIN rag.chunks c ON c.document_id = d.id"
            " WHERE d.source_table = %s AND d.doc_key = ANY(%s) AND d.deleted_at IS NULL"
            " GROUP BY d.doc_key, d.content_hash",
            (table, keys),
        ).fetchall()
    return {r[0]: (r[1], list(r[2])) for r in rows}


def probe_table(settings: Settings, table: str, folder: Path) -> Path:
    """A captured table ``table`` (id, title, body) of a test's own, and a mapping file in
    ``folder`` that maps that table only (a worker with it skips every other table's events)."""
    mappings = folder / "mappings.toml"
    mappings.write_text(
        f'[tables."{table}"]\nkey = ["id"]\ntitle = "{{title}}"\ntext = "{{body}}"\n'
    )
    with connect(source_database_url(settings), autocommit=True) as src:
        src.execute(
            f"CREATE TABLE IF NOT EXISTS {table} (id int PRIMARY KEY, title text NOT NULL,"
            " body text NOT NULL)"
        )
    return mappings
