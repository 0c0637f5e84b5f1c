"""The consumer runtime: the one Kafka poll-handle-produce-commit loop of every stage (the sync
worker, each step of the async workflow), and the one dead-letter envelope they all write.

A stage supplies a handler, ``handler(records, stop) -> Handled`` (the outputs to produce and,
per partition, the offset its records are done up to), and its specifics: how its consumer is
built, what it subscribes to, what it holds back from committing (the sync worker's large lane),
its rebalance listener, its bookkeeping after each batch. The runtime owns everything between
Kafka and the handler: connecting, subscribing, polling, producing, flushing, committing, the
backoff (freshet/retry.py), a graceful stop (the ``stop`` Event, which the `freshet` commands
set on SIGINT/SIGTERM: freshet/commands.py, install_stop_handlers), and closing.
`ConsumerRuntime.run` states the delivery contract step by step. `PerRecord` is a handler over a
record-at-a-time function (the workflow's steps): it retries a failing record and makes a dead
letter of one that keeps failing.

Dead-letter envelope (format 1)
-------------------------------
A record a stage gives up on is produced to the stage's dead-letter topic (the sync worker's
``freshet.sync.dlq``, the workflow's ``rag.workflow.dlq``; every dead-letter topic's name ends
in ``.dlq``, and no capture pattern matches such a topic). The message key is the record's key
(its SHA-256, in hex, when the key is over 8 KiB); the value is one JSON object:

    format         1
    consumer       who gave up on the record: "sync", "inference", "validator"
    stage          where it failed: sync "decode" | "map" | "size" | "embed" | "write";
                   a workflow step "read" (the message cannot be read), "handle" (the handler
                   failed `attempts` times); any consumer "produce" (the broker refused the
                   record's output for good)
    topic, partition, offset   the record's position (-1 when unknown)
    table, doc_key the source table and document key when known (sync), else null
    error_type     the exception's class name
    reason         what went wrong, at most 4,000 characters
    attempts       how many times the handler tried the record, when it counted them, else null
    key            the record's key as text: UTF-8, or "base64:..." when the bytes are not UTF-8
                   text without NUL; at most 8 KiB of it
    value          the record's value, the same way; at most 96 KiB of it
    record_size    the whole value's size in bytes (null for a null value)
    record_sha256  the whole value's SHA-256 in hex
    truncated      whether the key or the value was cut (the whole record stays in its topic
                   while retention keeps it: `freshet dlq replay` reads it back by position)
    ts             when the letter was made, ISO 8601 in UTC

An envelope stays under 700 kB whatever the record holds (JSON escapes a control character into
6 bytes; 96 KiB of them is under 600 kB), so Kafka's default 1 MiB message limit always takes it:
dead-lettering cannot fail on a record's bytes or size. The sync worker also keeps every dead
letter in the table rag.dead_letters (sync/deadletters.py), which `freshet dlq list|replay` read.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Protocol

from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import CommitFailedError, FencedInstanceIdError, KafkaError, KafkaTimeoutError
from kafka.structs import OffsetAndMetadata

from freshet.errors import FreshetError
from freshet.retry import Backoff, Stopped, retry, transient_db_error

logger = logging.getLogger(__name__)

# Errors of the Kafka client worth waiting out (a broker away, a socket closed).
KAFKA_ERRORS: tuple[type[BaseException], ...] = (KafkaError, OSError)

# Every dead-letter topic's name ends so; capture patterns exclude such topics.
DLQ_SUFFIX = ".dlq"
ENVELOPE_FORMAT = 1
# What a dead letter keeps of a record (see the module docstring).
MAX_STORED_KEY = 8 * 1024
MAX_MESSAGE_VALUE = 96 * 1024
MAX_REASON = 4000
# A record whose handler fails this many times in a row with an error that is not a service
# being away (database, Kafka) is a dead letter: nothing a record holds can stop its partition.
MAX_ATTEMPTS = 5
# While a member's coordinator is unknown, how often the runtime checks that a broker takes
# connections (`ConsumerRuntime.watch_group`).
PROBE_EVERY_S = 5.0
# While a member holds no partition, how often (at most) it asks the group's coordinator whether
# every partition of its topics is held by some member (`ConsumerRuntime.watch_group`).
GROUP_CHECK_EVERY_S = 30.0


class MemberFenced(FreshetError, RuntimeError):
    """Another consumer joined the group with this member's static id (group.instance.id):
    the broker fenced this one, which stops instead of fencing the other in turn."""

    def __init__(self, group: str | None, instance_id: str | None) -> None:
        super().__init__(
            f"another consumer joined group {group!r} with this worker's group.instance.id"
            f" {instance_id!r}, so Kafka fenced this one and it stopped; give each running"
            " worker its own id (FRESHET_SYNC_INSTANCE_ID), or leave it empty"
        )


def _coordinator_unknown(consumer: Any) -> bool:
    """Whether ``consumer``'s client knows no group coordinator now (False when it cannot
    say: a consumer without a group, or a client that does not expose it)."""
    coordinator = getattr(consumer, "_coordinator", None)
    unknown = getattr(coordinator, "coordinator_unknown", None)
    if unknown is None or not getattr(consumer, "config", {}).get("group_id"):
        return False
    try:
        return bool(unknown())
    except Exception:  # noqa: BLE001 - a broken client's state
        return True


def broker_reachable(bootstrap_servers: str, timeout: float = 1.0) -> bool:
    """Whether any of ``bootstrap_servers`` ("host:port,...") takes a TCP connection now."""
    for server in bootstrap_servers.split(","):
        host, _, port = server.strip().rpartition(":")
        if not host or not port.isdigit():
            continue
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
                return True
        except OSError:
            continue
    return False


def ensure_topics(
    bootstrap_servers: str, topics: Sequence[str], timeout_ms: int = 10_000
) -> list[str]:
    """Create those of ``topics`` that do not exist yet, with the broker's defaults (partitions,
    replication); the topics created (one Kafka refuses to create is logged, not raised). A
    consumer that joins its group before its topic exists gets no partitions until the group
    rebalances on the new topic's metadata when the topic is created, and kafka-python (3.0.12)
    was seen never to. With the topic there, the rebalance follows the first join at once
    (kafka-python's first join still precedes the topic's metadata; about 0.1 s later it
    rejoins with the partitions)."""
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(
        bootstrap_servers=bootstrap_servers,
        client_id="freshet-topics",
        request_timeout_ms=timeout_ms,
    )
    try:
        missing = sorted(set(topics) - set(admin.list_topics()))
        if missing:
            answers = admin.create_topics(missing, timeout_ms=timeout_ms, raise_errors=False)
            created, usable, refused = [], [], []
            for answer in answers.get("topics") or []:
                code = answer.get("error_code")
                # 36: another member created it meanwhile, which is as good.
                if code in (0, 36):
                    usable.append(answer["name"])
                    if code == 0:
                        created.append(answer["name"])
                else:
                    refused.append(f"{answer['name']} ({answer.get('error_message') or code})")
            if refused:
                # Not allowed to create topics here, say: subscribe anyway, as before.
                logger.warning(
                    "Kafka did not create the topics %s; subscribing to them as they are",
                    ", ".join(refused),
                )
            if usable:
                admin.wait_for_topics(usable, timeout_ms=timeout_ms)
            return created
        return []
    finally:
        admin.close()


def unheld_partitions(
    bootstrap_servers: str, group: str, topics: Sequence[str], timeout_ms: int = 5_000
) -> int | None:
    """How many partitions of ``topics`` no member of consumer group ``group`` holds, as the
    group's coordinator describes it; None while the group rebalances (its assignment is not
    settled) or when the description cannot be read."""
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(
        bootstrap_servers=bootstrap_servers,
        client_id="freshet-group-check",
        request_timeout_ms=timeout_ms,
    )
    try:
        described = admin.describe_groups([group]).get(group) or {}
        if described.get("group_state") not in ("Stable", "Empty"):
            return None
        held: set[tuple[str, int]] = set()
        for member in described.get("members") or []:
            assignment = member.get("member_assignment")
            if not isinstance(assignment, dict):
                return None
            for entry in assignment.get("assigned_partitions") or []:
                held.update((entry["topic"], int(p)) for p in entry["partitions"])
        partitions = {
            (topic["name"], int(p["partition_index"]))
            for topic in admin.describe_topics(list(topics))
            if not topic.get("error_code")
            for p in topic.get("partitions") or []
        }
        return len(partitions - held)
    finally:
        admin.close()


def _fenced(exc: BaseException) -> bool:
    return isinstance(exc, FencedInstanceIdError)


def is_dead_letter_topic(topic: str) -> bool:
    return topic.endswith(DLQ_SUFFIX)


class Record(Protocol):
    """A consumed record, as the runtime reads one (kafka-python's ConsumerRecord, test doubles)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...


# --- the dead-letter envelope ---------------------------------------------------------------
@dataclass(frozen=True)
class Stored:
    """A record's bytes as they can be stored in a text column and a JSON message."""

    text: str | None
    size: int | None
    sha256: str | None
    truncated: bool


def storable(raw: bytes | None, limit: int) -> Stored:
    """UTF-8 text when the bytes are UTF-8 without NUL, else base64 with a marker; at most
    ``limit`` bytes of the original are kept."""
    if raw is None:
        return Stored(None, None, None, False)
    raw = bytes(raw)
    cut = raw[:limit]
    try:
        text = cut.decode("utf-8")
        if "\x00" in text or text.startswith("base64:"):
            raise ValueError("not storable as text")
    except ValueError:  # UnicodeDecodeError is a ValueError
        text = "base64:" + base64.b64encode(cut).decode("ascii")
    return Stored(text, len(raw), hashlib.sha256(raw).hexdigest(), len(raw) > limit)


def stored_bytes(text: str | None) -> bytes | None:
    """The bytes a `storable` text stands for."""
    if text is None:
        return None
    if text.startswith("base64:"):
        return base64.b64decode(text[len("base64:") :])
    return text.encode("utf-8")


def clean_text(text: str | None, limit: int) -> str | None:
    """Text that PostgreSQL and JSON encoders accept: no NUL, no lone surrogate, bounded."""
    if text is None:
        return None
    text = text.replace("\x00", "\\0").encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[:limit] + f"... ({len(text):,} characters)"


def envelope(
    *,
    consumer: str,
    stage: str,
    topic: str | None,
    partition: int | None,
    offset: int | None,
    key: bytes | None,
    value: bytes | None,
    error_type: str,
    reason: str,
    table: str | None = None,
    doc_key: str | None = None,
    attempts: int | None = None,
) -> tuple[bytes | None, bytes]:
    """Key and value of the dead-letter message for one record (format 1, module docstring)."""
    stored_key = storable(key, MAX_STORED_KEY)
    stored_value = storable(value, MAX_MESSAGE_VALUE)
    body = {
        "format": ENVELOPE_FORMAT,
        "consumer": clean_text(consumer, 100),
        "stage": clean_text(stage, 100),
        "topic": clean_text(topic or "", 500),
        "partition": partition if partition is not None else -1,
        "offset": offset if offset is not None else -1,
        "table": clean_text(table, 500),
        "doc_key": clean_text(doc_key, 2000),
        "error_type": clean_text(error_type, 200),
        "reason": clean_text(reason, MAX_REASON),
        "attempts": attempts,
        "key": stored_key.text,
        "value": stored_value.text,
        "record_size": stored_value.size,
        "record_sha256": stored_value.sha256,
        "truncated": stored_key.truncated or stored_value.truncated,
        "ts": datetime.now(UTC).isoformat(),
    }
    if key is not None and len(key) > MAX_STORED_KEY:
        key = hashlib.sha256(bytes(key)).hexdigest().encode()
    return (bytes(key) if key is not None else None), json.dumps(body).encode()


# --- what a handler returns -----------------------------------------------------------------
@dataclass(frozen=True)
class Output:
    """A message to produce. ``record`` is the consumed record it answers: should the broker
    refuse the message for good, that record becomes a dead letter instead."""

    topic: str
    key: bytes | None
    value: bytes | None  # None: a tombstone (compacted topics)
    record: Any = field(default=None, repr=False, compare=False)
    dead_letter: bool = False


@dataclass
class Handled:
    """What a handler made of a batch: the outputs to produce (dead letters included) and, per
    partition, the next offset to read: every record before it is done once the outputs are
    flushed. ``detail`` is the stage's own, for its bookkeeping (`ConsumerRuntime.after`)."""

    outputs: list[Output] = field(default_factory=list)
    done: dict[Any, int] = field(default_factory=dict)
    detail: Any = None

    @classmethod
    def all_of(
        cls, records: Sequence[Record], outputs: Sequence[Output] = (), detail: Any = None
    ) -> Handled:
        """Every record of ``records`` done."""
        return cls(list(outputs), next_offsets(records), detail)


def next_offsets(records: Sequence[Record]) -> dict[TopicPartition, int]:
    """Per partition, the offset after the last of ``records``."""
    done: dict[TopicPartition, int] = {}
    for r in records:
        tp = TopicPartition(r.topic, r.partition)
        done[tp] = max(done.get(tp, 0), r.offset + 1)
    return done


Handler = Callable[[Sequence[Any], threading.Event], Handled]


def _retriable(exc: KafkaError) -> bool:
    return bool(getattr(exc, "retriable", False)) or isinstance(exc, KafkaTimeoutError)


def service_away(exc: BaseException) -> bool:
    """The database or Kafka is not there: wait it out, however long."""
    return transient_db_error(exc) or isinstance(exc, KAFKA_ERRORS)


# --- the runtime ----------------------------------------------------------------------------
class _Listener(ConsumerRebalanceListener):
    """Forgets what the runtime tracked of revoked partitions, then tells the stage."""

    def __init__(self, runtime: ConsumerRuntime) -> None:
        self.runtime = runtime

    def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        self.runtime.forget(revoked)
        if self.runtime.listener is not None:
            self.runtime.listener.on_partitions_revoked(revoked)

    def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        if self.runtime.listener is not None:
            self.runtime.listener.on_partitions_assigned(assigned)


@dataclass
class ConsumerRuntime:
    """One member of a consumer group, running ``handler`` over what it polls (see `run`).

    ``new_consumer`` builds the KafkaConsumer (group, client settings) without subscribing;
    the runtime subscribes it to ``topics`` or to ``pattern``. ``hold(partition)`` is the first
    offset the stage still holds back in that partition (None: nothing): offsets are committed
    up to it at most. ``after(records, handled, started)`` is the stage's bookkeeping after each
    batch is committed; ``between(stop)`` runs after every poll, with or without records."""

    name: str
    bootstrap_servers: str
    dead_letter_topic: str
    new_consumer: Callable[[], KafkaConsumer]
    handler: Handler | None = None
    topics: Sequence[str] = ()
    pattern: str | None = None
    poll_ms: int = 200
    max_records: int = 500
    hold: Callable[[Any], int | None] | None = None
    listener: ConsumerRebalanceListener | None = None
    after: Callable[[Sequence[Any], Handled, float], None] | None = None
    between: Callable[[threading.Event], None] | None = None
    # Log lines start so ("inference: "); the sync worker's have no prefix.
    log_prefix: str = ""
    # Where else a dead letter the broker refuses for good is kept, for the log line.
    refused_note: str = ""
    commit_timeout_ms: int = 10_000
    # A member whose client has known no group coordinator for this long (polls in a row) is
    # rebuilt: a new client, a new join (see `watch_group`). 0 turns the watch off.
    coordinator_lost_s: float = 30.0
    # A member that has held no partition for this long (polls in a row) while it knows its
    # coordinator asks the group whether some partition of its topics is held by no member;
    # if so it is rebuilt (see `watch_group`). 0 turns the watch off.
    unassigned_s: float = 60.0
    # Whether a broker takes connections now (None: a TCP connect to ``bootstrap_servers``).
    broker_reachable: Callable[[], bool] | None = None
    # How many partitions of the given topics no member of the group holds, or None when the
    # group cannot say now (None: `unheld_partitions`, asked of the group's coordinator).
    group_probe: Callable[[Sequence[str]], int | None] | None = None
    # Create the subscribed ``topics`` that do not exist before subscribing (`ensure_topics`):
    # the workflow's steps, whose input topics the first message would otherwise create (the
    # member then rejoins for them within a metadata round trip, not at that moment).
    create_topics: bool = False
    # The largest message the runtime's producer sends (kafka-python's max_request_size).
    max_request_bytes: int = 1_048_576
    consumer: Any = None
    producer: Any = None
    # Commit without waiting for the broker's answer (`commit_ready`): the sync worker's, whose
    # synchronous commit was about 5 ms of every batch at 20 edits/s on a busy machine.
    commit_async: bool = False
    # Per partition: the offset after the last record done, and the last committed.
    _next: dict[Any, int] = field(default_factory=dict, repr=False)
    _committed: dict[Any, int] = field(default_factory=dict, repr=False)
    # Per partition: the offset an asynchronous commit sent and the broker has not answered.
    _sending: dict[Any, int] = field(default_factory=dict, repr=False)
    # Why the last asynchronous commit failed (None: it did not): the next commit waits.
    _async_failed: BaseException | None = field(default=None, repr=False)
    # When the polls in a row that found no coordinator started (None: the last one found it).
    _lost_since: float | None = field(default=None, repr=False)
    _probed_at: float = field(default=float("-inf"), repr=False)
    # When the polls in a row that found this member without partitions started.
    _unassigned_since: float | None = field(default=None, repr=False)
    _group_checked_at: float = field(default=float("-inf"), repr=False)
    # How many times `watch_group` rebuilt the consumer.
    rebuilt: int = 0

    def __post_init__(self) -> None:
        if not is_dead_letter_topic(self.dead_letter_topic):
            raise ValueError(
                f"dead-letter topic {self.dead_letter_topic!r} must end in {DLQ_SUFFIX!r}"
                " (capture patterns exclude such topics)"
            )
        if self.pattern is None and not self.topics:
            raise ValueError("a consumer runtime needs topics or a pattern to subscribe to")

    # --- lifecycle ---------------------------------------------------------------------
    def serve(self, stop: threading.Event) -> None:
        """Connect, `run` until ``stop`` is set, and close. A stop while waiting for Kafka
        ends the wait quietly."""
        try:
            self.connect(stop)
            self.run(stop)
        except Stopped:
            logger.info("%sstopping while waiting for a service", self.log_prefix)
        finally:
            self.close()

    def connect(self, stop: threading.Event) -> Any:
        """The subscribed consumer, built once (waiting for Kafka as long as it takes)."""
        if self.consumer is None:
            self.consumer = retry(
                self._subscribed,
                what=f"{self.log_prefix}connecting to Kafka",
                stop=stop,
                transient=KAFKA_ERRORS,
            )
        return self.consumer

    def _subscribed(self) -> KafkaConsumer:
        if self.create_topics and self.pattern is None:
            created = ensure_topics(self.bootstrap_servers, self.topics)
            if created:
                logger.info("%screated the topics %s", self.log_prefix, ", ".join(created))
        consumer = self.new_consumer()
        if self.pattern is not None:
            consumer.subscribe(pattern=self.pattern, listener=_Listener(self))
        else:
            consumer.subscribe(topics=list(self.topics), listener=_Listener(self))
        return consumer

    def close(self) -> None:
        """Commit what is done (waiting for the answer), leave the group (its partitions
        move at once) and close the producer."""
        closers: list[Callable[[], object]] = []
        if self.consumer is not None:
            if self.commit_async:
                closers.append(self._commit_before_closing)
            closers.append(self.consumer.close)
        if self.producer is not None:
            closers.append(lambda: self.producer.close(timeout=5))
        for close in closers:
            try:
                close()
            except Exception as exc:  # noqa: BLE001 - closing what may be gone already
                logger.debug("%sclosing: %s", self.log_prefix, exc)

    def _commit_before_closing(self) -> None:
        offsets = self._ready(sent_counts=False)
        if offsets:
            self.consumer.commit(offsets, timeout_ms=2_000)
            for tp, meta in offsets.items():
                self._committed[tp] = meta.offset

    def forget(self, partitions: Sequence[Any]) -> None:
        """Partitions this member no longer owns (revoked in a rebalance)."""
        for tp in partitions:
            self._next.pop(tp, None)
            self._committed.pop(tp, None)
            self._sending.pop(tp, None)

    # --- the loop ----------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Consume until ``stop`` is set. The delivery contract, per batch (at-least-once
        delivery, and handlers whose effects are idempotent, make each record take effect
        exactly once):

        1. Poll a batch: at most ``max_records`` records, waiting at most ``poll_ms``.
           Rebalances run inside poll only, so between batches: the runtime forgets the
           revoked partitions, and since every batch was committed before this poll, nothing
           handled is lost with them (what the stage holds back, ``hold``, is redelivered to
           the partition's next owner).
        2. Handle it: ``handler(records, stop)``. The handler's database transaction commits
           here (the sync worker: the batch's changes and its dead letters in
           rag.dead_letters; the validator: its rag.answers upsert). A database outage is the
           handler's to wait out (the sync worker retries its transaction; `PerRecord` retries
           the record, below). It returns the outputs and dead letters to produce and, per
           partition, the offset its records are done up to.
        3. Produce the outputs and the dead letters (`deliver`).
        4. Flush the producer and check every send: what the broker may still take
           (retriable errors, timeouts) is sent again after a backoff; what it refuses for good
           is logged if it is a dead letter (the sync worker keeps its copy in
           rag.dead_letters), and an output becomes the dead letter of the record it answers.
        5. Commit, per partition, the offsets done in 2, never past the first record the stage
           holds back (``hold``) and never backwards (`commit_ready`): only after 2 to 4
           succeeded. A CommitFailedError (the group rebalanced meanwhile) is logged: the
           partition's new owner handles those records again, which changes nothing. With
           ``commit_async`` the commit is sent and its answer read at the next poll.
        6. The stage's bookkeeping (``after``, e.g. metrics), then ``between`` (the sync
           worker: what its large lane finished, steps 3 to 5 for it, and its heartbeat).

        Every call to Kafka (connecting, polling, producing and flushing, committing) is
        retried with jittered backoff (freshet/retry.py) until it succeeds or ``stop`` is set,
        so an outage of any length is waited out. A transient failure never commits: the batch
        is sent again in 3-4, or handled again by the handler in 2 (`PerRecord` seeks back to
        the failing record and polls it again after a backoff; a record that fails repeatedly,
        or cannot be read at all, becomes a dead letter and its partition goes on).

        Stop: ``stop`` is checked before every poll (and by `PerRecord` between records). The
        batch in hand is finished, steps 2 to 5, while the services answer; if one is away, its
        wait ends with `Stopped` and the batch is abandoned uncommitted, to be redelivered. An
        offset is committed only once every output of every record before it is flushed, so a
        stop, a crash or a kill -9 at any point leaves no partial work committed.
        """
        self.connect(stop)
        while not stop.is_set():
            records = self.poll(stop)
            if records:
                self.process(records, stop)
            else:
                self.watch_group(stop)
            if self.between is not None:
                self.between(stop)

    def watch_group(self, stop: threading.Event, now: float | None = None) -> bool:
        """Rebuild the consumer when its client has found no group coordinator in any poll for
        ``coordinator_lost_s``, or when it has held no partition for ``unassigned_s`` while
        some partition of its topics is held by no member; True when it did.

        kafka-python (3.0.12) can lose its coordinator and never look it up again: each poll
        returns nothing after its timeout while the client's IO thread spins, and the member
        never rejoins (seen in the workflow's inference step, where it left the step's
        requests unanswered for good). A new client looks the coordinator up afresh. A broker
        outage also leaves the coordinator unknown, and the old client finds it again once the
        broker is back, sooner than a new one would bootstrap: so the time counts only while a
        broker takes TCP connections (``broker_reachable``, probed every 5 s while the
        coordinator is unknown).

        It can also stay joined with no partitions: a member that joined while its topic did
        not exist yet, or whose assignment never arrived after a rebalance (both seen in CI:
        the step's requests waited for good). A member without partitions is normal when the
        group has more members than the topic has partitions, and while the group rebalances;
        so after ``unassigned_s`` without any it asks the group's coordinator, at most every
        GROUP_CHECK_EVERY_S (`unheld_partitions`, a separate admin client), and is rebuilt only
        when the group is settled and some partition of its topics is held by nobody.

        Called after a poll that returned no records (a poll returns records only once the
        coordinator is ready), so a long batch between two polls never counts as time lost; a
        commit that keeps failing meanwhile is watched the same way (`commit_ready`)."""
        if self._coordinator_lost(now):
            self._rebuild(stop, now)
            return True
        if self._stranded(now):
            self._rebuild(stop, now, why="has held no partition while the group left some unheld")
            return True
        return False

    def _stranded(self, now: float | None = None) -> bool:
        """Whether this member has held no partition for ``unassigned_s`` while its group,
        settled, leaves a partition of its topics unheld (each call is one observation)."""
        if self.unassigned_s <= 0 or self.consumer is None:
            return False
        now = time.monotonic() if now is None else now
        try:
            held = self.consumer.assignment()
            topics = sorted(self.consumer.subscription() or ())
            group = self.consumer.config.get("group_id")
        except Exception:  # noqa: BLE001 - a broken client's state: the other watch's case
            return False
        if held or not topics or not group or _coordinator_unknown(self.consumer):
            self._unassigned_since = None
            return False
        if self._unassigned_since is None:
            self._unassigned_since = now
            return False
        if (
            now - self._unassigned_since < self.unassigned_s
            or now - self._group_checked_at < GROUP_CHECK_EVERY_S
        ):
            return False
        self._group_checked_at = now
        probe = self.group_probe or (
            lambda names: unheld_partitions(self.bootstrap_servers, group, names)
        )
        try:
            unheld = probe(topics)
        except Exception as exc:  # noqa: BLE001 - asked again later
            logger.debug("%sdescribing group %s: %s", self.log_prefix, group, exc)
            return False
        if not unheld:
            return False
        logger.warning(
            "%sthis member of group %s has held no partition for %.0f s while %d partition(s)"
            " of %s are held by no member",
            self.log_prefix,
            group,
            now - self._unassigned_since,
            unheld,
            ", ".join(topics),
        )
        return True

    def _coordinator_lost(self, now: float | None = None) -> bool:
        """Whether the client has known no coordinator for ``coordinator_lost_s`` while a
        broker takes connections (each call is one observation; see `watch_group`)."""
        if self.coordinator_lost_s <= 0 or self.consumer is None:
            return False
        now = time.monotonic() if now is None else now
        if not _coordinator_unknown(self.consumer):
            self._lost_since = None
            return False
        if self._lost_since is None:
            self._lost_since = now
            return False
        lost_for = now - self._lost_since
        if lost_for < self.coordinator_lost_s and now - self._probed_at < PROBE_EVERY_S:
            return False
        self._probed_at = now
        reachable = self.broker_reachable or (lambda: broker_reachable(self.bootstrap_servers))
        if not reachable():
            # An outage: the client waits for the broker (a new one would only wait longer,
            # its bootstrap backing off). Count again from when the broker takes connections.
            self._lost_since = now
            return False
        return lost_for >= self.coordinator_lost_s

    def _rebuild(
        self, stop: threading.Event, now: float | None = None, why: str | None = None
    ) -> None:
        """A new client in place of one that lost its coordinator or its partitions
        (`watch_group`)."""
        now = time.monotonic() if now is None else now
        if why is None:
            lost_for = now - (self._lost_since if self._lost_since is not None else now)
            why = f"has found no group coordinator for {lost_for:.0f} s"
        logger.warning(
            "%sthe Kafka client %s; rebuilding the consumer (a new client rejoins the group;"
            " what is committed stays committed)",
            self.log_prefix,
            why,
        )
        old = self.consumer
        try:
            held = list(old.assignment())
        except Exception:  # noqa: BLE001 - a broken client may not answer
            held = []
        if held:
            _Listener(self).on_partitions_revoked(held)
        self.consumer = None
        self._lost_since = None
        self._unassigned_since = None
        # The old client's unanswered commits are lost with it: the next commit waits.
        self._sending.clear()
        self._async_failed = KafkaTimeoutError("the consumer was rebuilt")
        self.rebuilt += 1
        try:
            old.close(timeout_ms=5_000)
        except Exception as exc:  # noqa: BLE001 - closing a broken client
            logger.debug("%sclosing the old consumer: %s", self.log_prefix, exc)
        self.connect(stop)

    def poll(self, stop: threading.Event) -> list[Any]:
        """Step 1: one poll's records, partition by partition."""
        consumer = self.connect(stop)
        try:
            polled = retry(
                lambda: consumer.poll(timeout_ms=self.poll_ms, max_records=self.max_records),
                what=f"{self.log_prefix}polling Kafka",
                stop=stop,
                transient=KAFKA_ERRORS,
                fatal=_fenced,
            )
        except FencedInstanceIdError:
            raise self._fenced_error() from None
        return [r for tp in sorted(polled) for r in polled[tp]]

    def process(self, records: Sequence[Any], stop: threading.Event) -> Handled:
        """Steps 2 to 6 of `run` for one batch."""
        if self.handler is None:
            raise RuntimeError(f"{self.name}: the consumer runtime has no handler")
        started = time.perf_counter()
        handled = self.handler(records, stop)
        self.complete(handled, stop)
        if self.after is not None:
            self.after(records, handled, started)
        return handled

    def complete(self, handled: Handled, stop: threading.Event) -> None:
        """Steps 3 to 5: produce and flush ``handled.outputs``, then commit what is done."""
        self.deliver(handled.outputs, stop)
        for tp, next_offset in handled.done.items():
            self._next[tp] = max(self._next.get(tp, 0), next_offset)
        self.commit_ready(stop)

    def deliver(self, outputs: Sequence[Output], stop: threading.Event) -> None:
        """Steps 3 and 4: every output produced and flushed, or refused for good (see `run`)."""
        pending = list(outputs)
        if not pending:
            return

        def attempt() -> None:
            while pending:
                producer = self._producer_or_new()
                sent = []
                replaced: list[Output] = []
                for out in pending:
                    try:
                        future = producer.send(out.topic, key=out.key, value=out.value)
                    except KafkaError as exc:
                        if _retriable(exc):
                            raise  # the broker is away: wait, then send everything again
                        replaced.extend(self._refused(out, exc))
                        continue
                    sent.append((out, future))
                producer.flush(timeout=30)
                again = []
                for out, future in sent:
                    try:
                        future.get(timeout=0)
                    except KafkaError as exc:
                        if _retriable(exc):
                            again.append(out)
                        else:
                            replaced.extend(self._refused(out, exc))
                pending[:] = again + replaced
                if again:
                    raise KafkaTimeoutError(f"{len(again)} messages not yet delivered")

        every_one_a_letter = all(out.dead_letter for out in pending)
        retry(
            attempt,
            what=f"{self.log_prefix}publishing" + (" dead letters" if every_one_a_letter else ""),
            stop=stop,
            transient=KAFKA_ERRORS,
        )

    def _refused(self, out: Output, exc: KafkaError) -> list[Output]:
        """What to send instead of a message the broker refuses for good."""
        if out.dead_letter:
            logger.error(
                "%sdead letter not published to %s (%s)%s",
                self.log_prefix,
                out.topic,
                exc,
                self.refused_note,
            )
            return []
        if out.record is None:
            logger.error(
                "%smessage to %s refused for good and dropped: %s", self.log_prefix, out.topic, exc
            )
            return []
        record = out.record
        logger.error(
            "%s%s:%d@%d: its output to %s is refused for good (%s); the record goes to %s",
            self.log_prefix,
            record.topic,
            record.partition,
            record.offset,
            out.topic,
            exc,
            self.dead_letter_topic,
        )
        return [
            self.dead_letter(
                record,
                stage="produce",
                error_type=type(exc).__name__,
                reason=f"the broker refused the output to {out.topic}: {exc}",
            )
        ]

    def commit_ready(self, stop: threading.Event) -> None:
        """Step 5: commit, per partition, every offset now done and not held back.

        With ``commit_async`` the commit is sent and not waited for: the broker's answer is
        read at the next poll or commit (kafka-python runs the callback there). A failed
        answer makes the next commit a synchronous one, with the handling below (a rebalance
        logged, a fenced member stopped, a lost coordinator's client rebuilt); a stop commits
        what is done synchronously (`close`). Either way an offset is sent only after its
        records' effects are committed, so the delivery contract is unchanged: what a crash
        leaves uncommitted is handled again, which changes nothing."""
        if self.consumer is None:
            return
        waiting = not self.commit_async or self._async_failed is not None
        offsets = self._ready(sent_counts=not waiting)
        if not offsets:
            return
        if not waiting and self._send_commit(offsets):
            return
        offsets = self._ready(sent_counts=False)
        consumer = self.consumer
        lost = [False]

        def fatal(exc: BaseException) -> bool:
            if isinstance(exc, CommitFailedError) or _fenced(exc):
                return True
            lost[0] = self._coordinator_lost()
            return lost[0]

        try:
            retry(
                lambda: consumer.commit(offsets, timeout_ms=self.commit_timeout_ms),
                what=f"{self.log_prefix}committing offsets",
                stop=stop,
                transient=KAFKA_ERRORS,
                fatal=fatal,
            )
        except FencedInstanceIdError:
            raise self._fenced_error() from None
        except CommitFailedError as exc:
            # The group rebalanced meanwhile: the partitions' new owner re-reads these records,
            # and handling them again changes nothing.
            logger.warning(
                "%soffsets not committed, the group rebalanced: %s", self.log_prefix, exc
            )
            return
        except KAFKA_ERRORS as exc:
            if not lost[0]:
                raise
            # The client lost its coordinator for good: these offsets are not committed, and
            # the records are handled again by the partitions' next owner (perhaps this member
            # with its new client), which changes nothing.
            logger.warning("%soffsets not committed: %s", self.log_prefix, exc)
            self._rebuild(stop)
            return
        for tp, meta in offsets.items():
            self._committed[tp] = meta.offset
        self._async_failed = None

    def _ready(self, sent_counts: bool) -> dict[Any, OffsetAndMetadata]:
        """Per partition, the offset to commit now: done, not held back, beyond what is
        committed (and, ``sent_counts``, beyond what an unanswered commit sent)."""
        offsets = {}
        for tp, next_offset in self._next.items():
            held = self.hold(tp) if self.hold is not None else None
            target = next_offset if held is None else min(next_offset, held)
            floor = self._committed.get(tp, -1)
            if sent_counts:
                floor = max(floor, self._sending.get(tp, -1))
            if target > floor:
                offsets[tp] = OffsetAndMetadata(target, "", -1)
        return offsets

    def _send_commit(self, offsets: dict[Any, OffsetAndMetadata]) -> bool:
        """Send ``offsets`` without waiting for the answer; False when the client cannot
        (the caller commits synchronously instead)."""
        try:
            self.consumer.commit_async(offsets, callback=self._commit_answered)
        except FencedInstanceIdError:  # an earlier commit's answer, read now
            raise self._fenced_error() from None
        except KAFKA_ERRORS as exc:
            self._async_failed = exc
            return False
        for tp, meta in offsets.items():
            self._sending[tp] = meta.offset
        return True

    def _commit_answered(self, offsets: dict[Any, OffsetAndMetadata], answer: Any) -> None:
        """The broker's answer to an asynchronous commit (run by the client in a later poll
        or commit, on this thread)."""
        for tp, meta in offsets.items():
            if self._sending.get(tp) == meta.offset:
                del self._sending[tp]
        if isinstance(answer, BaseException):
            logger.info(
                "%san asynchronous offset commit failed (%s): the next commit waits for its answer",
                self.log_prefix,
                answer,
            )
            self._async_failed = answer
            return
        for tp, meta in offsets.items():
            if tp in self._next:  # not revoked meanwhile
                self._committed[tp] = max(self._committed.get(tp, -1), meta.offset)

    def _fenced_error(self) -> MemberFenced:
        config = getattr(self.consumer, "config", {}) or {}
        return MemberFenced(config.get("group_id"), config.get("group_instance_id"))

    def seek(self, partition: Any, offset: int) -> None:
        """Read ``partition`` again from ``offset`` at the next poll."""
        if self.consumer is not None:
            self.consumer.seek(partition, offset)

    def dead_letter(
        self,
        record: Record,
        *,
        stage: str,
        error_type: str,
        reason: str,
        attempts: int | None = None,
        table: str | None = None,
        doc_key: str | None = None,
    ) -> Output:
        """The dead-letter message for ``record``, bound for this runtime's dead-letter topic."""
        key, value = envelope(
            consumer=self.name,
            stage=stage,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key=record.key,
            value=record.value,
            error_type=error_type,
            reason=reason,
            table=table,
            doc_key=doc_key,
            attempts=attempts,
        )
        return Output(self.dead_letter_topic, key, value, dead_letter=True)

    def _producer_or_new(self) -> Any:
        if self.producer is None:
            self.producer = KafkaProducer(
                bootstrap_servers=self.bootstrap_servers,
                acks="all",
                max_block_ms=10_000,
                max_request_size=self.max_request_bytes,
            )
        return self.producer


# --- a record at a time ---------------------------------------------------------------------
@dataclass
class PerRecord:
    """A handler that runs ``handle(record) -> outputs`` on each record of a batch, in order.

    A record whose ``handle`` raises one of ``unreadable`` becomes a dead letter at once
    (stage "read"). Any other failure is retried from that record: the runtime seeks its
    partition back to it, waits a backoff (0.5 s doubling to 30 s, jittered), and the rest of
    the partition's batch waits for the next poll; the records before it are done. A record
    that fails ``max_attempts`` times in a row, with an error that is not a service being away
    (the database, Kafka: waited out however long), becomes a dead letter (stage "handle")."""

    runtime: ConsumerRuntime
    handle: Callable[[Any], list[Output]]
    unreadable: tuple[type[BaseException], ...] = ()
    max_attempts: int = MAX_ATTEMPTS
    backoff: Backoff = field(default_factory=lambda: Backoff(initial=0.5, cap=30.0))
    handled: int = 0
    dead_letters: int = 0
    _failures: dict[tuple[str, int, int], int] = field(default_factory=dict, repr=False)

    def __call__(self, records: Sequence[Any], stop: threading.Event) -> Handled:
        handled = Handled()
        waiting: set[tuple[str, int]] = set()  # partitions stopped at a failing record
        for record in records:
            if (record.topic, record.partition) in waiting:
                continue
            if stop.is_set():
                break
            outputs = self._attempt(record, stop)
            if outputs is None:
                waiting.add((record.topic, record.partition))
                continue
            handled.outputs.extend(replace(out, record=record) for out in outputs)
            handled.done[TopicPartition(record.topic, record.partition)] = record.offset + 1
        return handled

    def one(self, record: Any) -> list[Output]:
        """``handle(record)``, or the record's dead letter when it cannot be read."""
        try:
            outputs = self.handle(record)
        except self.unreadable as exc:
            return [self._dead(record, "read", exc, str(exc))]
        self.handled += 1
        return outputs

    def _attempt(self, record: Any, stop: threading.Event) -> list[Output] | None:
        """The record's outputs (or its dead letter), or None: it is to be polled again."""
        at = (record.topic, record.partition, record.offset)
        try:
            outputs = self.one(record)
        except Exception as exc:  # noqa: BLE001 - retried from this record, never skipped
            attempts = self._failures.get(at, 0) + 1
            if attempts >= self.max_attempts and not service_away(exc):
                self._failures.pop(at, None)
                reason = f"{self.runtime.name} failed {attempts} times: {type(exc).__name__}: {exc}"
                return [self._dead(record, "handle", exc, reason, attempts)]
            self._failures[at] = attempts
            wait = self.backoff.delay()
            logger.exception(
                "%s%s:%d@%d failed; retrying in %.1fs", self.runtime.log_prefix, *at, wait
            )
            self.runtime.seek(TopicPartition(record.topic, record.partition), record.offset)
            stop.wait(wait)
            return None
        self._failures.pop(at, None)
        self.backoff.reset()
        return outputs

    def _dead(
        self,
        record: Any,
        stage: str,
        exc: BaseException,
        reason: str,
        attempts: int | None = None,
    ) -> Output:
        self.dead_letters += 1
        log = logger.error if stage == "handle" else logger.warning
        log(
            "%s%s:%d@%d to %s: %s",
            self.runtime.log_prefix,
            record.topic,
            record.partition,
            record.offset,
            self.runtime.dead_letter_topic,
            reason,
        )
        return self.runtime.dead_letter(
            record,
            stage=stage,
            error_type=type(exc).__name__,
            reason=reason,
            attempts=attempts,
        )
