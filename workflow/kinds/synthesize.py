"""synthesize: gathers the raw answers to the sub-questions of one request (fan-in) and writes
one raw answer for the request: the sub-answers in order, with their citations renumbered
into one list.

Each part is stored in rag.workflow_parts (first copy wins); the worker that sees the last
part arrive emits the whole answer. A redelivered part, or two workers finishing the same
request, emit the same answer again under the same request id, which the validator writes
once (an upsert by id; one audit row per request and rule set): synthesized exactly once in
effect, at least once in delivery. A raw answer with no ``parent`` (a question that was not
split) passes on unchanged."""

from __future__ import annotations

import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from psycopg.types.json import Jsonb

from freshet.answering.factory import Answering
from freshet.answering.messages import MessageError, dumps, loads
from freshet.consumer import Output
from freshet.workflow.definition import StepSpec

_MARKER = re.compile(r"\[(\d{1,3})\]")


def combine(parent: str, question: str, user: Any, parts: Sequence[Mapping[str, Any]]) -> dict:
    """One raw answer from the raw answers of the parts, in part order."""
    failed = [p for p in parts if "error" in p]
    out: dict[str, Any] = {"id": parent, "question": question, "user": user}
    if len(failed) == len(parts):
        out["error"] = "; ".join(f"part {p.get('part')}: {p['error']}" for p in failed)
        return out
    texts, citations, markers, sources = [], [], [], {}
    offset, declined, stamps, backend = 0, True, [], ""
    for part in parts:
        if "error" in part:
            texts.append(f"({part.get('question')}: no answer, the backend failed)")
            continue
        answer = part["answer"]
        shift = offset

        def renumber(match: re.Match[str], shift: int = shift) -> str:
            return f"[{int(match.group(1)) + shift}]"

        texts.append(_MARKER.sub(renumber, str(answer.get("answer") or "")))
        citations += [{**c, "n": int(c["n"]) + shift} for c in answer.get("citations") or []]
        markers += [int(n) + shift for n in answer.get("markers") or []]
        sources.update({str(int(n) + shift): t for n, t in (part.get("sources") or {}).items()})
        declined = declined and bool(answer.get("declined", False))
        if answer.get("as_of"):
            stamps.append(str(answer["as_of"]))
        backend = backend or str(answer.get("backend") or "")
        offset += int(part.get("passages") or 0)
    out.update(
        passages=offset,
        answer={
            "answer": "\n\n".join(texts),
            "citations": citations,
            "as_of": max(stamps) if stamps else None,
            "backend": backend,
            "declined": declined,
            "markers": markers,
        },
        sources=sources,
    )
    return out


class WorkflowParts(ABC):
    """Where a synthesize step keeps the parts of each request until all are there."""

    @abstractmethod
    def add(self, parent: str, part: int, parts: int, body: Mapping[str, Any]) -> list[Any]:
        """Keep this part (the first copy wins); every part of ``parent`` so far, in order."""


class PgWorkflowParts(WorkflowParts):
    """Table rag.workflow_parts: every worker of the step sees the same parts."""

    def __init__(self, pool: Callable[[], Any]) -> None:
        self._pool = pool

    def add(self, parent: str, part: int, parts: int, body: Mapping[str, Any]) -> list[Any]:
        with self._pool().connection() as conn:
            conn.execute(
                "INSERT INTO rag.workflow_parts (parent, part, parts, body)"
                " VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
                (parent, part, parts, Jsonb(dict(body))),
            )
            rows = conn.execute(
                "SELECT body FROM rag.workflow_parts WHERE parent = %s ORDER BY part",
                (parent,),
            ).fetchall()
        return [r[0] for r in rows]


class InMemoryWorkflowParts(WorkflowParts):
    """One process's parts (FRESHET_ANSWER_STORE=memory, tests, the in-process runner)."""

    def __init__(self) -> None:
        self._parts: dict[str, dict[int, Any]] = {}
        self._lock = threading.Lock()

    def add(self, parent: str, part: int, parts: int, body: Mapping[str, Any]) -> list[Any]:
        with self._lock:
            kept = self._parts.setdefault(parent, {})
            kept.setdefault(part, dict(body))
            return [kept[n] for n in sorted(kept)]


def build(step: StepSpec, answering: Answering) -> Any:
    assert step.output is not None
    output = step.output
    store: WorkflowParts = (
        InMemoryWorkflowParts()
        if answering.settings.answer_store_backend == "memory"
        else PgWorkflowParts(answering.pool)
    )

    def handle(record: Any) -> list[Output]:
        body = loads(record.value)
        parent = body.get("parent")
        if parent is None:
            return [Output(output, record.key, record.value)]
        try:
            part, parts = int(body["part"]), int(body["parts"])
            if not isinstance(parent, str) or not 1 <= part <= parts:
                raise ValueError("part must be 1..parts")
        except (KeyError, TypeError, ValueError) as exc:
            raise MessageError(f"a part needs parent, part and parts: {exc}") from None
        gathered = store.add(parent, part, parts, body)
        if len(gathered) < parts:
            return []
        question = str(body.get("parent_question") or body.get("question") or "")
        whole = combine(parent, question, body.get("user"), gathered)
        if body.get("deadline"):
            whole["deadline"] = body["deadline"]
        return [Output(output, parent.encode(), dumps(whole))]

    return handle
