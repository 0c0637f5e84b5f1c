"""The synchronous /ask through a declared workflow: the same step handlers the workers run,
in process (workflow/runner.py), with no Kafka in between.

Every step but the last runs as it would in a worker (rewrite, decompose, retrieve, answer,
synthesize, or a step kind of a deployment's own); the last, the `validate` step, judges the
raw answer with the rules in force now, and the web keeps the verdict with the asker's keys
(the worker's validate step writes it without them). No deadline and no progress rows: the
request is the HTTP call. Which workflow: FRESHET_ASK_WORKFLOW (default: the shipped default
workflow, answer -> validate). A streamed answer (`stream: true`) runs the default chain's
functions instead, so that its tokens go out as they are generated.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING

from freshet.answering.answers import StoredAnswer
from freshet.answering.messages import AnswerRequest, loads
from freshet.workflow.definition import Workflow, WorkflowError
from freshet.workflow.kinds import build
from freshet.workflow.runner import run_in_process
from freshet.workflow.validator import Validator

if TYPE_CHECKING:
    from freshet.answering.factory import Answering

logger = logging.getLogger(__name__)


class InProcessWorkflow:
    """``workflow`` answering one request at a time in this process."""

    def __init__(self, workflow: Workflow, answering: Answering) -> None:
        if len(workflow.steps) < 2:
            raise WorkflowError(
                f"{workflow.source}: the synchronous /ask needs a step that answers before"
                " the validate step"
            )
        self.workflow = workflow
        self.head = replace(workflow, steps=workflow.steps[:-1])
        self.handlers = {s.name: build(s, answering, tracked=False) for s in self.head.steps}
        self.validator = Validator(answering.rules, answering.store())

    def answer(self, request: AnswerRequest) -> StoredAnswer:
        """The judged answer to ``request`` (not yet kept): ``failed`` when the answer
        backend failed."""
        key = request.id.encode()
        raw = run_in_process(self.head, self.handlers, key, request.encode())
        if len(raw) != 1:
            raise RuntimeError(
                f"workflow {self.workflow.name!r} gave {len(raw)} raw answers to one request"
                " (expected 1: does every split question end in a synthesize step?)"
            )
        stored = self.validator.judge(loads(raw[0].value))
        logger.info(
            "answered %s for %s through workflow %s: %s",
            request.id,
            request.user.name,
            self.workflow.name,
            stored.status,
        )
        return stored
