"""The inference step (group rag-inference): rag.requests -> retrieve + answer -> rag.answers.raw.

It retrieves as the asker (their access groups travel with the request) and answers with the
configured LLM backend; judging is the validator's job. A backend failure is a result, not a
crash: the raw answer carries the error and the request ends as ``failed``.
"""

from __future__ import annotations

from typing import Any

from freshet.answering.answers import cited_sources, compose
from freshet.answering.factory import Answering
from freshet.answering.llm import Answerer, LLMError
from freshet.answering.messages import RAW_ANSWERS, AnswerRequest, dumps
from freshet.answering.retrieval import Retriever
from freshet.consumer import Output


class Inference:
    def __init__(self, retriever: Retriever, answerer: Answerer, *, max_k: int) -> None:
        """``max_k``: the largest k a request may ask for (FRESHET_MAX_ASK_K)."""
        self.retriever = retriever
        self.answerer = answerer
        self.max_k = max_k

    @classmethod
    def from_answering(cls, answering: Answering) -> Inference:
        return cls(answering.retriever(), answering.answerer(), max_k=answering.settings.max_ask_k)

    def __call__(self, record: Any) -> list[Output]:
        request = AnswerRequest.decode(record.value, max_k=self.max_k)
        body: dict[str, Any] = {
            "id": request.id,
            "question": request.question,
            "user": request.user.to_dict(),
        }
        try:
            answer, passages = compose(
                self.retriever,
                self.answerer,
                request.question,
                request.user,
                request.k,
                request.filters,
            )
        except LLMError as exc:
            body["error"] = f"the answer backend failed: {exc}"
        else:
            # The cited passages' texts travel with the answer: the validator's `grounded`
            # rule checks the answer against them.
            body.update(
                passages=len(passages),
                answer=answer.to_dict(),
                sources={str(n): text for n, text in cited_sources(answer, passages).items()},
            )
        return [Output(RAW_ANSWERS, request.id.encode(), dumps(body))]
