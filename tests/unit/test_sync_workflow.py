"""The synchronous /ask runs a declared workflow's steps in process (FRESHET_ASK_WORKFLOW),
with the step workers' own handlers: a multi-part workflow splits and gathers a two-part
question within one HTTP call, a no-op step changes nothing, a wrong file stops the app."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from freshet.settings import PROJECT_ROOT
from freshet.web.services import get_ask_workflow
from freshet.workflow.definition import WorkflowError
from tests.unit.test_web_api import STAFF, make_app
from tests.unit.web_fakes import FakeRetriever, passage

PASSAGES = [
    passage(1, "The lighthouse keeper feeds the grey cat at dawn, before the lamp goes out."),
    passage(2, "The farmer feeds the ferret at noon, behind the red barn."),
]
QUESTION = "When does the keeper feed the cat, and when does the farmer feed the ferret?"


def asked(tmp_path: Path, workflow: Path | None, question: str = QUESTION) -> dict[str, Any]:
    config: dict[str, Any] = {"RETRIEVER": FakeRetriever(PASSAGES)}
    if workflow is not None:
        config["ASK_WORKFLOW"] = str(workflow)
    client = make_app(tmp_path, **config).test_client()
    response = client.post("/api/v1/ask", json={"question": question, "k": 2}, headers=STAFF)
    assert response.status_code == 200, response.get_json()
    body: dict[str, Any] = response.get_json()
    stored = client.get(f"/api/v1/answers/{body['id']}", headers=STAFF).get_json()
    assert stored == body  # kept, with the asker's keys, under its id
    return body


def test_a_multi_part_workflow_answers_both_parts_in_one_call(tmp_path: Path) -> None:
    body = asked(tmp_path, PROJECT_ROOT / "workflows" / "multi-part.toml")
    assert body["status"] == "approved"
    assert "dawn" in body["answer"] and "noon" in body["answer"], body["answer"]
    assert "\n\n" in body["answer"]  # one paragraph per sub-question, in order
    assert body["answer"].index("dawn") < body["answer"].index("noon")
    assert {c["doc_key"] for c in body["citations"]} == {"1", "2"}
    assert "steps" not in body and "deadline" not in body  # no queue, no deadline


def test_the_default_workflow_answers_as_before_and_a_noop_step_changes_nothing(
    tmp_path: Path,
) -> None:
    question = "When does the keeper feed the cat?"
    plain = asked(tmp_path / "a", None, question)
    text = (PROJECT_ROOT / "workflows" / "default.toml").read_text()
    text = text.replace('output = "rag.answers.raw"', 'output = "rag.answers.pre"').replace(
        '[[step]]\nname = "validate"',
        '[[step]]\nname = "pass"\nkind = "noop"\ninput = "rag.answers.pre"\n'
        'output = "rag.answers.raw"\ngroup = "rag-pass"\n\n[[step]]\nname = "validate"',
    )
    with_noop = tmp_path / "with-noop.toml"
    with_noop.write_text(text)
    noop = asked(tmp_path / "b", with_noop, question)
    app = make_app(tmp_path / "c", ASK_WORKFLOW=str(with_noop))
    with app.app_context():
        kinds = [s.kind for s in get_ask_workflow().workflow.steps]
    assert kinds == ["answer", "noop", "validate"]  # the file the setting names runs
    for body in (plain, noop):
        body.pop("id"), body.pop("created_at")
    assert noop == plain and "dawn" in plain["answer"]


def test_a_wrong_ask_workflow_stops_the_app_naming_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(WorkflowError, match="nope.toml"):
        make_app(tmp_path, ASK_WORKFLOW=str(missing))
    broken = tmp_path / "broken.toml"
    broken.write_text('[[step]]\nname = "a"\nkind = "answer"\ninput = "rag.requests"\n')
    with pytest.raises(WorkflowError, match="broken.toml"):
        make_app(tmp_path, ASK_WORKFLOW=str(broken))
