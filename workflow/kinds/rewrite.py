"""rewrite: turns a conversational question into a standalone search query, put in the
message as ``query`` (the answer still answers the asker's own question).

With an LLM backend that follows instructions (openai) the model rewrites it; the extractive
backend has no such model, so the step drops conversational lead-ins and politeness by rule
("Could you tell me ...", "..., please?")."""

from __future__ import annotations

import re
from typing import Any

from freshet.answering.factory import Answering
from freshet.answering.messages import dumps
from freshet.consumer import Output
from freshet.workflow.definition import StepSpec
from freshet.workflow.kinds.common import request_of

INSTRUCTION = (
    "Rewrite the user's message as one standalone search query for a document index. "
    "Keep every name, number and technical term; drop greetings and politeness. "
    "Reply with the query only."
)
_LEAD_IN = re.compile(
    r"^\s*(?:(?:hi|hello|hey)[,!.]?\s+)?(?:(?:please|so|ok(?:ay)?|well)[,]?\s+)?"
    r"(?:(?:can|could|would|will)\s+you\s+(?:please\s+)?(?:tell|show|explain(?:\s+to)?)\s+me\s+"
    r"|(?:i(?:\s+want|\s+would\s+like|'d\s+like|\s+need)\s+to\s+know|do\s+you\s+know"
    r"|tell\s+me)\s+)",
    re.IGNORECASE,
)
_TAIL = re.compile(r"[\s,]*(?:please|thanks|thank\s+you)?[\s?!.]*$", re.IGNORECASE)


def standalone(question: str) -> str:
    """The rule-based rewrite: the question without lead-ins, politeness and end marks."""
    query = _TAIL.sub("", _LEAD_IN.sub("", question)).strip()
    return query or question.strip()


def build(step: StepSpec, answering: Answering) -> Any:
    assert step.output is not None
    output = step.output
    max_k = answering.settings.max_ask_k
    answerer = answering.answerer()  # before the worker joins its group (kinds/__init__.py)

    def handle(record: Any) -> list[Output]:
        request, body = request_of(record, max_k)
        rewritten = answerer.complete(INSTRUCTION, request.question)
        body["query"] = (rewritten or "").strip() or standalone(request.question)
        return [Output(output, record.key, dumps(body))]

    return handle
