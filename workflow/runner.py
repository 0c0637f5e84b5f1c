"""A declared workflow run in one process: every step's handler, in order, over one request,
with no Kafka in between (each output goes to the step whose input is its topic). The same
handlers the step workers run; used to check a workflow file end to end and by the tests."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from freshet.consumer import Output
from freshet.workflow.definition import Workflow
from freshet.workflow.kinds import Handler, build

# A request fans out to at most this many messages in one run (a runaway workflow stops).
MAX_MESSAGES = 10_000


@dataclass(frozen=True)
class Message:
    """A record as a step handler reads it."""

    topic: str
    key: bytes | None
    value: bytes | None
    partition: int = 0
    offset: int = 0


def handlers_of(workflow: Workflow, answering: Any) -> dict[str, Handler]:
    return {step.name: build(step, answering) for step in workflow.steps}


def run_in_process(
    workflow: Workflow, handlers: Mapping[str, Handler], key: bytes, value: bytes
) -> list[Output]:
    """Every output of the run that no step consumes (the validate step's), in order."""
    consumer = {step.input: step.name for step in workflow.steps}
    pending: deque[Output] = deque([Output(workflow.steps[0].input, key, value)])
    final: list[Output] = []
    seen = 0
    while pending:
        seen += 1
        if seen > MAX_MESSAGES:
            raise RuntimeError(f"workflow {workflow.name} produced over {MAX_MESSAGES} messages")
        out = pending.popleft()
        step = consumer.get(out.topic)
        if step is None:
            final.append(out)
            continue
        pending.extend(handlers[step](Message(out.topic, out.key, out.value)))
    return final
