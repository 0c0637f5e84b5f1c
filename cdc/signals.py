"""Debezium signals through the signal table (the `source` channel).

An INSERT into freshet_cdc.signal travels through the replication stream to the connector,
which then runs an incremental snapshot of the named tables, interleaved with live changes.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence

import psycopg

_TABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*$")


def request_snapshot(conn: psycopg.Connection, tables: Sequence[str]) -> str:
    """Ask the connector for an incremental snapshot of `schema.table` names; returns the id."""
    bad = [t for t in tables if not _TABLE.match(t)]
    if bad:
        raise ValueError(f"not schema.table names: {', '.join(bad)}")
    signal_id = str(uuid.uuid4())
    data = json.dumps({"data-collections": list(tables), "type": "incremental"})
    conn.execute(
        "INSERT INTO freshet_cdc.signal (id, type, data) VALUES (%s, 'execute-snapshot', %s)",
        (signal_id, data),
    )
    return signal_id
