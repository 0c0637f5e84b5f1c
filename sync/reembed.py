"""Model change without downtime, behind a quality gate: `freshet reembed --model M`.

1. ``begin``: under the model lock, rag.chunks gets a shadow column ``embedding_next`` with the
   new model's dimension, and rag.embedding_state records the shadow as ``building``. From the
   next batch on, the sync worker writes both vectors for every chunk it writes
   (sync/index_models.py), so the shadow never falls behind the live changes.
2. ``backfill``: every chunk without a shadow vector gets one, in id order, in small
   transactions, at most FRESHET_REEMBED_RATE chunks/s on FRESHET_REEMBED_THREADS threads.
   The column itself is the progress: a run killed at any point resumes where it was, and a
   pass that ends reads again what was written without a shadow vector meanwhile.
3. ``build_index``: the shadow's HNSW index, built concurrently (search and the sync worker
   go on); an invalid index left by a killed build is dropped and built again.
4. The gate (sync/model_gate.py): the same query set searched with both models; the new one
   passes unless its nDCG@10 is lower by more than FRESHET_REEMBED_MAX_DROP.
5. ``switch``: one transaction under the model lock, taken exclusively (it waits for the sync
   worker's transaction in flight): the columns and indexes are renamed (catalog changes
   only), the generation grows by one. The old vectors stay in ``embedding_previous`` until
   ``drop_previous``. A refused model stays as a ``refused`` shadow (no longer written) until
   ``--force`` switches to it or ``--abort`` drops it.

Searches never fail meanwhile: a query embedded with the old model carries the old generation,
finds nothing after the switch and is embedded again with the new model
(freshet.answering.retrieval); the sync worker's batch in flight at the switch is not written
and is applied again by a worker rebuilt with the new model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from freshet.embedder import Embedder
from freshet.errors import FreshetError
from freshet.index_model import (
    ACTIVE_INDEX,
    PREVIOUS_COLUMN,
    PREVIOUS_INDEX,
    SHADOW_COLUMN,
    SHADOW_INDEX,
    IndexModel,
    read,
    read_locked,
)
from freshet.settings import Settings

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
# A switch waits this long for the locks it needs (a long transaction on rag.chunks), then
# tries again.
LOCK_TIMEOUT = "10s"


class ReembedError(FreshetError):
    """A model change that cannot go on as asked; the message says what to do."""


@dataclass(frozen=True)
class GateReport:
    old_model: str
    new_model: str
    query_set: str
    queries: int
    judged_found: int
    judged_total: int
    old_ndcg: float | None
    new_ndcg: float | None
    max_drop: float
    passed: bool
    forced: bool = False
    reason: str = ""

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        out = [
            f"quality gate on {self.query_set}: {self.queries} queries,"
            f" {self.judged_found}/{self.judged_total} judged documents in the index"
        ]
        if self.old_ndcg is not None and self.new_ndcg is not None:
            out.append(f"  nDCG@10 current model {self.old_model}: {self.old_ndcg:.4f}")
            out.append(f"  nDCG@10 new model     {self.new_model}: {self.new_ndcg:.4f}")
            out.append(
                f"  difference {self.new_ndcg - self.old_ndcg:+.4f}"
                f" (the most it may drop: {self.max_drop:g})"
            )
        if self.reason:
            out.append(f"  {self.reason}")
        verdict = "passed" if self.passed else "refused"
        out.append(
            f"  verdict: {verdict}" + (" (switching anyway: --force)" if self.forced else "")
        )
        return out


def begin(conn: psycopg.Connection[Any], settings: Settings, name: str, dim: int) -> IndexModel:
    """Start building a shadow for ``name`` (or resume one); returns the state."""
    with conn.transaction():
        conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        state = read_locked(conn, exclusive=True)
        if state.shadow_model is not None and state.shadow_model != name:
            raise ReembedError(
                f"a re-embed to {state.shadow_model} is under way ({state.shadow_state}): resume"
                f" it with `freshet reembed --model {state.shadow_model}`, or drop it with"
                " `freshet reembed --abort`"
            )
        if state.shadow_model is None:
            if name == state.active(settings):
                raise ReembedError(f"the index is embedded with {name} already")
            if state.previous_model is not None:
                raise ReembedError(
                    f"the previous embedding ({state.previous_model}) is still kept: drop it"
                    " first with `freshet reembed --drop-previous`"
                )
            conn.execute(
                f"ALTER TABLE rag.chunks ADD COLUMN IF NOT EXISTS {SHADOW_COLUMN} vector({dim})"
            )
        elif state.shadow_dim != dim:
            raise ReembedError(
                f"the shadow of {name} has {state.shadow_dim} dimensions, the model now"
                f" {dim}: drop it with `freshet reembed --abort` and start again"
            )
        conn.execute(
            "UPDATE rag.embedding_state SET shadow_model = %s, shadow_dim = %s,"
            " shadow_state = 'building', shadow_started = coalesce(shadow_started, now())",
            (name, dim),
        )
    return read(conn)


def missing(conn: psycopg.Connection[Any]) -> int:
    """Chunks without a shadow vector."""
    row = conn.execute(f"SELECT count(*) FROM rag.chunks WHERE {SHADOW_COLUMN} IS NULL").fetchone()
    return int(row[0]) if row else 0


class RateLimit:
    """At most ``rate`` items per second on average (0: no limit)."""

    def __init__(self, rate: float, sleep: Callable[[float], None] = time.sleep) -> None:
        self.rate = rate
        self.sleep = sleep
        self.started = time.monotonic()
        self.done = 0

    def add(self, count: int) -> None:
        self.done += count
        if self.rate <= 0:
            return
        ahead = self.done / self.rate - (time.monotonic() - self.started)
        if ahead > 0:
            self.sleep(ahead)


def backfill(
    conn: psycopg.Connection[Any],
    embedder: Embedder,
    *,
    batch: int,
    rate: float,
    progress: Progress | None = None,
    stop: Callable[[], bool] = lambda: False,
) -> int:
    """Give every chunk a shadow vector; returns how many were embedded. Stops early (work
    kept) when ``stop()`` is true."""
    remaining = missing(conn)
    total, done, last_id = remaining, 0, 0
    limit = RateLimit(rate)
    if progress is not None:
        progress(0, total)
    while not stop():
        rows = conn.execute(
            f"SELECT id, text, text_hash FROM rag.chunks WHERE id > %s AND {SHADOW_COLUMN}"
            " IS NULL ORDER BY id LIMIT %s",
            (last_id, batch),
        ).fetchall()
        if not rows:
            # The pass is over; what was written meanwhile without a shadow vector (before the
            # sync worker loaded the model, the large lane) is read in another pass.
            remaining = missing(conn)
            if remaining == 0:
                break
            last_id, total = 0, done + remaining
            continue
        vectors = embedder.embed([r[1] for r in rows])
        with conn.transaction(), conn.cursor() as cur:
            cur.executemany(
                f"UPDATE rag.chunks SET {SHADOW_COLUMN} = %s"
                f" WHERE id = %s AND text_hash = %s AND {SHADOW_COLUMN} IS NULL",
                [(v, r[0], r[2]) for v, r in zip(vectors, rows, strict=True)],
            )
        last_id = rows[-1][0]
        done += len(rows)
        if progress is not None:
            progress(min(done, total), max(total, done))
        limit.add(len(rows))
    return done


def build_index(conn: psycopg.Connection[Any]) -> bool:
    """The shadow's HNSW index, built concurrently (autocommit connection); False if it was
    there already."""
    row = conn.execute(
        "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = 'rag' AND c.relname = %s",
        (SHADOW_INDEX,),
    ).fetchone()
    if row is not None and row[0]:
        return False
    if row is not None:  # a build killed half-way leaves an invalid index
        conn.execute(f"DROP INDEX CONCURRENTLY IF EXISTS rag.{SHADOW_INDEX}")
    conn.execute(
        f"CREATE INDEX CONCURRENTLY {SHADOW_INDEX} ON rag.chunks"
        f" USING hnsw ({SHADOW_COLUMN} vector_cosine_ops) WITH (m = 16, ef_construction = 64)"
    )
    return True


def switch(
    conn: psycopg.Connection[Any], settings: Settings, name: str, report: GateReport
) -> IndexModel | int:
    """Make ``name`` the index's model in one transaction; returns the new state, or the
    number of chunks still without a shadow vector (nothing switched: backfill them first)."""
    with conn.transaction():
        conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        state = read_locked(conn, exclusive=True)
        if state.shadow_model != name:
            raise ReembedError(f"no shadow of {name} to switch to (was it aborted?)")
        left = missing(conn)
        if left:
            return left
        old = state.active(settings)
        for statement in (
            f"ALTER TABLE rag.chunks RENAME COLUMN embedding TO {PREVIOUS_COLUMN}",
            f"ALTER TABLE rag.chunks ALTER COLUMN {PREVIOUS_COLUMN} DROP NOT NULL",
            f"ALTER TABLE rag.chunks RENAME COLUMN {SHADOW_COLUMN} TO embedding",
            f"ALTER INDEX rag.{ACTIVE_INDEX} RENAME TO {PREVIOUS_INDEX}",
            f"ALTER INDEX rag.{SHADOW_INDEX} RENAME TO {ACTIVE_INDEX}",
        ):
            conn.execute(statement)
        conn.execute(
            "UPDATE rag.embedding_state SET generation = generation + 1, model = shadow_model,"
            " dim = shadow_dim, previous_model = %s, switched_at = now(), shadow_model = NULL,"
            " shadow_dim = NULL, shadow_state = NULL, shadow_started = NULL, gate = %s",
            (old, Jsonb(report.as_json())),
        )
    return read(conn)


def refuse(conn: psycopg.Connection[Any], report: GateReport) -> None:
    """Keep the old model; the shadow stays (no longer written) for --force or --abort."""
    with conn.transaction():
        read_locked(conn, exclusive=True)
        conn.execute(
            "UPDATE rag.embedding_state SET shadow_state = 'refused', gate = %s",
            (Jsonb(report.as_json()),),
        )


def abort(conn: psycopg.Connection[Any]) -> str | None:
    """Drop the shadow (column, index, state); returns its model, if there was one."""
    with conn.transaction():
        conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        state = read_locked(conn, exclusive=True)
        conn.execute(f"DROP INDEX IF EXISTS rag.{SHADOW_INDEX}")
        conn.execute(f"ALTER TABLE rag.chunks DROP COLUMN IF EXISTS {SHADOW_COLUMN}")
        conn.execute(
            "UPDATE rag.embedding_state SET shadow_model = NULL, shadow_dim = NULL,"
            " shadow_state = NULL, shadow_started = NULL"
        )
    return state.shadow_model


def drop_previous(conn: psycopg.Connection[Any]) -> str | None:
    """Drop the vectors of the model switched away from; returns that model, if any."""
    with conn.transaction():
        conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        state = read_locked(conn, exclusive=True)
        conn.execute(f"DROP INDEX IF EXISTS rag.{PREVIOUS_INDEX}")
        conn.execute(f"ALTER TABLE rag.chunks DROP COLUMN IF EXISTS {PREVIOUS_COLUMN}")
        conn.execute("UPDATE rag.embedding_state SET previous_model = NULL")
    return state.previous_model


def describe(state: IndexModel, settings: Settings) -> list[str]:
    """The state in a few lines (`freshet reembed --status`)."""
    lines = [f"index model: {state.active(settings)} (generation {state.generation})"]
    if state.switched_at is not None:
        lines.append(f"  switched at {state.switched_at:%Y-%m-%d %H:%M:%S %Z}")
    if state.previous_model:
        lines.append(
            f"  previous embedding kept: {state.previous_model}"
            " (drop it: freshet reembed --drop-previous)"
        )
    if state.shadow_model:
        lines.append(
            f"  shadow: {state.shadow_model} ({state.shadow_dim} dims), {state.shadow_state}"
        )
    if state.gate:
        gate = state.gate
        verdict = "passed" if gate.get("passed") else "refused"
        lines.append(
            f"  last gate: {gate.get('query_set')}: nDCG@10 {gate.get('old_ndcg')} ->"
            f" {gate.get('new_ndcg')} ({verdict})"
        )
    return lines
