"""Declared workflows: a TOML file names the ordered steps of an async answer workflow.

    name = "default"
    [[step]]
    name = "answer"            # unique in the workflow; `freshet step answer` runs it
    kind = "answer"            # a module of freshet.workflow.kinds
    input = "rag.requests"     # the topic it consumes
    output = "rag.answers.raw" # the topic it produces to (validate: fixed, see below)
    group = "rag-inference"    # its consumer group: each step scales on its own
    [step.params]              # the kind's parameters, if any

The first step reads the workflow's requests (``rag.requests`` is where POST /ask {async: true}
publishes; another topic suits a workflow fed by something else), every other step reads a
topic an earlier step writes, and the last step is a ``validate`` step, which
writes ``rag.answers`` / ``rag.answers.rejected`` and the answers table. Adding a step (a
re-ranker, a second LLM pass) is a kind module and a [[step]] table; no other step changes.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from freshet.answering.messages import REQUESTS
from freshet.errors import FreshetError
from freshet.resources import package_dir


class WorkflowError(FreshetError, ValueError):
    """A workflow file that cannot be read or run; the message names the file and the step."""


@dataclass(frozen=True)
class StepSpec:
    name: str
    kind: str
    input: str
    output: str | None
    group: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Workflow:
    name: str
    steps: tuple[StepSpec, ...]
    source: str

    def step(self, name: str) -> StepSpec:
        for step in self.steps:
            if step.name == name:
                return step
        raise WorkflowError(
            f"{self.source}: no step named {name!r}; steps: "
            + ", ".join(s.name for s in self.steps)
        )


def default_workflow() -> Path:
    return package_dir("freshet.workflows") / "default.toml"


def parse_workflow(text: str, source: str) -> Workflow:
    from freshet.workflow.kinds import KINDS, OUTPUT_FIXED

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise WorkflowError(f"{source}: not valid TOML: {exc}") from None
    entries = data.get("step")
    if not isinstance(entries, list) or not entries:
        raise WorkflowError(f"{source}: a workflow needs at least one [[step]]")
    steps: list[StepSpec] = []
    first = entries[0].get("input") if isinstance(entries[0], dict) else None
    produced = {first if isinstance(first, str) and first else REQUESTS}
    for i, entry in enumerate(entries, start=1):
        where = f"{source}: step {i}"
        if not isinstance(entry, dict):
            raise WorkflowError(f"{where}: must be a table")
        unknown = set(entry) - {"name", "kind", "input", "output", "group", "params"}
        if unknown:
            raise WorkflowError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        name = entry.get("name")
        kind = entry.get("kind")
        if not isinstance(name, str) or not name:
            raise WorkflowError(f"{where}: needs a `name`")
        where = f"{source}: step {i} ({name})"
        if kind not in KINDS:
            raise WorkflowError(f"{where}: kind must be one of {', '.join(sorted(KINDS))}")
        if any(s.name == name for s in steps):
            raise WorkflowError(f"{where}: the name is used twice")
        source_topic = entry.get("input")
        if not isinstance(source_topic, str) or source_topic not in produced:
            raise WorkflowError(
                f"{where}: `input` must be the first step's input or an earlier step's output"
                f" ({', '.join(sorted(produced))})"
            )
        output = entry.get("output")
        if kind in OUTPUT_FIXED:
            output = None
        elif not isinstance(output, str) or not output or output == source_topic:
            raise WorkflowError(f"{where}: needs an `output` topic other than its input")
        group = entry.get("group")
        if not isinstance(group, str) or not group:
            raise WorkflowError(f"{where}: needs a consumer `group`")
        if any(s.group == group for s in steps):
            raise WorkflowError(f"{where}: group {group!r} is another step's")
        params = entry.get("params", {})
        if not isinstance(params, dict):
            raise WorkflowError(f"{where}: `params` must be a table")
        steps.append(StepSpec(name, kind, source_topic, output, group, dict(params)))
        if output:
            produced.add(output)
    if steps[-1].kind != "validate":
        raise WorkflowError(f"{source}: the last step must be a `validate` step")
    name = data.get("name") or Path(source).stem
    return Workflow(str(name), tuple(steps), source)


def load_workflow(path: Path | str | None = None) -> Workflow:
    """The workflow of the file at ``path`` (default: the shipped default workflow)."""
    target = Path(path) if path else default_workflow()
    try:
        text = target.read_text(encoding="utf-8")
    except OSError as exc:
        raise WorkflowError(f"workflow file {str(target)!r}: {exc.strerror or exc}") from None
    return parse_workflow(text, str(target))
