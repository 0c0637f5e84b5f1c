"""Kafka record helpers shared by the unit tests, the integration tests and the fixture-capture
script (which runs outside pytest, so these are not in tests/conftest.py)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from kafka import KafkaConsumer, TopicPartition


@dataclass(frozen=True)
class FakeRecord:
    """A Kafka record as the sync worker's router reads one (topic, partition, offset, bytes)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass(frozen=True)
class RawRecord:
    topic: str
    partition: int
    offset: int
    key: str | None
    value: str | None
    received_at: float

    def as_fixture(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "key": self.key,
            "value": self.value,
        }


class TopicTail:
    """Reads a topic from its current end, so a test sees only what it caused."""

    def __init__(self, bootstrap_servers: str, topic: str) -> None:
        self.topic = topic
        self.consumer = KafkaConsumer(
            bootstrap_servers=bootstrap_servers,
            enable_auto_commit=False,
            group_id=None,
            consumer_timeout_ms=200,
        )
        partitions = self._partitions(timeout=30)
        self.consumer.assign(partitions)
        self.consumer.seek_to_end(*partitions)
        for tp in partitions:  # resolve the end offsets now, before the test writes
            self.consumer.position(tp)

    def _partitions(self, timeout: float) -> list[TopicPartition]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.consumer.partitions_for_topic(self.topic)
            if found:
                return [TopicPartition(self.topic, p) for p in sorted(found)]
            time.sleep(0.5)
        raise AssertionError(f"topic {self.topic} does not exist after {timeout}s")

    def collect(self, until: Callable[[list[RawRecord]], bool], timeout: float) -> list[RawRecord]:
        """Records in arrival order until `until(records)` holds or the timeout passes."""
        records: list[RawRecord] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            batch = self.consumer.poll(timeout_ms=200)
            for messages in batch.values():
                for m in messages:
                    records.append(
                        RawRecord(
                            m.topic,
                            m.partition,
                            m.offset,
                            m.key.decode() if m.key is not None else None,
                            m.value.decode() if m.value is not None else None,
                            time.monotonic(),
                        )
                    )
            if until(records):
                return records
        return records

    def close(self) -> None:
        self.consumer.close()


def key_is(record: RawRecord, **key: Any) -> bool:
    return record.key is not None and json.loads(record.key) == key


@contextmanager
def topic_from_start(bootstrap_servers: str, topic: str) -> Iterator[Any]:
    """A group-less consumer of ``topic`` from its first record; iteration ends after 5 s
    without a new record."""
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
        consumer_timeout_ms=5000,
    )
    try:
        yield consumer
    finally:
        consumer.close()
