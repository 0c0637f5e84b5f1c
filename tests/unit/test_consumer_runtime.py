"""The consumer runtime (freshet/consumer.py) without Kafka: a fake consumer and producer that
log every call, so the order of handle, produce, flush and commit can be checked; the dead-letter
envelope; and the capture pattern, which never matches a dead-letter topic."""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import psycopg
import pytest
from kafka import TopicPartition
from kafka.errors import (
    CommitFailedError,
    FencedInstanceIdError,
    KafkaConnectionError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NotLeaderForPartitionError,
    TopicAuthorizationFailedError,
)

from freshet.answering.messages import DEAD_LETTERS
from freshet.consumer import (
    DLQ_SUFFIX,
    MAX_ATTEMPTS,
    ConsumerRuntime,
    Handled,
    MemberFenced,
    Output,
    PerRecord,
    broker_reachable,
    envelope,
    is_dead_letter_topic,
    stored_bytes,
)
from freshet.embedder import Embedder
from freshet.retry import Backoff, Stopped
from freshet.settings import Settings
from freshet.sync import deadletters
from freshet.sync.writer import ApplyStats
from freshet.workflow.step import Step
from tests.support import FakeRecord

TP0 = TopicPartition("t", 0)
TP1 = TopicPartition("t", 1)
# Every field of the envelope, as freshet/consumer.py documents it.
ENVELOPE_FIELDS = {
    "format",
    "consumer",
    "stage",
    "topic",
    "partition",
    "offset",
    "table",
    "doc_key",
    "error_type",
    "reason",
    "attempts",
    "key",
    "value",
    "record_size",
    "record_sha256",
    "truncated",
    "ts",
}


# --- fakes -----------------------------------------------------------------------------------
class FakeConsumer:
    """A group member over a fixed log of records: poll reads from each partition's position,
    seek moves it, commit records what was committed. Every call goes to ``log``."""

    def __init__(self, records: Sequence[FakeRecord], log: list[Any]) -> None:
        self.records = sorted(records, key=lambda r: (r.topic, r.partition, r.offset))
        self.log = log
        self.position: dict[TopicPartition, int] = {}
        self.commits: list[dict[TopicPartition, int]] = []
        self.commit_errors: list[BaseException] = []
        self.listener: Any = None
        self.subscribed: dict[str, Any] = {}
        self.closed = False
        # Asynchronous commits: what the broker answers the next ones (None: success), the
        # answers not read yet (kafka-python reads them at the next poll or commit), and
        # whether an answer said this member was fenced.
        self.async_answers: list[BaseException | None] = []
        self.unread: list[tuple[Any, dict[TopicPartition, Any], Any]] = []
        self.fenced = False
        self.sync_commits = 0

    def _read_answers(self) -> None:
        if self.fenced:
            raise FencedInstanceIdError("fenced")
        while self.unread:
            callback, offsets, answer = self.unread.pop(0)
            callback(offsets, answer)

    def commit_async(self, offsets: dict[TopicPartition, Any], callback: Any = None) -> None:
        self._read_answers()
        answer = self.async_answers.pop(0) if self.async_answers else None
        if answer is None:
            self._record_commit(offsets)
        self.unread.append((callback, offsets, answer if answer is not None else "ok"))

    def subscribe(
        self, topics: Sequence[str] = (), pattern: str | None = None, listener: Any = None
    ) -> None:
        self.subscribed = {"topics": list(topics), "pattern": pattern}
        self.listener = listener

    def poll(self, timeout_ms: int = 0, max_records: int = 500) -> dict[TopicPartition, list[Any]]:
        self._read_answers()
        out: dict[TopicPartition, list[Any]] = {}
        taken = 0
        for r in self.records:
            tp = TopicPartition(r.topic, r.partition)
            if r.offset < self.position.get(tp, 0) or taken >= max_records:
                continue
            out.setdefault(tp, []).append(r)
            taken += 1
        for tp, rs in out.items():
            self.position[tp] = rs[-1].offset + 1
        self.log.append("poll")
        return out

    def drained(self) -> bool:
        return all(
            r.offset < self.position.get(TopicPartition(r.topic, r.partition), 0)
            for r in self.records
        )

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.position[tp] = offset
        self.log.append(("seek", tp.partition, offset))

    def commit(self, offsets: dict[TopicPartition, Any], timeout_ms: int | None = None) -> None:
        self._read_answers()
        if self.commit_errors:
            raise self.commit_errors.pop(0)
        self.sync_commits += 1
        self._record_commit(offsets)

    def _record_commit(self, offsets: dict[TopicPartition, Any]) -> None:
        committed = {tp: meta.offset for tp, meta in offsets.items()}
        self.commits.append(committed)
        self.log.append(("commit", {tp.partition: o for tp, o in committed.items()}))

    def close(self) -> None:
        self.closed = True


@dataclass
class FakeFuture:
    error: BaseException | None = None

    def get(self, timeout: float | None = None) -> None:
        if self.error is not None:
            raise self.error


class FakeProducer:
    """Takes every message unless ``refuse(topic, value)`` names an error: in the send's future,
    or raised by send itself when ``at_send``; ``flush_errors`` are raised by the next flushes."""

    def __init__(self, log: list[Any]) -> None:
        self.log = log
        self.delivered: list[tuple[str, bytes | None, bytes]] = []
        self.refuse: Callable[[str, bytes], BaseException | None] = lambda topic, value: None
        self.at_send = False
        self.flush_errors: list[BaseException] = []
        self.on_flush: Callable[[], None] = lambda: None
        self.closed = False

    def send(self, topic: str, key: bytes | None = None, value: bytes = b"") -> FakeFuture:
        self.log.append(("send", topic, value))
        error = self.refuse(topic, value)
        if error is not None and self.at_send:
            raise error
        if error is None:
            self.delivered.append((topic, key, value))
        return FakeFuture(error)

    def flush(self, timeout: float | None = None) -> None:
        self.on_flush()
        if self.flush_errors:
            raise self.flush_errors.pop(0)
        self.log.append("flush")

    def close(self, timeout: float | None = None) -> None:
        self.closed = True

    def values(self, topic: str) -> list[bytes]:
        return [value for t, _, value in self.delivered if t == topic]


def records(partition: int, count: int, topic: str = "t") -> list[FakeRecord]:
    return [
        FakeRecord(topic, partition, i, f"k{i}".encode(), f"v{partition}.{i}".encode())
        for i in range(count)
    ]


def echo(record: Any) -> list[Output]:
    return [Output("out", record.key, record.value)]


def make_runtime(
    recs: Sequence[FakeRecord], **options: Any
) -> tuple[ConsumerRuntime, FakeConsumer, FakeProducer, list[Any]]:
    log: list[Any] = []
    consumer, producer = FakeConsumer(recs, log), FakeProducer(log)
    runtime = ConsumerRuntime(
        name="test",
        bootstrap_servers="127.0.0.1:1",
        dead_letter_topic="test.dlq",
        new_consumer=lambda: consumer,
        topics=("t",),
        **options,
    )
    runtime.producer = producer
    return runtime, consumer, producer, log


def per_record(runtime: ConsumerRuntime, handle: Callable[[Any], list[Output]], **kw: Any) -> None:
    runtime.handler = PerRecord(runtime, handle, backoff=Backoff(initial=0.0), **kw)


def run_until_drained(
    runtime: ConsumerRuntime, consumer: FakeConsumer, max_polls: int = 50
) -> threading.Event:
    stop = threading.Event()
    polls = [0]

    def between(stop: threading.Event) -> None:
        polls[0] += 1
        if consumer.drained() or polls[0] >= max_polls:
            stop.set()

    runtime.between = between
    runtime.run(stop)
    return stop


def index(log: list[Any], predicate: Callable[[Any], bool]) -> list[int]:
    return [i for i, entry in enumerate(log) if predicate(entry)]


def is_commit(entry: Any) -> bool:
    return isinstance(entry, tuple) and entry[0] == "commit"


# --- the contract ----------------------------------------------------------------------------
def test_offsets_are_committed_only_after_handle_produce_and_flush() -> None:
    def handle(batch: Sequence[Any], stop: threading.Event) -> Handled:
        log.append(("handle", len(batch)))
        return Handled.all_of(batch, [o for r in batch for o in echo(r)])

    runtime, consumer, producer, log = make_runtime(records(0, 3) + records(1, 2), handler=handle)
    run_until_drained(runtime, consumer)
    assert consumer.subscribed == {"topics": ["t"], "pattern": None}
    assert log[:2] == ["poll", ("handle", 5)]
    sends = index(log, lambda e: isinstance(e, tuple) and e[0] == "send")
    [flush] = index(log, lambda e: e == "flush")
    [commit] = index(log, is_commit)
    assert len(sends) == 5 and max(sends) < flush < commit
    assert consumer.commits == [{TP0: 3, TP1: 2}]
    assert len(producer.values("out")) == 5


def test_an_asynchronous_commit_is_not_waited_for_and_its_answer_is_read_at_the_next_poll() -> None:
    runtime, consumer, _, _ = make_runtime(
        records(0, 3), handler=lambda b, s: Handled.all_of(b, []), commit_async=True
    )
    stop = threading.Event()
    runtime.process(runtime.poll(stop), stop)
    assert consumer.commits == [{TP0: 3}] and consumer.sync_commits == 0
    assert runtime._committed == {} and runtime._sending == {TP0: 3}  # sent, not answered
    runtime.commit_ready(stop)  # nothing new to send: the same offset is not sent twice
    assert consumer.commits == [{TP0: 3}]
    runtime.poll(stop)  # the client reads the answer
    assert runtime._committed == {TP0: 3} and runtime._sending == {}


def test_a_failed_asynchronous_commit_makes_the_next_commit_wait_for_its_answer() -> None:
    runtime, consumer, _, _ = make_runtime(
        records(0, 3),
        handler=lambda b, s: Handled.all_of(b, []),
        commit_async=True,
        max_records=1,
    )
    consumer.async_answers = [KafkaTimeoutError("no answer")]
    run_until_drained(runtime, consumer)
    # 1: sent, refused (read at the next poll); 2: committed synchronously; 3: sent again.
    assert consumer.commits == [{TP0: 2}, {TP0: 3}]
    assert consumer.sync_commits == 1
    assert runtime._async_failed is None and runtime._sending == {TP0: 3}


def test_a_stop_commits_what_is_done_and_unanswered_before_leaving_the_group() -> None:
    runtime, consumer, _, log = make_runtime(
        records(0, 2), handler=lambda b, s: Handled.all_of(b, []), commit_async=True
    )
    consumer.async_answers = [KafkaTimeoutError("lost with the connection")]
    stop = threading.Event()
    runtime.process(runtime.poll(stop), stop)
    assert consumer.commits == []  # the asynchronous commit's answer is a failure, unread
    runtime.close()
    assert consumer.commits == [{TP0: 2}] and consumer.sync_commits == 1 and consumer.closed
    # Answered already: nothing more is committed at close.
    runtime, consumer, _, _ = make_runtime(
        records(0, 2), handler=lambda b, s: Handled.all_of(b, []), commit_async=True
    )
    runtime.process(runtime.poll(stop), stop)
    runtime.poll(stop)
    runtime.close()
    assert consumer.commits == [{TP0: 2}] and consumer.sync_commits == 0


def test_a_fenced_answer_to_an_asynchronous_commit_stops_the_member() -> None:
    runtime, consumer, _, _ = make_runtime(
        records(0, 2), handler=lambda b, s: Handled.all_of(b, []), commit_async=True
    )
    stop = threading.Event()
    batch = runtime.poll(stop)
    consumer.fenced = True  # an earlier answer said so: kafka-python raises at the next commit
    with pytest.raises(MemberFenced):
        runtime.process(batch, stop)
    assert consumer.commits == []


def test_a_transient_flush_failure_sends_again_and_commits_only_after_a_flush_succeeds() -> None:
    handled: list[int] = []

    def handle(batch: Sequence[Any], stop: threading.Event) -> Handled:
        handled.append(len(batch))
        return Handled.all_of(batch, [o for r in batch for o in echo(r)])

    runtime, consumer, producer, log = make_runtime(records(0, 2), handler=handle)
    producer.flush_errors = [KafkaTimeoutError("broker away"), KafkaTimeoutError("still away")]
    run_until_drained(runtime, consumer)
    assert handled == [2]  # the handler's work is not redone: only the sending is retried
    [flush] = index(log, lambda e: e == "flush")
    [commit] = index(log, is_commit)
    assert flush < commit
    assert len(index(log, lambda e: isinstance(e, tuple) and e[0] == "send")) == 6
    assert consumer.commits == [{TP0: 2}]


def test_a_retriable_send_error_sends_that_message_again_and_nothing_is_committed_before() -> None:
    refused = [NotLeaderForPartitionError("moving")]

    runtime, consumer, producer, log = make_runtime(
        records(0, 3),
        handler=lambda batch, stop: Handled.all_of(batch, [echo(r)[0] for r in batch]),
    )
    producer.refuse = lambda topic, value: refused.pop() if value == b"v0.1" and refused else None
    run_until_drained(runtime, consumer)
    assert sorted(producer.values("out")) == [b"v0.0", b"v0.1", b"v0.2"]
    flushes = index(log, lambda e: e == "flush")
    [commit] = index(log, is_commit)
    assert len(flushes) == 2 and max(flushes) < commit  # committed after the second flush only
    assert consumer.commits == [{TP0: 3}]


def test_a_transient_commit_failure_is_retried_and_a_rebalance_is_not_a_failure() -> None:
    runtime, consumer, _, _ = make_runtime(
        records(0, 2), handler=lambda batch, stop: Handled.all_of(batch)
    )
    consumer.commit_errors = [KafkaTimeoutError("coordinator away")]
    run_until_drained(runtime, consumer)
    assert consumer.commits == [{TP0: 2}]

    runtime, consumer, _, _ = make_runtime(
        records(0, 2), handler=lambda batch, stop: Handled.all_of(batch)
    )
    consumer.commit_errors = [CommitFailedError("the group rebalanced")]
    run_until_drained(runtime, consumer)
    assert consumer.commits == []  # the partition's next owner handles the records again
    runtime.commit_ready(threading.Event())  # and this member did not count them as committed
    assert consumer.commits == [{TP0: 2}]


def test_a_fenced_static_member_stops_with_a_clear_error_instead_of_retrying() -> None:
    """Two workers with one group.instance.id would fence each other in turn for ever: the
    fenced one stops, and says which id and which setting."""
    runtime, consumer, _, _ = make_runtime(
        records(0, 2), handler=lambda batch, stop: Handled.all_of(batch)
    )
    consumer.config = {"group_id": "rag-sync", "group_instance_id": "worker-1"}  # type: ignore[attr-defined]
    consumer.commit_errors = [FencedInstanceIdError("fenced")]
    with pytest.raises(MemberFenced, match="'worker-1'.*FRESHET_SYNC_INSTANCE_ID"):
        run_until_drained(runtime, consumer)
    assert consumer.commits == []

    runtime, consumer, _, _ = make_runtime(records(0, 2))
    consumer.config = {"group_id": "rag-sync", "group_instance_id": "worker-1"}  # type: ignore[attr-defined]

    def fenced_poll(timeout_ms: int = 0, max_records: int = 500) -> Any:
        raise FencedInstanceIdError("fenced")

    consumer.poll = fenced_poll  # type: ignore[method-assign]
    with pytest.raises(MemberFenced, match="group 'rag-sync'"):
        runtime.poll(threading.Event())


def test_commits_never_pass_what_the_stage_holds_back_and_never_go_backwards() -> None:
    held: dict[TopicPartition, int | None] = {TP0: 1}
    runtime, consumer, _, _ = make_runtime(
        records(0, 3), handler=lambda batch, stop: Handled.all_of(batch), hold=held.get
    )
    stop = threading.Event()
    runtime.connect(stop)
    runtime.process(runtime.poll(stop), stop)
    assert consumer.commits == [{TP0: 1}]
    held[TP0] = None  # the stage released the rest
    runtime.complete(Handled(), stop)
    assert consumer.commits == [{TP0: 1}, {TP0: 3}]
    runtime.complete(Handled(done={TP0: 2}), stop)
    assert consumer.commits == [{TP0: 1}, {TP0: 3}]


def test_a_revoked_partition_is_forgotten_and_the_stage_is_told() -> None:
    told: list[Any] = []
    stage = SimpleNamespace(
        on_partitions_revoked=lambda tps: told.append(("revoked", tps)),
        on_partitions_assigned=lambda tps: told.append(("assigned", tps)),
    )
    runtime, consumer, _, _ = make_runtime(
        records(0, 2), handler=lambda batch, stop: Handled.all_of(batch), listener=stage
    )
    stop = threading.Event()
    runtime.connect(stop)
    runtime.process(runtime.poll(stop), stop)
    consumer.listener.on_partitions_revoked([TP0])
    consumer.listener.on_partitions_assigned([TP0])
    assert told == [("revoked", [TP0]), ("assigned", [TP0])]
    assert TP0 not in runtime._next and TP0 not in runtime._committed


def test_a_transient_handler_error_retries_the_record_and_never_commits_past_it() -> None:
    failures = {"left": MAX_ATTEMPTS + 3}  # more than MAX_ATTEMPTS: a service away is waited out

    def handle(record: Any) -> list[Output]:
        if record.offset == 1 and failures["left"]:
            failures["left"] -= 1
            raise psycopg.OperationalError("the database is away")
        return echo(record)

    runtime, consumer, producer, log = make_runtime(records(0, 3))
    per_record(runtime, handle)
    run_until_drained(runtime, consumer)
    assert producer.values("test.dlq") == []
    assert producer.values("out") == [b"v0.0", b"v0.1", b"v0.2"]  # each once, in order
    assert consumer.commits[0] == {TP0: 1}  # the record before the failing one is done
    assert consumer.commits[-1] == {TP0: 3}
    assert all(c[TP0] <= 1 for c in consumer.commits[:-1])
    assert [e for e in log if isinstance(e, tuple) and e[0] == "seek"] == [("seek", 0, 1)] * (
        MAX_ATTEMPTS + 3
    )


def test_a_poison_record_becomes_a_dead_letter_and_the_batch_goes_on() -> None:
    attempts: list[int] = []

    def handle(record: Any) -> list[Output]:
        if (record.partition, record.offset) == (0, 1):
            attempts.append(record.offset)
            raise ValueError("this record breaks the handler")
        return echo(record)

    runtime, consumer, producer, log = make_runtime(records(0, 4) + records(1, 2))
    per_record(runtime, handle)
    run_until_drained(runtime, consumer)
    assert len(attempts) == MAX_ATTEMPTS
    [letter] = [json.loads(v) for v in producer.values("test.dlq")]
    assert set(letter) == ENVELOPE_FIELDS
    assert (letter["consumer"], letter["stage"], letter["attempts"]) == ("test", "handle", 5)
    assert (letter["topic"], letter["partition"], letter["offset"]) == ("t", 0, 1)
    assert letter["error_type"] == "ValueError" and "breaks the handler" in letter["reason"]
    assert letter["value"] == "v0.1" and letter["key"] == "k1"
    assert sorted(producer.values("out")) == [b"v0.0", b"v0.2", b"v0.3", b"v1.0", b"v1.1"]
    [sent] = index(log, lambda e: isinstance(e, tuple) and e[:2] == ("send", "test.dlq"))
    before = [entry[1] for entry in log[:sent] if is_commit(entry)]
    assert before and all(c.get(0, 0) <= 1 for c in before)  # never past the failing record
    assert runtime._committed == {TP0: 4, TP1: 2}


def test_an_unreadable_record_is_a_dead_letter_at_once() -> None:
    class Unreadable(ValueError):
        pass

    def handle(record: Any) -> list[Output]:
        if record.offset == 0:
            raise Unreadable("not JSON")
        return echo(record)

    runtime, consumer, producer, _ = make_runtime(records(0, 2))
    per_record(runtime, handle, unreadable=(Unreadable,))
    run_until_drained(runtime, consumer)
    [letter] = [json.loads(v) for v in producer.values("test.dlq")]
    assert (letter["stage"], letter["reason"], letter["attempts"]) == ("read", "not JSON", None)
    assert consumer.commits == [{TP0: 2}]
    assert runtime.handler.dead_letters == 1 and runtime.handler.handled == 1  # type: ignore[union-attr]


@pytest.mark.parametrize("at_send", [False, True])
def test_an_output_refused_for_good_becomes_the_dead_letter_of_its_record(at_send: bool) -> None:
    runtime, consumer, producer, _ = make_runtime(records(0, 3))
    per_record(runtime, echo)
    producer.at_send = at_send
    producer.refuse = lambda topic, value: (
        MessageSizeTooLargeError("too large") if value == b"v0.1" else None
    )
    run_until_drained(runtime, consumer)
    assert producer.values("out") == [b"v0.0", b"v0.2"]
    [letter] = [json.loads(v) for v in producer.values("test.dlq")]
    assert (letter["stage"], letter["offset"], letter["error_type"]) == (
        "produce",
        1,
        "MessageSizeTooLargeError",
    )
    assert consumer.commits == [{TP0: 3}]


def test_a_dead_letter_refused_for_good_is_logged_and_the_batch_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def handle(batch: Sequence[Any], stop: threading.Event) -> Handled:
        letter = runtime.dead_letter(batch[0], stage="map", error_type="E", reason="why")
        return Handled.all_of(batch, [letter])

    runtime, consumer, producer, _ = make_runtime(
        records(0, 2), handler=handle, refused_note="; it is kept elsewhere"
    )
    producer.refuse = lambda topic, value: (
        TopicAuthorizationFailedError("no") if topic == "test.dlq" else None
    )
    with caplog.at_level(logging.ERROR, logger="freshet.consumer"):
        run_until_drained(runtime, consumer)
    assert "dead letter not published to test.dlq" in caplog.text
    assert "kept elsewhere" in caplog.text
    assert consumer.commits == [{TP0: 2}]


# --- stopping --------------------------------------------------------------------------------
def test_a_stop_finishes_the_record_in_hand_and_commits_only_what_is_done() -> None:
    stop = threading.Event()

    def handle(record: Any) -> list[Output]:
        if record.offset == 1:
            stop.set()  # SIGTERM while this record is handled
        return echo(record)

    runtime, consumer, producer, _ = make_runtime(records(0, 4))
    per_record(runtime, handle)
    runtime.run(stop)
    assert producer.values("out") == [b"v0.0", b"v0.1"]
    assert consumer.commits == [{TP0: 2}]  # records 2 and 3 are the next owner's, uncommitted


def test_a_stop_while_kafka_is_away_abandons_the_batch_uncommitted() -> None:
    stop = threading.Event()
    runtime, consumer, producer, log = make_runtime(
        records(0, 3), handler=lambda batch, stop: Handled.all_of(batch, [echo(batch[0])[0]])
    )

    def away() -> None:
        stop.set()
        raise KafkaTimeoutError("the broker is away")

    producer.on_flush = away
    with pytest.raises(Stopped):
        runtime.run(stop)
    assert consumer.commits == [] and not index(log, is_commit)


def test_serve_leaves_the_group_and_a_stop_while_connecting_is_quiet() -> None:
    runtime, consumer, producer, _ = make_runtime(
        records(0, 1), handler=lambda batch, stop: Handled.all_of(batch, [echo(batch[0])[0]])
    )
    stop = threading.Event()
    runtime.between = lambda stop: stop.set()
    runtime.serve(stop)
    assert consumer.commits == [{TP0: 1}] and consumer.closed and producer.closed

    stop = threading.Event()

    def no_broker() -> Any:
        stop.set()
        raise KafkaConnectionError("no broker")

    runtime = ConsumerRuntime("test", "127.0.0.1:1", "test.dlq", no_broker, topics=("t",))
    runtime.serve(stop)  # returns: no exception, nothing to close
    assert runtime.consumer is None


class LostCoordinatorConsumer(FakeConsumer):
    """A group member whose client may lose its coordinator (``lost``), as kafka-python's can
    for good: the runtime asks its ``_coordinator`` as it asks kafka-python's."""

    def __init__(self, log: list[Any], held: Sequence[TopicPartition] = ()) -> None:
        super().__init__([], log)
        self.config = {"group_id": "g"}
        self.lost = False
        self.held = list(held)
        self._coordinator = SimpleNamespace(coordinator_unknown=lambda: self.lost)
        self.close_timeout: int | None = None

    def assignment(self) -> set[TopicPartition]:
        return set(self.held)

    def subscription(self) -> set[str]:
        return set(self.subscribed.get("topics") or ())

    def close(self, timeout_ms: int | None = None) -> None:  # type: ignore[override]
        self.closed = True
        self.close_timeout = timeout_ms


def lost_coordinator_runtime(
    held: Sequence[TopicPartition] = (),
    unheld: Callable[[Sequence[str]], int | None] = lambda topics: 0,
) -> tuple[ConsumerRuntime, list[LostCoordinatorConsumer], list[Any]]:
    """``unheld``: what the group's coordinator says (partitions held by no member)."""
    built: list[LostCoordinatorConsumer] = []
    told: list[Any] = []

    def new_consumer() -> LostCoordinatorConsumer:
        built.append(LostCoordinatorConsumer([], held))
        return built[-1]

    stage = SimpleNamespace(
        on_partitions_revoked=lambda tps: told.append(("revoked", sorted(tps))),
        on_partitions_assigned=lambda tps: told.append(("assigned", tps)),
    )
    runtime = ConsumerRuntime(
        "test",
        "127.0.0.1:1",
        "test.dlq",
        new_consumer,
        topics=("t",),
        listener=stage,
        broker_reachable=lambda: reachable[0],
        group_probe=unheld,
    )
    return runtime, built, told


reachable = [True]  # what lost_coordinator_runtime's broker probe answers


def test_a_member_whose_client_lost_its_coordinator_for_good_is_rebuilt() -> None:
    runtime, built, told = lost_coordinator_runtime(held=[TP0, TP1])
    stop = threading.Event()
    runtime.connect(stop)
    runtime._next[TP0] = 3
    built[0].lost = True
    assert not runtime.watch_group(stop, now=100.0)  # the first poll that finds none
    assert not runtime.watch_group(stop, now=129.0)  # 29 s: a broker may be restarting
    assert runtime.rebuilt == 0 and len(built) == 1
    assert runtime.watch_group(stop, now=130.5)
    # The old client is closed within a bound, its partitions are given up (the stage is
    # told, the runtime forgets their offsets), and a new client subscribes afresh.
    assert built[0].closed and built[0].close_timeout == 5_000
    assert told == [("revoked", [TP0, TP1])] and TP0 not in runtime._next
    assert len(built) == 2 and runtime.consumer is built[1]
    assert built[1].subscribed == {"topics": ["t"], "pattern": None}
    assert runtime.rebuilt == 1
    # The new client starts a fresh count.
    built[1].lost = True
    assert not runtime.watch_group(stop, now=131.0)
    assert not runtime.watch_group(stop, now=160.0)


def test_a_member_that_knows_its_coordinator_is_never_rebuilt() -> None:
    # Without partitions while the group holds every partition (more members than
    # partitions), or while the group rebalances (None), a member knows its coordinator:
    # however long it stays so, nothing is rebuilt.
    for says in (0, None):
        runtime, built, _ = lost_coordinator_runtime(held=[], unheld=lambda topics, s=says: s)
        stop = threading.Event()
        runtime.connect(stop)
        assert not any(runtime.watch_group(stop, now=float(t)) for t in range(0, 600, 10))
        assert runtime.rebuilt == 0 and len(built) == 1
    # A coordinator lost for less than the limit, found again, then lost again: the count
    # starts over each time.
    for start in (1000.0, 1100.0):
        built[0].lost = True
        assert not runtime.watch_group(stop, now=start)
        assert not runtime.watch_group(stop, now=start + 25)
        built[0].lost = False
        assert not runtime.watch_group(stop, now=start + 26)
    assert runtime.rebuilt == 0 and len(built) == 1
    # The watch can be turned off.
    runtime.coordinator_lost_s = 0
    built[0].lost = True
    assert not any(runtime.watch_group(stop, now=float(t)) for t in range(2000, 2600, 10))


def test_a_member_left_without_partitions_while_the_group_leaves_some_unheld_is_rebuilt() -> None:
    # kafka-python 3.0.12, seen in CI: a member joined, its assignment never arrived (or it
    # joined before its topic existed and never rejoined), and the step's requests waited for
    # good. After 60 s without partitions it asks the group; 4 partitions held by nobody.
    asked: list[tuple[float, list[str]]] = []
    clock = [0.0]

    def unheld(topics: Sequence[str]) -> int:
        asked.append((clock[0], list(topics)))
        return 4

    runtime, built, _ = lost_coordinator_runtime(held=[], unheld=unheld)
    stop = threading.Event()
    runtime.connect(stop)
    for t in range(0, 60, 5):
        clock[0] = float(t)
        assert not runtime.watch_group(stop, now=clock[0])
    assert asked == [] and runtime.rebuilt == 0
    clock[0] = 60.0
    assert runtime.watch_group(stop, now=60.0)
    assert asked == [(60.0, ["t"])] and runtime.rebuilt == 1 and built[0].closed
    assert runtime.consumer is built[1] and built[1].subscribed["topics"] == ["t"]
    # The new member counts afresh.
    assert not runtime.watch_group(stop, now=61.0) and runtime.rebuilt == 1


def test_the_group_is_asked_at_most_every_30_s_and_a_failed_question_rebuilds_nothing() -> None:
    answers: list[Any] = [None, KafkaTimeoutError("no answer"), 0, 2]
    asked: list[float] = []
    clock = [0.0]

    def unheld(topics: Sequence[str]) -> int | None:
        asked.append(clock[0])
        answer = answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer  # type: ignore[no-any-return]

    runtime, built, _ = lost_coordinator_runtime(held=[], unheld=unheld)
    stop = threading.Event()
    runtime.connect(stop)
    rebuilt_at = None
    for t in range(0, 400, 5):
        clock[0] = float(t)
        if runtime.watch_group(stop, now=clock[0]):
            rebuilt_at = clock[0]
            break
    # Asked at 60 (rebalancing), 90 (no answer), 120 (all held), 150 (2 unheld: rebuilt).
    assert asked == [60.0, 90.0, 120.0, 150.0] and rebuilt_at == 150.0
    # A member that holds partitions never asks, and one that gets some starts over.
    runtime, built, _ = lost_coordinator_runtime(held=[TP0], unheld=unheld)
    runtime.connect(stop)
    asked.clear()
    assert not any(runtime.watch_group(stop, now=float(t)) for t in range(0, 600, 10))
    assert asked == []
    runtime.unassigned_s = 0  # the watch can be turned off
    built[0].held = []
    assert not any(runtime.watch_group(stop, now=float(t)) for t in range(600, 1200, 10))
    assert asked == []


def test_a_broker_outage_is_waited_out_by_the_same_client() -> None:
    # While no broker takes connections the old client is left to find its coordinator again
    # (a new one would only bootstrap later); the count starts when the broker is back.
    runtime, built, _ = lost_coordinator_runtime()
    stop = threading.Event()
    runtime.connect(stop)
    built[0].lost = True
    reachable[0] = False
    try:
        assert not any(runtime.watch_group(stop, now=float(t)) for t in range(0, 300, 5))
    finally:
        reachable[0] = True
    # Back at 300 s: the last probe that found no broker was at 295 s.
    assert not any(runtime.watch_group(stop, now=float(t)) for t in range(300, 325))
    assert runtime.watch_group(stop, now=325.5) and len(built) == 2


def test_the_broker_probe_is_a_tcp_connect() -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        assert broker_reachable(f"127.0.0.1:1, 127.0.0.1:{port}")
    finally:
        server.close()
    assert not broker_reachable(f"127.0.0.1:{port}", timeout=0.5)
    assert not broker_reachable("no-port-here")


def test_a_commit_that_fails_because_the_coordinator_is_lost_for_good_rebuilds_the_member() -> None:
    # A batch in hand when the client loses its coordinator: the commit would fail forever.
    # Once the coordinator has been unknown for the limit (the broker up), the offsets are
    # left uncommitted (the records are handled again, which changes nothing) and a new
    # client joins.
    runtime, built, told = lost_coordinator_runtime(held=[TP0])
    runtime.coordinator_lost_s = 0.05
    stop = threading.Event()
    runtime.connect(stop)
    built[0].lost = True
    built[0].commit_errors = [KafkaTimeoutError("no coordinator")] * 1000
    runtime._next[TP0] = 5
    runtime.commit_ready(stop)
    assert built[0].commits == [] and len(built[0].commit_errors) < 1000
    assert runtime.rebuilt == 1 and built[0].closed and runtime.consumer is built[1]
    assert told == [("revoked", [TP0])] and runtime._next == {}
    # With the coordinator known, a failing commit is only retried, never a rebuild.
    runtime, built, _ = lost_coordinator_runtime(held=[TP0])
    runtime.coordinator_lost_s = 0.05
    runtime.connect(stop)
    built[0].commit_errors = [KafkaTimeoutError("slow")] * 3
    runtime._next[TP0] = 5
    runtime.commit_ready(stop)
    assert built[0].commits == [{TP0: 5}] and runtime.rebuilt == 0


def test_the_watch_runs_after_empty_polls_in_the_loop() -> None:
    runtime, built, _ = lost_coordinator_runtime()
    runtime.coordinator_lost_s = 0.05
    runtime.handler = lambda batch, stop: Handled.all_of(batch)
    stop = threading.Event()
    runtime.connect(stop)
    built[0].lost = True
    polls = [0]

    def between(stop: threading.Event) -> None:
        polls[0] += 1
        if runtime.rebuilt or polls[0] >= 200:
            stop.set()
        stop.wait(0.005)

    runtime.between = between
    runtime.run(stop)
    assert runtime.rebuilt == 1 and built[0].closed and runtime.consumer is built[1]


def test_a_dead_letter_topic_must_end_in_dlq() -> None:
    with pytest.raises(ValueError, match=r"must end in '\.dlq'"):
        ConsumerRuntime("test", "127.0.0.1:1", "test.errors", lambda: None, topics=("t",))
    assert is_dead_letter_topic(deadletters.DLQ_TOPIC) and is_dead_letter_topic(DEAD_LETTERS)


# --- the envelope ----------------------------------------------------------------------------
def test_the_envelope_stays_under_the_message_limit_whatever_the_record_holds() -> None:
    for value in (b"\x01" * 200_000, b"x" * 5_000_000, "é".encode() * 1_000_000, b"\xff\xfe" * 9):
        key, message = envelope(
            consumer="test",
            stage="read",
            topic="t",
            partition=0,
            offset=1,
            key=b"k" * 100_000,
            value=value,
            error_type="E",
            reason="why " * 10_000,
        )
        assert len(message) + len(key or b"") < 1_000_000
        body = json.loads(message)
        assert set(body) == ENVELOPE_FIELDS and body["format"] == 1
        assert body["truncated"] is True and body["record_size"] == len(value)
        assert key is not None and len(key) == 64  # the long key's digest
        assert len(body["reason"]) < 4100
    _, message = envelope(
        consumer="test",
        stage="read",
        topic="t",
        partition=0,
        offset=1,
        key=None,
        value=b"\xff\x00binary",
        error_type="E",
        reason="why",
    )
    body = json.loads(message)
    assert body["value"].startswith("base64:") and stored_bytes(body["value"]) == b"\xff\x00binary"
    assert body["truncated"] is False and body["key"] is None


def test_the_sync_worker_and_the_workflow_write_the_same_envelope() -> None:
    from freshet.cdc.events import RecordPosition
    from freshet.sync.changes import Rejected

    _, sync_message = deadletters.dlq_message(
        Rejected(RecordPosition("freshet.app.articles", 2, 9), b"{}", b"{x", "decode", "E", "bad")
    )
    from freshet.answering.messages import loads

    def handle(record: Any) -> list[Output]:
        loads(record.value)  # raises MessageError: the message cannot be read
        return []

    step = Step("inference", "rag.requests", "g", "127.0.0.1:1", handle)
    [out] = step.handle(FakeRecord("rag.requests", 0, 4, b"r1", None))  # no value: unreadable
    sync_body, workflow_body = json.loads(sync_message), json.loads(out.value)
    assert set(sync_body) == set(workflow_body) == ENVELOPE_FIELDS
    assert (sync_body["consumer"], sync_body["stage"], sync_body["value"]) == (
        "sync",
        "decode",
        "{x",
    )
    assert (workflow_body["consumer"], workflow_body["stage"]) == ("inference", "read")
    assert out.topic == DEAD_LETTERS and out.dead_letter


# --- the capture pattern ---------------------------------------------------------------------
def test_no_capture_pattern_matches_a_dead_letter_topic() -> None:
    from freshet.sync.worker import topic_pattern

    for prefix in ("freshet", "rag", "app", "a.b"):
        pattern = re.compile(topic_pattern(prefix))
        for dead in (f"{prefix}.sync.dlq", f"{prefix}.workflow.dlq", f"{prefix}.billing.dlq"):
            assert is_dead_letter_topic(dead)
            assert not pattern.match(dead), (prefix, dead)
        assert pattern.match(f"{prefix}.app.articles")
        assert pattern.match(f"{prefix}.app.dlq_archive")
        assert pattern.match(f"{prefix}.sync.dlqs")
    # Each stage's own dead-letter topic, under the prefix that would otherwise capture it.
    for dead in (deadletters.DLQ_TOPIC, DEAD_LETTERS):
        assert dead.endswith(DLQ_SUFFIX)
        assert not re.match(topic_pattern(dead.split(".")[0]), dead), dead


# --- the sync worker over the runtime --------------------------------------------------------
class ZeroEmbedder(Embedder):
    def __init__(self) -> None:
        super().__init__(4)

    def _embed(self, texts: list[str]) -> np.ndarray:
        return np.zeros((len(texts), 4), dtype=np.float32)


class HeldLane:
    """What the sync worker asks of its large lane: it holds partition 0 from offset 1."""

    def __init__(self) -> None:
        self.first: int | None = 1
        self.done: list[Any] = []

    def holds(self, table: str, doc_key: str) -> bool:
        return False

    def first_pending(self, topic: str, partition: int) -> int | None:
        return self.first if partition == 0 else None

    def completed(self) -> list[Any]:
        done, self.done = self.done, []
        return done


def test_the_sync_worker_runs_its_batches_through_the_runtime(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from freshet.sync.worker import SyncWorker, topic_pattern

    settings = Settings(home=tmp_path)
    worker = SyncWorker(settings, ZeroEmbedder(), chunker=SimpleNamespace())  # type: ignore[arg-type]
    runtime = worker.runtime
    assert runtime.pattern == topic_pattern(settings.topic_prefix)
    assert (runtime.poll_ms, runtime.max_records) == (200, settings.sync_batch)
    assert runtime.dead_letter_topic == deadletters.DLQ_TOPIC
    monkeypatch.setattr(
        worker, "_apply_with_retry", lambda changes, rejected, stop, **kw: ApplyStats()
    )
    topic = f"{settings.topic_prefix}.app.articles"
    batch = [
        FakeRecord(topic, 0, 0, b'{"id": 1}', b'{"op": "c", "after": {"id": 1'),  # not JSON
        FakeRecord(topic, 0, 1, b'{"id": 2}', None),  # a tombstone
        FakeRecord(f"{settings.topic_prefix}.app.unmapped", 1, 0, b"{}", b"{}"),
    ]
    runtime, consumer, producer, log = _attach(worker, batch)
    lane = HeldLane()
    worker.lane = lane  # type: ignore[assignment]
    stop = threading.Event()
    runtime.connect(stop)
    assert consumer.subscribed["pattern"] == topic_pattern(settings.topic_prefix)
    worker.process(runtime.poll(stop), stop)
    [letter] = [json.loads(v) for v in producer.values(deadletters.DLQ_TOPIC)]
    assert (letter["consumer"], letter["stage"], letter["offset"]) == ("sync", "decode", 0)
    [flush] = index(log, lambda e: e == "flush")
    [commit] = index(log, is_commit)
    assert flush < commit
    # Partition 0 only up to the record the lane holds; partition 1 in full.
    assert consumer.commits == [
        {TopicPartition(topic, 0): 1, TopicPartition(f"{settings.topic_prefix}.app.unmapped", 1): 1}
    ]
    counters = worker.metrics.snapshot()["counters"]
    assert (counters["events"], counters["dead_letters"], counters["batches"]) == (3, 1, 1)
    # The lane applies what it held: between batches, its offsets are committed.
    lane.first, lane.done = None, [SimpleNamespace(stats=ApplyStats())]
    worker._finish_lane_work(stop)
    assert consumer.commits[-1] == {TopicPartition(topic, 0): 2}


def test_a_new_worker_sizes_its_backlog_and_dates_its_lag_only_after_its_first_batch(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Recovery: a restarted worker's first changes wait for no Kafka round trip of its own
    bookkeeping (the backlog's size, the lag's positions and age)."""
    from freshet.sync.worker import HEARTBEAT_SECONDS, SyncWorker

    worker = SyncWorker(Settings(home=tmp_path), ZeroEmbedder(), chunker=SimpleNamespace())  # type: ignore[arg-type]
    worker.lane = None
    sized: list[int] = []
    monkeypatch.setattr(worker, "_size_backlog", lambda: sized.append(worker._done))
    monkeypatch.setattr(worker, "_heartbeat", lambda state, force=False: None)
    stop = threading.Event()
    worker.on_assigned([TP0])
    worker._between(stop)  # the poll that joined the group, before any batch
    assert sized == [] and not worker._lag_due(worker._started + 0.1)
    worker._done = 3  # the first batch is applied
    worker._between(stop)
    assert sized == [3] and worker._lag_due(worker._started + 0.1)
    worker._done = 0  # an idle topic: the lag is dated after a heartbeat's interval anyway
    assert worker._lag_due(worker._started + HEARTBEAT_SECONDS)


def _attach(
    worker: Any, batch: list[FakeRecord]
) -> tuple[ConsumerRuntime, FakeConsumer, FakeProducer, list[Any]]:
    log: list[Any] = []
    consumer, producer = FakeConsumer(batch, log), FakeProducer(log)
    worker.runtime.new_consumer = lambda: consumer
    worker.runtime.producer = producer
    return worker.runtime, consumer, producer, log


def test_a_large_batch_is_applied_in_transactions_of_whole_documents_then_committed_once(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sync/pacing.py in the worker: 10 documents (one changed twice), the first transaction of
    1 document while nothing is measured, each next one twice as large; the offsets are
    committed once, after all."""
    from freshet.sync.worker import SyncWorker

    settings = Settings(home=tmp_path)
    worker = SyncWorker(settings, ZeroEmbedder(), chunker=SimpleNamespace())  # type: ignore[arg-type]
    worker.lane = None
    transactions: list[list[tuple[str, int]]] = []

    def apply(
        changes: list[Any], rejected: list[Any], stop: threading.Event, on_embedded: Any = None
    ) -> ApplyStats:
        transactions.append([(c.doc_key, c.position.offset) for c in changes])
        return ApplyStats(applied=len(changes), embed_seconds=0.1 * len(changes))

    monkeypatch.setattr(worker, "_apply_with_retry", apply)
    topic = f"{settings.topic_prefix}.app.articles"

    def upsert(offset: int, key: int) -> FakeRecord:
        row = {"id": key, "title": "T", "body": "B", "access_groups": []}
        source = {"lsn": 100 + offset, "ts_ms": 1_700_000_000_000, "schema": "app"}
        source["table"] = "articles"
        value = json.dumps({"op": "u", "after": row, "source": source})
        return FakeRecord(topic, 0, offset, json.dumps({"id": key}).encode(), value.encode())

    batch = [upsert(i, i) for i in range(10)] + [upsert(10, 0)]
    runtime, consumer, _, log = _attach(worker, batch)
    stop = threading.Event()
    runtime.connect(stop)
    worker.process(runtime.poll(stop), stop)
    assert [len({k for k, _ in t}) for t in transactions] == [1, 2, 4, 3]
    assert transactions[0][:2] == [("0", 0), ("0", 10)]  # document 0's changes together
    assert consumer.commits == [{TopicPartition(topic, 0): 11}]
    assert len(index(log, is_commit)) == 1


def test_record_checksums_are_verified_in_c_not_in_python() -> None:
    # kafka-python checks every fetched batch's CRC-32C; without the `crc32c` package it does so
    # byte by byte in Python (about 7 MB/s here, against about 20 GB/s in C), on every consumer.
    from kafka.record import util

    assert util.crc32c_c is not None, "pip install crc32c (requirements.txt)"
    assert util.calc_crc32c(memoryview(b"123456789")) == 0xE3069283  # the CRC-32C check value
