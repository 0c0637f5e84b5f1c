"""noop: passes every message on unchanged (a placeholder, and the proof that adding a step
changes no other step)."""

from __future__ import annotations

from typing import Any

from freshet.answering.factory import Answering
from freshet.consumer import Output
from freshet.workflow.definition import StepSpec


def build(step: StepSpec, answering: Answering) -> Any:
    assert step.output is not None
    output = step.output

    def handle(record: Any) -> list[Output]:
        return [Output(output, record.key, record.value)]

    return handle
