"""The async workflow's subcommands: `freshet infer | validate`, one step's worker each, and
`freshet rules check | show` for the answer rules' owners.

The handlers import the answering core and the Kafka client only when they run; no Flask app
is built (the answering core is used directly).
"""

from __future__ import annotations

import argparse
import gc
import sys

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
        handler = Validator(answering.rules, answering.store())
    step = Step(name, topic, group, settings.bootstrap_servers, handler)
    gc.collect()
    gc.freeze()
    say(f"{step.name}: consuming {step.topic} in group {step.group}")
    step.run(stop)
    return 0


def cmd_rules(settings: Settings, args: argparse.Namespace) -> int:
    """`freshet rules check [SOURCE]`: is this rules source valid (before it is put in place);
    `freshet rules show`: the rules in force now, with their version."""
    from freshet.answering.live_rules import LiveRules
    from freshet.answering.rules import RulesError

    source = settings.answer_rules if args.source is None else args.source
    connect = None
    if source.strip() == "table":
        from freshet.db import connect as open_db
        from freshet.db import database_url

        def connect() -> object:
            return open_db(database_url(settings), autocommit=True)

    try:
        rules = LiveRules(source, reload_s=0, connect=connect).current()
    except RulesError as exc:
        print(f"freshet rules: {exc}", file=sys.stderr)
        return 1
    if args.action == "check":
        say(f"{rules.source}: {len(rules.rules)} rule(s), valid ({rules.label})")
        return 0
    say(f"answer rules in force: {rules.source}, version {rules.label}")
    for rule in rules.rules:
        say(f"  {rule.name} ({rule.kind})")
    return 0


def register(subparsers: Subparsers) -> None:
    rules = subparsers.add_parser(
        "rules",
        help="check an answer rules source, or show the rules in force (FRESHET_ANSWER_RULES)",
    )
    rules.add_argument("action", choices=("check", "show"))
    rules.add_argument(
        "source",
        nargs="?",
        default=None,
        help="a rules file, a directory of them, or `table` (default: FRESHET_ANSWER_RULES)",
    )
    rules.set_defaults(handler=cmd_rules)
    for name, what in (
        ("infer", "rag.requests -> retrieve + answer -> rag.answers.raw"),
        ("validate", "rag.answers.raw -> answer rules -> rag.answers / rag.answers.rejected"),
    ):
        step = subparsers.add_parser(name, help=f"run one async workflow worker: {what}")
        step.add_argument("--tag", default="", help=argparse.SUPPRESS)
        step.set_defaults(handler=cmd_workflow_step)
