"""The REST API through Flask's test client, with a fake retriever: validation, auth, errors."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from freshet.answering.answers import WITHHELD
from freshet.answering.llm.base import Answerer, LLMError
from freshet.answering.llm.extractive import ExtractiveAnswerer, LexicalScorer
from freshet.answering.messages import AnswerRequest
from freshet.answering.retrieval import Passage
from freshet.settings import Settings
from freshet.web import create_app
from freshet.web.publisher import QueueUnavailable, RequestPublisher
from tests.unit.web_fakes import FakeRetriever, passage

PASSAGES = [
    passage(1, "Public text about Kafka Connect workers and their connector tasks."),
    passage(2, "Staff only: the Kafka Connect workers restart every night.", groups=("staff",)),
    passage(3, "Support only: Kafka Connect tickets go to the support queue.", groups=("support",)),
    passage(4, "Module docs about connector tasks in Kafka.", table="app.module_docs"),
]
STAFF = {"Authorization": "Bearer demo-staff"}
SUPPORT = {"Authorization": "Bearer demo-support"}
ADMIN = {"Authorization": "Bearer demo-admin"}


def make_app(tmp_path: Path, **config: Any) -> Flask:
    settings = Settings.from_env({"FRESHET_HOME": str(tmp_path), "FRESHET_CONNECT_PORT": "1"})
    base: dict[str, Any] = {
        "TESTING": True,
        "SETTINGS": settings,
        "RETRIEVER": FakeRetriever(PASSAGES),
        "ANSWERER": ExtractiveAnswerer(LexicalScorer()),
        "ANSWER_STORE_BACKEND": "memory",
        "RATE_LIMIT_BACKEND": "memory",
        "REQUEST_PUBLISHER": RecordingPublisher(),
    }
    base.update(config)
    return create_app(base)


@pytest.fixture
def client(tmp_path: Path) -> FlaskClient:
    return make_app(tmp_path).test_client()


def error_of(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.is_json
    error: dict[str, Any] = response.get_json()["error"]
    assert error["status"] == status and error["message"]
    return error


def events(body: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for block in body.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def test_health(client: FlaskClient) -> None:
    assert client.get("/api/v1/health").get_json() == {"status": "ok"}


def test_factory_reads_prefixed_environment_through_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FRESHET_* variables reach the app config through Settings.from_env, and only so."""
    monkeypatch.setenv("FRESHET_HNSW_EF_SEARCH", "250")
    monkeypatch.setenv("FRESHET_PUBLIC_DOCUMENTS", "false")
    monkeypatch.setenv("FRESHET_HOME", str(tmp_path))
    app = make_app(tmp_path, SETTINGS=Settings.from_env())
    assert app.config["HNSW_EF_SEARCH"] == 250 and app.config["PUBLIC_DOCUMENTS"] is False
    assert make_app(tmp_path, HNSW_EF_SEARCH=7).config["HNSW_EF_SEARCH"] == 7
    # Settings built from another environment: this process's variables change nothing.
    assert make_app(tmp_path).config["HNSW_EF_SEARCH"] == Settings().hnsw_ef_search


def test_tokens_file_replaces_demo_tokens(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"s3cret": {"user": "ops", "groups": ["staff"]}}))
    client = make_app(tmp_path, API_TOKENS_FILE=str(tokens)).test_client()
    assert client.get("/api/v1/me", headers={"Authorization": "Bearer s3cret"}).get_json() == {
        "user": "ops",
        "groups": ["staff"],
        "admin": False,
    }
    error_of(client.get("/api/v1/me", headers=STAFF), 401)


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("", "q"),
        ("q=", "q"),
        ("q=%20%20", "q"),
        ("q=x&k=0", "k"),
        ("q=x&k=", "k"),
        ("q=x&k=101", "k"),
        ("q=x&k=abc", "k"),
        ("q=x&k=2.5", "k"),
        ("q=x&mode=fuzzy", "mode"),
        ("q=x&dedupe=maybe", "dedupe"),
        ("q=x&metadata=%7Bnot-json", "metadata"),
        ("q=x&metadata=%5B1%5D", "metadata"),
        ("q=" + "x" * 1001, "q"),
    ],
)
def test_search_rejects_bad_input_with_reason(client: FlaskClient, query: str, field: str) -> None:
    error = error_of(client.get(f"/api/v1/search?{query}"), 400)
    assert error["field"] == field


def test_search_k_range_message_names_the_bounds(client: FlaskClient) -> None:
    assert "between 1 and 100" in error_of(client.get("/api/v1/search?q=x&k=500"), 400)["message"]


def test_search_applies_acl_and_filters(tmp_path: Path) -> None:
    retriever = FakeRetriever(PASSAGES)
    client = make_app(tmp_path, RETRIEVER=retriever).test_client()
    public = client.get("/api/v1/search?q=kafka&k=10").get_json()["results"]
    assert [r["chunk_id"] for r in public] == [1, 4]
    staff = client.get("/api/v1/search?q=kafka&k=10", headers=STAFF).get_json()["results"]
    assert [r["chunk_id"] for r in staff] == [1, 2, 4]
    body = client.get("/api/v1/search?q=kafka&table=app.module_docs&mode=dense&k=3").get_json()
    assert [r["chunk_id"] for r in body["results"]] == [4]
    assert retriever.calls[-1]["mode"] == "dense" and retriever.calls[-1]["k"] == 3


def test_anonymous_can_be_refused(tmp_path: Path) -> None:
    client = make_app(tmp_path, ALLOW_ANONYMOUS=False).test_client()
    response = client.get("/api/v1/search?q=x")
    error_of(response, 401)
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert client.get("/api/v1/search?q=x", headers=STAFF).status_code == 200


@pytest.mark.parametrize("header", ["Bearer nope", "Basic abc", "Bearer", "token"])
def test_bad_tokens_are_401_not_anonymous(client: FlaskClient, header: str) -> None:
    error_of(client.get("/api/v1/search?q=x", headers={"Authorization": header}), 401)


def test_ask_validation(client: FlaskClient) -> None:
    error_of(client.post("/api/v1/ask", json={"question": ""}), 400)
    error_of(client.post("/api/v1/ask", json={"question": "   "}), 400)
    error_of(client.post("/api/v1/ask", json={}), 400)
    error_of(client.post("/api/v1/ask", json=["question"]), 400)
    error_of(client.post("/api/v1/ask", json={"question": 5}), 400)
    error_of(client.post("/api/v1/ask", json={"question": "q", "k": 0}), 400)
    error_of(client.post("/api/v1/ask", json={"question": "q", "k": 21}), 400)
    error_of(client.post("/api/v1/ask", json={"question": "q", "k": True}), 400)
    error_of(client.post("/api/v1/ask", json={"question": "q", "stream": "perhaps"}), 400)
    error_of(client.post("/api/v1/ask", data="{bad", content_type="application/json"), 400)
    error_of(client.post("/api/v1/ask", data="question=x"), 415)


class RecordingPublisher(RequestPublisher):
    def __init__(self, down: bool = False) -> None:
        self.requests: list[AnswerRequest] = []
        self.down = down

    def publish(self, request: AnswerRequest) -> None:
        if self.down:
            raise QueueUnavailable("Kafka at 127.0.0.1:1 did not take the request")
        self.requests.append(request)


def test_ask_async_publishes_the_request_and_keeps_it_pending(tmp_path: Path) -> None:
    publisher = RecordingPublisher()
    client = make_app(tmp_path, REQUEST_PUBLISHER=publisher).test_client()
    body = {"question": "When do workers restart?", "k": 3, "async": True, "table": "app.articles"}
    response = client.post("/api/v1/ask", json=body, headers=STAFF)
    assert response.status_code == 202
    pending = response.get_json()
    assert pending["status"] == "pending" and "answer" not in pending
    assert response.headers["Location"] == f"/api/v1/answers/{pending['id']}"
    [request] = publisher.requests
    assert (request.id, request.question, request.k) == (pending["id"], body["question"], 3)
    assert request.user.groups == ("staff",) and request.filters.tables == ("app.articles",)
    assert client.get(f"/api/v1/answers/{pending['id']}", headers=STAFF).get_json() == pending
    error_of(client.get(f"/api/v1/answers/{pending['id']}", headers=SUPPORT), 404)


def test_ask_async_without_kafka_is_503_and_the_answer_failed(tmp_path: Path) -> None:
    client = make_app(tmp_path, REQUEST_PUBLISHER=RecordingPublisher(down=True)).test_client()
    response = client.post("/api/v1/ask", json={"question": "q", "async": True}, headers=STAFF)
    error = error_of(response, 503)
    assert "Kafka at 127.0.0.1:1" in error["message"]
    stored = client.get(f"/api/v1/answers/{error['id']}", headers=STAFF).get_json()
    assert stored["status"] == "failed" and "Kafka" in stored["error"]


def test_an_answer_that_breaks_a_rule_is_withheld(tmp_path: Path) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text(
        '[[rule]]\nname = "no-restart-talk"\nkind = "forbidden_pattern"\n'
        'pattern = "restart"\nmessage = "restarts are not discussed"\n'
    )
    client = make_app(tmp_path, ANSWER_RULES=str(rules)).test_client()
    question = {"question": "When do Kafka Connect workers restart?"}
    body = client.post("/api/v1/ask", json=question, headers=STAFF).get_json()
    assert body["status"] == "rejected" and body["answer"] == WITHHELD
    assert body["citations"] == [] and "restart" not in json.dumps(body["answer"])
    assert body["violations"] == [
        {"rule": "no-restart-talk", "message": "restarts are not discussed"}
    ]
    streamed = events(
        client.post("/api/v1/ask", json={**question, "stream": True}, headers=STAFF).get_data(
            as_text=True
        )
    )
    assert streamed[-1][0] == "done" and streamed[-1][1]["status"] == "rejected"
    assert streamed[-1][1]["answer"] == WITHHELD


def test_oversized_body_is_413_json(client: FlaskClient) -> None:
    error_of(client.post("/api/v1/ask", json={"question": "x" * 70_000}), 413)


def test_unknown_route_and_wrong_method_are_json(client: FlaskClient) -> None:
    error_of(client.get("/api/v1/nope"), 404)
    response = client.post("/api/v1/health")
    assert error_of(response, 405)["allowed"] == ["GET", "HEAD", "OPTIONS"]
    assert "GET" in response.headers["Allow"]
    page = client.get("/no-such-page")
    assert page.status_code == 404 and not page.is_json


def test_ask_answers_with_citations_and_keeps_the_answer(client: FlaskClient) -> None:
    response = client.post(
        "/api/v1/ask", json={"question": "When do Kafka Connect workers restart?"}, headers=STAFF
    )
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "approved"
    assert "[" in body["answer"] and body["citations"]
    assert {c["chunk_id"] for c in body["citations"]} <= {1, 2, 4}
    assert response.headers["Location"] == f"/api/v1/answers/{body['id']}"
    assert client.get(f"/api/v1/answers/{body['id']}", headers=STAFF).get_json() == body
    assert client.get(f"/api/v1/answers/{body['id']}", headers=ADMIN).status_code == 200
    error_of(client.get(f"/api/v1/answers/{body['id']}", headers=SUPPORT), 404)
    error_of(client.get(f"/api/v1/answers/{body['id']}"), 404)
    error_of(client.get("/api/v1/answers/does-not-exist", headers=STAFF), 404)


@pytest.mark.parametrize("how", ["flag", "accept"])
def test_ask_streams_server_sent_events_without_rules(tmp_path: Path, how: str) -> None:
    """No rule can withhold the answer: its text streams as it is generated."""
    client = make_app(tmp_path, ANSWER_RULES="").test_client()
    body: dict[str, Any] = {"question": "What are connector tasks in Kafka?"}
    headers = dict(STAFF)
    if how == "flag":
        body["stream"] = True
    else:
        headers["Accept"] = "text/event-stream"
    response = client.post("/api/v1/ask", json=body, headers=headers)
    assert response.status_code == 200
    assert response.mimetype == "text/event-stream"
    stream = events(response.get_data(as_text=True))
    names = [name for name, _ in stream]
    assert names[0] == "start" and names[-1] == "done" and "token" in names
    assert stream[0][1]["buffered"] is False
    # The passages come first: where each comes from, before any token.
    passages = [d for n, d in stream if n == "passage"]
    assert len(passages) == stream[0][1]["passages"] and names.index("token") > len(passages)
    done = stream[-1][1]
    assert "".join(d["text"] for n, d in stream if n == "token") == done["answer"]
    assert done["citations"] and done["id"] == stream[0][1]["id"]
    assert client.get(f"/api/v1/answers/{done['id']}", headers=STAFF).get_json() == done


def test_with_rules_a_stream_sends_passages_then_only_the_judged_answer(
    client: FlaskClient,
) -> None:
    """The shipped rules can withhold an answer: no text is sent before its verdict."""
    body = {"question": "What are connector tasks in Kafka?", "stream": True}
    stream = events(client.post("/api/v1/ask", json=body, headers=STAFF).get_data(as_text=True))
    names = [name for name, _ in stream]
    assert names == ["start"] + ["passage"] * stream[0][1]["passages"] + ["done"]
    assert stream[0][1]["buffered"] is True
    first = stream[1][1]
    assert {"n", "source_table", "doc_key", "chunk_id", "source_lsn", "title"} <= set(first)
    assert "text" not in first  # where a passage comes from, not what it says
    done = stream[-1][1]
    assert done["status"] == "approved" and done["citations"]
    assert client.get(f"/api/v1/answers/{done['id']}", headers=STAFF).get_json() == done


def test_a_withheld_stream_never_carries_its_text(tmp_path: Path) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rule]]\nname = "no-kafka"\nkind = "forbidden_pattern"\npattern = "kafka"\n')
    app = make_app(tmp_path, ANSWER_RULES=str(rules))
    body = {"question": "When do Kafka Connect workers restart?", "stream": True}
    raw = app.test_client().post("/api/v1/ask", json=body, headers=STAFF).get_data(as_text=True)
    stream = events(raw)
    assert [n for n, _ in stream if n not in ("start", "passage")] == ["done"]
    assert stream[-1][1]["status"] == "rejected" and stream[-1][1]["answer"] == WITHHELD
    withheld = app.extensions["freshet.answer_store"].get(stream[-1][1]["id"]).answer["answer"]
    assert "every night" in withheld  # what the rules withheld, kept for their owners...
    assert "every night" not in raw and "Staff only" not in raw  # ...and in no event at all


class FailingAnswerer(Answerer):
    name = "failing"

    def stream(self, question: str, passages: Sequence[Passage]) -> Iterator[str]:
        yield "partial"
        raise LLMError("endpoint down")


def test_backend_failure_is_502_or_an_error_event(tmp_path: Path) -> None:
    client = make_app(tmp_path, ANSWERER=FailingAnswerer()).test_client()
    error = error_of(client.post("/api/v1/ask", json={"question": "q"}), 502)
    assert "endpoint down" in error["message"]
    streamed = client.post("/api/v1/ask", json={"question": "q", "stream": True})
    stream = events(streamed.get_data(as_text=True))
    assert stream[-1][0] == "error" and "endpoint down" in stream[-1][1]["message"]


class ExplodingRetriever(FakeRetriever):
    def search(self, *args: Any, **kwargs: Any) -> list[Passage]:
        raise RuntimeError("boom: secret internals")


def test_unexpected_errors_are_opaque_json_500(tmp_path: Path) -> None:
    client = make_app(tmp_path, RETRIEVER=ExplodingRetriever([])).test_client()
    error = error_of(client.get("/api/v1/search?q=x"), 500)
    assert "secret" not in error["message"]


def test_documents_are_acl_checked(client: FlaskClient) -> None:
    doc = client.get("/api/v1/documents/app.articles/2", headers=STAFF).get_json()
    assert doc["doc_key"] == "2" and doc["chunks"][0]["text"].startswith("Staff only")
    for headers in ({}, SUPPORT):
        error = error_of(client.get("/api/v1/documents/app.articles/2", headers=headers), 404)
        assert error["key"] == "2"
    error_of(client.get("/api/v1/documents/app.articles/999"), 404)
    error_of(client.get("/api/v1/documents/app.nothing/1", headers=ADMIN), 404)


def test_status_needs_admin(client: FlaskClient) -> None:
    error_of(client.get("/api/v1/status"), 403)
    error_of(client.get("/api/v1/status", headers=STAFF), 403)


def test_ui_pages_and_static_files(client: FlaskClient) -> None:
    for path in ("/", "/search", "/documents/app.articles/12", "/status"):
        page = client.get(path)
        assert page.status_code == 200 and page.mimetype == "text/html", path
        html = page.get_data(as_text=True)
        assert 'for="token"' in html and "/static/app.js" in html
        assert "http://" not in html and "https://" not in html  # nothing from a CDN
    assert 'data-key="12"' in client.get("/documents/app.articles/12").get_data(as_text=True)
    for name in ("app.js", "app.css"):
        static = client.get(f"/static/{name}")
        assert static.status_code == 200
        static.close()


def test_status_reports_what_it_cannot_reach(client: FlaskClient) -> None:
    status = client.get("/api/v1/status", headers=ADMIN).get_json()
    assert status["postgres"]["state"] == "DOWN"
    assert "FRESHET_HOME" in status["postgres"]["error"]  # no embedded database in tmp_path
    assert status["connector"]["state"] == "UNKNOWN" and status["connect"]["state"] == "UNKNOWN"
    assert status["llm_backend"] == "extractive"
