"""The async answer workflow end to end on the real stack: POST /ask {async: true} -> Kafka
rag.requests -> `freshet infer` -> rag.answers.raw -> `freshet validate` (the answer rules) ->
rag.answers / rag.answers.rejected and table rag.answers, read back by request id."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from kafka import KafkaProducer

from freshet.answering.live_rules import read_path
from freshet.answering.messages import APPROVED, DEAD_LETTERS, REJECTED, REQUESTS
from freshet.cdc.services import LocalInference, LocalValidator
from freshet.db import connect, database_url
from freshet.settings import PROJECT_ROOT, Settings
from freshet.web import close_app, create_app
from tests.conftest import freshet, wait_for
from tests.integration.conftest import WorkerThread
from tests.integration.sync_support import caught_up, source
from tests.support import topic_from_start

pytestmark = pytest.mark.integration

CANARY = (880_001, "Lighthouse routine", "The lighthouse keeper feeds the grey cat at dawn.")
FERRET = (880_002, "Barn routine", "The farmer feeds the ferret at noon, behind the red barn.")
# A row with reference markers of its own: copied into an answer they cite nothing, and the
# citation rules (applied by the validator, after Kafka) must not withhold the answer for them.
ALMANAC = (
    880_003,
    "Harbour almanac",
    "The harbour tide turns at the stroke of noon [7], as the old almanac records [12].",
)
ROWS = (CANARY, FERRET, ALMANAC)


@pytest.fixture(scope="module")
def workflow_env(
    running_stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """The session stack plus one inference and one validator process started by `freshet up`,
    judging with the shipped rules and one more: nothing about ferrets."""
    rules = tmp_path_factory.mktemp("rules") / "answers.toml"
    shipped = (PROJECT_ROOT / "rules" / "answers.toml").read_text()
    rules.write_text(
        shipped + '\n[[rule]]\nname = "no-ferrets"\nkind = "forbidden_pattern"\n'
        'pattern = "ferret"\nmessage = "ferrets are off topic"\n'
    )
    env = {
        **running_stack_env,
        "FRESHET_START_WORKFLOW": "true",
        "FRESHET_ANSWER_RULES": str(rules),
    }
    settings = Settings.from_env(env)
    try:
        up = freshet(env, "up")
        assert up.returncode == 0, up.stdout + up.stderr
        assert LocalInference(settings).running() and LocalValidator(settings).running()
        yield env
    finally:
        LocalValidator(settings).stop()
        LocalInference(settings).stop()


@pytest.fixture(scope="module")
def indexed(running_stack: Settings, workflow_env: dict[str, str]) -> Iterator[None]:
    with source(running_stack) as conn:
        for key, title, body in ROWS:
            conn.execute(
                "INSERT INTO app.articles (id, title, body) VALUES (%s, %s, %s)"
                " ON CONFLICT (id) DO UPDATE SET title = EXCLUDED.title, body = EXCLUDED.body",
                (key, title, body),
            )
    yield
    with source(running_stack) as conn:
        conn.execute("DELETE FROM app.articles WHERE id = ANY(%s)", ([r[0] for r in ROWS],))


@pytest.fixture
def client(
    running_stack: Settings,
    workflow_env: dict[str, str],
    indexed: None,
    start_worker: Callable[..., WorkerThread],
) -> Iterator[FlaskClient]:
    caught_up(start_worker())
    app = create_app({"POOL_MAX_SIZE": 2}, settings=Settings.from_env(workflow_env))
    yield app.test_client()
    close_app(app)


def outcome(client: FlaskClient, answer_id: str, timeout: float = 180) -> dict[str, Any]:
    def judged() -> dict[str, Any] | None:
        body: dict[str, Any] = client.get(f"/api/v1/answers/{answer_id}").get_json()
        return None if body["status"] == "pending" else body

    found = wait_for(judged, timeout, interval=0.2)
    assert found, f"answer {answer_id} still pending after {timeout:.0f}s"
    return found


def ask_async(client: FlaskClient, question: str) -> str:
    response = client.post("/api/v1/ask", json={"question": question, "async": True, "k": 3})
    body = response.get_json()
    assert response.status_code == 202, body
    assert body["status"] == "pending"
    return str(body["id"])


def on_topic(settings: Settings, topic: str, answer_id: str) -> dict[str, Any] | None:
    with topic_from_start(settings.bootstrap_servers, topic) as consumer:
        for record in consumer:
            if record.key == answer_id.encode():
                value: dict[str, Any] = json.loads(record.value)
                return value
    return None


def test_an_async_answer_is_approved_with_citations(
    client: FlaskClient, running_stack: Settings
) -> None:
    answer_id = ask_async(client, "When does the lighthouse keeper feed the cat?")
    body = outcome(client, answer_id)
    assert body["status"] == "approved", body
    assert "dawn" in body["answer"]
    assert ("app.articles", str(CANARY[0])) in {
        (c["source_table"], c["doc_key"]) for c in body["citations"]
    }
    published = on_topic(running_stack, APPROVED, answer_id)
    assert published is not None and published["answer"] == body["answer"]


def test_an_async_answer_that_breaks_a_rule_is_rejected_and_withheld(
    client: FlaskClient, running_stack: Settings
) -> None:
    answer_id = ask_async(client, "When does the farmer feed the ferret?")
    body = outcome(client, answer_id)
    assert body["status"] == "rejected", body
    assert "ferret" not in body["answer"] and body["citations"] == []
    assert {"rule": "no-ferrets", "message": "ferrets are off topic"} in body["violations"]
    published = on_topic(running_stack, REJECTED, answer_id)
    assert published is not None and "ferret" in published["withheld"]["answer"]


def test_a_rows_own_citation_markers_do_not_withhold_an_async_answer(
    client: FlaskClient,
) -> None:
    answer_id = ask_async(client, "When does the harbour tide turn?")
    body = outcome(client, answer_id)
    assert body["status"] == "approved", body
    assert "noon [7], as the old almanac records [12]." in body["answer"]
    assert ("app.articles", str(ALMANAC[0])) in {
        (c["source_table"], c["doc_key"]) for c in body["citations"]
    }
    assert 7 not in body["markers"] and 12 not in body["markers"]


def test_another_anonymous_caller_cannot_read_an_async_answer(
    client: FlaskClient, workflow_env: dict[str, str]
) -> None:
    response = client.post("/api/v1/ask", json={"question": "Who feeds the cat?", "async": True})
    pending = response.get_json()
    secret, url = pending.pop("secret"), f"/api/v1/answers/{pending['id']}"
    outcome(client, pending["id"])  # the asker, by the session cookie of the ask
    stranger = create_app({"POOL_MAX_SIZE": 1}, settings=Settings.from_env(workflow_env))
    try:
        other = stranger.test_client()  # another anonymous caller, another web process
        assert other.get(url).status_code == 404
        judged = other.get(url, headers={"Freshet-Answer-Secret": secret}).get_json()
        assert judged["status"] == "approved" and judged["id"] == pending["id"]
    finally:
        close_app(stranger)


def test_a_malformed_request_is_dead_lettered_and_the_next_is_answered(
    client: FlaskClient, running_stack: Settings
) -> None:
    producer = KafkaProducer(bootstrap_servers=running_stack.bootstrap_servers, acks="all")
    try:
        producer.send(REQUESTS, key=b"broken-request", value=b"{not json").get(timeout=30)
    finally:
        producer.close()
    answer_id = ask_async(client, "Who feeds the grey cat?")
    assert outcome(client, answer_id)["status"] == "approved"
    letter = wait_for(
        lambda: on_topic(running_stack, DEAD_LETTERS, "broken-request"), 60, interval=1
    )
    assert letter and letter["topic"] == REQUESTS and "not JSON" in letter["reason"]
    assert letter["value"] == "{not json"


def test_status_lists_the_workflow_workers(workflow_env: dict[str, str]) -> None:
    result = freshet(workflow_env, "status", "--json")
    report = json.loads(result.stdout)
    assert report["workflow"]["infer"]["state"] == "RUNNING"
    assert report["workflow"]["validate"]["state"] == "RUNNING"
    assert report["workflow"]["stale-watch"]["state"] == "RUNNING"


def test_unknown_answer_ids_are_404(client: FlaskClient) -> None:
    response = client.get("/api/v1/answers/no-such-request")
    assert response.status_code == 404 and response.get_json()["error"]["message"]


def test_a_rule_added_while_the_validator_runs_applies_to_the_next_request(
    client: FlaskClient, running_stack: Settings, workflow_env: dict[str, str]
) -> None:
    """The policy owners edit their rules file; the running validator process (and this web
    app) apply the new rule to the next answer, with the new rule set's version, and every
    verdict is audited once."""
    # The module's anonymous asks share one rate-limit bucket: this test asks on its own.
    app = create_app(
        {"POOL_MAX_SIZE": 2, "RATE_LIMIT_BACKEND": "off"},
        settings=Settings.from_env(workflow_env),
    )
    try:
        _rule_added_applies(app.test_client(), running_stack, workflow_env)
    finally:
        close_app(app)


def _rule_added_applies(
    client: FlaskClient, running_stack: Settings, workflow_env: dict[str, str]
) -> None:
    path = Path(workflow_env["FRESHET_ANSWER_RULES"])
    before = path.read_text()
    question = "When does the lighthouse keeper feed the cat?"
    try:
        approved = outcome(client, ask_async(client, question))
        assert approved["status"] == "approved", approved
        path.write_text(
            before + '\n[[rule]]\nname = "no-lighthouses"\nkind = "forbidden_pattern"\n'
            'pattern = "lighthouse"\nmessage = "lighthouses are closed today"\n'
        )
        version = read_path(path).label
        time.sleep(1.5)  # FRESHET_ANSWER_RULES_RELOAD_S is 1 s
        answer_id = ask_async(client, question)
        body = outcome(client, answer_id)
        assert body["status"] == "rejected" and body["withheld"] is True, body
        assert {"rule": "no-lighthouses", "message": "lighthouses are closed today"} in body[
            "violations"
        ]
        assert body["rules_version"] == version
        published = on_topic(running_stack, REJECTED, answer_id)
        assert published is not None and published["rules"] == version
        # The synchronous path of a running web app applies it too.
        sync = client.post("/api/v1/ask", json={"question": question, "k": 3}).get_json()
        assert sync["status"] == "rejected" and sync["rules_version"] == version
        with connect(database_url(running_stack), autocommit=True) as conn:
            audit = conn.execute(
                "SELECT request_id, status, rules_version FROM rag.answer_audit"
                " WHERE request_id = ANY(%s) ORDER BY id",
                ([approved["id"], answer_id],),
            ).fetchall()
        assert [(r[0], r[1]) for r in audit] == [
            (approved["id"], "approved"),
            (answer_id, "rejected"),
        ]
        assert version.endswith(audit[1][2])
    finally:
        path.write_text(before)
        time.sleep(1.5)
