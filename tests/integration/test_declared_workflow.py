"""A declared multi-step workflow on the real stack, every step its own `freshet step`
process and consumer group: rewrite -> decompose (fan-out) -> answer (two workers) ->
synthesize (fan-in) -> validate. 100 two-part questions all complete, each answered exactly
once in effect, even when one answer worker is killed with SIGKILL mid-run."""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kafka import KafkaProducer

from freshet.answering.messages import AnswerRequest
from freshet.answering.retrieval import Filters
from freshet.answering.users import User
from freshet.db import connect, database_url
from freshet.settings import PROJECT_ROOT, Settings
from tests.conftest import wait_for
from tests.integration.conftest import WorkerThread
from tests.integration.sync_support import caught_up, source
from tests.integration.workflow_support import settle, start_step, stop_all

pytestmark = pytest.mark.integration

ROWS = (
    (881_001, "Lighthouse routine", "The lighthouse keeper feeds the grey cat at dawn."),
    (881_002, "Barn routine", "The farmer feeds the ferret at noon, behind the red barn."),
)
ASKS = 100
STEPS = ("rewrite", "decompose", "answer", "answer", "synthesize", "validate")


def workflow_file(folder: Path, tag: str) -> Path:
    """The shipped multi-part workflow on topics and groups of this test's own."""
    text = (PROJECT_ROOT / "workflows" / "multi-part.toml").read_text()
    text = text.replace('input = "rag.requests"', f'input = "it.{tag}.requests"')
    text = text.replace('"rag.multi.', f'"it.{tag}.').replace('"rag-multi-', f'"it-{tag}-')
    path = folder / "multi-part.toml"
    path.write_text(text)
    return path


@pytest.fixture
def indexed(running_stack: Settings, start_worker: Callable[..., WorkerThread]) -> Iterator[None]:
    with source(running_stack) as conn:
        for key, title, body in ROWS:
            conn.execute(
                "INSERT INTO app.articles (id, title, body) VALUES (%s, %s, %s)"
                " ON CONFLICT (id) DO UPDATE SET title = EXCLUDED.title, body = EXCLUDED.body",
                (key, title, body),
            )
    caught_up(start_worker())
    yield
    with source(running_stack) as conn:
        conn.execute("DELETE FROM app.articles WHERE id = ANY(%s)", ([r[0] for r in ROWS],))


def test_a_hundred_two_part_questions_through_five_steps_with_a_worker_killed(
    running_stack: Settings,
    running_stack_env: dict[str, str],
    indexed: None,
    tmp_path: Path,
) -> None:
    tag = uuid.uuid4().hex[:8]
    workflow = workflow_file(tmp_path, tag)
    logs = {f"{n}-{i}": tmp_path / f"{n}-{i}.log" for i, n in enumerate(STEPS)}
    processes = {
        key: start_step(running_stack_env, key.rsplit("-", 1)[0], workflow, log)
        for key, log in logs.items()
    }
    settle(
        processes,
        logs,
        lambda key: start_step(running_stack_env, key.rsplit("-", 1)[0], workflow, logs[key]),
        f"partitions assigned: it.{tag}.",
    )
    ids = [f"{tag}-{n:03d}" for n in range(ASKS)]
    producer = KafkaProducer(bootstrap_servers=running_stack.bootstrap_servers)
    try:
        for i, rid in enumerate(ids):
            question = (
                f"Could you tell me when the keeper feeds the cat on visit {i}, and when does"
                " the farmer feed the ferret?"
            )
            request = AnswerRequest(rid, question, 3, User("ann"), Filters(("app.articles",)))
            producer.send(f"it.{tag}.requests", key=rid.encode(), value=request.encode())
        producer.flush()
        started = time.monotonic()

        def answered() -> int:
            with connect(database_url(running_stack), autocommit=True) as conn:
                row = conn.execute(
                    "SELECT count(*) FROM rag.answers WHERE id = ANY(%s)", (ids,)
                ).fetchone()
            return int(row[0]) if row else 0

        # Kill one of the two answer workers once the answers start to arrive.
        assert wait_for(lambda: answered() >= 10, 300, interval=0.5), "no answers in 300 s"
        killed = processes["answer-2"]
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)
        assert wait_for(lambda: answered() == ASKS, 600, interval=1), (
            f"{answered()} of {ASKS} answered; logs in {tmp_path}"
        )
        print(f"{ASKS} two-part asks answered in {time.monotonic() - started:.1f} s")
        with connect(database_url(running_stack), autocommit=True) as conn:
            statuses = conn.execute(
                "SELECT status, count(*) FROM rag.answers WHERE id = ANY(%s) GROUP BY status",
                (ids,),
            ).fetchall()
            audit = conn.execute(
                "SELECT request_id, count(*) FROM rag.answer_audit WHERE request_id = ANY(%s)"
                " GROUP BY request_id",
                (ids,),
            ).fetchall()
            sample = conn.execute(
                "SELECT answer FROM rag.answers WHERE id = %s", (ids[0],)
            ).fetchone()
            parts = conn.execute(
                "SELECT count(*) FROM rag.workflow_parts WHERE parent = ANY(%s)", (ids,)
            ).fetchone()
        assert dict(statuses) == {"approved": ASKS}
        assert len(audit) == ASKS and {n for _, n in audit} == {1}  # one verdict each
        assert parts == (2 * ASKS,)
        assert sample is not None
        text = sample[0]["answer"]
        assert "dawn" in text and "noon" in text, text
        assert {c["doc_key"] for c in sample[0]["citations"]} >= {str(r[0]) for r in ROWS}
        # Both answer workers held partitions of the questions topic before the kill.
        for key in ("answer-2", "answer-3"):
            assert f"partitions assigned: it.{tag}.questions[" in logs[key].read_text(
                errors="replace"
            ), key
    finally:
        producer.close()
        stop_all(processes.values())


def test_requests_past_their_deadline_end_as_timeout_with_what_was_done(
    running_stack: Settings,
    running_stack_env: dict[str, str],
    tmp_path: Path,
) -> None:
    """No answer worker runs: the questions are rewritten and split, then wait. The validate
    worker's sweep ends them as `timeout` past their deadline, naming the steps done; an
    answer worker started afterwards consumes the parts without answering them, and the
    requests stay timed out."""
    from datetime import UTC, datetime, timedelta

    from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition

    tag = uuid.uuid4().hex[:8]
    workflow = workflow_file(tmp_path, tag)
    ids = [f"{tag}-late-{n}" for n in range(3)]
    logs = {name: tmp_path / f"{name}.log" for name in ("rewrite", "decompose", "validate")}
    processes = {
        name: start_step(running_stack_env, name, workflow, log) for name, log in logs.items()
    }
    settle(
        processes,
        logs,
        lambda name: start_step(running_stack_env, name, workflow, logs[name]),
        f"partitions assigned: it.{tag}.",
    )
    # The deadline leaves the two steps time to load the model on their first record (a CI
    # run saw the second step's load end 12 s after its partitions were assigned).
    deadline = datetime.now(UTC) + timedelta(seconds=45)
    question = "When does the keeper feed the cat, and when does the farmer feed the ferret?"
    with connect(database_url(running_stack), autocommit=True) as conn:
        for rid in ids:  # the pending answers POST /ask {async: true} keeps
            conn.execute(
                "INSERT INTO rag.answers (id, question, asked_by, status, deadline)"
                " VALUES (%s, %s, 'ann', 'pending', %s)",
                (rid, question, deadline),
            )
    producer = KafkaProducer(bootstrap_servers=running_stack.bootstrap_servers)

    def rows() -> dict[str, tuple[str, str | None]]:
        with connect(database_url(running_stack), autocommit=True) as conn:
            found = conn.execute(
                "SELECT id, status, error FROM rag.answers WHERE id = ANY(%s)", (ids,)
            ).fetchall()
        return {r[0]: (r[1], r[2]) for r in found}

    try:
        for rid in ids:
            request = AnswerRequest(
                rid, question, 3, User("ann"), Filters(("app.articles",)), deadline=deadline
            )
            producer.send(f"it.{tag}.requests", key=rid.encode(), value=request.encode())
        producer.flush()
        assert wait_for(
            lambda: {s for s, _ in rows().values()} == {"timeout"}, 150, interval=0.5
        ), f"{rows()}; logs in {tmp_path}"
        assert datetime.now(UTC) >= deadline
        for rid, (_, error) in rows().items():
            assert error is not None and "steps done: rewrite, decompose" in error, (rid, error)
        with connect(database_url(running_stack), autocommit=True) as conn:
            steps = conn.execute(
                "SELECT DISTINCT step FROM rag.answer_steps WHERE request_id = ANY(%s)", (ids,)
            ).fetchall()
        assert {s for (s,) in steps} == {"rewrite", "decompose"}
        # An answer worker now: it reads the six parts, past their deadline, and answers none.
        processes["answer"] = start_step(
            running_stack_env, "answer", workflow, tmp_path / "answer.log"
        )
        topic = f"it.{tag}.questions"
        probe = KafkaConsumer(bootstrap_servers=running_stack.bootstrap_servers)
        admin = KafkaAdminClient(bootstrap_servers=running_stack.bootstrap_servers)
        try:
            ends = probe.end_offsets(
                [TopicPartition(topic, p) for p in probe.partitions_for_topic(topic) or ()]
            )

            def consumed() -> bool:
                group = f"it-{tag}-answer"
                done = admin.list_group_offsets({group: None}).get(group) or {}
                # A partition no part was keyed to has nothing to commit.
                return all(
                    end == 0 or (tp in done and done[tp].offset >= end) for tp, end in ends.items()
                )

            assert sum(ends.values()) == 2 * len(ids)
            assert wait_for(consumed, 300, interval=1), f"logs in {tmp_path}"
        finally:
            probe.close()
            admin.close()
        assert {s for s, _ in rows().values()} == {"timeout"}
        with connect(database_url(running_stack), autocommit=True) as conn:
            answered = conn.execute(
                "SELECT count(*) FROM rag.answer_steps WHERE request_id = ANY(%s)"
                " AND step = 'answer'",
                (ids,),
            ).fetchone()
        assert answered == (0,)
    finally:
        producer.close()
        stop_all(processes.values())
