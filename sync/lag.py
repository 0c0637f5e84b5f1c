"""How far the index is behind its sources, per table: the changes not yet applied, and the
commit time of the oldest of them.

A change is applied when the sync worker's database transaction that wrote it has committed;
only then does the worker commit the offsets past it (DESIGN.md's delivery contract). So the
records between a partition's applied offset and its end are exactly the changes captured but
not yet in the index, and the first of them is the oldest one. Its age is read from the change
itself (Debezium's `source.ts_ms`, the source transaction's commit time), or from the Kafka
record's timestamp when the record is not a change event (a tombstone, a poisonous record).

Two readers use this module:
- the sync worker, at each heartbeat, from its own positions (`freshet sync`'s metrics endpoint
  and rag.workers); the commit times are read on a thread of their own (`LagProbe`), since a
  peek at a record takes up to a second, which the worker's loop must not wait for;
- `freshet status`, from the consumer group's committed offsets, so that it shows the lag even
  when no worker runs (that is when it grows).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from freshet.cdc.events import ChangeEvent, DecodeError, decode_record
from freshet.sync.changes import table_of_topic

logger = logging.getLogger(__name__)

PEEK_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class TableLag:
    """One table's changes not yet applied, over all of its topic's partitions."""

    table: str
    records: int
    oldest_commit: datetime | None  # None: nothing behind, or its time could not be read

    def seconds(self, now: datetime | None = None) -> float:
        """How long ago the oldest change not yet applied was committed; 0 when none is."""
        if self.records == 0 or self.oldest_commit is None:
            return 0.0
        return max(0.0, ((now or datetime.now(UTC)) - self.oldest_commit).total_seconds())

    def as_dict(self, now: datetime | None = None) -> dict[str, Any]:
        return {
            "records": self.records,
            "seconds": round(self.seconds(now), 3),
            "oldest_commit": self.oldest_commit.isoformat() if self.oldest_commit else None,
        }


def commit_time(record: Any) -> datetime | None:
    """The source commit time of a Kafka record's change, or the record's own timestamp."""
    try:
        decoded = decode_record(record)
    except DecodeError:
        decoded = None
    if isinstance(decoded, ChangeEvent):
        return decoded.source.commit_time
    stamp = getattr(record, "timestamp", None)
    if isinstance(stamp, int) and stamp > 0:
        return datetime.fromtimestamp(stamp / 1000, UTC)
    return None


def per_table(
    behind: Mapping[Any, int], oldest: Mapping[Any, datetime | None], prefix: str
) -> dict[str, TableLag]:
    """Partition figures (keys: TopicPartition-like, with .topic) summed by table: records
    added, the oldest commit time the earliest of the partitions'."""
    records: dict[str, int] = {}
    earliest: dict[str, datetime | None] = {}
    for tp, count in behind.items():
        table = table_of_topic(tp.topic, prefix) or tp.topic
        records[table] = records.get(table, 0) + max(0, int(count))
        when = oldest.get(tp) if count > 0 else None
        current = earliest.get(table)
        if current is not None and when is not None:
            when = min(current, when)
        earliest[table] = when if when is not None else current
    return {t: TableLag(t, records[t], earliest[t]) for t in sorted(records)}


def oldest_commit_times(
    peek: Any, offsets: Mapping[Any, int], timeout_s: float = PEEK_TIMEOUT_S
) -> dict[Any, datetime | None]:
    """The commit time of the record at each partition's offset, read with ``peek``: a
    KafkaConsumer of no group, which this call assigns to those partitions. A partition whose
    record does not arrive in time has None."""
    found: dict[Any, datetime | None] = dict.fromkeys(offsets)
    if not offsets:
        return found
    peek.assign(list(offsets))
    for tp, offset in offsets.items():
        peek.seek(tp, offset)
    deadline = time.monotonic() + timeout_s
    waiting = set(offsets)
    while waiting and time.monotonic() < deadline:
        batches = peek.poll(timeout_ms=200, max_records=max(len(waiting), 1) * 4)
        for tp, records in batches.items():
            if tp not in waiting:
                continue
            for record in records:
                if record.offset >= offsets[tp]:
                    found[tp] = commit_time(record)
                    waiting.discard(tp)
                    peek.pause(tp)
                    break
    peek.assign([])
    return found


Publish = Callable[[Mapping[Any, int], Mapping[Any, datetime | None]], None]


class LagProbe:
    """Dates the oldest change not yet applied on a thread of its own, for the sync worker.

    The worker counts the records behind itself at each heartbeat (its positions and the
    partitions' ends, answered at once) and hands them over with `submit`; this thread reads the
    record at each applied offset with a peek consumer of its own (`oldest_commit_times`) and
    calls ``publish(behind, oldest)``. That peek takes up to ``timeout_s`` (a fetch from a
    freshly assigned partition): on the worker's own loop it held back every change polled
    meanwhile, about a third of the loop's time at 20 edits/s.

    Requests are served in order, the newest only: one submitted while the thread reads is kept,
    any older one waiting is dropped. A request with nothing behind is published at once, so a
    worker that has caught up reports 0 without a peek. ``failed(exc)`` hears of a Kafka error;
    the last published figures stay."""

    def __init__(
        self,
        new_peek: Callable[[], Any],
        publish: Publish,
        failed: Callable[[BaseException], None] = lambda exc: None,
        timeout_s: float = 1.0,
        errors: tuple[type[BaseException], ...] = (Exception,),
    ) -> None:
        self.new_peek, self.publish, self.failed = new_peek, publish, failed
        self.timeout_s, self.errors = timeout_s, errors
        self._wake = threading.Condition()
        self._request: tuple[dict[Any, int], dict[Any, int]] | None = None
        self._stopping = False
        self._busy = False
        self._peek: Any = None
        self._thread: threading.Thread | None = None

    def submit(self, behind: Mapping[Any, int], applied: Mapping[Any, int]) -> None:
        """Records behind and the applied offset, per partition; returns at once."""
        with self._wake:
            if self._stopping:
                return
            self._request = (dict(behind), dict(applied))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="lag-probe", daemon=True)
                self._thread.start()
            self._wake.notify()

    def idle(self) -> bool:
        """Nothing waiting and nothing being read (tests wait for it)."""
        with self._wake:
            return self._request is None and not self._busy

    def close(self, timeout: float = 5.0) -> None:
        """Stops the thread once its read is done (at most ``timeout_s``) and closes the peek."""
        with self._wake:
            self._stopping = True
            self._request = None
            self._wake.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _run(self) -> None:
        try:
            while True:
                with self._wake:
                    while self._request is None and not self._stopping:
                        self._wake.wait()
                    if self._stopping:
                        return
                    behind, applied = self._request  # type: ignore[misc]
                    self._request, self._busy = None, True
                try:
                    self._serve(behind, applied)
                finally:
                    with self._wake:
                        self._busy = False
        finally:
            if self._peek is not None:
                try:
                    self._peek.close()
                except Exception as exc:  # noqa: BLE001 - closing what may be gone already
                    logger.debug("closing the lag peek: %s", exc)

    def _serve(self, behind: dict[Any, int], applied: dict[Any, int]) -> None:
        pending = {tp: applied[tp] for tp, n in behind.items() if n > 0 and tp in applied}
        started = time.monotonic()
        try:
            if pending and self._peek is None:
                self._peek = self.new_peek()
            oldest = (
                oldest_commit_times(self._peek, pending, timeout_s=self.timeout_s)
                if pending
                else {}
            )
        except self.errors as exc:
            self.failed(exc)
            return
        if pending:
            logger.debug(
                "lag probe: %d of %d partitions dated in %.0f ms",
                sum(1 for when in oldest.values() if when is not None),
                len(pending),
                (time.monotonic() - started) * 1000,
            )
        self.publish(behind, oldest)


def peek_consumer(bootstrap_servers: str, client_id: str) -> Any:
    """A consumer of no group, reading committed records only (as the sync worker reads)."""
    from kafka import KafkaConsumer

    return KafkaConsumer(
        bootstrap_servers=bootstrap_servers,
        client_id=client_id,
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
        request_timeout_ms=5000,
        max_partition_fetch_bytes=64 * 1024 * 1024,
        fetch_max_bytes=64 * 1024 * 1024,
    )


def group_lag(
    bootstrap_servers: str,
    group: str,
    prefix: str,
    topics: Iterable[str],
) -> dict[str, TableLag]:
    """Each captured table's lag as the consumer group ``group`` stands (its committed
    offsets; a partition it never committed counts from its first record). ``topics`` are the
    table topics to report (the sync worker's subscription). Raises what Kafka raises."""
    from kafka import KafkaAdminClient, TopicPartition

    admin = KafkaAdminClient(
        bootstrap_servers=bootstrap_servers,
        client_id="freshet-status-lag",
        request_timeout_ms=5000,
    )
    try:
        peek = peek_consumer(bootstrap_servers, "freshet-status-lag")
    except BaseException:
        admin.close()
        raise
    try:
        offsets = admin.list_group_offsets({group: None}).get(group) or {}
        committed = {
            TopicPartition(tp.topic, tp.partition): meta.offset for tp, meta in offsets.items()
        }
        partitions = [
            TopicPartition(topic, p)
            for topic in sorted(topics)
            for p in sorted(peek.partitions_for_topic(topic) or ())
        ]
        if not partitions:
            return {}
        ends = peek.end_offsets(partitions)
        starts = peek.beginning_offsets(partitions)
        applied = {
            tp: committed[tp] if committed.get(tp, -1) >= 0 else starts[tp] for tp in partitions
        }
        behind = {tp: max(0, ends[tp] - applied[tp]) for tp in partitions}
        oldest = oldest_commit_times(peek, {tp: applied[tp] for tp in partitions if behind[tp]})
        return per_table(behind, oldest, prefix)
    finally:
        peek.close()
        admin.close()
