"""One factory for the answering core: the objects a web process or a workflow step answers with.

Built from the one Settings and the answering config (``freshet.answering.config``); each object
is made on first use, so a process pays only for what it uses (a validator never loads a model).
The web app wraps one per app (``freshet.web.services``); ``freshet infer`` and ``freshet
validate`` build one directly, with no Flask app.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from psycopg_pool import ConnectionPool

from freshet.answering.answers import AnswerStore, InMemoryAnswerStore, PgAnswerStore
from freshet.answering.config import DEFAULTS
from freshet.answering.llm import Answerer, make_answerer
from freshet.answering.retrieval import EmbedThread, PgRetriever, Retriever
from freshet.answering.rules import RuleSet, load_rules
from freshet.settings import Settings

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Answering:
    """Lazily built retriever, answerer, answer store and rules for one process."""

    def __init__(
        self,
        settings: Settings,
        config: Mapping[str, Any] | None = None,
        *,
        pool: Callable[[], ConnectionPool] | None = None,
        embedder: Any = None,
    ) -> None:
        self.settings = settings
        self.config: dict[str, Any] = {**DEFAULTS, **(config or {})}
        self._pool_factory = pool
        self._embedder = embedder
        self._objects: dict[str, Any] = {}
        self._lock = threading.RLock()

    def _once(self, key: str, build: Callable[[], T]) -> T:
        with self._lock:
            if key not in self._objects:
                self._objects[key] = build()
            value: T = self._objects[key]
            return value

    # Configuration with a None default is filled from the Settings.
    @property
    def embedding_model(self) -> str:
        return str(self.config.get("EMBEDDING_MODEL") or self.settings.embedding_model)

    @property
    def llm_backend(self) -> str:
        return str(self.config.get("LLM_BACKEND") or self.settings.llm_backend)

    @property
    def database_url(self) -> str:
        url = self.config.get("DATABASE_URL")
        if url:
            return str(url)
        from freshet.db import database_url

        return database_url(self.settings)

    @property
    def rules_path(self) -> str:
        path = self.config.get("ANSWER_RULES")
        return self.settings.answer_rules if path is None else str(path)

    def pool(self) -> ConnectionPool:
        if self._pool_factory is not None:
            return self._pool_factory()

        def build() -> ConnectionPool:
            from pgvector.psycopg import register_vector

            from freshet.db import redact

            pool = ConnectionPool(
                self.database_url,
                min_size=int(self.config["POOL_MIN_SIZE"]),
                max_size=int(self.config["POOL_MAX_SIZE"]),
                configure=register_vector,
                kwargs={"connect_timeout": 5},
                name="freshet-answering",
                open=False,
            )
            pool.open()
            logger.info("database pool opened: %s", redact(self.database_url))
            return pool

        return self._once("pool", build)

    def embed(self) -> EmbedThread:
        """The query embedder (the shared freshet Embedder, serialised)."""

        def build() -> EmbedThread:
            if self._embedder is not None:
                return EmbedThread(self._embedder)
            from freshet.embedder import embedder_from_settings

            settings = self.settings.with_overrides(embedding_model=self.embedding_model)
            return EmbedThread(lambda: embedder_from_settings(settings))

        return self._once("embed", build)

    def retriever(self) -> Retriever:
        return self._once(
            "retriever",
            lambda: PgRetriever(
                self.pool,
                self.embed(),
                ef_search=int(self.config["HNSW_EF_SEARCH"]),
                public_documents=bool(self.config["PUBLIC_DOCUMENTS"]),
                text_weight=float(self.config["HYBRID_TEXT_WEIGHT"]),
                rrf_k=int(self.config["RRF_K"]),
            ),
        )

    def answerer(self) -> Answerer:
        def build() -> Answerer:
            backend = self.llm_backend
            embed_many = self.embed().many if backend == "extractive" else None
            answerer = make_answerer(backend, self.config, embed_many)
            logger.info("answer backend: %s", answerer.name)
            return answerer

        return self._once("answerer", build)

    def store(self) -> AnswerStore:
        def build() -> AnswerStore:
            if self.config["ANSWER_STORE_BACKEND"] == "memory":
                return InMemoryAnswerStore(int(self.config["ANSWER_STORE_SIZE"]))
            return PgAnswerStore(self.pool)

        return self._once("store", build)

    def rules(self) -> RuleSet:
        def build() -> RuleSet:
            rules = load_rules(self.rules_path)
            logger.info(
                "answer rules: %d from %s (%s)", len(rules.rules), rules.source, rules.digest
            )
            return rules

        return self._once("rules", build)

    def close(self) -> None:
        """Close what this factory opened (its own pool), not what it was handed."""
        with self._lock:
            pool = self._objects.pop("pool", None)
        if pool is not None:
            pool.close()
