"""Bearer tokens -> users with access groups; an admin sees every group.

The token table comes from the app config (API_TOKENS, or the JSON file FRESHET_API_TOKENS_FILE).
Its default holds the demo tokens of ``freshet.web.DEMO_API_TOKENS``: for the local demo only. Those
tokens are public, so they are accepted only from a loopback peer that no proxy forwarded
(``freshet.web.server`` also refuses to listen beyond loopback without a tokens file).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import Mapping
from typing import Any

from flask import Flask, current_app, g, request
from werkzeug.datastructures import Headers

from freshet.answering.users import ANONYMOUS, User
from freshet.errors import FreshetError
from freshet.web.errors import ApiError

logger = logging.getLogger(__name__)


#: Headers a reverse proxy adds: a request that carries one did not start on this host.
FORWARDING_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Real-IP")


class TokenError(FreshetError, ValueError):
    """A token table entry or an Authorization header that cannot be used."""


def parse_tokens(raw: Mapping[str, Any]) -> dict[str, User]:
    """Validate a token table ``{token: {user, groups, admin}}`` into users."""
    if not isinstance(raw, Mapping):
        raise TokenError("API_TOKENS must be a mapping of token -> {user, groups, admin}")
    users: dict[str, User] = {}
    for token, entry in raw.items():
        if not isinstance(token, str) or not token:
            raise TokenError("every API token must be a non-empty string")
        if not isinstance(entry, Mapping):
            raise TokenError(f"API token entry for user of token #{len(users) + 1} is not a map")
        name = entry.get("user")
        groups = entry.get("groups", [])
        admin = entry.get("admin", False)
        if not isinstance(name, str) or not name:
            raise TokenError(f"API token #{len(users) + 1} has no user name")
        if name == ANONYMOUS.name:
            # Callers without a token are "anonymous"; a token user of that name would share
            # their identity (their answers, their rate limits).
            raise TokenError(f"API token #{len(users) + 1}: the user name {name!r} is reserved")
        if not isinstance(groups, list) or not all(isinstance(x, str) and x for x in groups):
            raise TokenError(f"API token of user {name!r}: groups must be a list of names")
        if not isinstance(admin, bool):
            raise TokenError(f"API token of user {name!r}: admin must be true or false")
        users[token] = User(name, tuple(sorted(set(groups))), admin)
    return users


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header; None when there is none."""
    if header is None or not header.strip():
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise TokenError("the Authorization header must be 'Bearer <token>'")
    return token.strip()


def authenticate(
    header: str | None,
    tokens: Mapping[str, User],
    allow_anonymous: bool,
    *,
    public: frozenset[str] = frozenset(),
    local: bool = True,
) -> User | None:
    """The user of a request; None for an unknown token or a missing one when anonymous is off.

    A token of ``public`` (the demo tokens, which anyone can read) is refused with a
    TokenError unless the request is ``local`` (see ``is_local``)."""
    token = bearer_token(header)
    if token is None:
        return ANONYMOUS if allow_anonymous else None
    # Constant-time comparison against every token, so timing does not reveal prefixes.
    found: User | None = None
    matched = ""
    for known, user in tokens.items():
        if hmac.compare_digest(known.encode(), token.encode()):
            found, matched = user, known
    if found is not None and matched in public and not local:
        raise TokenError(
            "the demo tokens are public and valid only on loopback (a request from this "
            "host, not through a proxy); use a token of FRESHET_API_TOKENS_FILE"
        )
    return found


def is_local(remote_addr: str | None, headers: Mapping[str, str] | Headers) -> bool:
    """Whether a request came from this host itself: a loopback peer, forwarded by no proxy."""
    if any(headers.get(name) for name in FORWARDING_HEADERS):
        return False
    try:
        return ipaddress.ip_address((remote_addr or "").split("%")[0]).is_loopback
    except ValueError:
        return False


def tokens_of(app: Flask) -> dict[str, User]:
    """The app's token table, parsed once."""
    cached = app.extensions.get("freshet.tokens")
    if cached is None:
        cached = parse_tokens(app.config.get("API_TOKENS") or {})
        app.extensions["freshet.tokens"] = cached
    return cached


def _tokens() -> dict[str, User]:
    return tokens_of(current_app._get_current_object())  # type: ignore[attr-defined]


def public_tokens(tokens: Mapping[str, Any]) -> frozenset[str]:
    """The tokens of ``tokens`` that are published (the demo tokens)."""
    from freshet.web import DEMO_API_TOKENS

    return frozenset(t for t in tokens if t in DEMO_API_TOKENS)


def current_user() -> User:
    """The request's user, or a 401 ApiError; cached on ``g`` for the request."""
    user = g.get("freshet_user")
    if isinstance(user, User):
        return user
    try:
        tokens = _tokens()
        user = authenticate(
            request.headers.get("Authorization"),
            tokens,
            bool(current_app.config["ALLOW_ANONYMOUS"]),
            public=public_tokens(tokens),
            local=is_local(request.remote_addr, request.headers),
        )
    except TokenError as exc:
        raise ApiError(str(exc), 401) from None
    if user is None:
        raise ApiError("a valid bearer token is required", 401)
    g.freshet_user = user
    return user


def require_admin() -> User:
    user = current_user()
    if not user.admin:
        raise ApiError("this resource needs an admin token", 403)
    return user
