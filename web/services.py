"""The app's shared objects, from one answering-core factory per app (``app.extensions``).

Tests inject their own through create_app's test_config (RETRIEVER, EMBEDDER, ANSWERER,
ANSWER_STORE), so no unit test needs a model or a database.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from flask import Flask, current_app

from freshet.answering.answers import AnswerStore
from freshet.answering.factory import Answering
from freshet.answering.llm import Answerer
from freshet.answering.retrieval import EmbedThread, Retriever

if TYPE_CHECKING:
    from freshet.workflow.synchronous import InProcessWorkflow

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


class AppAnswering(Answering):
    """The answering factory of one app: what a test injected (RETRIEVER, ANSWERER,
    ANSWER_STORE) wins over what the settings would build, so the workflow step kinds the
    synchronous /ask runs use the same objects as the rest of the app."""

    def __init__(self, app: Flask) -> None:
        from freshet.web import app_settings
        from freshet.web.db import get_pool

        super().__init__(
            app_settings(app),
            pool=lambda: get_pool(app),
            embedder=app.extensions.get("freshet.embedder"),
        )
        self.app = app

    def retriever(self) -> Retriever:
        given = self.app.extensions.get("freshet.retriever")
        return given if isinstance(given, Retriever) else super().retriever()

    def answerer(self) -> Answerer:
        given = self.app.extensions.get("freshet.answerer")
        return given if isinstance(given, Answerer) else super().answerer()

    def store(self) -> AnswerStore:
        given = self.app.extensions.get("freshet.answer_store")
        return given if isinstance(given, AnswerStore) else super().store()


def answering(app: Flask | None = None) -> Answering:
    """The app's answering factory: its Settings, its pool, its (or an injected) embedder."""
    app = app or _app()
    return _lazy(app, "freshet.answering", lambda: AppAnswering(app))


def get_ask_workflow(app: Flask | None = None) -> InProcessWorkflow:
    """The workflow the synchronous /ask runs in process (FRESHET_ASK_WORKFLOW)."""
    app = app or _app()

    def build() -> InProcessWorkflow:
        from freshet.workflow.definition import load_workflow
        from freshet.workflow.synchronous import InProcessWorkflow

        chosen = answering(app).settings.ask_workflow.strip()
        return InProcessWorkflow(load_workflow(chosen or None), answering(app))

    return _lazy(app, "freshet.ask_workflow", build)


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
