"""The async answer path's topics and message shapes (JSON, keyed by request id).

    rag.requests       {id, question, k, filters: {tables, metadata}, user: {user, groups, admin},
                        asked_at, deadline?}  (deadline: ISO 8601; every step passes it on, and
                        a step that gets a message past it ends the request as ``timeout``)
    rag.answers.raw    {id, question, user, passages, answer: {answer, citations, as_of, backend}}
                       or, when the answer backend failed, {id, question, user, error}
    rag.answers        the approved answer as GET /api/v1/answers/<id> returns it
    rag.answers.rejected  the rejected one, with its violations and the withheld text
    rag.answers.stale  an answer whose cited row changed or went since (freshet/workflow/
                       stale.py): {format, answer_id, source_table, doc_key, cited_lsn,
                       changed_lsn, op, committed_at, detected_at}, keyed by answer id
    rag.workflow.dlq   a message a step gave up on, in the consumer runtime's dead-letter
                       envelope (freshet/consumer.py): where it came from, why, what it held

The request carries the asker's identity so that the inference step retrieves only what they
may see (design rule 8); the topics are internal to the deployment, like rag.* tables.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from freshet.answering.retrieval import Filters
from freshet.answering.users import User

REQUESTS = "rag.requests"
RAW_ANSWERS = "rag.answers.raw"
APPROVED = "rag.answers"
REJECTED = "rag.answers.rejected"
DEAD_LETTERS = "rag.workflow.dlq"
# An answer whose cited row changed since (workflow/stale.py), keyed by answer id.
STALE = "rag.answers.stale"


class MessageError(ValueError):
    """A message that is not what its topic carries; the text says what is wrong."""


@dataclass(frozen=True)
class AnswerRequest:
    id: str
    question: str
    k: int
    user: User
    filters: Filters = field(default_factory=Filters)
    asked_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    deadline: datetime | None = None

    def encode(self) -> bytes:
        extra = {"deadline": self.deadline.isoformat()} if self.deadline else {}
        return dumps(
            {
                "id": self.id,
                "question": self.question,
                "k": self.k,
                "filters": {
                    "tables": list(self.filters.tables),
                    "metadata": dict(self.filters.metadata or {}),
                },
                "user": self.user.to_dict(),
                "asked_at": self.asked_at.isoformat(),
                **extra,
            }
        )

    @classmethod
    def decode(cls, raw: bytes | None, *, max_k: int) -> AnswerRequest:
        """The request in ``raw``; its k must be 1..``max_k``, the largest k a question may
        ask for (FRESHET_MAX_ASK_K, which POST /ask enforces too)."""
        body = loads(raw)
        filters = body.get("filters") or {}
        if not isinstance(filters, dict):
            raise MessageError("filters must be an object")
        try:
            tables = filters.get("tables") or []
            metadata = filters.get("metadata") or None
            if not isinstance(tables, list) or not all(isinstance(t, str) for t in tables):
                raise MessageError("filters.tables must be a list of strings")
            if metadata is not None and not isinstance(metadata, dict):
                raise MessageError("filters.metadata must be an object")
            k = body["k"]
            if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= max_k:
                raise MessageError(f"k must be an integer from 1 to {max_k}")
            question = body["question"]
            if not isinstance(question, str) or not question.strip():
                raise MessageError("question must be a non-empty string")
            return cls(
                id=request_id(body),
                question=question,
                k=k,
                user=user_of(body),
                filters=Filters(tuple(tables), metadata),
                asked_at=datetime.fromisoformat(body["asked_at"]),
                deadline=deadline_of(body),
            )
        except MessageError:
            raise
        except KeyError as exc:
            raise MessageError(f"missing field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise MessageError(str(exc)) from None


def dumps(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":"), default=str).encode()


def loads(raw: bytes | None) -> dict[str, Any]:
    if raw is None:
        raise MessageError("the message has no value")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise MessageError(f"not JSON: {exc}") from None
    except RecursionError:
        raise MessageError("JSON nested too deeply to read") from None
    if not isinstance(body, dict):
        raise MessageError("not a JSON object")
    return body


def request_id(body: Mapping[str, Any]) -> str:
    value = body.get("id")
    if not isinstance(value, str) or not value or len(value) > 64:
        raise MessageError("id must be a string of 1 to 64 characters")
    return value


def deadline_of(body: Mapping[str, Any]) -> datetime | None:
    """The message's deadline (timezone-aware), or None when it has none."""
    value = body.get("deadline")
    if value is None:
        return None
    try:
        stamp = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        stamp = None
    if stamp is None:
        raise MessageError("deadline must be an ISO 8601 timestamp")
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)


def user_of(body: Mapping[str, Any]) -> User:
    user = body.get("user")
    if not isinstance(user, dict) or not isinstance(user.get("user"), str):
        raise MessageError("user must be an object with a `user` name")
    groups = user.get("groups") or []
    if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
        raise MessageError("user.groups must be a list of strings")
    return User(user["user"], tuple(groups), bool(user.get("admin", False)))
