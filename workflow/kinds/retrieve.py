"""retrieve: adds ``passages`` to the message: what the asker may see (access groups, design
rule 8), searched with the rewritten ``query`` when there is one; params: ``k`` overrides the
request's k."""

from __future__ import annotations

from typing import Any

from freshet.answering.answers import retrieve
from freshet.answering.factory import Answering
from freshet.answering.messages import dumps
from freshet.consumer import Output
from freshet.workflow.definition import StepSpec
from freshet.workflow.kinds.common import request_of


def build(step: StepSpec, answering: Answering) -> Any:
    assert step.output is not None
    output = step.output
    max_k = answering.settings.max_ask_k
    k_override = step.params.get("k")
    retriever = answering.retriever()  # before the worker joins its group (kinds/__init__.py)

    def handle(record: Any) -> list[Output]:
        request, body = request_of(record, max_k)
        query = str(body.get("query") or request.question)
        k = int(k_override) if k_override else request.k
        found = retrieve(retriever, query, request.user, k, request.filters)
        body["passages"] = [p.to_dict() for p in found]
        return [Output(output, record.key, dumps(body))]

    return handle
