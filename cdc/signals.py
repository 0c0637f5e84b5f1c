"""Debezium signals through the signal table (the `source` channel).

An INSERT into freshet_cdc.signal travels through the replication stream to the connector,
which then runs an incremental snapshot of the named tables, interleaved with live changes.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence

import psycopg

_TABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*$")


def request_snapshot(
    conn: psycopg.Connection,
    tables: Sequence[str],
    conditions: Mapping[str, str] | None = None,
) -> str:
    """Ask the connector for an incremental snapshot of `schema.table` names, each limited to
    the rows its SQL condition selects when one is given; returns the signal id."""
    bad = [t for t in tables if not _TABLE.match(t)]
    if bad:
        raise ValueError(f"not schema.table names: {', '.join(bad)}")
    signal_id = str(uuid.uuid4())
    request: dict[str, object] = {"data-collections": list(tables), "type": "incremental"}
    if conditions:
        request["additional-conditions"] = [
            {"data-collection": table, "filter": condition}
            for table, condition in conditions.items()
        ]
    data = json.dumps(request)
    conn.execute(
        "INSERT INTO freshet_cdc.signal (id, type, data) VALUES (%s, 'execute-snapshot', %s)",
        (signal_id, data),
    )
    return signal_id
