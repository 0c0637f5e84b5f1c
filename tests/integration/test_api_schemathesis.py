"""Property-based tests of /api/v1 against its own OpenAPI document (schemathesis).

For every operation in web/openapi.py, schemathesis generates valid and invalid requests and
sends them to the WSGI app in-process; the app runs on the session's real stack, with the
demo data synced into schema `rag`. No input may make a route fail with a server error, and
every response must match what the document declares (status codes, content types, bodies).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from flask import Flask
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from freshet.embedder import Embedder
from freshet.settings import Settings
from freshet.sync.chunking import TokenChunker
from freshet.sync.worker import SyncWorker
from freshet.web import close_app, create_app
from tests.integration.conftest import WorkerThread
from tests.integration.sync_support import caught_up

pytestmark = [
    pytest.mark.integration,
    # Hypothesis flags any change of the global `random` state while it draws a case; Kafka's
    # client threads (kafka-python picks brokers and jitters reconnects with it) can make one
    # at any moment, which says nothing about the strategies here.
    pytest.mark.filterwarnings(
        "ignore:Do not use the `random` module inside strategies"
        ":hypothesis.errors.HypothesisDeprecationWarning"
    ),
]

ADMIN = {"Authorization": "Bearer demo-admin"}


@pytest.fixture(scope="module")
def synced_stack(running_stack: Settings, embedder: Embedder) -> Settings:
    """The session's stack with every demo row in the index, so reads return real chunks."""
    worker = WorkerThread(
        SyncWorker(running_stack, embedder, TokenChunker(embedder.tokenizer))  # type: ignore[attr-defined]
    ).start()
    try:
        caught_up(worker)
    finally:
        worker.stop()
    return running_stack


@pytest.fixture(scope="module")
def api_app(synced_stack: Settings, embedder: Embedder) -> Iterator[Flask]:
    # No sync worker runs while this module does, so the app may share the session's model.
    # The limits stay on (the shared buckets of rag.rate_limits see every generated request),
    # with room for the generated cases; 429 is in the document, so either outcome conforms.
    limits = {"SEARCH_BURST": 100_000, "ASK_BURST": 100_000, "ASK_CONCURRENCY_PER_CALLER": 8}
    app = create_app({"EMBEDDER": embedder, "POOL_MAX_SIZE": 4, **limits}, settings=synced_stack)
    # schemathesis calls the WSGI app without a peer address; the demo tokens it sends are
    # valid only from loopback, where these calls come from.
    wsgi = app.wsgi_app

    def from_loopback(environ: dict[str, Any], start_response: Any) -> Any:
        environ.setdefault("REMOTE_ADDR", "127.0.0.1")
        return wsgi(environ, start_response)

    app.wsgi_app = from_loopback  # type: ignore[method-assign]
    yield app
    close_app(app)


# The document as the app serves it. Serving it needs no database, so it is loaded at import
# (the lazy schemathesis.pytest.from_fixture sets Node._nodeid, which pytest 9 removed); the
# requests go to the `api_app` fixture's app.
schema = schemathesis.openapi.from_wsgi("/api/v1/openapi.json", create_app({"TESTING": True}))
# PostgreSQL text and jsonb cannot hold NUL, so the API refuses it with a 400 (tested below);
# generating it would only make valid-looking metadata objects "rejected positive data".
schema.config.generation.update(allow_x00=False)


def assert_not_a_server_error(case: schemathesis.Case, response: schemathesis.Response) -> None:
    """No 5xx, for any input."""
    assert response.status_code < 500, (
        f"{case.operation.label} answered {response.status_code}: {response.text[:500]}\n"
        f"reproduce: {case.as_curl_command()}"
    )


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_api_conforms_to_its_openapi_document(case: schemathesis.Case, api_app: Flask) -> None:
    # Each case as whatever token schemathesis generated (often none or an unknown one), then
    # as the admin, who may call every route (GET /status included) and sees every group.
    for headers in (None, ADMIN):
        response = case.call(app=api_app, headers=headers)
        assert_not_a_server_error(case, response)
        case.validate_response(response, excluded_checks=[not_a_server_error])


@pytest.mark.parametrize(
    ("method", "url", "body", "status", "field"),
    [
        ("GET", "/api/v1/search?q=ferry%00times", None, 400, "q"),
        ("GET", '/api/v1/search?q=ferry&metadata={"kind":"\\u0000"}', None, 400, "metadata"),
        ("GET", '/api/v1/search?q=ferry&metadata={"\\ud800":1}', None, 400, "metadata"),
        ("GET", "/api/v1/search?q=ferry&table=app.articles%00", None, 400, "table"),
        ("POST", "/api/v1/ask", '{"question": "ferry\\u0000"}', 400, "question"),
        ("POST", "/api/v1/ask", '{"question": "\\udc00 ferry"}', 400, "question"),
        ("POST", "/api/v1/ask", '{"question": "ferry", "k": Infinity}', 400, "k"),
        ("POST", "/api/v1/ask", '{"question": "ferry", "metadata": {"a": NaN}}', 400, "metadata"),
        ("GET", "/api/v1/documents/app.articles/1%00", None, 404, None),
        # Nesting no parser, check or PostgreSQL can be made to recurse on: once a 500.
        ("GET", "/api/v1/search?q=ferry&metadata=" + "[" * 5000, None, 400, "metadata"),
        ("POST", "/api/v1/ask", '{"question": "ferry", "k": ' + "[" * 5000 + "}", 400, "k"),
        ("POST", "/api/v1/ask", '{"a":' * 40 + "1" + "}" * 40, 400, "a"),
    ],
)
def test_text_postgresql_cannot_hold_is_a_4xx(
    api_app: Flask, method: str, url: str, body: str | None, status: int, field: str | None
) -> None:
    """Inputs that PostgreSQL cannot store (NUL, lone surrogates, NaN) or that nest too deep
    once made a 500."""
    response = api_app.test_client().open(
        url, method=method, data=body, content_type="application/json" if body else None
    )
    assert response.status_code == status, response.get_data(as_text=True)
    error = response.get_json()["error"]
    assert error["status"] == status and error["message"]
    assert error.get("field") == field
