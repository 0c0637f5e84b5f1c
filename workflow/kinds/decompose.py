"""decompose: a multi-part question (its rewritten ``query`` when a rewrite step ran before)
becomes one message per sub-question (fan-out), each with
its own id (``<id>~<n>``) and ``parent``, ``part`` (1-based), ``parts`` and
``parent_question``; a synthesize step later gathers their answers. A one-part question
passes on unchanged. Params: ``max_parts`` (default 4).

With an LLM backend that follows instructions the model splits the question; otherwise it is
split by rule: at each question mark, and at ", and" / "and" followed by a question word."""

from __future__ import annotations

import re
from typing import Any

from freshet.answering.factory import Answering
from freshet.answering.messages import dumps
from freshet.consumer import Output
from freshet.workflow.definition import StepSpec
from freshet.workflow.kinds.common import request_of

INSTRUCTION = (
    "Split the user's question into the separate questions it asks, one per line, each "
    "understandable on its own. A single question stays one line. Reply with the lines only."
)
_QUESTION_WORD = r"(?:what|when|where|who|whom|whose|why|how|which|does|do|did|is|are|can|should)"
_SPLIT = re.compile(rf"(?<=\?)\s+|,?\s*(?:;|\band\b)\s+(?={_QUESTION_WORD}\b)", re.IGNORECASE)


def split_question(question: str, max_parts: int = 4) -> list[str]:
    """The sub-questions of ``question`` by rule (at most ``max_parts``; the rest stays in
    the last one)."""
    parts = [p.strip(" ,;") for p in _SPLIT.split(question.strip()) if p and p.strip(" ,;")]
    parts = [p for p in parts if len(p.split()) >= 2] or [question.strip()]
    if len(parts) > max_parts:
        parts = [*parts[: max_parts - 1], " ".join(parts[max_parts - 1 :])]
    return [p if p.endswith("?") else p + "?" for p in parts] if len(parts) > 1 else parts


def build(step: StepSpec, answering: Answering) -> Any:
    assert step.output is not None
    output = step.output
    max_k = answering.settings.max_ask_k
    max_parts = int(step.params.get("max_parts", 4))
    answerer = answering.answerer()  # before the worker joins its group (kinds/__init__.py)

    def handle(record: Any) -> list[Output]:
        request, body = request_of(record, max_k)
        # A rewrite step before this one made the standalone form: split that.
        asked = str(body.get("query") or request.question)
        lines = answerer.complete(INSTRUCTION, asked)
        parts = (
            [line.strip() for line in lines.splitlines() if line.strip()][:max_parts]
            if lines
            else split_question(asked, max_parts)
        )
        if len(parts) <= 1:
            return [Output(output, record.key, record.value)]
        outputs = []
        for n, sub in enumerate(parts, start=1):
            message = {
                **body,
                "id": f"{request.id}~{n}",
                "question": sub,
                "parent": request.id,
                "part": n,
                "parts": len(parts),
                "parent_question": request.question,
            }
            message.pop("query", None)
            # Keyed by the sub-question's id: the parts spread over the next step's workers.
            outputs.append(Output(output, message["id"].encode(), dumps(message)))
        return outputs

    return handle
