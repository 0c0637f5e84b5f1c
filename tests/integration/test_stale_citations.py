"""Stale citations on the real stack: an answer citing a row that is then updated (and later
deleted) is marked stale by `freshet stale-watch`, a consumer group over the change topics, and
each change is one event on rag.answers.stale; an answer kept after a change it missed is stale
at once."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from freshet.answering.answers import PgAnswerStore, StoredAnswer
from freshet.answering.messages import STALE
from freshet.answering.users import User
from freshet.db import connect, database_url
from freshet.settings import PROJECT_ROOT, Settings
from freshet.web import close_app, create_app
from tests.conftest import wait_for
from tests.integration.conftest import WorkerThread
from tests.integration.sync_support import caught_up, chunk_texts, index, source
from tests.integration.workflow_support import stop_all
from tests.support import topic_from_start

pytestmark = pytest.mark.integration

ADMIN = {"Authorization": "Bearer demo-admin"}


@pytest.fixture
def watcher(running_stack_env: dict[str, str], tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    log = tmp_path / "stale-watch.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "freshet.cli", "-v", "stale-watch"],
            env={**running_stack_env, "PYTHONWARNINGS": "ignore"},
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=PROJECT_ROOT,
        )
    try:
        yield process
    finally:
        stop_all([process])


@pytest.fixture
def client(running_stack: Settings) -> Iterator[FlaskClient]:
    app = create_app({"POOL_MAX_SIZE": 2, "RATE_LIMIT_BACKEND": "off"}, settings=running_stack)
    yield app.test_client()
    close_app(app)


def events_for(settings: Settings, answer_id: str) -> list[dict[str, Any]]:
    found = []
    with topic_from_start(settings.bootstrap_servers, STALE) as consumer:
        for record in consumer:
            if record.key == answer_id.encode():
                found.append(json.loads(record.value))
    return found


def test_an_answer_citing_a_changed_row_is_marked_stale_once_per_change(
    running_stack: Settings,
    start_worker: Callable[..., WorkerThread],
    watcher: subprocess.Popen[bytes],
    client: FlaskClient,
) -> None:
    caught_up(start_worker())
    key = 870_000_000 + uuid.uuid4().int % 10_000_000
    text = f"The Vellmar ferry number {key} leaves the north pier at 06:10."
    with source(running_stack) as src, index(running_stack) as idx:
        try:
            src.execute(
                "INSERT INTO app.articles (id, title, body) VALUES (%s, 'Vellmar ferry', %s)",
                (key, text),
            )
            assert wait_for(lambda: text in " ".join(chunk_texts(idx, "app.articles", key)), 60)
            # The watcher consumes once it has seen this row's insert.
            with connect(database_url(running_stack), autocommit=True) as db:

                def seen() -> bool:
                    row = db.execute(
                        "SELECT 1 FROM rag.source_changes WHERE source_table = 'app.articles'"
                        " AND doc_key = %s",
                        (str(key),),
                    ).fetchone()
                    return row is not None

                assert wait_for(seen, 120, interval=0.2), "the stale watcher saw no change"
            response = client.post(
                "/api/v1/ask",
                json={"question": f"When does Vellmar ferry number {key} leave?", "k": 3},
                headers=ADMIN,
            )
            body = response.get_json()
            assert response.status_code == 200 and body["status"] == "approved", body
            assert str(key) in {c["doc_key"] for c in body["citations"]}, body
            url = f"/api/v1/answers/{body['id']}"
            assert "stale" not in client.get(url, headers=ADMIN).get_json()

            src.execute(
                "UPDATE app.articles SET body = %s WHERE id = %s", (text + " Or 06:40.", key)
            )
            updated = time.monotonic()

            def stale() -> dict[str, Any] | None:
                got = client.get(url, headers=ADMIN).get_json()
                return got.get("stale")

            marked = wait_for(stale, 30, interval=0.05)
            elapsed = time.monotonic() - updated
            print(f"marked stale {elapsed * 1000:.0f} ms after the update's commit")
            assert marked, "the answer was not marked stale within 30 s"
            [change] = marked["changes"]
            assert (change["source_table"], change["doc_key"], change["op"]) == (
                "app.articles",
                str(key),
                "update",
            )
            assert change["changed_lsn"] > change["cited_lsn"]

            src.execute("DELETE FROM app.articles WHERE id = %s", (key,))
            assert wait_for(lambda: len(events_for(running_stack, body["id"])) >= 2, 60)
            time.sleep(2)  # anything published twice would be there by now
            events = events_for(running_stack, body["id"])
            assert [e["op"] for e in events] == ["update", "delete"], events
            assert len({e["changed_lsn"] for e in events}) == 2
            assert events[0]["changed_lsn"] == change["changed_lsn"]

            # An answer kept after a change it could not have seen is stale at once.
            late = StoredAnswer(
                f"late-{key}",
                "q",
                User("demo-admin"),
                "approved",
                {
                    "answer": "x",
                    "citations": [
                        {
                            "source_table": "app.articles",
                            "doc_key": str(key),
                            "source_lsn": change["cited_lsn"],
                        }
                    ],
                },
            )
            from psycopg_pool import ConnectionPool

            with ConnectionPool(database_url(running_stack), min_size=1, max_size=1) as pool:
                store = PgAnswerStore(lambda: pool)
                store.put(late)
                kept = store.get(late.id)
            assert kept is not None and kept.stale_at is not None
            assert {c["op"] for c in kept.stale} == {"delete"}  # the newest change of the row
        finally:
            src.execute("DELETE FROM app.articles WHERE id = %s", (key,))
