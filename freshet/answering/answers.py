"""Asking: retrieve -> prompt -> answer -> judge by the answer rules -> keep by request id.

The synchronous path runs every step in the web process. The async path (``async: true``)
keeps a pending answer, publishes the request to ``rag.requests`` and returns at once; the
inference and validator groups of ``workflow/`` run the same steps and record the outcome in
the same store, where GET /api/v1/answers/<id> finds it from any web process.

Statuses: ``pending`` (queued), ``approved`` (passed every rule), ``rejected`` (broke a rule: the
text and citations are withheld, the violations say why), ``failed`` (the answer backend failed).

An answer is read back by its asker's token, or, for an anonymous asker, with the answer's own
capability (its secret or the asker's session, see freshet/answering/capability.py).
"""

from __future__ import annotations

import logging
import threading
import uuid
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from freshet.answering.capability import NO_KEYS, Keys
from freshet.answering.llm import Answer, Answerer
from freshet.answering.retrieval import NO_FILTERS, Filters, Passage, Retriever
from freshet.answering.rules import Judged, RuleSet, Violation
from freshet.answering.users import ANONYMOUS, User

logger = logging.getLogger(__name__)

STATUSES = ("pending", "approved", "rejected", "failed")
WITHHELD = "This answer was withheld: it did not pass the answer rules."


@dataclass(frozen=True)
class StoredAnswer:
    """An answer (its JSON form) with its request id, who asked, and its verdict."""

    id: str
    question: str
    owner: User
    status: str = "pending"
    answer: Mapping[str, Any] | None = None
    violations: tuple[Violation, ...] = ()
    error: str | None = None
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    keys: Keys = NO_KEYS

    def visible_to(self, user: User, secret: str | None = None, session: str | None = None) -> bool:
        """An admin; the asker by their token (the text may quote passages of their groups);
        for an anonymous asker only the answer's secret or the asker's session: anonymous
        callers share a name, not an identity."""
        if user.admin:
            return True
        if self.owner.name != ANONYMOUS.name:
            return user.name == self.owner.name
        return self.keys.opens(secret, session)

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id,
            "question": self.question,
            "status": self.status,
            "created_at": self.created_at.isoformat(),
        }
        if self.status == "approved" and self.answer is not None:
            body.update(self.answer)
        elif self.status == "rejected":
            backend = (self.answer or {}).get("backend", "")
            body.update(answer=WITHHELD, citations=[], as_of=None, backend=backend)
            body["violations"] = [v.to_dict() for v in self.violations]
        elif self.status == "failed":
            body["error"] = self.error or "answering failed"
        return body


def judge(
    answer_id: str,
    question: str,
    owner: User,
    answer: Answer | Mapping[str, Any],
    passages: int,
    rules: RuleSet,
) -> StoredAnswer:
    """The answer with the rules' verdict: approved, or rejected with its violations."""
    body = answer.to_dict() if isinstance(answer, Answer) else dict(answer)
    violations = tuple(rules.check(Judged.of(body, passages)))
    if violations:
        logger.warning(
            "answer %s rejected by %s: %s",
            answer_id,
            rules.source,
            "; ".join(f"{v.rule}: {v.message}" for v in violations),
        )
    status = "rejected" if violations else "approved"
    return StoredAnswer(answer_id, question, owner, status, body, violations)


class AnswerStore(ABC):
    """Keeps answers by request id."""

    @abstractmethod
    def put(self, answer: StoredAnswer) -> None:
        """Insert or replace the answer with this id."""

    @abstractmethod
    def get(self, answer_id: str) -> StoredAnswer | None: ...


class InMemoryAnswerStore(AnswerStore):
    """A thread-safe LRU of the newest ``capacity`` answers of this process (tests, no DB)."""

    def __init__(self, capacity: int = 1000) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._items: OrderedDict[str, StoredAnswer] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, answer: StoredAnswer) -> None:
        with self._lock:
            known = self._items.get(answer.id)
            if known is not None and answer.keys == NO_KEYS:
                answer = replace(answer, keys=known.keys)  # as the SQL upsert keeps them
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


class PgAnswerStore(AnswerStore):
    """Answers in table rag.answers: every web process and workflow step sees the same ones."""

    def __init__(self, pool: Callable[[], ConnectionPool]) -> None:
        self._pool = pool

    def put(self, answer: StoredAnswer) -> None:
        with self._pool().connection() as conn:
            conn.execute(
                "INSERT INTO rag.answers (id, question, asked_by, status, answer, violations,"
                " error, created_at, secret_hash, session_hash)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status,"
                " answer = EXCLUDED.answer, violations = EXCLUDED.violations,"
                " error = EXCLUDED.error, updated_at = now(),"
                # The validator's verdict carries no keys: the asker's stay.
                " secret_hash = coalesce(EXCLUDED.secret_hash, rag.answers.secret_hash),"
                " session_hash = coalesce(EXCLUDED.session_hash, rag.answers.session_hash)",
                (
                    answer.id,
                    answer.question,
                    answer.owner.name,
                    answer.status,
                    Jsonb(dict(answer.answer)) if answer.answer is not None else None,
                    Jsonb([v.to_dict() for v in answer.violations]),
                    answer.error,
                    answer.created_at,
                    answer.keys.secret_hash,
                    answer.keys.session_hash,
                ),
            )

    def get(self, answer_id: str) -> StoredAnswer | None:
        with self._pool().connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            row = cur.execute(
                "SELECT id, question, asked_by, status, answer, violations, error, created_at,"
                " secret_hash, session_hash FROM rag.answers WHERE id = %s",
                (answer_id,),
            ).fetchone()
        if row is None:
            return None
        return StoredAnswer(
            id=row["id"],
            question=row["question"],
            owner=User(row["asked_by"]),
            status=row["status"],
            answer=row["answer"],
            violations=tuple(Violation(v["rule"], v["message"]) for v in row["violations"]),
            error=row["error"],
            created_at=row["created_at"],
            keys=Keys(row["secret_hash"], row["session_hash"]),
        )


def new_id() -> str:
    return uuid.uuid4().hex


def retrieve(
    retriever: Retriever, question: str, user: User, k: int, filters: Filters
) -> list[Passage]:
    # Hybrid and one passage per document: k distinct sources make better context.
    return retriever.search(question, user, k=k, mode="hybrid", filters=filters, dedupe=True)


def compose(
    retriever: Retriever,
    answerer: Answerer,
    question: str,
    user: User,
    k: int,
    filters: Filters = NO_FILTERS,
) -> tuple[Answer, int]:
    """Retrieve what ``user`` may see and answer from it; the answer and how many passages it
    was given. Raises LLMError when the backend fails."""
    passages = answerer.fit(question, retrieve(retriever, question, user, k, filters))
    return answerer.answer(question, passages), len(passages)


def answer_question(
    retriever: Retriever,
    answerer: Answerer,
    rules: RuleSet,
    answer_id: str,
    question: str,
    user: User,
    *,
    k: int,
    filters: Filters = NO_FILTERS,
) -> StoredAnswer:
    """Retrieve what ``user`` may see, answer, and judge: the steps both paths run."""
    answer, passages = compose(retriever, answerer, question, user, k, filters)
    logger.info(
        "answered %s for %s with %d passages, %d citations",
        answer_id,
        user.name,
        passages,
        len(answer.citations),
    )
    return judge(answer_id, question, user, answer, passages, rules)


def ask(
    retriever: Retriever,
    answerer: Answerer,
    store: AnswerStore,
    rules: RuleSet,
    question: str,
    user: User,
    *,
    k: int,
    filters: Filters = NO_FILTERS,
    keys: Keys = NO_KEYS,
) -> StoredAnswer:
    """Answer ``question`` for ``user`` now, and keep the judged answer with ``keys``."""
    stored = answer_question(
        retriever, answerer, rules, new_id(), question, user, k=k, filters=filters
    )
    stored = replace(stored, keys=keys)
    store.put(stored)
    return stored


@dataclass
class AnswerStream:
    """A streamed answer: iterate ``pieces()``, then ``result`` holds the judged answer.

    When rules that can withhold an answer are configured the stream is ``buffered``: the API
    sends no piece of the text before the verdict, only the judged answer at the end. Without
    such rules the pieces reach the client as they are generated.
    """

    id: str
    question: str
    user: User
    passages: Sequence[Passage]
    answerer: Answerer
    store: AnswerStore
    rules: RuleSet
    result: StoredAnswer | None = None
    keys: Keys = NO_KEYS

    @property
    def buffered(self) -> bool:
        return self.rules.can_withhold

    def pieces(self) -> Iterator[str]:
        parts: list[str] = []
        for piece in self.answerer.stream(self.question, self.passages):
            parts.append(piece)
            yield piece
        answer = self.answerer.finish("".join(parts), self.passages)
        judged = judge(self.id, self.question, self.user, answer, len(self.passages), self.rules)
        self.result = replace(judged, keys=self.keys)
        self.store.put(self.result)


def ask_stream(
    retriever: Retriever,
    answerer: Answerer,
    store: AnswerStore,
    rules: RuleSet,
    question: str,
    user: User,
    *,
    k: int,
    filters: Filters = NO_FILTERS,
    keys: Keys = NO_KEYS,
) -> AnswerStream:
    """Retrieve now (so retrieval errors are a normal response), generate while streaming."""
    passages = answerer.fit(question, retrieve(retriever, question, user, k, filters))
    return AnswerStream(new_id(), question, user, passages, answerer, store, rules, keys=keys)


def failed(stored: StoredAnswer, error: str) -> StoredAnswer:
    return replace(stored, status="failed", answer=None, violations=(), error=error)
