"""The UI's server-rendered pages: the status page's admin-token hint and the search as a link."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from freshet.answering.retrieval import MODES
from freshet.settings import Settings
from freshet.web import DEMO_API_TOKENS, create_app
from freshet.web.ui import SEARCH_MODES
from tests.unit.web_fakes import FakeRetriever, passage

OWN_TOKENS = {"s3cret-admin-token": {"user": "ops", "groups": [], "admin": True}}


def make_app(tmp_path: Path, **config: Any) -> Flask:
    settings = Settings.from_env({"FRESHET_HOME": str(tmp_path), "FRESHET_CONNECT_PORT": "1"})
    base: dict[str, Any] = {
        "TESTING": True,
        "SETTINGS": settings,
        "RETRIEVER": FakeRetriever([passage(1, "Public text about connector tasks.")]),
        "ANSWER_STORE_BACKEND": "memory",
        "RATE_LIMIT_BACKEND": "memory",
    }
    base.update(config)
    return create_app(base)


@pytest.fixture
def client(tmp_path: Path) -> FlaskClient:
    return make_app(tmp_path).test_client()


class Elements(HTMLParser):
    """Every start tag's attributes by element id, plus the text inside each id'd element."""

    def __init__(self) -> None:
        super().__init__()
        self.by_id: dict[str, dict[str, str | None]] = {}
        self.options: dict[str, list[dict[str, str | None]]] = {}
        self.text: dict[str, str] = {}
        self._open: list[tuple[str, str | None]] = []
        self._select: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        ident = found.get("id")
        if ident:
            self.by_id[ident] = found
            self.text.setdefault(ident, "")
        if tag == "select":
            self._select = ident
        elif tag == "option" and self._select:
            self.options.setdefault(self._select, []).append(found)
        if tag not in ("input", "meta", "link", "br"):
            self._open.append((tag, ident))

    def handle_endtag(self, tag: str) -> None:
        if tag == "select":
            self._select = None
        while self._open:
            open_tag, _ = self._open.pop()
            if open_tag == tag:
                break

    def handle_data(self, data: str) -> None:
        for _, ident in self._open:
            if ident:
                self.text[ident] += data


def page(client: FlaskClient, url: str, **kwargs: Any) -> tuple[str, Elements]:
    response = client.get(url, **kwargs)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == "text/html"
    body = response.get_data(as_text=True)
    parsed = Elements()
    parsed.feed(body)
    return body, parsed


def hint_of(parsed: Elements) -> tuple[str | None, str]:
    """The status page's hint: its kind and its text with whitespace collapsed."""
    assert "status-hint" in parsed.by_id, "the status page has no admin-token hint"
    return parsed.by_id["status-hint"].get("data-hint"), " ".join(
        parsed.text["status-hint"].split()
    )


# --- the status page's admin-token hint ------------------------------------------------------
def test_status_page_with_demo_tokens_names_the_demo_admin_token(client: FlaskClient) -> None:
    _, parsed = page(client, "/status")
    kind, text = hint_of(parsed)
    assert kind == "demo"
    assert "demo-admin" in text
    assert "API token field at the top of the page" in text and "Use token" in text
    # The field the hint points at is there, and the status fetch still is the script's job.
    assert parsed.by_id["token"]["type"] == "password"
    assert "status-refresh" in parsed.by_id
    # Only the admin demo token is named: the others are no use on this page.
    for token in DEMO_API_TOKENS:
        if token != "demo-admin":
            assert token not in text


@pytest.mark.parametrize(
    "request_from",
    [
        {"environ_base": {"REMOTE_ADDR": "192.0.2.7"}},
        {"headers": {"X-Forwarded-For": "192.0.2.7"}},
    ],
)
def test_status_page_off_loopback_says_demo_tokens_do_not_work_there(
    client: FlaskClient, request_from: dict[str, Any]
) -> None:
    _, parsed = page(client, "/status", **request_from)
    kind, text = hint_of(parsed)
    assert kind == "demo-remote"
    assert "FRESHET_API_TOKENS_FILE" in text and "docs/web.md" in text
    assert "demo-admin" not in text  # refused from here: pasting it would only fail


def test_status_page_with_a_tokens_file_says_how_to_configure_one(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({**OWN_TOKENS, "t0k-staff": {"user": "s", "groups": ["staff"]}}))
    client = make_app(tmp_path, API_TOKENS_FILE=str(tokens)).test_client()
    body, parsed = page(client, "/status")
    kind, text = hint_of(parsed)
    assert kind == "configure"
    assert "FRESHET_API_TOKENS_FILE" in text and "docs/web.md" in text
    assert '"admin": true' in text and "API token field" in text
    for token in [*DEMO_API_TOKENS, "s3cret-admin-token", "t0k-staff"]:
        assert token not in body, f"the page shows the token {token!r}"


def test_status_page_with_own_tokens_in_the_config_names_none(tmp_path: Path) -> None:
    client = make_app(tmp_path, API_TOKENS=OWN_TOKENS).test_client()
    body, parsed = page(client, "/status")
    assert hint_of(parsed)[0] == "configure"
    assert "s3cret-admin-token" not in body and "demo-admin" not in body


# --- search as a link ------------------------------------------------------------------------
def selected(parsed: Elements, select: str) -> list[str | None]:
    return [o.get("value") for o in parsed.options[select] if "selected" in o]


def test_the_form_offers_every_mode_of_the_api() -> None:
    assert {mode for mode, _ in SEARCH_MODES} == set(MODES)


def test_search_link_fills_the_form_and_runs_it(client: FlaskClient) -> None:
    _, parsed = page(client, "/search?q=x&mode=text")
    assert parsed.by_id["q"]["value"] == "x"
    assert selected(parsed, "mode") == ["text"]
    assert parsed.by_id["search-form"]["data-run"] == "true"


def test_search_page_without_a_query_runs_nothing(client: FlaskClient) -> None:
    _, parsed = page(client, "/search")
    assert parsed.by_id["q"]["value"] == ""
    assert selected(parsed, "mode") == ["hybrid"]
    assert selected(parsed, "table") == []  # "all tables", the first option
    assert parsed.by_id["k"]["value"] == "10"
    assert "checked" not in parsed.by_id["dedupe"]
    assert parsed.by_id["search-form"]["data-run"] == "false"


def test_search_link_fills_table_results_and_dedupe(client: FlaskClient) -> None:
    _, parsed = page(
        client, "/search?q=kafka+tasks&mode=dense&table=app.module_docs&k=3&dedupe=true"
    )
    assert parsed.by_id["q"]["value"] == "kafka tasks"
    assert selected(parsed, "mode") == ["dense"]
    assert selected(parsed, "table") == ["app.module_docs"]
    assert parsed.by_id["k"]["value"] == "3"
    assert "checked" in parsed.by_id["dedupe"]


@pytest.mark.parametrize(
    "query",
    ["mode=bogus", "mode=<b>x</b>", "mode=", "k=0", "k=101", "k=ten", "table=app.secrets"],
)
def test_search_link_ignores_values_that_do_not_fit(client: FlaskClient, query: str) -> None:
    body, parsed = page(client, "/search?q=x&" + query)
    assert selected(parsed, "mode") == ["hybrid"]
    assert selected(parsed, "table") == []
    assert parsed.by_id["k"]["value"] == "10"
    assert "bogus" not in body and "<b>x</b>" not in body and "app.secrets" not in body


@pytest.mark.parametrize(
    "query",
    [
        "<script>alert(1)</script>",
        '"><img src=x onerror=alert(1)>',
        "' autofocus onfocus='alert(1)",
        "a & b < c",
    ],
)
def test_search_link_query_is_escaped(client: FlaskClient, query: str) -> None:
    body, parsed = page(client, "/search", query_string={"q": query, "mode": "text"})
    assert parsed.by_id["q"]["value"] == query  # the form holds exactly what was asked
    assert set(parsed.by_id["q"]) == {
        "id", "name", "type", "required", "maxlength", "value", "autofocus"
    }  # fmt: skip
    assert "<script>alert" not in body and "<img" not in body
    assert selected(parsed, "mode") == ["text"]
