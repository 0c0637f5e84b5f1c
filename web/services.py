"""The app's shared objects, from one answering-core factory per app (``app.extensions``).

Tests inject their own through create_app's test_config (RETRIEVER, EMBEDDER, ANSWERER,
ANSWER_STORE), so no unit test needs a model or a database.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

from flask import Flask, current_app

from freshet.answering.factory import Answering
from freshet.answering.llm import Answerer
from freshet.answering.retrieval import EmbedThread, Retriever

T = TypeVar("T")
_lock = threading.RLock()


def _app() -> Flask:
    return current_app._get_current_object()  # type: ignore[attr-defined]


def _lazy(app: Flask, key: str, build: Callable[[], T]) -> T:
    value = app.extensions.get(key)
    if value is None:
        with _lock:
            value = app.extensions.get(key)
            if value is None:
                value = build()
                app.extensions[key] = value
    return value


def answering(app: Flask | None = None) -> Answering:
    """The app's answering factory: its Settings, its pool, its (or an injected) embedder."""
    app = app or _app()

    def build() -> Answering:
        from freshet.web import app_settings
        from freshet.web.db import get_pool

        return Answering(
            app_settings(app),
            pool=lambda: get_pool(app),
            embedder=app.extensions.get("freshet.embedder"),
        )

    return _lazy(app, "freshet.answering", build)


def get_embed(app: Flask | None = None) -> EmbedThread:
    """The query embedder (the shared freshet Embedder, serialised)."""
    app = app or _app()
    return _lazy(app, "freshet.embed", lambda: answering(app).embed())


def get_retriever(app: Flask | None = None) -> Retriever:
    app = app or _app()
    return _lazy(app, "freshet.retriever", lambda: answering(app).retriever())


def get_answerer(app: Flask | None = None) -> Answerer:
    app = app or _app()
    return _lazy(app, "freshet.answerer", lambda: answering(app).answerer())
