"""Anonymous callers share a name, never an identity: an anonymous asker's answer is read back
only with its own secret or the asker's session; a token user's only with their token."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from freshet.answering.answers import InMemoryAnswerStore, StoredAnswer
from freshet.answering.capability import SECRET_HEADER, SESSION_COOKIE, Keys, digest, new_key
from freshet.answering.users import ANONYMOUS
from freshet.web.answers import get_store
from tests.unit.test_web_api import ADMIN, STAFF, SUPPORT, error_of, events, make_app

QUESTION = {"question": "What are connector tasks in Kafka?"}


@pytest.fixture
def app(tmp_path: Path) -> Flask:
    return make_app(tmp_path, RATE_LIMIT_BACKEND="off")


def answer_url(body: dict[str, Any]) -> str:
    return f"/api/v1/answers/{body['id']}"


@pytest.mark.parametrize("how", ["sync", "async", "stream"])
def test_another_anonymous_caller_cannot_read_an_anonymous_answer(app: Flask, how: str) -> None:
    asker = app.test_client()
    if how == "stream":
        raw = asker.post("/api/v1/ask", json={**QUESTION, "stream": True}).get_data(as_text=True)
        start, done = events(raw)[0][1], events(raw)[-1][1]
        body = {**done, "secret": start["secret"]}
    else:
        response = asker.post("/api/v1/ask", json={**QUESTION, "async": how == "async"})
        body = response.get_json()
    secret = body.pop("secret")
    assert len(secret) >= 32
    stranger = app.test_client()  # anonymous too, without the asker's cookie
    error_of(stranger.get(answer_url(body)), 404)
    error_of(stranger.get(answer_url(body), headers={SECRET_HEADER: new_key()}), 404)
    error_of(stranger.get(answer_url(body) + "?secret=short"), 404)
    # The answer's own capability: its secret, as a header or a parameter...
    assert stranger.get(answer_url(body), headers={SECRET_HEADER: secret}).get_json() == body
    assert stranger.get(answer_url(body) + f"?secret={secret}").get_json() == body
    # ...or the asker's own session (the cookie set with their first answer).
    assert asker.get(answer_url(body)).get_json() == body


def test_the_session_cookie_is_http_only_and_kept(app: Flask) -> None:
    asker = app.test_client()
    response = asker.post("/api/v1/ask", json=QUESTION)
    cookie = response.headers["Set-Cookie"]
    assert cookie.startswith(f"{SESSION_COOKIE}=") and "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie and "Path=/api/v1" in cookie
    again = asker.post("/api/v1/ask", json=QUESTION)
    assert "Set-Cookie" not in again.headers  # one session, many answers
    first, second = response.get_json(), again.get_json()
    assert first["secret"] != second["secret"]
    assert asker.get(answer_url(first)).status_code == 200
    assert asker.get(answer_url(second)).status_code == 200


def test_a_forged_session_cookie_opens_nothing(app: Flask) -> None:
    body = app.test_client().post("/api/v1/ask", json=QUESTION).get_json()
    forger: FlaskClient = app.test_client()
    forger.set_cookie(SESSION_COOKIE, new_key(), path="/api/v1")
    error_of(forger.get(answer_url(body)), 404)


def test_token_users_read_their_own_answers_by_token(app: Flask) -> None:
    client = app.test_client()
    response = client.post("/api/v1/ask", json=QUESTION, headers=STAFF)
    body = response.get_json()
    assert "secret" not in body and "Set-Cookie" not in response.headers
    assert client.get(answer_url(body), headers=STAFF).get_json() == body
    assert client.get(answer_url(body), headers=ADMIN).status_code == 200
    error_of(client.get(answer_url(body), headers=SUPPORT), 404)
    error_of(client.get(answer_url(body)), 404)


def test_an_anonymous_secret_works_for_a_token_user_but_a_staff_answer_needs_staff(
    app: Flask,
) -> None:
    anonymous = app.test_client().post("/api/v1/ask", json=QUESTION).get_json()
    secret = anonymous.pop("secret")
    headers = {**SUPPORT, SECRET_HEADER: secret}
    assert app.test_client().get(answer_url(anonymous), headers=headers).get_json() == anonymous
    # An answer drawn from staff passages is never opened by a secret-like header.
    staff = app.test_client().post("/api/v1/ask", json=QUESTION, headers=STAFF).get_json()
    error_of(app.test_client().get(answer_url(staff), headers=headers), 404)


def test_the_store_keeps_digests_only(app: Flask) -> None:
    body = app.test_client().post("/api/v1/ask", json=QUESTION).get_json()
    with app.app_context():
        stored = get_store().get(body["id"])
    assert stored is not None
    assert stored.keys.secret_hash == digest(body["secret"])
    assert body["secret"] not in repr(stored)


def test_a_verdict_without_keys_keeps_the_askers_keys() -> None:
    store = InMemoryAnswerStore()
    keys = Keys(digest("a" * 32), digest("b" * 32))
    store.put(StoredAnswer("r1", "q", ANONYMOUS, keys=keys))
    store.put(StoredAnswer("r1", "q", ANONYMOUS, "approved", {"answer": "x"}))  # the validator
    stored = store.get("r1")
    assert stored is not None and stored.status == "approved" and stored.keys == keys
    assert stored.visible_to(ANONYMOUS, secret="a" * 32)
    assert stored.visible_to(ANONYMOUS, session="b" * 32)
    assert not stored.visible_to(ANONYMOUS)
