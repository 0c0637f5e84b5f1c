"""The consumer runtime's group watch on the real broker: a member stranded without partitions
is rebuilt and consumes; a workflow step creates its input topic before it joins its group."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.coordinator.assignors.abstract import ConsumerProtocolAssignment
from kafka.coordinator.assignors.range import RangePartitionAssignor

from freshet.consumer import ConsumerRuntime, Handled, ensure_topics, unheld_partitions
from freshet.settings import Settings
from freshet.workflow.step import Step
from tests.conftest import wait_for

pytestmark = pytest.mark.integration


def topics_of(settings: Settings) -> set[str]:
    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    try:
        return set(admin.list_topics())
    finally:
        admin.close()


def new_topic(settings: Settings, name: str, partitions: int) -> tuple[str, str]:
    """A new topic of ``partitions`` partitions, and a new group's name."""
    tag = uuid.uuid4().hex[:8]
    topic, group = f"it.{name}.{tag}", f"it-{name}-{tag}"
    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    try:
        admin.create_topics({topic: {"num_partitions": partitions}}, wait_for_metadata=True)
    finally:
        admin.close()
    return topic, group


class AssignsNothing(RangePartitionAssignor):
    """The range assignor's protocol, but every member gets no partition: the state a member
    is left in when its assignment never arrives, or when it joined before its topic existed
    ("No partition metadata for topic"), and kafka-python (3.0.12) never rejoins."""

    @classmethod
    def assign(cls, cluster: Any, members: Any) -> dict[str, Any]:
        return {m.member_id: ConsumerProtocolAssignment(cls.version, [], b"") for m in members}


def test_a_member_stranded_without_partitions_is_rebuilt_and_consumes(
    running_stack: Settings,
) -> None:
    """The first client's group assignment gives it nothing (AssignsNothing), and it stays so.
    The group watch asks the coordinator, finds the partitions held by nobody, and rebuilds
    the member; the new client (the default assignor) takes them and consumes."""
    topic, group = new_topic(running_stack, "stranded", 2)
    bootstrap = running_stack.bootstrap_servers
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        for n in range(4):
            producer.send(topic, key=str(n).encode(), value=b"x").get(timeout=30)
    finally:
        producer.close()
    built: list[KafkaConsumer] = []

    def new_consumer() -> KafkaConsumer:
        strategy = (AssignsNothing,) if not built else (RangePartitionAssignor,)
        built.append(
            KafkaConsumer(
                bootstrap_servers=bootstrap,
                group_id=group,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                partition_assignment_strategy=strategy,
            )
        )
        return built[-1]

    seen: list[Any] = []

    def handler(records: Any, stop: threading.Event) -> Handled:
        seen.extend(records)
        return Handled.all_of(records)

    runtime = ConsumerRuntime(
        "stranded",
        bootstrap,
        "it.stranded.dlq",
        new_consumer,
        handler=handler,
        topics=(topic,),
        unassigned_s=5.0,
    )
    stop = threading.Event()
    started = time.monotonic()
    thread = threading.Thread(target=runtime.serve, args=(stop,), daemon=True)
    thread.start()
    try:
        assert wait_for(lambda: len(seen) == 4, 120, interval=0.2), (
            f"{len(seen)} of 4 records consumed; rebuilt {runtime.rebuilt} times"
        )
        print(f"consumed after {time.monotonic() - started:.1f} s, rebuilt {runtime.rebuilt}")
        assert runtime.rebuilt == 1 and len(built) == 2
        assert unheld_partitions(bootstrap, group, [topic]) == 0
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive()


def joined(consumer: KafkaConsumer) -> bool:
    """Poll once; whether the consumer holds partitions now."""
    consumer.poll(timeout_ms=200)
    return bool(consumer.assignment())


def test_the_group_check_counts_partitions_no_member_holds(running_stack: Settings) -> None:
    topic, group = new_topic(running_stack, "unheld", 3)
    bootstrap = running_stack.bootstrap_servers
    # No member at all: the group is unknown (Dead), which the check does not judge.
    assert unheld_partitions(bootstrap, group, [topic]) is None
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group)
    consumer.subscribe([topic])
    try:
        assert wait_for(lambda: joined(consumer), 60)
        assert unheld_partitions(bootstrap, group, [topic]) == 0
    finally:
        consumer.close()
    # The member left: the group is Empty and holds nothing.
    assert wait_for(lambda: unheld_partitions(bootstrap, group, [topic]) == 3, 30)


def test_a_step_creates_its_input_topic_before_joining(running_stack: Settings) -> None:
    topic = f"it.step-input.{uuid.uuid4().hex[:8]}"
    assert topic not in topics_of(running_stack)
    step = Step(
        "it-step",
        topic,
        f"it-step-{uuid.uuid4().hex[:8]}",
        running_stack.bootstrap_servers,
        lambda record: [],
    )
    stop = threading.Event()
    try:
        consumer = step.runtime.connect(stop)
        assert topic in topics_of(running_stack)
        # The member joins the group with the topic's partitions (the broker's default count).
        assert wait_for(lambda: joined(consumer), 60)
        assert {tp.topic for tp in consumer.assignment()} == {topic}
    finally:
        step.runtime.close()


def test_topics_kafka_refuses_to_create_are_logged_not_raised(
    running_stack: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    good = f"it.ensure.{uuid.uuid4().hex[:8]}"
    bad = "not a valid topic name!"
    bootstrap = running_stack.bootstrap_servers
    assert ensure_topics(bootstrap, [good, bad]) == [good]
    assert good in topics_of(running_stack) and bad not in topics_of(running_stack)
    assert "Kafka did not create the topics not a valid topic name!" in caplog.text
    assert ensure_topics(bootstrap, [good]) == []  # there already
