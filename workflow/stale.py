"""Stale citations: a consumer group over the change topics (the ones the sync worker reads)
that marks an answer stale when a row it cited changes or goes, and tells whoever holds it.

Every approved answer keeps the rows it cited, (table, key, LSN), in rag.answer_citations
(the answer store writes them with the answer). Per polled batch of change events the watcher,
in one transaction:

1. records the newest change of each row in rag.source_changes (a TRUNCATE as the whole
   table: key ''), so that an answer kept after a change it was not there for is stale at
   once (the answer store checks this table when it keeps the citations);
2. adds to rag.answer_stale one row per (answer, change) for every citation older than the
   change (a row updated, deleted, shrunk past the size limit, or its table truncated), and
   sets rag.answers.stale_at the first time;

then commits its offsets. rag.answer_stale is an outbox: between polls the watcher publishes
every row not yet published to ``rag.answers.stale`` (keyed by answer id) and marks it
published once the broker has it. A change is one event per answer that cited the row: a
redelivered change adds no row (the primary key holds the change's LSN) and so no second
event. Snapshot reads are not changes (a re-snapshot reads every row again) and are skipped;
so are events the sync worker dead-letters (they cannot be read here either).

Event (format 1): {format, answer_id, source_table, doc_key, cited_lsn, changed_lsn, op
("update" | "delete" | "oversized" | "truncate"), committed_at, detected_at}.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

import psycopg
from kafka import KafkaConsumer

from freshet.answering.messages import STALE
from freshet.consumer import ConsumerRuntime, Handled, Output
from freshet.retry import retry, transient_db_error
from freshet.settings import Settings
from freshet.sync.changes import Change, Kind, Router, topic_pattern
from freshet.sync.mapping import Mappings

logger = logging.getLogger(__name__)

T = TypeVar("T")

EVENT_FORMAT = 1
DEAD_LETTERS = "rag.stale.dlq"
# Unpublished events read per round of the outbox.
PUBLISH_BATCH = 500
_OPS = {
    Kind.UPSERT: "update",
    Kind.DELETE: "delete",
    Kind.OVERSIZED: "oversized",
    Kind.TRUNCATE: "truncate",
}


@dataclass(frozen=True)
class RowChange:
    """One change of one source row (doc_key '': the whole table, a TRUNCATE)."""

    source_table: str
    doc_key: str
    lsn: int
    op: str
    committed_at: datetime | None

    @classmethod
    def of(cls, change: Change) -> RowChange | None:
        """The change a stale citation cares about, or None (a snapshot read, a tombstone,
        an event without a source position)."""
        op = _OPS.get(change.kind)
        if op is None or change.snapshot or change.lsn is None:
            return None
        key = "" if change.kind is Kind.TRUNCATE else change.doc_key
        return cls(change.table, key, change.lsn, op, change.commit_time)


def newest_per_row(changes: Sequence[RowChange]) -> list[RowChange]:
    """The newest change of each row (what rag.source_changes keeps)."""
    newest: dict[tuple[str, str], RowChange] = {}
    for c in changes:
        known = newest.get((c.source_table, c.doc_key))
        if known is None or c.lsn > known.lsn:
            newest[(c.source_table, c.doc_key)] = c
    return list(newest.values())


def event(row: Sequence[Any]) -> Output:
    """The rag.answers.stale message of one rag.answer_stale row."""
    answer_id, table, key, cited, changed, op, committed, detected = row
    body = {
        "format": EVENT_FORMAT,
        "answer_id": answer_id,
        "source_table": table,
        "doc_key": key,
        "cited_lsn": cited,
        "changed_lsn": changed,
        "op": op,
        "committed_at": committed.isoformat() if committed else None,
        "detected_at": detected.isoformat(),
    }
    return Output(STALE, answer_id.encode(), json.dumps(body, separators=(",", ":")).encode())


_MARK = """
INSERT INTO rag.answer_stale
    (answer_id, source_table, doc_key, cited_lsn, changed_lsn, op, committed_at)
SELECT c.answer_id, c.source_table, c.doc_key, c.source_lsn, v.lsn, v.op, v.committed_at
FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::text[], %s::timestamptz[])
     AS v(source_table, doc_key, lsn, op, committed_at)
JOIN rag.answer_citations c
  ON c.source_table = v.source_table AND (v.doc_key = '' OR c.doc_key = v.doc_key)
WHERE c.source_lsn < v.lsn
ON CONFLICT DO NOTHING
RETURNING answer_id
"""

_REMEMBER = """
INSERT INTO rag.source_changes (source_table, doc_key, lsn, op, committed_at)
SELECT * FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::text[], %s::timestamptz[])
ON CONFLICT (source_table, doc_key) DO UPDATE
SET lsn = EXCLUDED.lsn, op = EXCLUDED.op, committed_at = EXCLUDED.committed_at, seen_at = now()
WHERE rag.source_changes.lsn < EXCLUDED.lsn
"""


def _columns(changes: Sequence[RowChange]) -> tuple[list[Any], ...]:
    return (
        [c.source_table for c in changes],
        [c.doc_key for c in changes],
        [c.lsn for c in changes],
        [c.op for c in changes],
        [c.committed_at for c in changes],
    )


@dataclass
class StaleWatch:
    """One member of the stale watcher's group (FRESHET_STALE_GROUP)."""

    settings: Settings
    connect: Callable[[], Any]
    stale: int = 0
    published: int = 0
    router: Router = field(init=False)
    runtime: ConsumerRuntime = field(init=False)
    _conn: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        s = self.settings
        self.router = Router(Mappings.load(s.mappings_path), s.topic_prefix)
        self.runtime = ConsumerRuntime(
            name="stale-watch",
            bootstrap_servers=s.bootstrap_servers,
            dead_letter_topic=DEAD_LETTERS,
            new_consumer=self._new_consumer,
            handler=self.handle,
            pattern=topic_pattern(s.topic_prefix),
            poll_ms=200,
            max_records=500,
            log_prefix="stale-watch: ",
            between=self.publish,
        )

    def _new_consumer(self) -> KafkaConsumer:
        s = self.settings
        return KafkaConsumer(
            bootstrap_servers=s.bootstrap_servers,
            group_id=s.stale_group,
            client_id="freshet-stale-watch",
            enable_auto_commit=False,
            # A new group reads the topics from the start: a change older than a citation
            # makes nothing stale (its LSN is lower), and no change is missed.
            auto_offset_reset="earliest",
            metadata_max_age_ms=5_000,
            max_partition_fetch_bytes=s.max_event_bytes + (1 << 20),
            fetch_max_bytes=max(52_428_800, s.max_event_bytes + (1 << 20)),
            session_timeout_ms=10_000,
            heartbeat_interval_ms=3_000,
        )

    def run(self, stop: threading.Event) -> None:
        logger.info(
            "stale-watch: watching %s in group %s", self.runtime.pattern, self.settings.stale_group
        )
        try:
            self.runtime.serve(stop)
        finally:
            self._drop()

    def _db(self, call: Callable[[Any], T], what: str, stop: threading.Event) -> T:
        """``call(connection)`` on the watcher's one connection, waiting out a database that
        is away (reconnecting) until it succeeds or ``stop`` is set."""

        def attempt() -> T:
            if self._conn is None or self._conn.closed:
                self._conn = self.connect()
            try:
                return call(self._conn)
            except psycopg.Error as exc:
                if transient_db_error(exc):
                    self._drop()
                raise

        return retry(
            attempt,
            what=f"stale-watch: {what}",
            stop=stop,
            transient=(psycopg.Error,),
            fatal=lambda exc: not transient_db_error(exc),
        )

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None

    def handle(self, records: Sequence[Any], stop: threading.Event) -> Handled:
        """Steps 1 and 2 of the module docstring, in one transaction."""
        routed = self.router.route(records)
        changes = [c for c in map(RowChange.of, routed.changes) if c is not None]
        if not changes:
            return Handled.all_of(records)

        def mark(conn: Any) -> list[str]:
            with conn.transaction():
                conn.execute(_REMEMBER, _columns(newest_per_row(changes)))
                marked = [r[0] for r in conn.execute(_MARK, _columns(changes)).fetchall()]
                if marked:
                    conn.execute(
                        "UPDATE rag.answers SET stale_at = coalesce(stale_at, now())"
                        " WHERE id = ANY(%s)",
                        (sorted(set(marked)),),
                    )
            return marked

        marked = self._db(mark, "marking stale answers", stop)
        if marked:
            self.stale += len(marked)
            logger.info(
                "stale-watch: %d answer(s) stale by %d change(s)", len(set(marked)), len(marked)
            )
        return Handled.all_of(records)

    def publish(self, stop: threading.Event) -> None:
        """The outbox: every stale event not yet published goes to rag.answers.stale, then is
        marked published (a crash in between publishes it again: at least once)."""
        rows = self._db(
            lambda conn: conn.execute(
                "SELECT answer_id, source_table, doc_key, cited_lsn, changed_lsn, op,"
                " committed_at, detected_at FROM rag.answer_stale WHERE published_at IS NULL"
                " ORDER BY detected_at LIMIT %s",
                (PUBLISH_BATCH,),
            ).fetchall(),
            "reading unpublished stale events",
            stop,
        )
        if not rows:
            return
        self.runtime.deliver([event(r) for r in rows], stop)
        keys = (
            [r[0] for r in rows],
            [r[1] for r in rows],
            [r[2] for r in rows],
            [r[4] for r in rows],
        )
        self._db(
            lambda conn: conn.execute(
                "UPDATE rag.answer_stale SET published_at = now()"
                " WHERE (answer_id, source_table, doc_key, changed_lsn) IN"
                " (SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::bigint[]))",
                keys,
            ),
            "marking stale events published",
            stop,
        )
        self.published += len(rows)
