"""The BM25 text index's backfill and checks: `freshet reindex-text`.

Triggers on rag.chunks (migration 0006) keep the postings and statistics exact for every chunk
written since the migration. Chunks written before it have no postings until this backfill
indexes them: in small transactions (each locks only its batch of chunks against a concurrent
delete, so search and the sync worker go on), recording its progress in rag.text_backfill, so a
killed run resumes where it stopped. ``rebuild`` drops every posting and statistic and indexes
every chunk again (after a change of the tokenizer, or to make sure).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class BackfillState:
    upto: int  # chunk ids up to this one are the backfill's; newer ones the triggers'
    done: int  # chunk ids up to this one are indexed
    remaining: int  # chunks of the backfill still to index
    finished: bool


def state(conn: psycopg.Connection) -> BackfillState:
    row = conn.execute(
        "SELECT b.upto, b.done, b.finished_at IS NOT NULL,"
        " (SELECT count(*) FROM rag.chunks WHERE id > b.done AND id <= b.upto)"
        " FROM rag.text_backfill AS b"
    ).fetchone()
    assert row is not None, "rag.text_backfill has no row: run `freshet migrate`"
    return BackfillState(upto=row[0], done=row[1], remaining=row[3], finished=row[2])


def rebuild(conn: psycopg.Connection) -> None:
    """Forget every posting and statistic; the backfill then indexes every chunk. Writers wait
    for this one short transaction (the chunks are locked against writes while it runs)."""
    with conn.transaction():
        conn.execute("LOCK TABLE rag.chunks IN SHARE MODE")
        conn.execute("TRUNCATE rag.text_postings, rag.text_terms")
        conn.execute("UPDATE rag.text_corpus SET chunks = 0, length = 0")
        conn.execute(
            "UPDATE rag.text_backfill SET upto = (SELECT coalesce(max(id), 0) FROM rag.chunks),"
            " done = 0, started_at = now(), finished_at = NULL"
        )


def backfill(
    conn: psycopg.Connection,
    *,
    batch: int = 500,
    progress: Progress | None = None,
    stop: Callable[[], bool] = lambda: False,
) -> int:
    """Index the chunks written before the text index existed; the number indexed."""
    current = state(conn)
    total = current.remaining
    indexed = 0
    if progress is not None:
        progress(0, total)
    while not stop():
        with conn.transaction():
            # FOR SHARE: a concurrent delete of one of these chunks waits for this batch (and
            # then removes its postings), or went first (and the chunk is not read here).
            ids = [
                r[0]
                for r in conn.execute(
                    "SELECT id FROM rag.chunks WHERE id > %s AND id <= %s"
                    " ORDER BY id LIMIT %s FOR SHARE",
                    (current.done, current.upto, batch),
                )
            ]
            last = ids[-1] if ids else current.upto
            if ids:
                conn.execute("SELECT rag.text_index_add(%s)", (ids,))
            conn.execute(
                "UPDATE rag.text_backfill SET done = %s, finished_at = CASE WHEN %s THEN now() END",
                (last, last >= current.upto),
            )
        indexed += len(ids)
        current = BackfillState(current.upto, last, total - indexed, last >= current.upto)
        if progress is not None:
            progress(min(indexed, total), total)
        if current.finished:
            break
    return indexed


def recount_differences(conn: psycopg.Connection) -> dict[str, int]:
    """How the stored statistics differ from a recount from the chunks' text: the number of
    terms whose document frequency differs, of chunks whose postings differ, and the errors
    in the corpus's chunk count and length. All zero for an exact index."""
    row = conn.execute(
        """
        WITH postings AS (
            SELECT t.term, c.id AS chunk_id, t.tf
            FROM rag.chunks AS c, rag.text_terms_of(c.text) AS t
        ), df AS (
            SELECT term, count(*) AS df FROM postings GROUP BY term
        ), stored AS (
            SELECT term, chunk_id, tf FROM rag.text_postings
        )
        SELECT
            (SELECT count(*) FROM df FULL JOIN rag.text_terms AS s USING (term)
             WHERE df.df IS DISTINCT FROM s.df),
            (SELECT count(DISTINCT coalesce(p.chunk_id, s.chunk_id))
             FROM postings AS p FULL JOIN stored AS s USING (term, chunk_id)
             WHERE p.tf IS DISTINCT FROM s.tf),
            (SELECT chunks FROM rag.text_corpus)
              - (SELECT count(DISTINCT chunk_id) FROM postings),
            (SELECT length FROM rag.text_corpus) - (SELECT coalesce(sum(tf), 0) FROM postings)
        """
    ).fetchone()
    assert row is not None
    return {
        "terms": int(row[0]),
        "chunks": int(row[1]),
        "corpus_chunks": int(row[2]),
        "corpus_length": int(row[3]),
    }


def progress_bar(unit: str = "chunk", what: str = "indexing text (BM25)") -> Progress:
    """A progress bar with ETA on a terminal; a log line every 10 s otherwise."""
    import sys

    if sys.stderr.isatty():
        from tqdm import tqdm

        bars: dict[str, tqdm] = {}

        def update(done: int, total: int) -> None:
            if "bar" not in bars:
                bars["bar"] = tqdm(total=total, unit=unit, desc=what)
            bars["bar"].n = done
            bars["bar"].refresh()
            if done >= total:
                bars["bar"].close()

        return update
    started, last = time.monotonic(), [0.0]

    def log(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] < 10 and done < total:
            return
        last[0] = now
        rate = done / max(now - started, 1e-9)
        eta = (total - done) / rate if rate > 0 else float("inf")
        logger.warning("%s: %d/%d %s (%.0f/s, ETA %.0fs)", what, done, total, unit, rate, eta)

    return log
