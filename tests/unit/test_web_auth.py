"""Bearer token parsing and the token table."""

from __future__ import annotations

import pytest

from freshet.answering.users import ANONYMOUS, User
from freshet.web import DEMO_API_TOKENS
from freshet.web.auth import TokenError, authenticate, bearer_token, parse_tokens


def test_demo_tokens_parse_into_users() -> None:
    users = parse_tokens(DEMO_API_TOKENS)
    assert users["demo-public"] == User("demo-public", (), False)
    assert users["demo-staff"].groups == ("staff",)
    assert users["demo-support"].groups == ("support",)
    assert users["demo-admin"].admin is True


@pytest.mark.parametrize(
    "table",
    [
        {"": {"user": "a"}},
        {"t": "not a map"},
        {"t": {"groups": []}},
        {"t": {"user": "a", "groups": "staff"}},
        {"t": {"user": "a", "groups": [""]}},
        {"t": {"user": "a", "admin": "yes"}},
        ["t"],
    ],
)
def test_bad_token_tables_are_refused(table: object) -> None:
    with pytest.raises(TokenError):
        parse_tokens(table)  # type: ignore[arg-type]


def test_groups_are_deduplicated_and_sorted() -> None:
    users = parse_tokens({"t": {"user": "a", "groups": ["b", "a", "b"]}})
    assert users["t"].groups == ("a", "b")


@pytest.mark.parametrize(
    ("header", "token"),
    [(None, None), ("", None), ("Bearer abc", "abc"), ("bearer  abc ", "abc")],
)
def test_bearer_token(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token


@pytest.mark.parametrize("header", ["Basic abc", "Bearer", "abc"])
def test_malformed_authorization_is_an_error(header: str) -> None:
    with pytest.raises(TokenError):
        bearer_token(header)


def test_authenticate() -> None:
    users = parse_tokens(DEMO_API_TOKENS)
    assert authenticate("Bearer demo-staff", users, True) == users["demo-staff"]
    assert authenticate("Bearer wrong", users, True) is None
    assert authenticate(None, users, True) is ANONYMOUS
    assert authenticate(None, users, False) is None
