"""`freshet verify --repair`: fix what verify found through the pipeline, never around it.

- A row whose document is missing, stale, duplicated, hidden or has the wrong access groups is
  re-read by Debezium: an incremental snapshot of exactly those keys (the signal table, with an
  `additional-conditions` filter), so the fix arrives as a change event like any other and the
  sync worker applies it under the usual version rules.
- A served document whose row is gone is removed the way a delete removes it, guarded by
  version: it is marked deleted at the source's current WAL position only if its version is
  still the one verify saw, so a change that arrived meanwhile always wins, and any older event
  replayed later changes nothing.
Unmappable rows are not touched: the mapping must be fixed first.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql

from freshet.cdc.signals import request_snapshot
from freshet.sync.mapping import TableMapping
from freshet.sync.verify import TableReport

logger = logging.getLogger(__name__)

# The kinds an incremental snapshot of the row fixes.
RESNAPSHOT = ("missing", "stale", "acl", "duplicated", "hidden")
KEYS_PER_SIGNAL = 500


def key_filter(
    conn: psycopg.Connection, mapping: TableMapping, keys: Sequence[tuple[Any, ...]]
) -> str:
    """A SQL condition selecting exactly these key values, for Debezium's snapshot filter."""
    columns = sql.SQL(", ").join(sql.Identifier(c) for c in mapping.key)
    values = sql.SQL(", ").join(
        sql.SQL("({})").format(sql.SQL(", ").join(sql.Literal(v) for v in key)) for key in keys
    )
    return sql.SQL("({}) IN ({})").format(columns, values).as_string(conn)


def resnapshot(
    source: psycopg.Connection, mapping: TableMapping, report: TableReport
) -> tuple[int, list[str]]:
    """Ask Debezium to re-read every row of ``report`` that a snapshot fixes; returns how many
    keys and the signal ids."""
    keys = sorted(
        {key for kind in RESNAPSHOT for key in report.found[kind] if key in report.key_values}
    )
    signals = []
    for start in range(0, len(keys), KEYS_PER_SIGNAL):
        batch = [report.key_values[k] for k in keys[start : start + KEYS_PER_SIGNAL]]
        condition = key_filter(source, mapping, batch)
        signals.append(request_snapshot(source, [mapping.table], {mapping.table: condition}))
    if keys:
        logger.warning(
            "repair: incremental snapshot of %d rows of %s requested", len(keys), mapping.table
        )
    return len(keys), signals


def remove_orphans(
    source: psycopg.Connection,
    index: psycopg.Connection,
    mapping: TableMapping,
    report: TableReport,
) -> int:
    """Remove the documents of rows that are gone, each guarded by the version verify saw."""
    if not report.orphans:
        return 0
    removed = 0
    for key, (doc_id, lsn, seq) in sorted(report.orphans.items()):
        # The row is gone now and any later insert of it commits after this WAL position, so
        # its event outranks the removal.
        position = source.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()
        assert position is not None
        if _row_exists(source, mapping, key):
            continue
        with index.transaction():
            row = index.execute(
                "UPDATE rag.documents SET deleted_at = coalesce(deleted_at, now()),"
                " hidden_reason = NULL, source_row = '{}'::jsonb, content_hash = NULL,"
                " source_lsn = %s, source_seq = 0, indexed_at = now()"
                " WHERE id = %s AND source_lsn = %s AND source_seq = %s RETURNING id",
                (int(position[0]), doc_id, lsn, seq),
            ).fetchone()
            if row is None:
                continue  # a change arrived since verify looked: it wins
            index.execute("DELETE FROM rag.chunks WHERE document_id = %s", (doc_id,))
        removed += 1
    if removed:
        logger.warning("repair: removed %d orphaned documents of %s", removed, mapping.table)
    return removed


def _row_exists(source: psycopg.Connection, mapping: TableMapping, key: str) -> bool:
    """Whether the row of document key ``key`` exists (the key parsed back from its text; an
    untyped literal takes the column's type, so the primary key's index is used)."""
    values = (key,) if len(mapping.key) == 1 else tuple(json.loads(key))
    condition = sql.SQL(" AND ").join(
        sql.SQL("{} = {}").format(sql.Identifier(c), sql.Literal(str(v)))
        for c, v in zip(mapping.key, values, strict=True)
    )
    schema, table = mapping.table.split(".", 1)
    query = sql.SQL("SELECT 1 FROM {}.{} WHERE {}").format(
        sql.Identifier(schema), sql.Identifier(table), condition
    )
    return source.execute(query).fetchone() is not None
