"""Rate limits and concurrency caps on /search and /ask: buckets, callers, caps, and the 429s
the API answers with (a fake clock; no database, no timing)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, request

from freshet.answering.users import ANONYMOUS, User
from freshet.settings import SettingsError
from freshet.web.limits import (
    Concurrency,
    Limit,
    LocalBuckets,
    PgRateLimiter,
    caller_of,
    get_limits,
    limits_from_config,
)
from tests.unit.test_web_api import STAFF, SUPPORT, error_of, events, make_app

ASK = Limit("ask", rate=0.5, burst=3, per_caller=2, total=3)
BAD_TOKEN = {"Authorization": "Bearer not-a-token"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_admits_its_burst_then_says_when_to_come_back() -> None:
    clock = Clock()
    buckets = LocalBuckets(clock)
    assert [buckets.take(ASK, "user:a").admitted for _ in range(4)] == [True] * 3 + [False]
    refused = buckets.take(ASK, "user:a")
    assert refused.retry_after == pytest.approx(2.0)  # one token at 0.5/s
    clock.now += 1.0
    assert buckets.take(ASK, "user:a").retry_after == pytest.approx(1.0)
    clock.now += 1.0
    assert buckets.take(ASK, "user:a").admitted
    assert buckets.take(ASK, "user:b").admitted  # every caller has a bucket of their own


def test_idle_full_buckets_are_dropped() -> None:
    clock = Clock()
    buckets = LocalBuckets(clock)
    for i in range(50):
        buckets.take(ASK, f"addr:10.0.0.{i}")
    clock.now += 120  # > the 6 s an empty bucket needs to fill, and the minute between prunes
    buckets.take(ASK, "addr:10.0.1.1")
    assert len(buckets) == 1


def test_concurrency_per_caller_and_per_route() -> None:
    cap = Concurrency()
    a1, a2 = cap.acquire(ASK, "user:a"), cap.acquire(ASK, "user:a")
    assert cap.acquire(ASK, "user:a") == "caller"
    b1 = cap.acquire(ASK, "user:b")
    assert cap.acquire(ASK, "user:c") == "route"  # total 3 asks in this process
    assert not isinstance(a1, str) and not isinstance(a2, str) and not isinstance(b1, str)
    a1.release()
    a1.release()  # a slot is released once, whoever calls first
    assert cap.in_flight("ask") == 2 and cap.in_flight("ask", "user:a") == 1
    assert not isinstance(cap.acquire(ASK, "user:c"), str)


@pytest.mark.parametrize(
    ("user", "address", "caller"),
    [
        (User("ann", ("staff",)), "10.1.2.3", "user:ann"),
        (User("ops", (), True), None, "user:ops"),
        (ANONYMOUS, "10.1.2.3", "addr:10.1.2.3"),
        (ANONYMOUS, "::ffff:10.1.2.3", "addr:10.1.2.3"),
        (ANONYMOUS, "2001:db8:1:2:aaaa::1", "addr:2001:db8:1:2::/64"),
        (ANONYMOUS, "2001:db8:1:2:bbbb::9", "addr:2001:db8:1:2::/64"),
        (ANONYMOUS, None, "addr:unknown"),
    ],
)
def test_callers_are_the_tokens_user_or_the_address(
    user: User, address: str | None, caller: str
) -> None:
    assert caller_of(user, address) == caller


class FakeConnection:
    def __init__(self, pool: FakePool) -> None:
        self.pool = pool

    def execute(self, sql: str, params: Any) -> Any:
        self.pool.statements.append(sql)
        return self

    def fetchone(self) -> tuple[bool, float]:
        return self.pool.reply


class FakePool:
    """Stands in for the psycopg pool: answers the bucket upsert with ``reply``."""

    def __init__(self, reply: tuple[bool, float] = (True, 2.0), down: bool = False) -> None:
        self.reply = reply
        self.down = down
        self.statements: list[str] = []

    @contextmanager
    def connection(self, timeout: float | None = None) -> Iterator[FakeConnection]:
        if self.down:
            raise OSError("connection refused")
        yield FakeConnection(self)


def test_the_shared_bucket_decides_and_a_caller_over_it_is_refused_without_a_round_trip() -> None:
    clock = Clock()
    pool = FakePool(reply=(False, 0.25))  # another process took the tokens
    limiter = PgRateLimiter(lambda: pool, clock=clock)  # type: ignore[arg-type, return-value]
    verdict = limiter.take(ASK, "user:a")
    assert not verdict.admitted and verdict.retry_after == pytest.approx(1.5)
    assert len(pool.statements) == 1
    assert not limiter.take(ASK, "user:a").admitted
    assert len(pool.statements) == 1  # refused by the local copy of the shared bucket
    clock.now += 2.0
    pool.reply = (True, 0.25)
    assert limiter.take(ASK, "user:a").admitted and len(pool.statements) == 2


def test_without_the_database_the_process_buckets_decide() -> None:
    limiter = PgRateLimiter(lambda: FakePool(down=True), clock=Clock())  # type: ignore[arg-type, return-value]
    assert [limiter.take(ASK, "user:a").admitted for _ in range(4)] == [True] * 3 + [False]


@pytest.mark.parametrize(
    ("key", "value"),
    [("RATE_LIMIT_BACKEND", "redis"), ("ASK_BURST", 0), ("SEARCH_RATE_PER_MINUTE", "x")],
)
def test_bad_limit_settings_are_a_settings_error(tmp_path: Path, key: str, value: Any) -> None:
    config = dict(make_app(tmp_path).config)
    config[key] = value
    with pytest.raises(SettingsError):
        limits_from_config(config, lambda: None)  # type: ignore[arg-type, return-value]


SEARCH = "/api/v1/search?q=kafka"


def test_over_the_search_limit_is_a_429_with_retry_after_and_a_reason(tmp_path: Path) -> None:
    client = make_app(tmp_path, SEARCH_BURST=3, SEARCH_RATE_PER_MINUTE=6).test_client()
    for _ in range(3):
        assert client.get(SEARCH, headers=STAFF).status_code == 200
    response = client.get(SEARCH, headers=STAFF)
    error = error_of(response, 429)
    assert response.headers["Retry-After"] == "10"  # one token at 6 per minute
    assert error["reason"] == "rate" and error["route"] == "search" and error["retry_after"] == 10
    assert "6 per minute" in error["message"] and "retry in 10 s" in error["message"]
    assert error["limit"] == {"per_minute": 6, "burst": 3, "concurrent_per_caller": 4}
    # Another token, and an anonymous caller, have budgets of their own.
    assert client.get(SEARCH, headers=SUPPORT).status_code == 200
    assert client.get(SEARCH).status_code == 200


def test_anonymous_callers_are_limited_by_address(tmp_path: Path) -> None:
    client = make_app(tmp_path, ASK_BURST=1, ASK_RATE_PER_MINUTE=1).test_client()
    body = {"question": "What are connector tasks?"}
    here = {"REMOTE_ADDR": "10.0.0.1"}
    assert client.post("/api/v1/ask", json=body, environ_base=here).status_code == 200
    error_of(client.post("/api/v1/ask", json=body, environ_base=here), 429)
    other = {"REMOTE_ADDR": "10.0.0.2"}
    assert client.post("/api/v1/ask", json=body, environ_base=other).status_code == 200


def test_bad_requests_cost_no_budget(tmp_path: Path) -> None:
    client = make_app(tmp_path, SEARCH_BURST=1).test_client()
    for _ in range(5):
        error_of(client.get("/api/v1/search?q=kafka&k=0", headers=STAFF), 400)
    assert client.get(SEARCH, headers=STAFF).status_code == 200


def test_async_asks_are_limited_too(tmp_path: Path) -> None:
    client = make_app(tmp_path, ASK_BURST=2).test_client()
    body = {"question": "When do workers restart?", "async": True}
    assert [client.post("/api/v1/ask", json=body, headers=STAFF).status_code for _ in range(3)] == [
        202,
        202,
        429,
    ]


class OpenStream:
    """A streamed ask, opened and read on a thread of its own, as a server thread would (Flask
    keeps a streaming request's context pushed on the thread that opened it)."""

    BODY = {"question": "What are connector tasks in Kafka?", "stream": True}

    def __init__(self, app: Flask, headers: dict[str, str]) -> None:
        self.thread = ThreadPoolExecutor(1)
        self.response = self.thread.submit(
            lambda: app.test_client().post("/api/v1/ask", json=self.BODY, headers=headers)
        ).result()

    def read(self) -> list[tuple[str, dict[str, Any]]]:
        body = self.thread.submit(lambda: self.response.get_data(as_text=True)).result()
        self.thread.shutdown()
        return events(body)

    def abandon(self) -> None:
        self.thread.submit(self.response.close).result()  # the client went away
        self.thread.shutdown()


def test_a_streamed_answer_holds_its_slot_until_its_last_event(tmp_path: Path) -> None:
    app = make_app(tmp_path, ASK_CONCURRENCY_PER_CALLER=1)
    client = app.test_client()
    streaming = OpenStream(app, STAFF)
    assert streaming.response.status_code == 200
    assert get_limits(app).concurrency.in_flight("ask", "user:demo-staff") == 1
    error = error_of(client.post("/api/v1/ask", json=OpenStream.BODY, headers=STAFF), 429)
    assert error["reason"] == "concurrency" and "1 of yours are in progress" in error["message"]
    assert client.post("/api/v1/ask", json=OpenStream.BODY, headers=SUPPORT).status_code == 200
    assert streaming.read()[-1][0] == "done"
    assert get_limits(app).concurrency.in_flight("ask") == 0
    assert client.post("/api/v1/ask", json=OpenStream.BODY, headers=STAFF).status_code == 200


def test_a_stream_the_client_abandons_releases_its_slot(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    streaming = OpenStream(app, STAFF)
    assert get_limits(app).concurrency.in_flight("ask") == 1
    streaming.abandon()
    assert get_limits(app).concurrency.in_flight("ask") == 0


def test_the_process_wide_ask_cap(tmp_path: Path) -> None:
    app = make_app(tmp_path, MAX_CONCURRENT_ASKS=1)
    client = app.test_client()
    streaming = OpenStream(app, STAFF)
    error = error_of(client.post("/api/v1/ask", json=OpenStream.BODY, headers=SUPPORT), 429)
    assert error["reason"] == "concurrency" and "answering 1 ask" in error["message"]
    assert client.get(SEARCH, headers=SUPPORT).status_code == 200  # searches are still served
    streaming.read()
    assert client.post("/api/v1/ask", json=OpenStream.BODY, headers=SUPPORT).status_code == 200


def test_limits_can_be_turned_off(tmp_path: Path) -> None:
    client = make_app(tmp_path, RATE_LIMIT_BACKEND="off", SEARCH_BURST=1).test_client()
    assert {client.get(SEARCH, headers=STAFF).status_code for _ in range(5)} == {200}


def test_a_caller_over_a_limit_is_refused_before_flask_reads_the_request(tmp_path: Path) -> None:
    app = make_app(tmp_path, ASK_BURST=1)
    dispatched: list[str] = []
    app.before_request(lambda: dispatched.append(request.path) and None)
    client = app.test_client()
    assert client.post("/api/v1/ask", json={"question": "q"}, headers=STAFF).status_code == 200
    assert len(dispatched) == 1
    # Over its limit now: refused in front of Flask, body unread (this one is not even JSON).
    response = client.post("/api/v1/ask", data="{not json", headers=STAFF)
    error = error_of(response, 429)
    assert error["reason"] == "rate" and response.headers["Retry-After"]
    assert len(dispatched) == 1
    # Others are not: another token, an unknown token (a 401 from Flask), a bad request.
    assert client.post("/api/v1/ask", json={"question": "q"}, headers=SUPPORT).status_code == 200
    error_of(client.post("/api/v1/ask", json={"question": "q"}, headers=BAD_TOKEN), 401)
    error_of(client.get("/api/v1/search?q=kafka&k=0", headers=STAFF), 400)
    assert len(dispatched) == 4
