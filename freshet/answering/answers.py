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

import hashlib
import json
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
from freshet.answering.rules import Judged, Outcome, RuleSet, Violation
from freshet.answering.users import ANONYMOUS, User

logger = logging.getLogger(__name__)

STATUSES = ("pending", "approved", "rejected", "failed")
WITHHELD = "This answer was withheld: it did not pass the answer rules."


@dataclass(frozen=True)
class Verdict:
    """What the audit keeps of one judgement: the answer judged (a digest), the rule set
    (digest, version, source) and each rule's outcome."""

    answer_digest: str
    rules: RuleSet
    outcomes: tuple[Outcome, ...]

    @classmethod
    def of(cls, body: Mapping[str, Any], rules: RuleSet, outcomes: Sequence[Outcome]) -> Verdict:
        judged = {k: body.get(k) for k in ("answer", "citations", "markers", "declined")}
        canonical = json.dumps(judged, sort_keys=True, separators=(",", ":"), default=str)
        digest = hashlib.sha256(canonical.encode()).hexdigest()[:16]
        return cls(digest, rules, tuple(outcomes))


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
    # The rule set's digest@version that judged it (answers judged before versions: None).
    rules_version: str | None = None
    # Set when the answer was judged just now: what the audit records (not read back).
    verdict: Verdict | None = field(default=None, compare=False)

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
            body["withheld"] = True
            body["violations"] = [v.to_dict() for v in self.violations]
        if self.rules_version is not None and self.status in ("approved", "rejected"):
            body["rules_version"] = self.rules_version
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
    sources: Mapping[int, str] | None = None,
) -> StoredAnswer:
    """The answer with the rules' verdict: approved, or rejected with its violations.
    ``sources``: the text of each cited passage by its [n] (None: not known)."""
    body = answer.to_dict() if isinstance(answer, Answer) else dict(answer)
    outcomes = rules.outcomes(Judged.of(body, passages, question, sources))
    violations = tuple(Violation(o.rule, o.message or "") for o in outcomes if not o.passed)
    if violations:
        logger.warning(
            "answer %s rejected by %s (%s): %s",
            answer_id,
            rules.source,
            rules.label,
            "; ".join(f"{v.rule}: {v.message}" for v in violations),
        )
    status = "rejected" if violations else "approved"
    return StoredAnswer(
        answer_id,
        question,
        owner,
        status,
        body,
        violations,
        rules_version=rules.label,
        verdict=Verdict.of(body, rules, outcomes),
    )


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
        """The answer by its id, and its verdict appended to rag.answer_audit (once per
        request and rule set: a redelivered answer adds no row), in one transaction."""
        with self._pool().connection() as conn, conn.transaction():
            conn.execute(
                "INSERT INTO rag.answers (id, question, asked_by, status, answer, violations,"
                " error, created_at, secret_hash, session_hash, rules_version)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status,"
                " answer = EXCLUDED.answer, violations = EXCLUDED.violations,"
                " error = EXCLUDED.error, updated_at = now(),"
                " rules_version = EXCLUDED.rules_version,"
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
                    answer.rules_version,
                ),
            )
            verdict = answer.verdict
            if verdict is not None:
                conn.execute(
                    "INSERT INTO rag.answer_audit (request_id, answer_digest, rules_digest,"
                    " rules_version, rules_source, status, outcomes)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s)"
                    " ON CONFLICT ON CONSTRAINT uq_answer_audit_verdict DO NOTHING",
                    (
                        answer.id,
                        verdict.answer_digest,
                        verdict.rules.digest,
                        verdict.rules.version,
                        verdict.rules.source,
                        answer.status,
                        Jsonb([o.to_dict() for o in verdict.outcomes]),
                    ),
                )

    def get(self, answer_id: str) -> StoredAnswer | None:
        with self._pool().connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            row = cur.execute(
                "SELECT id, question, asked_by, status, answer, violations, error, created_at,"
                " secret_hash, session_hash, rules_version FROM rag.answers WHERE id = %s",
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
            rules_version=row["rules_version"],
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
) -> tuple[Answer, list[Passage]]:
    """Retrieve what ``user`` may see and answer from it; the answer and the passages it was
    given. Raises LLMError when the backend fails."""
    passages = list(answerer.fit(question, retrieve(retriever, question, user, k, filters)))
    return answerer.answer(question, passages), passages


def cited_sources(answer: Answer, passages: Sequence[Passage]) -> dict[int, str]:
    """The text of each passage the answer cites, by its [n] (what `grounded` checks)."""
    return {c.n: passages[c.n - 1].text for c in answer.citations if 0 < c.n <= len(passages)}


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
        len(passages),
        len(answer.citations),
    )
    sources = cited_sources(answer, passages)
    return judge(answer_id, question, user, answer, len(passages), rules, sources)


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
        judged = judge(
            self.id,
            self.question,
            self.user,
            answer,
            len(self.passages),
            self.rules,
            cited_sources(answer, self.passages),
        )
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
    return replace(
        stored,
        status="failed",
        answer=None,
        violations=(),
        error=error,
        rules_version=None,
        verdict=None,
    )
