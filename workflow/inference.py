"""The inference step (kind ``answer``; group rag-inference in the default workflow):
a request -> retrieve + answer -> a raw answer (rag.answers.raw in the default workflow).

It retrieves as the asker (their access groups travel with the request), with the rewritten
``query`` when a rewrite step ran before, unless a retrieve step already put ``passages`` in
the message; it answers with the configured LLM backend; judging is the validator's job. A
backend failure is a result, not a crash: the raw answer carries the error and the request
ends as ``failed``. The fields of a decomposed question (``parent``, ``part``, ...) are passed
on for the synthesize step.
"""

from __future__ import annotations

from typing import Any

from freshet.answering.answers import cited_sources, retrieve
from freshet.answering.factory import Answering
from freshet.answering.llm import Answerer, LLMError
from freshet.answering.messages import RAW_ANSWERS, MessageError, dumps
from freshet.answering.retrieval import Retriever
from freshet.consumer import Output
from freshet.workflow.kinds.common import carried, passage_from_dict, request_of


class Inference:
    def __init__(
        self,
        retriever: Retriever,
        answerer: Answerer,
        *,
        max_k: int,
        output: str = RAW_ANSWERS,
    ) -> None:
        """``max_k``: the largest k a request may ask for (FRESHET_MAX_ASK_K)."""
        self.retriever = retriever
        self.answerer = answerer
        self.max_k = max_k
        self.output = output

    @classmethod
    def from_answering(cls, answering: Answering, output: str = RAW_ANSWERS) -> Inference:
        return cls(
            answering.retriever(),
            answering.answerer(),
            max_k=answering.settings.max_ask_k,
            output=output,
        )

    def __call__(self, record: Any) -> list[Output]:
        request, body = request_of(record, self.max_k)
        out: dict[str, Any] = {
            "id": request.id,
            "question": request.question,
            "user": request.user.to_dict(),
            **carried(body),
        }
        given = body.get("passages")
        if given is not None and not isinstance(given, list):
            raise MessageError("passages must be a list")
        try:
            if given is None:
                query = str(body.get("query") or request.question)
                found = retrieve(self.retriever, query, request.user, request.k, request.filters)
            else:
                found = [passage_from_dict(p) for p in given]
            passages = list(self.answerer.fit(request.question, found))
            answer = self.answerer.answer(request.question, passages)
        except LLMError as exc:
            out["error"] = f"the answer backend failed: {exc}"
        else:
            # The cited passages' texts travel with the answer: the validator's `grounded`
            # rule checks the answer against them.
            out.update(
                passages=len(passages),
                answer=answer.to_dict(),
                sources={str(n): text for n, text in cited_sources(answer, passages).items()},
            )
        return [Output(self.output, request.id.encode(), dumps(out))]
