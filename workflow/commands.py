"""The async workflow's subcommands: `freshet infer | validate`, one step's worker each.

The handlers import the answering core and the Kafka client only when they run; no Flask app
is built (the answering core is used directly).
"""

from __future__ import annotations

import argparse
import gc

from freshet.commands import Subparsers, install_stop_handlers, say
from freshet.settings import Settings


def cmd_workflow_step(settings: Settings, args: argparse.Namespace) -> int:
    """One member of an async workflow step's group in the foreground, until SIGINT/SIGTERM."""
    from freshet.answering.factory import Answering
    from freshet.answering.messages import RAW_ANSWERS, REQUESTS
    from freshet.workflow.inference import Inference
    from freshet.workflow.step import Handler, Step
    from freshet.workflow.validator import Validator

    stop = install_stop_handlers()
    # The answering core with no Flask app: the same factory and Settings the web app uses.
    answering = Answering(settings)
    handler: Handler
    if args.command == "infer":
        name, topic, group = "inference", REQUESTS, settings.inference_group
        handler = Inference.from_answering(answering)
    else:
        name, topic, group = "validator", RAW_ANSWERS, settings.validator_group
        handler = Validator(answering.rules(), answering.store())
    step = Step(name, topic, group, settings.bootstrap_servers, handler)
    gc.collect()
    gc.freeze()
    say(f"{step.name}: consuming {step.topic} in group {step.group}")
    step.run(stop)
    return 0


def register(subparsers: Subparsers) -> None:
    for name, what in (
        ("infer", "rag.requests -> retrieve + answer -> rag.answers.raw"),
        ("validate", "rag.answers.raw -> answer rules -> rag.answers / rag.answers.rejected"),
    ):
        step = subparsers.add_parser(name, help=f"run one async workflow worker: {what}")
        step.add_argument("--tag", default="", help=argparse.SUPPRESS)
        step.set_defaults(handler=cmd_workflow_step)
