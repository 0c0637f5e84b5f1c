"""Deadlines and step progress of async asks, without Kafka: a message past its deadline ends
the request as `timeout` (the step's handler does not run), a late answer changes nothing, the
sweeper ends requests no step holds, and the API gives `deadline_s` and the steps done."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from freshet.answering.answers import InMemoryAnswerStore, StepDone, StoredAnswer, progress
from freshet.answering.messages import AnswerRequest, MessageError, deadline_of
from freshet.answering.retrieval import Filters
from freshet.answering.users import User
from freshet.consumer import Output
from freshet.settings import PROJECT_ROOT
from freshet.workflow.definition import load_workflow
from freshet.workflow.runner import Message, handlers_of, run_in_process
from freshet.workflow.tracking import Sweeper, Tracked
from tests.unit.test_declared_workflow import FakeAnswering
from tests.unit.test_web_api import STAFF, RecordingPublisher, error_of, make_app

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
MULTI = PROJECT_ROOT / "workflows" / "multi-part.toml"


def message(deadline: datetime | None, **extra: Any) -> Message:
    request = AnswerRequest("r1", "Who feeds the cat?", 3, User("ann"), Filters(), NOW, deadline)
    body = {**json.loads(request.encode()), **extra}
    return Message("rag.requests", b"r1", json.dumps(body).encode())


class Counting:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, record: Any) -> list[Output]:
        self.calls += 1
        return [Output("next", record.key, record.value)]


def test_a_message_past_its_deadline_ends_the_request_as_timeout_without_the_handler() -> None:
    store, handler = InMemoryAnswerStore(), Counting()
    store.put(StoredAnswer("r1", "Who feeds the cat?", User("ann"), deadline=NOW))
    store.step_done("r1", "rewrite")
    step = Tracked("answer", handler, store, clock=lambda: NOW + timedelta(seconds=1))
    assert step(message(NOW)) == [] and handler.calls == 0
    ended = store.get("r1")
    assert ended is not None and ended.status == "timeout"
    assert ended.error is not None
    assert "waiting for step 'answer'" in ended.error and "steps done: rewrite" in ended.error
    body = ended.to_dict()
    assert body["status"] == "timeout" and body["deadline"] == NOW.isoformat()
    assert "answer" not in body  # nothing unjudged reaches the asker


def test_a_message_before_its_deadline_is_handled_and_its_step_recorded() -> None:
    store, handler = InMemoryAnswerStore(), Counting()
    step = Tracked("answer", handler, store, clock=lambda: NOW - timedelta(seconds=1))
    assert len(step(message(NOW))) == 1 and handler.calls == 1
    assert [d.step for d in store.steps("r1")] == ["answer"]
    # No deadline at all (a request from an older client): handled, never timed out.
    assert len(Tracked("answer", handler, store)(message(None))) == 1


def test_a_part_is_recorded_against_its_parent_and_progress_counts_the_parts() -> None:
    store, handler = InMemoryAnswerStore(), Counting()
    step = Tracked("answer", handler, store, clock=lambda: NOW)
    for part in (1, 2):
        step(message(None, id=f"r1~{part}", parent="r1", part=part, parts=3))
    step(message(None, id="r1~2", parent="r1", part=2, parts=3))  # redelivered: counted once
    assert progress(store.steps("r1")) == [
        {
            "step": "answer",
            "done_at": store.steps("r1")[-1].done_at.isoformat(),
            "parts_done": 2,
            "parts": 3,
        }
    ]


def test_progress_lists_steps_in_the_order_they_first_finished() -> None:
    t = [NOW + timedelta(seconds=s) for s in range(4)]
    steps = [
        StepDone("answer", t[2], 1, 2),
        StepDone("rewrite", t[0]),
        StepDone("answer", t[3], 2, 2),
    ]
    assert [(e["step"], e.get("parts_done")) for e in progress(steps)] == [
        ("rewrite", None),
        ("answer", 2),
    ]


def test_a_timed_out_request_stays_so_and_an_answered_one_cannot_time_out() -> None:
    store = InMemoryAnswerStore()
    late = StoredAnswer("r1", "q", User("ann"), deadline=NOW)
    store.put(late)
    assert store.time_out(late, "answer") is True
    assert store.time_out(late, "validate") is False  # already ended
    store.put(StoredAnswer("r1", "q", User("ann"), "approved", {"answer": "late"}))
    assert store.get("r1").status == "timeout"  # type: ignore[union-attr]
    store.put(StoredAnswer("r2", "q", User("ann"), "approved", {"answer": "in time"}))
    assert store.time_out(StoredAnswer("r2", "q", User("ann")), "answer") is False
    assert store.get("r2").status == "approved"  # type: ignore[union-attr]


def test_the_sweeper_ends_pending_requests_past_deadline_and_grace_only() -> None:
    store = InMemoryAnswerStore()
    now = datetime.now(UTC)
    store.put(StoredAnswer("old", "q", User("ann"), deadline=now - timedelta(seconds=30)))
    store.put(StoredAnswer("fresh", "q", User("ann"), deadline=now - timedelta(seconds=0.5)))
    store.put(StoredAnswer("future", "q", User("ann"), deadline=now + timedelta(seconds=60)))
    store.put(StoredAnswer("done", "q", User("ann"), "approved", {}, deadline=now - timedelta(1)))
    sweeper = Sweeper(store, every_s=0.0, grace_s=5.0)
    sweeper(threading.Event())
    assert sweeper.ended == 1
    statuses = {i: store.get(i).status for i in ("old", "fresh", "future", "done")}  # type: ignore[union-attr]
    assert statuses == {
        "old": "timeout",
        "fresh": "pending",
        "future": "pending",
        "done": "approved",
    }
    assert "steps done: none" in (store.get("old").error or "")  # type: ignore[union-attr]


def test_a_deadline_that_is_not_a_timestamp_is_a_message_error() -> None:
    assert deadline_of({"deadline": "2026-12-05T12:00:00"}) == NOW  # naive: UTC
    with pytest.raises(MessageError, match="deadline"):
        deadline_of({"deadline": "soon"})
    with pytest.raises(MessageError, match="deadline"):
        deadline_of({"deadline": 5})


def test_a_workflow_run_past_its_deadline_ends_as_timeout_with_the_parts_done() -> None:
    workflow = load_workflow(MULTI)
    answering = FakeAnswering()
    handlers = handlers_of(workflow, answering)
    past = datetime.now(UTC) - timedelta(seconds=1)
    question = "Who feeds the cat? And when does the tide turn?"
    request = AnswerRequest("r9", question, 3, User("ann"), Filters(), deadline=past)
    answering.answers.put(StoredAnswer("r9", question, User("ann"), deadline=past))
    assert run_in_process(workflow, handlers, b"r9", request.encode()) == []
    ended = answering.answers.get("r9")
    assert ended is not None and ended.status == "timeout"
    assert "waiting for step 'rewrite'" in (ended.error or "")
    # In time: every step is recorded, the answer's two parts under `answer`.
    soon = datetime.now(UTC) + timedelta(seconds=60)
    request = AnswerRequest("r10", question, 3, User("ann"), Filters(), deadline=soon)
    [out] = run_in_process(workflow, handlers, b"r10", request.encode())
    assert json.loads(out.value)["status"] == "approved"
    steps = progress(answering.answers.steps("r10"))
    assert [e["step"] for e in steps] == [
        "rewrite",
        "decompose",
        "answer",
        "synthesize",
        "validate",
    ]
    assert steps[2]["parts_done"] == steps[2]["parts"] == 2


@pytest.mark.parametrize("bad", [0, -1, "5", True, 3601, float("nan")])
def test_deadline_s_out_of_range_is_a_400_naming_the_field(tmp_path: Path, bad: Any) -> None:
    client = make_app(tmp_path).test_client()
    body = {"question": "q", "async": True, "deadline_s": bad}
    error = error_of(client.post("/api/v1/ask", json=body, headers=STAFF), 400)
    assert error["field"] == "deadline_s" and "deadline_s" in error["message"]


def test_an_async_ask_has_a_deadline_and_its_answer_shows_the_steps_done(tmp_path: Path) -> None:
    publisher = RecordingPublisher()
    app = make_app(tmp_path, REQUEST_PUBLISHER=publisher)
    client = app.test_client()
    before = datetime.now(UTC)
    response = client.post(
        "/api/v1/ask", json={"question": "q?", "async": True, "deadline_s": 30}, headers=STAFF
    )
    assert response.status_code == 202
    pending = response.get_json()
    [request] = publisher.requests
    assert request.deadline is not None
    assert before + timedelta(seconds=29) < request.deadline < before + timedelta(seconds=31)
    assert pending["deadline"] == request.deadline.isoformat() and pending["steps"] == []
    # Default deadline: FRESHET_ASK_DEADLINE_S after the ask.
    client.post("/api/v1/ask", json={"question": "q?", "async": True}, headers=STAFF)
    assert publisher.requests[1].deadline - publisher.requests[1].asked_at == timedelta(seconds=120)
    from freshet.web.answers import get_store

    with app.app_context():
        get_store().step_done(pending["id"], "answer")
    shown = client.get(f"/api/v1/answers/{pending['id']}", headers=STAFF).get_json()
    assert [s["step"] for s in shown["steps"]] == ["answer"] and shown["status"] == "pending"
