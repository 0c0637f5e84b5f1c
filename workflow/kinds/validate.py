"""validate: the answer rules (freshet/answering/rules.py, reloaded live) judge a raw answer;
the verdict goes to rag.answers / rag.answers.rejected, the answers table and the audit."""

from __future__ import annotations

from typing import Any

from freshet.answering.factory import Answering
from freshet.workflow.definition import StepSpec
from freshet.workflow.validator import Validator


def build(step: StepSpec, answering: Answering) -> Any:
    return Validator(answering.rules, answering.store())
