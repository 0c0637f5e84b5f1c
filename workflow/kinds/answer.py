"""answer: a request -> a raw answer from the configured LLM backend (freshet/workflow/
inference.py; the default workflow's `answer` step is exactly `freshet infer`)."""

from __future__ import annotations

from typing import Any

from freshet.answering.factory import Answering
from freshet.workflow.definition import StepSpec
from freshet.workflow.inference import Inference


def build(step: StepSpec, answering: Answering) -> Any:
    assert step.output is not None
    return Inference.from_answering(answering, output=step.output)
