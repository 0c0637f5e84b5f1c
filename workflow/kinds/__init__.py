"""Step kinds of a declared workflow (workflow/definition.py): one module per kind, each with
``build(step, answering) -> handler``; a handler takes one Kafka record and returns what to
produce (``Output``s), and is idempotent (records are redelivered after a crash).

Messages between steps are the request (rag.requests' JSON) with what earlier steps added:
``query`` (rewrite: the standalone search query), ``passages`` (retrieve: what the asker may
see, as JSON), and for a decomposed question ``parent``, ``part``, ``parts`` and
``parent_question``. The ``answer`` kind turns such a message into a raw answer
(rag.answers.raw's shape, with the same extra fields); ``synthesize`` gathers the raw answers
of one parent; ``validate`` judges a raw answer and writes the result.

A kind's ``build`` takes from the answering core what its handler uses (retriever, answerer,
and with them the embedding model) then, not on the first record: a step worker builds its
handler before it joins its group, so loading a model (seconds) is not paid by the first
requests it is given, against their deadline.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from freshet.answering.factory import Answering
    from freshet.workflow.definition import StepSpec

Handler = Callable[[Any], list[Any]]

KINDS = ("rewrite", "decompose", "retrieve", "answer", "synthesize", "validate", "noop")
# Kinds whose outputs are fixed (validate: rag.answers, rag.answers.rejected, the table).
OUTPUT_FIXED = frozenset({"validate"})
# Records a worker polls at once, per kind (param `batch` overrides): a batch's outputs are
# produced when all its records are handled, so a kind that takes a model call per record
# polls few, and its first answers do not wait for the rest of a burst.
BATCH = {"answer": 2, "rewrite": 4, "decompose": 4, "retrieve": 8}
DEFAULT_BATCH = 50


def batch_of(step: StepSpec) -> int:
    value = step.params.get("batch", BATCH.get(step.kind, DEFAULT_BATCH))
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"step {step.name}: batch must be a positive integer")
    return value


def build(step: StepSpec, answering: Answering, *, tracked: bool = True) -> Handler:
    """The handler of ``step``: module freshet.workflow.kinds.<kind>'s ``build``; ``tracked``:
    with the request's deadline and progress kept around it (freshet/workflow/tracking.py),
    as the step workers run it (the synchronous /ask has neither)."""
    from freshet.workflow.tracking import Tracked

    module = importlib.import_module(f"freshet.workflow.kinds.{step.kind}")
    handler: Handler = module.build(step, answering)
    return Tracked(step.name, handler, answering.store()) if tracked else handler
