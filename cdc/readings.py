"""What the stack's state is read from: one reader for `freshet status` and the web Status page.

Both show the Debezium connector through Connect's REST API and, from schema ``rag``, the
server's version, the sync workers' heartbeats and whether the index equals its source. The
reading (the requests, the queries) lives here; each caller shapes the result its own way
(``freshet.cdc.stack.status`` for the command line, ``freshet.web.status.collect`` for the
page). Read-only, and light: no model, no Flask, no Kafka client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from psycopg import sql
from psycopg.rows import dict_row

from freshet.cdc.connect import ConnectClient, ConnectError, connector_state

#: Every column of rag.workers a status shows, one row a worker.
_WORKERS = """
SELECT worker_id, group_id, hostname, pid, state, started_at, heartbeat_at,
       extract(epoch FROM now() - heartbeat_at)::float8 AS heartbeat_age_s,
       events_applied, events_skipped, embeddings, events_per_sec, lag, progress,
       last_error, last_error_at
FROM rag.workers {where} ORDER BY worker_id
"""


@dataclass(frozen=True)
class ConnectReading:
    """What Connect said about the worker and the connector."""

    url: str
    name: str
    # Why Connect could not be asked (not reachable, or it refused the request); None: it answered.
    error: str | None = None
    # The worker's Kafka version (read only when asked for, and before the connector's status).
    version: str | None = None
    # The connector's status as Connect returns it; None: no such connector (or an error).
    raw: dict[str, Any] | None = None

    @property
    def reachable(self) -> bool:
        return self.error is None

    def connector(self) -> dict[str, Any]:
        """The connector and its tasks, traces included; state MISSING when not registered."""
        if self.raw is None:
            return {"name": self.name, "state": "MISSING"}
        raw = self.raw
        return {
            "name": self.name,
            "state": connector_state(raw),
            "connector_state": raw["connector"]["state"],
            "connector_trace": raw["connector"].get("trace"),
            "tasks": [
                {
                    "id": t["id"],
                    "state": t["state"],
                    "worker": t.get("worker_id"),
                    "trace": t.get("trace"),
                }
                for t in raw.get("tasks", [])
            ],
        }


def read_connect(url: str, name: str, timeout: float, *, version: bool = False) -> ConnectReading:
    """Ask Connect for its version (when ``version``) and for the connector's status."""
    client = ConnectClient(url, timeout=timeout)
    found: str | None = None
    try:
        if version:
            found = client.info().get("version")
        raw = client.status(name)
    except ConnectError as exc:
        return ConnectReading(url, name, error=str(exc), version=found)
    return ConnectReading(url, name, version=found, raw=raw)


def has_table(conn: Any, name: str) -> bool:
    return bool(conn.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone()[0])


def server_version(conn: Any) -> str | None:
    row = conn.execute("SHOW server_version").fetchone()
    return row[0] if row else None


def dead_letters(conn: Any) -> int | None:
    """Dead letters not yet resolved; None before the migrations created the table."""
    if not has_table(conn, "rag.dead_letters"):
        return None
    row = conn.execute("SELECT count(*) FROM rag.dead_letters WHERE resolved_at IS NULL").fetchone()
    return int(row[0])


def worker_rows(conn: Any, within_s: float | None = None) -> list[dict[str, Any]]:
    """rag.workers, a dict per worker (``within_s``: only those with a heartbeat that recent)."""
    if not has_table(conn, "rag.workers"):
        return []
    where: sql.Composable = sql.SQL("")
    if within_s is not None:
        where = sql.SQL("WHERE heartbeat_at > now() - {} * interval '1 second'").format(
            sql.Literal(within_s)
        )
    query = sql.SQL(_WORKERS).format(where=where)
    with conn.cursor(row_factory=dict_row) as cur:
        return list(cur.execute(query).fetchall())


def convergence(conn: Any) -> dict[str, Any]:
    """Whether the index equals its source: the last `freshet verify`, documents hidden on
    purpose, and mappings that no longer fit their tables ({} before the migrations)."""
    from freshet.sync import problems
    from freshet.sync.drift import history
    from freshet.sync.verify import last_run

    if not has_table(conn, "rag.verify_runs"):
        return {}
    hidden = conn.execute(
        "SELECT count(*) FROM rag.documents WHERE hidden_reason IS NOT NULL"
    ).fetchone()
    return {
        "verify": last_run(conn),
        "history": history(conn),
        "hidden_documents": int(hidden[0]) if hidden else 0,
        "mapping_problems": problems.current(conn),
    }


def embedding_model(conn: Any) -> dict[str, Any] | None:
    """The index's embedding model (NULL: EMBEDDING_MODEL) and a model change under way, with
    the chunks its shadow still lacks; None before migration 0013."""
    if not has_table(conn, "rag.embedding_state"):
        return None
    row = conn.execute(
        "SELECT model, generation, shadow_model, shadow_state, previous_model"
        " FROM rag.embedding_state"
    ).fetchone()
    if row is None:
        return None
    out: dict[str, Any] = {
        "model": row[0],
        "generation": int(row[1]),
        "shadow_model": row[2],
        "shadow_state": row[3],
        "previous_model": row[4],
    }
    if row[2] is not None:
        left = conn.execute("SELECT count(*) FROM rag.chunks WHERE embedding_next IS NULL")
        out["shadow_missing"] = int(left.fetchone()[0])
    return out


def text_index(conn: Any) -> dict[str, Any] | None:
    """The BM25 index: chunks and terms indexed, and chunks still waiting for
    `freshet reindex-text` (written before the index existed); None before migration 0006."""
    if not has_table(conn, "rag.text_backfill"):
        return None
    row = conn.execute(
        "SELECT c.chunks, (SELECT count(*) FROM rag.text_terms),"
        " (SELECT count(*) FROM rag.chunks WHERE id > b.done AND id <= b.upto)"
        " FROM rag.text_corpus AS c, rag.text_backfill AS b"
    ).fetchone()
    if row is None:
        return None
    return {"chunks": int(row[0]), "terms": int(row[1]), "to_backfill": int(row[2])}
