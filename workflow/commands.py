"""The async workflow's subcommands: `freshet infer | validate`, one step's worker each, and
`freshet rules check | show` for the answer rules' owners.

The handlers import the answering core and the Kafka client only when they run; no Flask app
is built (the answering core is used directly).
"""

from __future__ import annotations

import argparse
import gc
import sys
from typing import Any

from freshet.commands import Subparsers, install_stop_handlers, say
from freshet.settings import Settings


def _run_step(settings: Settings, spec: Any, name: str, group: str) -> int:
    """One member of ``spec``'s step in group ``group``, in the foreground, until
    SIGINT/SIGTERM. The answering core is built with no Flask app: the same factory and
    Settings the web app uses."""
    from freshet.answering.factory import Answering
    from freshet.workflow.kinds import batch_of, build
    from freshet.workflow.step import Step
    from freshet.workflow.tracking import Sweeper

    stop = install_stop_handlers()
    answering = Answering(settings)
    try:
        handler = build(spec, answering)
        # Every validate worker also ends the requests past their deadline that no step holds.
        sweeper = Sweeper(answering.store()) if spec.kind == "validate" else None
        step = Step(
            name,
            spec.input,
            group,
            settings.bootstrap_servers,
            handler,
            batch=batch_of(spec),
            between=sweeper,
        )
        gc.collect()
        gc.freeze()
        say(f"{step.name} ({spec.kind}): consuming {step.topic} in group {step.group}")
        step.run(stop)
    finally:
        # Its pool, and its query-embedding thread (a model still building at a stop).
        answering.close()
    return 0


def cmd_workflow_step(settings: Settings, args: argparse.Namespace) -> int:
    """`freshet infer` / `freshet validate`: the default workflow's `answer` / `validate`
    step (workflows/default.toml), in the groups FRESHET_INFERENCE_GROUP /
    FRESHET_VALIDATOR_GROUP."""
    from freshet.workflow.definition import load_workflow

    if args.command == "infer":
        spec = load_workflow().step("answer")
        return _run_step(settings, spec, "inference", settings.inference_group)
    spec = load_workflow().step("validate")
    return _run_step(settings, spec, "validator", settings.validator_group)


def cmd_step(settings: Settings, args: argparse.Namespace) -> int:
    """`freshet step NAME [--workflow PATH]`: one member of a declared workflow step's group."""
    from freshet.workflow.definition import WorkflowError, load_workflow

    try:
        spec = load_workflow(args.workflow).step(args.name)
    except WorkflowError as exc:
        print(f"freshet step: {exc}", file=sys.stderr)
        return 2
    return _run_step(settings, spec, spec.name, spec.group)


def cmd_stale_watch(settings: Settings, args: argparse.Namespace) -> int:
    """`freshet stale-watch`: one member of the stale watcher's group (FRESHET_STALE_GROUP),
    in the foreground until SIGINT/SIGTERM (freshet/workflow/stale.py)."""
    from freshet.db import connect, database_url
    from freshet.workflow.stale import StaleWatch

    stop = install_stop_handlers()
    url = database_url(settings)
    watch = StaleWatch(settings, lambda: connect(url, autocommit=True))
    say(f"stale-watch: marking answers whose cited rows change (group {settings.stale_group})")
    watch.run(stop)
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
    step = subparsers.add_parser(
        "step", help="run one worker of a declared workflow's step (docs/workflow.md)"
    )
    step.add_argument("name", help="the step's name in the workflow file")
    step.add_argument(
        "--workflow",
        default=None,
        help="the workflow file (default: the shipped default workflow)",
    )
    step.set_defaults(handler=cmd_step)
    watch = subparsers.add_parser(
        "stale-watch",
        help="mark answers whose cited rows changed, and publish rag.answers.stale",
    )
    watch.add_argument("--tag", default="", help=argparse.SUPPRESS)
    watch.set_defaults(handler=cmd_stale_watch)
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
