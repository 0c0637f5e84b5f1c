"""The synchronous ask path (retrieve -> prompt -> answer) and where answers are kept.

Limitation, by design for now: answers live in an in-process LRU store, so GET
/api/v1/answers/<id> only finds answers made by the same web process, and they vanish on
restart. ``AnswerStore`` is the seam where a table- or Kafka-backed store (the async path's
``rag.answers`` topic) replaces it once its migration exists.
"""

from __future__ import annotations

import logging
import threading
import uuid
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from flask import Flask, current_app

from web.auth import User
from web.llm import Answer, Answerer
from web.retrieval import NO_FILTERS, Filters, Passage, Retriever

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredAnswer:
    """An answer with its request id, who asked and when; what GET /answers/<id> returns."""

    id: str
    question: str
    answer: Answer
    owner: User
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def visible_to(self, user: User) -> bool:
        """Only the asker (same user name) or an admin: the text may quote private passages."""
        return user.admin or user.name == self.owner.name

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "question": self.question,
            "status": "done",
            "created_at": self.created_at.isoformat(),
            **self.answer.to_dict(),
        }


class AnswerStore(ABC):
    """Keeps answers by request id."""

    @abstractmethod
    def put(self, answer: StoredAnswer) -> None: ...

    @abstractmethod
    def get(self, answer_id: str) -> StoredAnswer | None: ...


class InMemoryAnswerStore(AnswerStore):
    """A thread-safe LRU of the newest ``capacity`` answers of this process."""

    def __init__(self, capacity: int = 1000) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._items: OrderedDict[str, StoredAnswer] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, answer: StoredAnswer) -> None:
        with self._lock:
            self._items[answer.id] = answer
            self._items.move_to_end(answer.id)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, answer_id: str) -> StoredAnswer | None:
        with self._lock:
            found = self._items.get(answer_id)
            if found is not None:
                self._items.move_to_end(answer_id)
            return found

    def __len__(self) -> int:
        return len(self._items)


def new_id() -> str:
    return uuid.uuid4().hex


def retrieve(
    retriever: Retriever, question: str, user: User, k: int, filters: Filters
) -> list[Passage]:
    # Hybrid and one passage per document: k distinct sources make better context.
    return retriever.search(question, user, k=k, mode="hybrid", filters=filters, dedupe=True)


def ask(
    retriever: Retriever,
    answerer: Answerer,
    store: AnswerStore,
    question: str,
    user: User,
    *,
    k: int,
    filters: Filters = NO_FILTERS,
) -> StoredAnswer:
    """Answer ``question`` for ``user`` from what they may see, and keep the answer."""
    passages = answerer.fit(question, retrieve(retriever, question, user, k, filters))
    answer = answerer.answer(question, passages)
    stored = StoredAnswer(new_id(), question, answer, user)
    store.put(stored)
    logger.info(
        "answered %s for %s with %d passages, %d citations",
        stored.id,
        user.name,
        len(passages),
        len(answer.citations),
    )
    return stored


@dataclass
class AnswerStream:
    """A streamed answer: iterate ``pieces()``, then ``result`` holds the stored answer."""

    id: str
    question: str
    user: User
    passages: Sequence[Passage]
    answerer: Answerer
    store: AnswerStore
    result: StoredAnswer | None = None

    def pieces(self) -> Iterator[str]:
        parts: list[str] = []
        for piece in self.answerer.stream(self.question, self.passages):
            parts.append(piece)
            yield piece
        answer = self.answerer.finish("".join(parts), self.passages)
        self.result = StoredAnswer(self.id, self.question, answer, self.user)
        self.store.put(self.result)


def ask_stream(
    retriever: Retriever,
    answerer: Answerer,
    store: AnswerStore,
    question: str,
    user: User,
    *,
    k: int,
    filters: Filters = NO_FILTERS,
) -> AnswerStream:
    """Retrieve now (so retrieval errors are a normal response), generate while streaming."""
    passages = answerer.fit(question, retrieve(retriever, question, user, k, filters))
    return AnswerStream(new_id(), question, user, passages, answerer, store)


def get_store(app: Flask | None = None) -> AnswerStore:
    app = app or current_app._get_current_object()  # type: ignore[attr-defined]
    return app.extensions["freshet.answer_store"]


def init_app(app: Flask) -> None:
    if "freshet.answer_store" not in app.extensions:
        app.extensions["freshet.answer_store"] = InMemoryAnswerStore(
            int(app.config["ANSWER_STORE_SIZE"])
        )
