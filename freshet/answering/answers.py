"""Asking: retrieve -> prompt -> answer -> judge by the answer rules -> keep by request id.

The synchronous path runs the declared workflow's steps in the web process
(freshet/workflow/synchronous.py); a streamed answer runs `ask_stream` here. The async path
(``async: true``) keeps a pending answer, publishes the request to ``rag.requests`` and returns
at once; the workflow's step workers run the same steps and record the outcome in the same
store, where GET /api/v1/answers/<id> finds it from any web process.

Statuses: ``pending`` (queued), ``approved`` (passed every rule), ``rejected`` (broke a rule: the
text and citations are withheld, the violations say why), ``failed`` (the answer backend failed),
``timeout`` (an async request passed its deadline first: the error says where it was and what
was done). Only a pending answer can time out, and a timed-out one stays so: an answer that
arrives after the deadline changes nothing. The steps that finished an async request are kept
too (`AnswerStore.steps`): the ask page shows them as they complete.

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

STATUSES = ("pending", "approved", "rejected", "failed", "timeout")
# Statuses an answer never leaves once it has one.
FINAL = frozenset({"timeout"})
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
    # When a pending async request ends as ``timeout`` (None: no deadline).
    deadline: datetime | None = None
    # When a row it cited first changed after it was cited, and each such change (read back
    # from the store; the stale watcher, freshet/workflow/stale.py, finds them).
    stale_at: datetime | None = None
    stale: tuple[Mapping[str, Any], ...] = ()
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
        elif self.status == "timeout":
            body["error"] = self.error or "the request passed its deadline"
        if self.deadline is not None:
            body["deadline"] = self.deadline.isoformat()
        if self.stale_at is not None:
            body["stale"] = {"since": self.stale_at.isoformat(), "changes": list(self.stale)}
        return body


@dataclass(frozen=True)
class StepDone:
    """A workflow step that finished (part of) an async request: ``part`` is the sub-question
    (1-based, of ``parts``), 0 for the whole request."""

    step: str
    done_at: datetime
    part: int = 0
    parts: int = 0

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"step": self.step, "done_at": self.done_at.isoformat()}
        if self.part:
            body.update(part=self.part, parts=self.parts)
        return body


def progress(steps: Sequence[StepDone]) -> list[dict[str, Any]]:
    """The steps of a request in the order they first finished, a fanned-out step once with
    how many of its parts are done: [{step, done_at, parts_done?, parts?}]."""
    out: dict[str, dict[str, Any]] = {}
    for done in sorted(steps, key=lambda d: d.done_at):
        entry = out.get(done.step)
        if entry is None:
            entry = out[done.step] = {"step": done.step, "done_at": done.done_at.isoformat()}
        else:
            entry["done_at"] = done.done_at.isoformat()
        if done.part:
            entry["parts_done"] = entry.get("parts_done", 0) + 1
            entry["parts"] = max(entry.get("parts", 0), done.parts)
    return list(out.values())


def timeout_detail(step: str | None, steps: Sequence[StepDone], deadline: datetime | None) -> str:
    """What a timed-out request says: when its deadline was, where it was, what was done."""
    when = f" ({deadline.isoformat(timespec='seconds')})" if deadline else ""
    where = f" while waiting for step {step!r}" if step else ""
    done = [
        e["step"] + (f" ({e['parts_done']} of {e['parts']} parts)" if "parts" in e else "")
        for e in progress(steps)
    ]
    return f"the request passed its deadline{when}{where}; steps done: " + (
        ", ".join(done) if done else "none"
    )


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

    @abstractmethod
    def time_out(self, answer: StoredAnswer, step: str | None) -> bool:
        """End ``answer`` (its id, question, asker, deadline) as ``timeout`` unless it already
        has an outcome; True when this call ended it. ``step``: the step it was waiting for."""

    @abstractmethod
    def step_done(self, request_id: str, step: str, part: int = 0, parts: int = 0) -> None:
        """Record that ``step`` finished (part ``part`` of) the request (first time counts)."""

    @abstractmethod
    def steps(self, request_id: str) -> list[StepDone]:
        """The steps that finished the request, oldest first."""

    @abstractmethod
    def sweep(self, grace_s: float = 0.0) -> list[str]:
        """End as ``timeout`` every pending answer more than ``grace_s`` past its deadline
        (requests no step is handling); their ids."""


class InMemoryAnswerStore(AnswerStore):
    """A thread-safe LRU of the newest ``capacity`` answers of this process (tests, no DB)."""

    def __init__(self, capacity: int = 1000) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._items: OrderedDict[str, StoredAnswer] = OrderedDict()
        self._steps: dict[str, dict[tuple[str, int], StepDone]] = {}
        self._lock = threading.Lock()

    def put(self, answer: StoredAnswer) -> None:
        with self._lock:
            known = self._items.get(answer.id)
            if known is not None and known.status in FINAL:
                return  # a timed-out request stays so
            if known is not None and answer.keys == NO_KEYS:
                answer = replace(answer, keys=known.keys)  # as the SQL upsert keeps them
            if known is not None and answer.deadline is None:
                answer = replace(answer, deadline=known.deadline)
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

    def time_out(self, answer: StoredAnswer, step: str | None) -> bool:
        with self._lock:
            known = self._items.get(answer.id)
            if known is not None and known.status != "pending":
                return False
            base = known or answer
            done = self._steps.get(answer.id, {}).values()
            detail = timeout_detail(step, list(done), base.deadline or answer.deadline)
            self._items[answer.id] = replace(
                base, status="timeout", error=detail, deadline=base.deadline or answer.deadline
            )
            self._items.move_to_end(answer.id)
            return True

    def step_done(self, request_id: str, step: str, part: int = 0, parts: int = 0) -> None:
        with self._lock:
            kept = self._steps.setdefault(request_id, {})
            kept.setdefault((step, part), StepDone(step, datetime.now(UTC), part, parts))
            while len(self._steps) > self.capacity:
                self._steps.pop(next(iter(self._steps)))

    def steps(self, request_id: str) -> list[StepDone]:
        with self._lock:
            return sorted(self._steps.get(request_id, {}).values(), key=lambda d: d.done_at)

    def sweep(self, grace_s: float = 0.0) -> list[str]:
        now = datetime.now(UTC)
        with self._lock:
            late = [
                a
                for a in self._items.values()
                if a.status == "pending"
                and a.deadline is not None
                and (now - a.deadline).total_seconds() > grace_s
            ]
        return [a.id for a in late if self.time_out(a, None)]


class PgAnswerStore(AnswerStore):
    """Answers in table rag.answers: every web process and workflow step sees the same ones."""

    def __init__(self, pool: Callable[[], ConnectionPool]) -> None:
        self._pool = pool

    def put(self, answer: StoredAnswer) -> None:
        """The answer by its id, and its verdict appended to rag.answer_audit (once per
        request and rule set: a redelivered answer adds no row), in one transaction."""
        with self._pool().connection() as conn, conn.transaction():
            written = conn.execute(
                "INSERT INTO rag.answers (id, question, asked_by, status, answer, violations,"
                " error, created_at, secret_hash, session_hash, rules_version, deadline)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status,"
                " answer = EXCLUDED.answer, violations = EXCLUDED.violations,"
                " error = EXCLUDED.error, updated_at = now(),"
                " rules_version = EXCLUDED.rules_version,"
                # The validator's verdict carries no keys: the asker's stay.
                " secret_hash = coalesce(EXCLUDED.secret_hash, rag.answers.secret_hash),"
                " session_hash = coalesce(EXCLUDED.session_hash, rag.answers.session_hash),"
                " deadline = coalesce(EXCLUDED.deadline, rag.answers.deadline)"
                # A timed-out request stays so: a late answer changes nothing.
                " WHERE rag.answers.status <> 'timeout' RETURNING id",
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
                    answer.deadline,
                ),
            ).fetchone()
            if written is not None and answer.status == "approved":
                self._cite(conn, answer)
            verdict = answer.verdict
            if verdict is not None and written is not None:
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

    @staticmethod
    def _cite(conn: Any, answer: StoredAnswer) -> None:
        """The rows the approved answer cites, for the stale watcher; stale at once if one of
        them changed after the cited version already (a change seen before the answer was
        kept)."""
        cited: dict[tuple[str, str], int] = {}
        for c in (answer.answer or {}).get("citations") or ():
            try:
                row = (str(c["source_table"]), str(c["doc_key"]))
                lsn = int(c["source_lsn"])
            except (KeyError, TypeError, ValueError):
                continue
            cited[row] = min(lsn, cited.get(row, lsn))
        if not cited:
            return
        conn.execute(
            "INSERT INTO rag.answer_citations (answer_id, source_table, doc_key, source_lsn)"
            " SELECT %s, * FROM unnest(%s::text[], %s::text[], %s::bigint[])"
            " ON CONFLICT DO NOTHING",
            (answer.id, [t for t, _ in cited], [k for _, k in cited], list(cited.values())),
        )
        late = conn.execute(
            "INSERT INTO rag.answer_stale (answer_id, source_table, doc_key, cited_lsn,"
            " changed_lsn, op, committed_at)"
            " SELECT c.answer_id, c.source_table, c.doc_key, c.source_lsn, s.lsn, s.op,"
            " s.committed_at FROM rag.answer_citations c JOIN rag.source_changes s"
            " ON s.source_table = c.source_table AND (s.doc_key = '' OR s.doc_key = c.doc_key)"
            " WHERE c.answer_id = %s AND s.lsn > c.source_lsn ON CONFLICT DO NOTHING"
            " RETURNING answer_id",
            (answer.id,),
        ).fetchall()
        if late:
            conn.execute(
                "UPDATE rag.answers SET stale_at = coalesce(stale_at, now()) WHERE id = %s",
                (answer.id,),
            )

    def get(self, answer_id: str) -> StoredAnswer | None:
        with self._pool().connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            row = cur.execute(
                "SELECT id, question, asked_by, status, answer, violations, error, created_at,"
                " secret_hash, session_hash, rules_version, deadline, stale_at"
                " FROM rag.answers WHERE id = %s",
                (answer_id,),
            ).fetchone()
            stale: list[dict[str, Any]] = []
            if row is not None and row["stale_at"] is not None:
                stale = cur.execute(
                    "SELECT source_table, doc_key, cited_lsn, changed_lsn, op, committed_at,"
                    " detected_at FROM rag.answer_stale WHERE answer_id = %s"
                    " ORDER BY detected_at, changed_lsn",
                    (answer_id,),
                ).fetchall()
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
            deadline=row["deadline"],
            stale_at=row["stale_at"],
            stale=tuple(
                {k: v.isoformat() if isinstance(v, datetime) else v for k, v in c.items()}
                for c in stale
            ),
        )

    def time_out(self, answer: StoredAnswer, step: str | None) -> bool:
        with self._pool().connection() as conn, conn.transaction():
            known = conn.execute(
                "SELECT status, deadline FROM rag.answers WHERE id = %s FOR UPDATE", (answer.id,)
            ).fetchone()
            if known is not None and known[0] != "pending":
                return False
            deadline = (known[1] if known is not None else None) or answer.deadline
            detail = timeout_detail(step, self._steps(conn, answer.id), deadline)
            if known is None:  # published by something other than the web tier
                conn.execute(
                    "INSERT INTO rag.answers (id, question, asked_by, status, error, deadline)"
                    " VALUES (%s, %s, %s, 'timeout', %s, %s) ON CONFLICT (id) DO NOTHING",
                    (answer.id, answer.question, answer.owner.name, detail, deadline),
                )
            else:
                conn.execute(
                    "UPDATE rag.answers SET status = 'timeout', error = %s, updated_at = now()"
                    " WHERE id = %s AND status = 'pending'",
                    (detail, answer.id),
                )
        logger.warning("answer %s timed out: %s", answer.id, detail)
        return True

    def step_done(self, request_id: str, step: str, part: int = 0, parts: int = 0) -> None:
        with self._pool().connection() as conn:
            conn.execute(
                "INSERT INTO rag.answer_steps (request_id, step, part, parts)"
                " VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
                (request_id, step, part, parts),
            )

    def steps(self, request_id: str) -> list[StepDone]:
        with self._pool().connection() as conn:
            return self._steps(conn, request_id)

    @staticmethod
    def _steps(conn: Any, request_id: str) -> list[StepDone]:
        rows = conn.execute(
            "SELECT step, done_at, part, parts FROM rag.answer_steps WHERE request_id = %s"
            " ORDER BY done_at, step, part",
            (request_id,),
        ).fetchall()
        return [StepDone(r[0], r[1], r[2], r[3]) for r in rows]

    def sweep(self, grace_s: float = 0.0) -> list[str]:
        with self._pool().connection() as conn:
            rows = conn.execute(
                "SELECT id, question, asked_by, deadline FROM rag.answers"
                " WHERE status = 'pending' AND deadline IS NOT NULL"
                " AND deadline < now() - make_interval(secs => %s) ORDER BY deadline LIMIT 500",
                (grace_s,),
            ).fetchall()
        late = [StoredAnswer(r[0], r[1], User(r[2]), deadline=r[3]) for r in rows]
        return [a.id for a in late if self.time_out(a, None)]


def new_id() -> str:
    return uuid.uuid4().hex


def retrieve(
    retriever: Retriever, question: str, user: User, k: int, filters: Filters
) -> list[Passage]:
    # Hybrid and one passage per document: k distinct sources make better context.
    return retriever.search(question, user, k=k, mode="hybrid", filters=filters, dedupe=True)


def cited_sources(answer: Answer, passages: Sequence[Passage]) -> dict[int, str]:
    """The text of each passage the answer cites, by its [n] (what `grounded` checks)."""
    return {c.n: passages[c.n - 1].text for c in answer.citations if 0 < c.n <= len(passages)}


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
