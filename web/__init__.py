"""The Flask app: retrieval, answers with citations, web UI and REST API."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from freshet.settings import Settings, SettingsError

if TYPE_CHECKING:  # create_app imports Flask: `freshet --help` must not pay for it
    from flask import Flask

#: Demo-only bearer tokens: anyone who reads this file knows them, so they are valid only on
#: loopback. Set FRESHET_API_TOKENS_FILE (a JSON file) for anything but the local demo.
DEMO_API_TOKENS: dict[str, dict[str, Any]] = {
    "demo-public": {"user": "demo-public", "groups": [], "admin": False},
    "demo-staff": {"user": "demo-staff", "groups": ["staff"], "admin": False},
    "demo-support": {"user": "demo-support", "groups": ["support"], "admin": False},
    "demo-admin": {"user": "demo-admin", "groups": [], "admin": True},
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


def create_app(
    test_config: Mapping[str, Any] | None = None, *, settings: Settings | None = None
) -> Flask:
    """Application factory. The config is the app's settings (``Settings.app_config``): those
    of ``settings``, else of test_config's ``SETTINGS``, else ``Settings.from_env()`` (this
    process's environment, read once, here, when create_app is itself the entry point).

    test_config is the tests' way to override settings (its keys for settings, such as
    ``RRF_K``, change the app's Settings too, so the two always agree) and to inject objects
    (``INJECTABLE``); nothing else in the app reads the environment.
    """
    overrides = dict(test_config or {})
    if settings is None:
        settings = overrides.get("SETTINGS") or Settings.from_env()
    settings = settings.with_app_config(overrides)
    from flask import Flask

    app = Flask(__name__)
    # DATABASE_URL: None until first use, then the settings' URL (config_value).
    app.config["DATABASE_URL"] = None
    app.config.from_mapping(overrides)
    app.config.from_mapping(settings.app_config())
    app.config["SETTINGS"] = settings
    if app.config["API_TOKENS"] is None:
        app.config["API_TOKENS"] = DEMO_API_TOKENS
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
    hops = int(app.config["TRUSTED_PROXY_HOPS"])
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
        raise SettingsError(
            f"FRESHET_API_TOKENS_FILE={path!r} is not a readable JSON file: {exc}"
        ) from exc
    if not isinstance(tokens, dict):
        raise SettingsError(f"FRESHET_API_TOKENS_FILE={path!r} must hold a JSON object")
    app.config["API_TOKENS"] = tokens


def app_settings(app: Flask) -> Settings:
    """The app's Settings: the one its config was filled from."""
    settings = app.config["SETTINGS"]
    assert isinstance(settings, Settings)
    return settings


def config_value(app: Flask, key: str) -> Any:
    """A config value; DATABASE_URL is resolved from the Settings at first use (DATABASE_URL,
    else the embedded PostgreSQL's URL)."""
    value = app.config.get(key)
    if value is None and key == "DATABASE_URL":
        from freshet.db import database_url

        value = database_url(app_settings(app))
        app.config["DATABASE_URL"] = value
    return value


def close_app(app: Flask) -> None:
    """Release what the app opened: its query-embedding thread, its Kafka producer and its
    database pool."""
    from freshet.web.db import close_pool
    from freshet.web.publisher import close_publisher

    embed = app.extensions.pop("freshet.embed", None)
    if embed is not None:
        embed.close()
    close_publisher(app)
    close_pool(app)
