"""The app's shared objects, built lazily once per app and kept in ``app.extensions``.

Tests inject their own through create_app's test_config (RETRIEVER, EMBEDDER, ANSWERER,
ANSWER_STORE), so no unit test needs a model or a database.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from flask import Flask, current_app

from freshet.web.llm import Answerer, make_answerer
from freshet.web.retrieval import EmbedThread, PgRetriever, Retriever

logger = logging.getLogger(__name__)

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


def get_embed(app: Flask | None = None) -> EmbedThread:
    """The query embedder (the shared freshet Embedder, serialised)."""
    app = app or _app()

    def build() -> EmbedThread:
        from freshet.web import config_value

        embedder: Any = app.extensions.get("freshet.embedder")
        if embedder is not None:
            return EmbedThread(embedder)
        from freshet.embedder import embedder_from_settings
        from freshet.web import app_settings

        settings = app_settings(app).with_overrides(
            embedding_model=config_value(app, "EMBEDDING_MODEL")
        )
        return EmbedThread(lambda: embedder_from_settings(settings))

    return _lazy(app, "freshet.embed", build)


def get_retriever(app: Flask | None = None) -> Retriever:
    app = app or _app()

    def build() -> Retriever:
        from freshet.web.db import get_pool

        return PgRetriever(
            lambda: get_pool(app),
            get_embed(app),
            ef_search=int(app.config["HNSW_EF_SEARCH"]),
            public_documents=bool(app.config["PUBLIC_DOCUMENTS"]),
            text_weight=float(app.config["HYBRID_TEXT_WEIGHT"]),
            rrf_k=int(app.config["RRF_K"]),
        )

    return _lazy(app, "freshet.retriever", build)


def get_answerer(app: Flask | None = None) -> Answerer:
    app = app or _app()

    def build() -> Answerer:
        from freshet.web import config_value

        backend = str(config_value(app, "LLM_BACKEND"))
        embed_many = get_embed(app).many if backend == "extractive" else None
        answerer = make_answerer(backend, dict(app.config), embed_many)
        logger.info("answer backend: %s", answerer.name)
        return answerer

    return _lazy(app, "freshet.answerer", build)
