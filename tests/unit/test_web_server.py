"""The demo tokens are public: valid only on loopback. Beyond loopback the web app needs a tokens
file of its own, or it refuses to start and says so."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from freshet.cli import main
from freshet.settings import Settings, SettingsError
from freshet.web import DEMO_API_TOKENS
from freshet.web.auth import TokenError, is_local, parse_tokens
from freshet.web.server import ExposureError, check_exposure, is_loopback, run
from tests.unit.test_web_api import STAFF, error_of, make_app

OWN_TOKENS = {"s3cret-ops-token": {"user": "ops", "groups": ["staff"]}}


def tokens_file(tmp_path: Path, tokens: dict[str, Any]) -> str:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps(tokens))
    return str(path)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.1", "::1", "[::1]", "localhost"])
def test_loopback_hosts(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "example.com", "", "my-host"])
def test_other_hosts(host: str) -> None:
    assert not is_loopback(host)


def test_on_loopback_the_demo_tokens_serve(tmp_path: Path) -> None:
    check_exposure(make_app(tmp_path), "127.0.0.1")


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20"])
def test_beyond_loopback_without_a_tokens_file_it_refuses_to_start(
    tmp_path: Path, host: str
) -> None:
    with pytest.raises(ExposureError) as refused:
        check_exposure(make_app(tmp_path), host)
    message = str(refused.value)
    assert host in message and "FRESHET_API_TOKENS_FILE" in message and "loopback" in message
    assert isinstance(refused.value, SettingsError)  # the CLI prints it as one line


def test_tokens_given_inline_are_not_a_tokens_file(tmp_path: Path) -> None:
    with pytest.raises(ExposureError, match="FRESHET_API_TOKENS_FILE"):
        check_exposure(make_app(tmp_path, API_TOKENS=OWN_TOKENS), "0.0.0.0")


def test_beyond_loopback_a_tokens_file_of_its_own_is_enough(tmp_path: Path) -> None:
    check_exposure(make_app(tmp_path, API_TOKENS_FILE=tokens_file(tmp_path, OWN_TOKENS)), "::")


def test_a_tokens_file_with_a_demo_token_is_refused_beyond_loopback(tmp_path: Path) -> None:
    path = tokens_file(tmp_path, {**OWN_TOKENS, "demo-admin": DEMO_API_TOKENS["demo-admin"]})
    with pytest.raises(ExposureError, match="demo-admin"):
        check_exposure(make_app(tmp_path, API_TOKENS_FILE=path), "0.0.0.0")


def test_the_server_refuses_before_loading_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_model(*args: Any) -> None:
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr("freshet.web.server.get_embed", no_model)
    with pytest.raises(ExposureError):
        run(Settings.from_env({"FRESHET_HOME": str(tmp_path)}), host="0.0.0.0", port=1)


def test_freshet_web_says_why_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FRESHET_HOME", str(tmp_path))
    monkeypatch.delenv("FRESHET_API_TOKENS_FILE", raising=False)
    assert main(["web", "--host", "0.0.0.0", "--port", "1"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "FRESHET_API_TOKENS_FILE" in error[0], error


@pytest.mark.parametrize(
    ("peer", "headers", "local"),
    [
        ("127.0.0.1", {}, True),
        ("::1", {}, True),
        ("10.0.0.7", {}, False),
        ("127.0.0.1", {"X-Forwarded-For": "203.0.113.9"}, False),
        ("127.0.0.1", {"Forwarded": "for=203.0.113.9"}, False),
        ("127.0.0.1", {"X-Real-IP": "203.0.113.9"}, False),
        (None, {}, False),
    ],
)
def test_a_local_request(peer: str | None, headers: dict[str, str], local: bool) -> None:
    assert is_local(peer, headers) is local


def test_demo_tokens_are_refused_from_beyond_loopback(tmp_path: Path) -> None:
    client = make_app(tmp_path).test_client()
    remote = {"REMOTE_ADDR": "10.0.0.7"}
    error = error_of(client.get("/api/v1/me", headers=STAFF, environ_base=remote), 401)
    assert "loopback" in error["message"] and "FRESHET_API_TOKENS_FILE" in error["message"]
    proxied = {**STAFF, "X-Forwarded-For": "203.0.113.9"}
    error_of(client.get("/api/v1/me", headers=proxied), 401)
    assert client.get("/api/v1/me", headers=STAFF).get_json()["user"] == "demo-staff"
    # Anonymous callers stay anonymous, from anywhere.
    assert client.get("/api/v1/me", environ_base=remote).get_json()["user"] == "anonymous"


def test_own_tokens_work_from_anywhere(tmp_path: Path) -> None:
    client = make_app(tmp_path, API_TOKENS_FILE=tokens_file(tmp_path, OWN_TOKENS)).test_client()
    headers = {"Authorization": "Bearer s3cret-ops-token"}
    me = client.get("/api/v1/me", headers=headers, environ_base={"REMOTE_ADDR": "10.0.0.7"})
    assert me.get_json()["user"] == "ops"


def test_behind_trusted_proxies_the_caller_is_the_forwarded_address(tmp_path: Path) -> None:
    client = make_app(tmp_path, TRUSTED_PROXY_HOPS=1, ASK_BURST=1).test_client()
    body = {"question": "What are connector tasks?"}
    for address in ("203.0.113.1", "203.0.113.2"):
        forwarded = {"X-Forwarded-For": address}
        assert client.post("/api/v1/ask", json=body, headers=forwarded).status_code == 200
    error_of(client.post("/api/v1/ask", json=body, headers={"X-Forwarded-For": "203.0.113.1"}), 429)


def test_no_token_may_be_named_anonymous() -> None:
    with pytest.raises(TokenError, match="reserved"):
        parse_tokens({"t": {"user": "anonymous"}})
