"""What the admin status page shows: index counts, dead letters, workers, connector state.

Read-only. A part that cannot be reached is reported as such (state DOWN / UNKNOWN) instead of
failing the whole request. What it shares with `freshet status` (the connector, the workers'
heartbeats, the server version, convergence) is read by ``freshet.cdc.readings``; this module
adds the index counts and shapes the page's JSON.
"""

from __future__ import annotations

import logging
from typing import Any

from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from freshet.cdc import readings
from freshet.settings import Settings

logger = logging.getLogger(__name__)

_COUNTS = """
SELECT
  (SELECT count(*) FROM rag.documents WHERE deleted_at IS NULL) AS documents,
  (SELECT count(*) FROM rag.documents WHERE deleted_at IS NOT NULL) AS deleted_documents,
  (SELECT count(*) FROM rag.chunks) AS chunks,
  (SELECT count(*) FROM rag.dead_letters WHERE resolved_at IS NULL) AS dead_letters,
  (SELECT max(source_ts) FROM rag.documents) AS newest_source_ts,
  (SELECT max(indexed_at) FROM rag.documents) AS last_indexed_at,
  (SELECT count(*) FROM rag.answers WHERE status = 'pending') AS answers_pending,
  (SELECT count(*) FROM rag.answers WHERE status = 'approved') AS answers_approved,
  (SELECT count(*) FROM rag.answers WHERE status = 'rejected') AS answers_rejected,
  (SELECT count(*) FROM rag.answers WHERE status = 'failed') AS answers_failed
"""


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v.isoformat() if hasattr(v, "isoformat") else v for k, v in row.items()}


def database_status(pool: ConnectionPool) -> dict[str, Any]:
    """Counts and worker heartbeats from schema rag."""
    try:
        with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            counts = cur.execute(_COUNTS).fetchone() or {}
            workers = readings.worker_rows(conn)
            version = readings.server_version(conn)
            convergence = readings.convergence(conn)
    except Exception as exc:  # noqa: BLE001 - status reports, it does not fail
        logger.warning("status: database unreachable: %s", exc)
        return {"postgres": {"state": "DOWN", "error": str(exc).strip().splitlines()[0]}}
    return {
        "postgres": {"state": "RUNNING", "version": version},
        "index": _jsonable(dict(counts)),
        "dead_letters": counts.get("dead_letters"),
        "workers": [_jsonable(dict(w)) for w in workers],
        "convergence": convergence,
    }


def connector_status(settings: Settings, timeout: float) -> dict[str, Any]:
    """The Debezium connector and its tasks through Connect's REST API; UNKNOWN if unreachable."""
    reading = readings.read_connect(settings.connect_rest_url, settings.connector_name, timeout)
    name = settings.connector_name
    if not reading.reachable:
        return {
            "connect": {
                "url": settings.connect_rest_url,
                "state": "UNKNOWN",
                "error": reading.error,
            },
            "connector": {"name": name, "state": "UNKNOWN", "tasks": []},
        }
    connect = {"url": settings.connect_rest_url, "state": "RUNNING"}
    if reading.raw is None:
        return {"connect": connect, "connector": {"name": name, "state": "MISSING", "tasks": []}}
    full = reading.connector()  # the page shows no traces
    return {
        "connect": connect,
        "connector": {
            "name": name,
            "state": full["state"],
            "connector_state": full["connector_state"],
            "tasks": [
                {"id": t["id"], "state": t["state"], "worker": t["worker"]} for t in full["tasks"]
            ],
        },
    }


def collect(
    pool: ConnectionPool | None, settings: Settings, timeout: float, problem: str | None = None
) -> dict[str, Any]:
    """Everything the status page shows; ``problem`` says why there is no pool, if none."""
    result: dict[str, Any] = (
        database_status(pool)
        if pool is not None
        else {"postgres": {"state": "DOWN", "error": problem or "no database configured"}}
    )
    result.update(connector_status(settings, timeout))
    return result
