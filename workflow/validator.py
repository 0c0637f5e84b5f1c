"""The validator step (group rag-validate): rag.answers.raw -> the answer rules ->
rag.answers (approved) or rag.answers.rejected, and the verdict into table rag.answers.

The rules are the business's (FRESHET_ANSWER_RULES), the same the synchronous path applies.
Writing the table is an upsert by request id, so a redelivered raw answer changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from freshet.answering.answers import AnswerStore, StoredAnswer, judge
from freshet.answering.messages import (
    APPROVED,
    REJECTED,
    MessageError,
    dumps,
    loads,
    request_id,
    user_of,
)
from freshet.answering.rules import RuleSet
from freshet.consumer import Output


class Validator:
    """``rules``: a rule set, or a callable giving the one in force now (LiveRules.current:
    a rule changed by its owners applies to the next answer, no restart)."""

    def __init__(self, rules: RuleSet | Callable[[], RuleSet], store: AnswerStore) -> None:
        self.rules: Callable[[], RuleSet] = (lambda: rules) if isinstance(rules, RuleSet) else rules
        self.store = store

    def __call__(self, record: Any) -> list[Output]:
        stored = self.judge(loads(record.value))
        self.store.put(stored)
        out = stored.to_dict()
        out["rules"] = stored.rules_version or self.rules().label
        if stored.status == "rejected":
            out["withheld"] = stored.answer
        topic = APPROVED if stored.status == "approved" else REJECTED
        return [Output(topic, stored.id.encode(), dumps(out))]

    def judge(self, body: dict[str, Any]) -> StoredAnswer:
        """The verdict on a raw answer by the rules in force now (kept by the caller): the
        validate step writes it to the answers table, the synchronous /ask with the asker's
        keys."""
        answer_id = request_id(body)
        question = str(body.get("question") or "")
        user = user_of(body)
        rules = self.rules()
        if "error" in body:
            return StoredAnswer(answer_id, question, user, "failed", error=str(body["error"]))
        answer = body.get("answer")
        passages = body.get("passages")
        if not isinstance(answer, dict) or not isinstance(passages, int):
            raise MessageError("a raw answer needs `answer` (object) and `passages` (int)")
        sources = body.get("sources")
        try:
            cited = None if sources is None else {int(n): str(t) for n, t in sources.items()}
            return judge(answer_id, question, user, answer, passages, rules, cited)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise MessageError(f"the raw answer cannot be judged: {exc!r}") from None
