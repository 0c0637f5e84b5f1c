"""Read a captured row by its key from the source database, for the one case the change event
cannot be completed from the index: a column Debezium did not send (unchanged TOAST) for a key
the index has never stored, as after `UPDATE ... SET id = id + 1` on a row with a large body.

The row read is the row as it is now, which may be newer than the event; the event's version is
kept, so a later event of the row re-applies it as usual. Values are returned in the shapes the
Debezium JSON converter uses (text, text[] as lists, JSON and numerics as strings, bytes as
base64), so a filled-in column reads like one the event carried.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import json
import logging
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from freshet.sync.mapping import TableMapping

logger = logging.getLogger(__name__)


def debezium_value(value: Any) -> Any:
    """A psycopg value in the shape Debezium's JSON converter gives the same column."""
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, decimal.Decimal | uuid.UUID):
        return str(value)
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(dt.UTC)
            return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return value.isoformat()
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, list):
        return [debezium_value(v) for v in value]
    return value


@dataclass
class SourceRows:
    """Rows of captured tables by primary key; one lazily opened connection, reopened after a
    failure (the caller retries the batch on a transient error)."""

    connect: Callable[[], psycopg.Connection]
    _conn: psycopg.Connection | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def fetch(
        self, mapping: TableMapping, key: Mapping[str, Any], columns: Sequence[str]
    ) -> dict[str, Any] | None:
        """``columns`` of the row whose key columns equal ``key``; None when there is none."""
        schema, table = mapping.table.split(".", 1)
        query = sql.SQL("SELECT {} FROM {}.{} WHERE {}").format(
            sql.SQL(", ").join(sql.Identifier(c) for c in columns),
            sql.Identifier(schema),
            sql.Identifier(table),
            sql.SQL(" AND ").join(
                sql.SQL("{} = {}").format(sql.Identifier(c), sql.Placeholder()) for c in mapping.key
            ),
        )
        params = [key[c] for c in mapping.key]
        with self._lock:
            conn = self._connection()
            try:
                row = conn.cursor(row_factory=dict_row).execute(query, params).fetchone()
            except psycopg.Error:
                conn.close()
                self._conn = None
                raise
        if row is None:
            return None
        return {name: debezium_value(value) for name, value in row.items()}

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = self.connect()
            self._conn.autocommit = True
        return self._conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
