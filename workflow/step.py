"""One step of the async workflow: a consumer group that reads a topic, handles each record and
produces what it yields, at least once.

Per polled batch: handle every record, flush the producer, then commit the batch's offsets; a
crash before the commit means the batch is handled again, so every handler is idempotent
(outputs keyed by request id, the answers table upserted by id). A record the handler cannot
read (MessageError) goes to rag.workflow.dlq with the reason and keeps the partition flowing;
any other failure (database or Kafka down) is retried from that record with backoff, never
skipped. Every call to Kafka (connecting, polling, producing, committing) waits out an outage
of any length with jittered backoff until it succeeds or the step is told to stop.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, OffsetAndMetadata, TopicPartition
from kafka.errors import CommitFailedError, KafkaError

from freshet.answering.messages import DEAD_LETTERS, MessageError, dumps
from freshet.retry import Stopped, retry, transient_db_error

logger = logging.getLogger(__name__)

MAX_BACKOFF_S = 30.0
KAFKA_ERRORS = (KafkaError, OSError)
# A record whose handler fails this many times in a row with an error that is not a service
# being away (database, Kafka) is a dead letter: nothing a record holds can stop its partition.
MAX_ATTEMPTS = 5


@dataclass(frozen=True)
class Output:
    topic: str
    key: bytes | None
    value: bytes


Handler = Callable[[Any], list[Output]]


def dead_letter(record: Any, reason: str) -> Output:
    """The dead-letter message for ``record``: why, where it came from, and what it held."""
    value = record.value
    return Output(
        DEAD_LETTERS,
        record.key,
        dumps(
            {
                "reason": reason,
                "topic": record.topic,
                "partition": record.partition,
                "offset": record.offset,
                "value": value.decode("utf-8", "replace") if value is not None else None,
            }
        ),
    )


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
    handled: int = 0
    dead_letters: int = 0
    _backoff: float = field(default=0.5, repr=False)
    _failures: dict[tuple[str, int, int], int] = field(default_factory=dict, repr=False)

    def run(self, stop: threading.Event) -> None:
        def kafka(call: Callable[[], Any], what: str) -> Any:
            return retry(call, what=f"{self.name}: {what}", stop=stop, transient=KAFKA_ERRORS)

        try:
            consumer = kafka(
                lambda: KafkaConsumer(
                    self.topic,
                    bootstrap_servers=self.bootstrap_servers,
                    group_id=self.group,
                    enable_auto_commit=False,
                    auto_offset_reset="earliest",
                    client_id=f"freshet-{self.name}",
                ),
                "connecting to Kafka",
            )
            producer = kafka(
                lambda: KafkaProducer(
                    bootstrap_servers=self.bootstrap_servers, acks="all", max_block_ms=10_000
                ),
                "connecting to Kafka",
            )
        except Stopped:
            return
        logger.info("%s: consuming %s in group %s", self.name, self.topic, self.group)
        try:
            while not stop.is_set():
                polled = kafka(
                    lambda: consumer.poll(timeout_ms=self.poll_ms, max_records=self.batch),
                    "polling",
                )
                for partition, records in polled.items():
                    self._process(consumer, producer, partition, records, stop)
        except Stopped:
            logger.info("%s: stopping while waiting for Kafka", self.name)
        finally:
            for close in (lambda: producer.close(timeout=10), consumer.close):
                try:
                    close()  # the consumer leaves the group: its partitions move at once
                except Exception as exc:  # noqa: BLE001 - closing what may be gone already
                    logger.debug("%s: closing: %s", self.name, exc)
            logger.info("%s: stopped after %d records", self.name, self.handled)

    def _process(
        self,
        consumer: KafkaConsumer,
        producer: KafkaProducer,
        partition: TopicPartition,
        records: Sequence[Any],
        stop: threading.Event,
    ) -> None:
        done = None
        for record in records:
            if stop.is_set():
                break
            try:
                outputs = self.handle(record)
            except Exception as exc:  # noqa: BLE001 - retried from this record, never skipped
                attempts = self._failures.get(_at(record), 0) + 1
                if attempts >= MAX_ATTEMPTS and not _service_away(exc):
                    self._failures.pop(_at(record), None)
                    self.dead_letters += 1
                    reason = f"{self.name} failed {attempts} times: {type(exc).__name__}: {exc}"
                    logger.error(
                        "%s: %s:%d@%d to %s: %s", self.name, *_at(record), DEAD_LETTERS, reason
                    )
                    outputs = [dead_letter(record, reason[:2000])]
                else:
                    self._failures[_at(record)] = attempts
                    logger.exception(
                        "%s: %s:%d@%d failed; retrying in %.1fs",
                        self.name,
                        *_at(record),
                        self._backoff,
                    )
                    consumer.seek(partition, record.offset)
                    stop.wait(self._backoff)
                    self._backoff = min(self._backoff * 2, MAX_BACKOFF_S)
                    break
            self._failures.pop(_at(record), None)
            for out in outputs:
                producer.send(out.topic, key=out.key, value=out.value)
            done = record.offset
            self._backoff = 0.5
        if done is None:
            return
        retry(
            lambda: producer.flush(timeout=30),
            what=f"{self.name}: publishing",
            stop=stop,
            transient=KAFKA_ERRORS,
        )
        try:
            retry(
                lambda: consumer.commit({partition: OffsetAndMetadata(done + 1, "", -1)}),
                what=f"{self.name}: committing",
                stop=stop,
                transient=KAFKA_ERRORS,
                fatal=lambda exc: isinstance(exc, CommitFailedError),
            )
        except CommitFailedError as exc:
            # A rebalance moved the partition: its new owner handles these records again
            # (every handler is idempotent).
            logger.warning("%s: offsets not committed, the group rebalanced: %s", self.name, exc)

    def handle(self, record: Any) -> list[Output]:
        """The handler's outputs, or the record's dead letter when it cannot be read."""
        try:
            outputs = self.handler(record)
        except MessageError as exc:
            self.dead_letters += 1
            logger.warning("%s: %s:%d@%d to %s: %s", self.name, *_at(record), DEAD_LETTERS, exc)
            return [dead_letter(record, str(exc))]
        self.handled += 1
        return outputs


def _at(record: Any) -> tuple[str, int, int]:
    return record.topic, record.partition, record.offset


def _service_away(exc: BaseException) -> bool:
    """The database or Kafka is not there: wait it out, however long."""
    return transient_db_error(exc) or isinstance(exc, KAFKA_ERRORS)
