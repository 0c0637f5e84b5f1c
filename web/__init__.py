"""The Flask app: retrieval, answers with citations, web UI and REST API."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flask import Flask

from freshet.answering.config import DEFAULTS as ANSWERING_DEFAULTS
from freshet.settings import Settings

logger = logging.getLogger(__name__)

#: Demo-only bearer tokens: anyone who reads this file knows them, so they are valid only on
#: loopback. Set FRESHET_API_TOKENS_FILE (a JSON file) for anything but the local demo.
DEMO_API_TOKENS: dict[str, dict[str, Any]] = {
    "demo-public": {"user": "demo-public", "groups": [], "admin": False},
    "demo-staff": {"user": "demo-staff", "groups": ["staff"], "admin": False},
    "demo-support": {"user": "demo-support", "groups": ["support"], "admin": False},
    "demo-admin": {"user": "demo-admin", "groups": [], "admin": True},
}

DEFAULTS: dict[str, Any] = {
    # Retrieval, answering, the answer store and rules: freshet.answering.config.
    **ANSWERING_DEFAULTS,
    "ALLOW_ANONYMOUS": True,
    "API_TOKENS": DEMO_API_TOKENS,
    "API_TOKENS_FILE": None,
    "MAX_CONTENT_LENGTH": 64 * 1024,
    # Report where each API request's time went in a Server-Timing response header.
    "SERVER_TIMING": True,
    # Limits on /search and /ask per caller (a token's user; anonymous: the address), see
    # web/limits.py. postgres: buckets shared by every web process (rag.rate_limits); memory:
    # per process; off: no limits at all.
    "RATE_LIMIT_BACKEND": "postgres",
    "SEARCH_RATE_PER_MINUTE": 300,
    "SEARCH_BURST": 30,
    "SEARCH_CONCURRENCY_PER_CALLER": 4,
    "ASK_RATE_PER_MINUTE": 10,
    "ASK_BURST": 5,
    "ASK_CONCURRENCY_PER_CALLER": 2,
    # Asks of all callers in flight in one process: the server's other threads stay free for
    # searches and the rest (waitress serves with web.server.THREADS = 8).
    "MAX_CONCURRENT_ASKS": 4,
    # Proxies in front of the app that append X-Forwarded-For (0: the peer is the caller).
    "TRUSTED_PROXY_HOPS": 0,
    # None: Settings.from_env(), built on first use; server.run passes its own.
    "SETTINGS": None,
}

#: test_config keys holding ready-made objects, moved into app.extensions by the factory.
INJECTABLE = {
    "RETRIEVER": "freshet.retriever",
    "EMBEDDER": "freshet.embedder",
    "ANSWERER": "freshet.answerer",
    "ANSWER_STORE": "freshet.answer_store",
    "REQUEST_PUBLISHER": "freshet.request_publisher",
    "LIMITS": "freshet.limits",
}

_lock = threading.Lock()


def create_app(
    test_config: Mapping[str, Any] | None = None, *, settings: Settings | None = None
) -> Flask:
    """Application factory: defaults, then FRESHET_* environment variables, then test_config."""
    app = Flask(__name__)
    app.config.from_mapping(DEFAULTS)
    if settings is not None:
        app.config["SETTINGS"] = settings
    app.config.from_prefixed_env("FRESHET")
    if test_config is not None:
        app.config.from_mapping(test_config)
    _load_tokens_file(app)
    for key, extension in INJECTABLE.items():
        if app.config.get(key) is not None:
            app.extensions[extension] = app.config.pop(key)

    from freshet.web import answers, db, errors, limits
    from freshet.web.api import bp as api_bp
    from freshet.web.ui import bp as ui_bp

    db.init_app(app)
    errors.init_app(app)
    answers.init_app(app)
    limits.init_app(app)
    app.register_blueprint(api_bp)
    app.register_blueprint(ui_bp)
    hops = int(app.config.get("TRUSTED_PROXY_HOPS") or 0)
    if hops > 0:  # outermost: everything after it sees the caller's address
        from werkzeug.middleware.proxy_fix import ProxyFix

        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops)  # type: ignore[method-assign]
    return app


def _load_tokens_file(app: Flask) -> None:
    path = app.config.get("API_TOKENS_FILE")
    if not path:
        return
    try:
        tokens = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RuntimeError(
            f"FRESHET_API_TOKENS_FILE={path!r} is not a readable JSON file: {exc}"
        ) from exc
    if not isinstance(tokens, dict):
        raise RuntimeError(f"FRESHET_API_TOKENS_FILE={path!r} must hold a JSON object")
    app.config["API_TOKENS"] = tokens


def app_settings(app: Flask) -> Settings:
    """The app's Settings: the one it was built with, else Settings.from_env() on first use."""
    settings = app.config.get("SETTINGS")
    if settings is None:
        with _lock:
            settings = app.config.get("SETTINGS")
            if settings is None:
                settings = Settings.from_env()
                app.config["SETTINGS"] = settings
    assert isinstance(settings, Settings)
    return settings


def config_value(app: Flask, key: str) -> Any:
    """A config value whose None default is filled from the Settings (EMBEDDING_MODEL...)."""
    value = app.config.get(key)
    if value is not None:
        return value
    settings = app_settings(app)
    if key == "EMBEDDING_MODEL":
        return settings.embedding_model
    if key == "LLM_BACKEND":
        return settings.llm_backend
    if key == "DATABASE_URL":
        from freshet.db import database_url

        value = database_url(settings)
        app.config["DATABASE_URL"] = value
        return value
    return None


def close_app(app: Flask) -> None:
    """Release what the app opened: its database pool and its Kafka producer."""
    from freshet.web.db import close_pool
    from freshet.web.publisher import close_publisher

    close_publisher(app)
    close_pool(app)
