"""One factory for the answering core: the objects a web process or a workflow step answers with.

Built from the one Settings (retrieval, answer backend, answer store and rules are its fields);
each object is made on first use, so a process pays only for what it uses (a validator never
loads a model).
The web app wraps one per app (``freshet.web.services``); ``freshet infer`` and ``freshet
validate`` build one directly, with no Flask app.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from psycopg_pool import ConnectionPool

from freshet.answering.answers import AnswerStore, InMemoryAnswerStore, PgAnswerStore
from freshet.answering.bm25 import BM25
from freshet.answering.live_rules import LiveRules
from freshet.answering.llm import Answerer, make_answerer
from freshet.answering.retrieval import EmbedThread, PgRetriever, Retriever
from freshet.answering.rules import RuleSet
from freshet.settings import Settings

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Answering:
    """Lazily built retriever, answerer, answer store and rules for one process."""

    def __init__(
        self,
        settings: Settings,
        *,
        pool: Callable[[], ConnectionPool] | None = None,
        embedder: Any = None,
    ) -> None:
        self.settings = settings
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

    @property
    def database_url(self) -> str:
        """DATABASE_URL, else the embedded PostgreSQL's URL."""
        from freshet.db import database_url

        return database_url(self.settings)

    def pool(self) -> ConnectionPool:
        if self._pool_factory is not None:
            return self._pool_factory()

        def build() -> ConnectionPool:
            from pgvector.psycopg import register_vector

            from freshet.db import redact

            pool = ConnectionPool(
                self.database_url,
                min_size=self.settings.pool_min_size,
                max_size=self.settings.pool_max_size,
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
            from freshet import index_model
            from freshet.embedder import embedder_from_settings

            def model_for(state: index_model.IndexModel) -> tuple[str, Callable[[], Any]]:
                name = state.active(self.settings)
                return name, lambda: embedder_from_settings(self.settings, model=name)

            # The index's model: EMBEDDING_MODEL unless `freshet reembed` switched it; the
            # thread follows a later switch (PgRetriever.search).
            state = index_model.current(self.settings)
            name, build = model_for(state or index_model.IndexModel())
            return EmbedThread(
                build,
                generation=state.generation if state is not None and state.present else None,
                model_name=name,
                model_for=model_for,
            )

        return self._once("embed", build)

    def retriever(self) -> Retriever:
        int8 = self.settings.query_int8
        return self._once(
            "retriever",
            lambda: PgRetriever(
                self.pool,
                self.embed(),
                embed_hybrid=self.embed().fast if int8 != "off" else None,
                embed_dense=self.embed().fast if int8 == "all" else None,
                ef_search=self.settings.hnsw_ef_search,
                public_documents=self.settings.public_documents,
                text_weight=self.settings.hybrid_text_weight,
                rrf_k=self.settings.rrf_k,
                bm25=BM25(
                    k1=self.settings.bm25_k1,
                    b=self.settings.bm25_b,
                    cap=self.settings.bm25_postings_cap,
                    hybrid_cap=self.settings.bm25_hybrid_postings_cap,
                ),
            ),
        )

    def answerer(self) -> Answerer:
        def build() -> Answerer:
            extractive = self.settings.llm_backend == "extractive"
            answerer = make_answerer(self.settings, self.embed().many if extractive else None)
            logger.info("answer backend: %s", answerer.name)
            return answerer

        return self._once("answerer", build)

    def store(self) -> AnswerStore:
        def build() -> AnswerStore:
            if self.settings.answer_store_backend == "memory":
                return InMemoryAnswerStore(self.settings.answer_store_size)
            return PgAnswerStore(self.pool)

        return self._once("store", build)

    def live_rules(self) -> LiveRules:
        """The answer rules of FRESHET_ANSWER_RULES, looked at again every
        FRESHET_ANSWER_RULES_RELOAD_S seconds (freshet/answering/live_rules.py)."""

        def build() -> LiveRules:
            live = LiveRules(
                self.settings.answer_rules,
                reload_s=self.settings.answer_rules_reload_s,
                connect=lambda: self.pool().connection(),
                # The model loads on the first answer a banned_topics rule judges, not before.
                embed=lambda texts: self.embed().many(texts),
            )
            rules = live.current()
            logger.info(
                "answer rules: %d from %s (%s)", len(rules.rules), rules.source, rules.label
            )
            return live

        return self._once("live_rules", build)

    def rules(self) -> RuleSet:
        """The answer rules in force now."""
        return self.live_rules().current()

    def close(self) -> None:
        """Close what this factory opened (its own pool, its query-embedding thread), not what
        it was handed."""
        with self._lock:
            pool = self._objects.pop("pool", None)
            embed = self._objects.pop("embed", None)
        if embed is not None:
            embed.close()
        if pool is not None:
            pool.close()
