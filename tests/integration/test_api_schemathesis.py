"""Property-based tests of /api/v1 against its own OpenAPI document (schemathesis).

For every operation in web/openapi.py, schemathesis generates valid and invalid requests and
sends them to the WSGI app in-process; the app runs on the session's real stack, with the
demo data synced into schema `rag`. No input may make a route answer 500, and every response
must match what the document declares (status codes, content types, bodies, headers).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from flask import Flask
from hypothesis import HealthCheck, settings

from freshet.embedder import Embedder
from freshet.settings import Settings
from sync.chunking import TokenChunker
from sync.worker import SyncWorker
from tests.integration.conftest import WorkerThread
from tests.integration.sync_support import caught_up
from web import create_app
from web.db import close_pool

pytestmark = pytest.mark.integration


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
    app = create_app({"EMBEDDER": embedder, "POOL_MAX_SIZE": 4}, settings=synced_stack)
    yield app
    close_pool(app)


# The document as the app serves it. Loading it needs no database, so it is read at import
# (schemathesis.pytest.from_fixture, the lazy loader, does not work with pytest 9: it sets
# the removed Node._nodeid); the requests go to the `api_app` fixture's app instead.
schema = schemathesis.openapi.from_wsgi("/api/v1/openapi.json", create_app({"TESTING": True}))


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_api_conforms_to_its_openapi_document(case: schemathesis.Case, api_app: Flask) -> None:
    case.call_and_validate(app=api_app)
