"""A declared multi-step workflow on the real stack, every step its own `freshet step`
process and consumer group: rewrite -> decompose (fan-out) -> answer (two workers) ->
synthesize (fan-in) -> validate. 100 two-part questions all complete, each answered exactly
once in effect, even when one answer worker is killed with SIGKILL mid-run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
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


def start_step(
    env: dict[str, str], name: str, workflow: Path, log: Path
) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "freshet.cli", "-v", "step", name, "--workflow", str(workflow)],
            env={**env, "PYTHONWARNINGS": "ignore"},
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=PROJECT_ROOT,
        )


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
        for process in processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes.values():
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
