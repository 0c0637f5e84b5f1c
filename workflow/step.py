"""One step of the async workflow: a consumer group that reads a topic, handles each record and
produces what it yields, at least once.

The loop is the consumer runtime's (freshet/consumer.py; `ConsumerRuntime.run` states the
delivery contract), the same as the sync worker's; a step is a record handler run through
`PerRecord`, and its consumer's settings. Per polled batch: handle the records one at a time,
produce and flush what they yield, then commit their offsets; a crash before the commit means
they are handled again, so every handler is idempotent (outputs keyed by request id, the answers
table upserted by id). A record the handler cannot read (MessageError) goes to rag.workflow.dlq
at once (the runtime's dead-letter envelope, stage "read") and keeps the partition flowing; any
other failure is retried from that record with backoff, never skipped: for as long as the
database or Kafka is away, and MAX_ATTEMPTS times for anything else, after which the record is a
dead letter too (stage "handle"). Every call to Kafka (connecting, polling, producing,
committing) waits out an outage of any length with jittered backoff until it succeeds or the
step is told to stop; a stop finishes the record in hand, commits what is done and leaves the
group.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition

from freshet.answering.messages import DEAD_LETTERS, MessageError
from freshet.consumer import MAX_ATTEMPTS, ConsumerRuntime, Output, PerRecord
from freshet.retry import Backoff

logger = logging.getLogger(__name__)

__all__ = ["MAX_ATTEMPTS", "Handler", "Output", "Step"]

Handler = Callable[[Any], list[Output]]


@dataclass
class Step:
    """Runs ``handler`` over ``topic`` in consumer group ``group`` until ``stop`` is set."""

    name: str
    topic: str
    group: str
    bootstrap_servers: str
    handler: Handler
    batch: int = 50
    poll_ms: int = 200
    # Run after every poll (the validate step's deadline sweep), with or without records.
    between: Callable[[threading.Event], None] | None = None
    # Between two attempts at a failing record: 0.5 s doubling to 30 s (jittered).
    backoff: Backoff = field(default_factory=lambda: Backoff(initial=0.5, cap=30.0), repr=False)

    def __post_init__(self) -> None:
        self.runtime = ConsumerRuntime(
            name=self.name,
            bootstrap_servers=self.bootstrap_servers,
            dead_letter_topic=DEAD_LETTERS,
            new_consumer=self._new_consumer,
            topics=(self.topic,),
            poll_ms=self.poll_ms,
            max_records=self.batch,
            log_prefix=f"{self.name}: ",
            listener=_Assignment(self.name),
            between=self.between,
            # The step's input topic exists before it joins its group: the member's first,
            # empty, assignment is followed by a rejoin with the partitions within a metadata
            # round trip, not when the first message creates the topic.
            create_topics=True,
        )
        self.records = PerRecord(
            self.runtime, self.handler, unreadable=(MessageError,), backoff=self.backoff
        )
        self.runtime.handler = self.records

    @property
    def handled(self) -> int:
        """Records the handler took (dead letters not counted)."""
        return self.records.handled

    @property
    def dead_letters(self) -> int:
        return self.records.dead_letters

    def run(self, stop: threading.Event) -> None:
        logger.info("%s: consuming %s in group %s", self.name, self.topic, self.group)
        self.runtime.serve(stop)
        logger.info("%s: stopped after %d records", self.name, self.handled)

    def handle(self, record: Any) -> list[Output]:
        """The handler's outputs, or the record's dead letter when it cannot be read."""
        return self.records.one(record)

    def _new_consumer(self) -> KafkaConsumer:
        """The group member's consumer; the runtime subscribes it to the step's topic."""
        return KafkaConsumer(
            bootstrap_servers=self.bootstrap_servers,
            group_id=self.group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            client_id=f"freshet-{self.name}",
            # A step may subscribe before its topic exists (the first ask creates it); with
            # the client's default (5 minutes) it saw the topic only after asks had timed out.
            metadata_max_age_ms=5_000,
        )


class _Assignment(ConsumerRebalanceListener):
    """Logs which partitions this member holds (how a step's workers share the load)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        pass

    def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        names = ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(assigned)) or "none"
        logger.info("%s: partitions assigned: %s", self.name, names)
