"""Who may read an answer later: its asker, by token, or for an anonymous asker the answer's
own capability. Anonymous callers share a user name, never an identity.

An anonymous asker's answer carries two keys, of which the store keeps only SHA-256 digests:
a ``secret`` returned once with the answer (present it as the ``Freshet-Answer-Secret`` header
or the ``secret`` query parameter), and the asker's session (the ``freshet_session`` cookie,
HttpOnly, set on their first ask), so a browser reads its own answers without handling the
secret. Both are 192-bit random values: a digest is enough, no key has to be shared between web
processes, and any process can check either key against rag.answers.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

SECRET_HEADER = "Freshet-Answer-Secret"
SESSION_COOKIE = "freshet_session"
_KEY = re.compile(r"[A-Za-z0-9_-]{32,64}")


@dataclass(frozen=True)
class Keys:
    """The digests of an answer's secret and of its asker's session (None: not set)."""

    secret_hash: str | None = None
    session_hash: str | None = None

    def opens(self, secret: str | None, session: str | None) -> bool:
        """Whether a presented secret or session is this answer's."""
        return matches(self.secret_hash, secret) or matches(self.session_hash, session)


NO_KEYS = Keys()


def new_key() -> str:
    """A fresh random secret or session id (32 URL-safe characters, 192 bits)."""
    return secrets.token_urlsafe(24)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def matches(stored: str | None, presented: str | None) -> bool:
    if not stored or not presented or not _KEY.fullmatch(presented):
        return False
    return hmac.compare_digest(stored, digest(presented))


def valid_key(value: str | None) -> str | None:
    """``value`` when it has the form of a key we issue, else None."""
    return value if value and _KEY.fullmatch(value) else None


def presented_secret(header: str | None, arg: str | None) -> str | None:
    """The secret of the ``Freshet-Answer-Secret`` header, else of the ``secret`` parameter."""
    return valid_key(header or arg)
