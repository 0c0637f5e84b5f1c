"""Mapping problems: a mapping that no longer fits its table (a renamed, dropped or retyped
column), counted per table and column in rag.mapping_problems, which `freshet status`, the
metrics endpoint and the status page show. Collected during a batch, written with it."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import psycopg

logger = logging.getLogger(__name__)


@dataclass
class Problems:
    """(table, column) -> [problem, occurrences, a sample document key]."""

    found: dict[tuple[str, str], list[Any]] = field(default_factory=dict)

    def add(self, table: str, column: str, problem: str, doc_key: str) -> None:
        entry = self.found.get((table, column))
        if entry is None:
            self.found[(table, column)] = [problem, 1, doc_key]
        else:
            entry[0] = problem
            entry[1] += 1

    def merge(self, other: Problems) -> None:
        for (table, column), (problem, count, key) in other.found.items():
            entry = self.found.setdefault((table, column), [problem, 0, key])
            entry[0] = problem
            entry[1] += count

    def __len__(self) -> int:
        return sum(entry[1] for entry in self.found.values())


def _clean(text: str, limit: int) -> str:
    return text.replace("\x00", "\\0").encode("utf-8", "backslashreplace").decode()[:limit]


def record(conn: psycopg.Connection, problems: Problems) -> None:
    """Count the batch's problems (in the caller's transaction) and log each once a batch."""
    for (table, column), (problem, count, key) in sorted(problems.found.items()):
        logger.warning(
            "mapping of %s does not fit the table: column %s: %s (%d events, e.g. key %s)",
            table,
            column,
            problem,
            count,
            key,
        )
        conn.execute(
            "INSERT INTO rag.mapping_problems (source_table, column_name, problem, occurrences,"
            " sample_key) VALUES (%s, %s, %s, %s, %s)"
            " ON CONFLICT (source_table, column_name) DO UPDATE SET problem = EXCLUDED.problem,"
            " occurrences = rag.mapping_problems.occurrences + EXCLUDED.occurrences,"
            " sample_key = EXCLUDED.sample_key, last_seen_at = now()",
            (
                _clean(table, 200),
                _clean(column, 200),
                _clean(problem, 2000),
                count,
                _clean(key, 200),
            ),
        )


def current(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """Every recorded problem, newest first."""
    rows = conn.execute(
        "SELECT source_table, column_name, problem, occurrences, sample_key, first_seen_at,"
        " last_seen_at FROM rag.mapping_problems ORDER BY last_seen_at DESC"
    ).fetchall()
    return [
        {
            "table": r[0],
            "column": r[1],
            "problem": r[2],
            "occurrences": r[3],
            "sample_key": r[4],
            "first_seen_at": r[5].isoformat(),
            "last_seen_at": r[6].isoformat(),
        }
        for r in rows
    ]


def clear(conn: psycopg.Connection, table: str, columns: list[str]) -> None:
    """Forget the problems of ``columns`` of ``table`` (the mapping fits them again)."""
    conn.execute(
        "DELETE FROM rag.mapping_problems WHERE source_table = %s AND column_name = ANY(%s)",
        (table, columns),
    )
