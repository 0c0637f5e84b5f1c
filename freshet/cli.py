"""The `freshet` command: the entry point that builds Settings and runs one subcommand."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from freshet.settings import Settings, SettingsError

logger = logging.getLogger("freshet")


def _say(message: str) -> None:
    print(f"freshet: {message}", flush=True)


def cmd_up(settings: Settings, args: argparse.Namespace) -> int:
    from freshet.cdc import stack

    started = stack.up(settings, report=_say)
    fresh = [name for name, was_started in started.items() if was_started]
    _say("started: " + (", ".join(fresh) if fresh else "nothing (all already running)"))
    print(render_status(stack.status(settings)))
    return 0


def cmd_down(settings: Settings, args: argparse.Namespace) -> int:
    from freshet.cdc import stack

    stack.down(settings, report=_say)
    return 0


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    from freshet.cdc import stack

    report = stack.status(settings)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(render_status(report))
    healthy = report["connector"].get("state") == "RUNNING"
    return 0 if healthy else 3


def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    """Bring everything up, show where it is, and stop it all on Ctrl+C."""
    from freshet.cdc import stack

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    started = stack.up(settings, report=_say)
    print(render_status(stack.status(settings)))
    web = f"web UI and API on {settings.web_url}; " if settings.start_web else ""
    _say(
        f"demo running: {web}connector {settings.connector_name} streams schema app to "
        f"{settings.topic_prefix}.app.*; press Ctrl+C to stop what this command started"
    )
    while not stop.wait(timeout=1.0):
        pass
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl+C exits hard
    if any(started.values()):
        stack.down(settings, report=_say)
    return 0


def cmd_supervise(settings: Settings, args: argparse.Namespace) -> int:
    """Restart what `freshet up` started when it dies, until SIGINT/SIGTERM."""
    from freshet.cdc.supervisor import Supervisor

    stop = _install_stop_handlers()
    Supervisor(settings).run(stop)
    return 0


def cmd_verify(settings: Settings, args: argparse.Namespace) -> int:
    """Compare the source with the index; with --repair, fix differences through Debezium."""
    from freshet.sync.verify_cli import run_verify

    return run_verify(settings, args)


def cmd_snapshot(settings: Settings, args: argparse.Namespace) -> int:
    from freshet.cdc.signals import request_snapshot
    from freshet.db import connect, source_database_url

    with connect(source_database_url(settings), autocommit=True) as conn:
        signal_id = request_snapshot(conn, args.tables)
    _say(f"incremental snapshot of {', '.join(args.tables)} requested (signal {signal_id})")
    return 0


def _install_stop_handlers() -> threading.Event:
    """First SIGINT/SIGTERM asks for a graceful stop; a second Ctrl+C exits at once."""
    stop = threading.Event()
    first: list[float] = []

    def handle(signum: int, frame: object) -> None:
        # Tools like `timeout` deliver one signal twice within microseconds; a person's second
        # Ctrl+C comes later.
        if stop.is_set() and signum == signal.SIGINT and time.monotonic() - first[0] > 0.5:
            print("freshet: second interrupt, exiting now", file=sys.stderr)
            os._exit(130)
        if not stop.is_set():
            first.append(time.monotonic())
            print(
                "freshet: stopping after the current batch (Ctrl+C again to exit now)",
                file=sys.stderr,
            )
        stop.set()

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)
    return stop


def cmd_sync(settings: Settings, args: argparse.Namespace) -> int:
    """One sync worker in the foreground, until SIGINT/SIGTERM."""
    from freshet.sync.metrics import serve
    from freshet.sync.worker import build_worker, progress_printer

    if args.metrics_port is not None:
        settings = settings.with_overrides(metrics_port=args.metrics_port)
    stop = _install_stop_handlers()
    worker = build_worker(settings)
    worker.progress = progress_printer()
    # The model and libraries are loaded for good: keep the collector from rescanning their
    # objects. A full collection over them takes ~190 ms here, a latency spike for a change.
    gc.collect()
    gc.freeze()
    server = None
    if settings.metrics_port:
        try:
            server = serve(worker.metrics, settings.metrics_port)
            _say(f"metrics on http://127.0.0.1:{settings.metrics_port}/metrics")
        except OSError as exc:
            _say(f"metrics endpoint not started: port {settings.metrics_port}: {exc}")
    try:
        worker.run(stop)
    finally:
        if server is not None:
            server.shutdown()
    return 0


def cmd_workflow_step(settings: Settings, args: argparse.Namespace) -> int:
    """One member of an async workflow step's group in the foreground, until SIGINT/SIGTERM."""
    from freshet.answering import config as answering_config
    from freshet.answering.factory import Answering
    from freshet.answering.messages import RAW_ANSWERS, REQUESTS
    from freshet.workflow.inference import Inference
    from freshet.workflow.step import Handler, Step
    from freshet.workflow.validator import Validator

    stop = _install_stop_handlers()
    # The answering core with no Flask app: the same factory and config the web app uses.
    answering = Answering(settings, answering_config.from_env(os.environ))
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
    _say(f"{step.name}: consuming {step.topic} in group {step.group}")
    step.run(stop)
    return 0


def cmd_dlq(settings: Settings, args: argparse.Namespace) -> int:
    from freshet.db import connect, database_url
    from freshet.sync import deadletters

    with connect(database_url(settings), autocommit=True, vector=True) as conn:
        if args.action == "list":
            letters = deadletters.list_dead_letters(
                conn, include_resolved=args.all, limit=args.limit
            )
            if args.json:
                print(json.dumps([d.as_json() for d in letters], indent=2))
                return 0
            if not letters:
                _say("no dead letters")
            for d in letters:
                state = "resolved" if d.resolved_at else f"replays={d.replay_count}"
                print(f"{d.id:>6}  {d.topic}[{d.partition}]@{d.offset}  {d.stage:<6} {state}")
                print(f"        {d.error_type}: {d.reason}")
            return 0
        from freshet.sync.changes import Router
        from freshet.sync.mapping import Mappings
        from freshet.sync.replay import kafka_fetch, replay
        from freshet.sync.worker import build_worker

        worker = build_worker(settings)
        router = Router(Mappings.load(settings.mappings_path), settings.topic_prefix)
        fetch = kafka_fetch(settings.bootstrap_servers)
        outcomes = replay(conn, router, worker.writer, args.ids or None, fetch)
        for outcome in outcomes:
            verdict = "resolved" if outcome.resolved else f"still failing: {outcome.reason}"
            print(f"{outcome.id:>6}  {verdict}")
        if not outcomes:
            _say("nothing to replay")
        return 0 if all(o.resolved for o in outcomes) else 1


def cmd_web(settings: Settings, args: argparse.Namespace) -> int:
    from freshet.web.server import run

    port = args.port or settings.web_port
    _say(f"web app on http://{args.host}:{port}/")
    run(settings, host=args.host, port=port)
    return 0


def cmd_ask(settings: Settings, args: argparse.Namespace) -> int:
    """Answer a question in-process, through the same path as POST /api/v1/ask."""
    from freshet.web import create_app

    app = create_app(settings=settings)
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    response = app.test_client().post(
        "/api/v1/ask", json={"question": args.question, "k": args.k}, headers=headers
    )
    body = response.get_json(silent=True) or {}
    if response.status_code >= 400:
        print(f"freshet: error: {body.get('error', response.status_code)}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    print(body.get("answer", ""))
    for citation in body.get("citations", []):
        print(
            f"  [{citation['n']}] {citation['source_table']} {citation['doc_key']} "
            f"(version {citation.get('source_lsn')}, {citation.get('source_ts')})"
        )
    if body.get("as_of"):
        print(f"  as of {body['as_of']}")
    return 0


def cmd_embed(settings: Settings, args: argparse.Namespace) -> int:
    """Print the query vector of a text as a pgvector literal, for psql."""
    from freshet.embedder import embedder_from_settings, vector_literal

    vector = embedder_from_settings(settings).embed([args.text])[0]
    print(f"'{vector_literal(vector)}'::vector" if args.sql else vector_literal(vector))
    return 0


def render_status(report: dict[str, Any]) -> str:
    """The human form of `freshet status`."""
    lines = [f"FRESHET_HOME  {report['home']}"]
    pg = report["postgres"]
    where = "embedded" if pg.get("embedded") else "external"
    detail = pg.get("url") or ""
    if pg.get("state") == "RUNNING":
        detail += f"  (PostgreSQL {pg.get('version')})"
    else:
        detail += f"  {pg.get('error', '')}"
    lines.append(f"postgres      {pg.get('state', 'DOWN'):<9} {where:<9} {detail}")
    kafka = report["kafka"]
    kinfo = kafka["bootstrap_servers"]
    if kafka.get("state") == "RUNNING":
        kinfo += f"  ({len(kafka.get('topics', []))} topics)"
    else:
        kinfo += f"  {kafka.get('error', '')}"
    kwhere = "local" if kafka.get("local") else "external"
    lines.append(f"kafka         {kafka.get('state', 'DOWN'):<9} {kwhere:<9} {kinfo}")
    conn = report["connect"]
    cwhere = "local" if conn.get("local") else "external"
    cinfo = conn["url"] + (f"  (Kafka {conn['version']})" if conn.get("version") else "")
    if conn.get("state") != "RUNNING":
        cinfo += f"  {conn.get('error', '')}"
    lines.append(f"connect       {conn.get('state', 'DOWN'):<9} {cwhere:<9} {cinfo}")
    connector = report["connector"]
    lines.append(f"connector     {connector['state']:<9} {connector['name']}")
    for name, step in (report.get("workflow") or {}).items():
        lines.append(f"{name:<13} {step['state']:<9} {'local':<9} pid {step['pid'] or '-'}")
    web = report.get("web")
    if web:
        lines.append(f"web app       {web['state']:<9} {'local':<9} {web['url']}")
    for task in connector.get("tasks", []):
        lines.append(f"  task {task['id']:<7} {task['state']:<9} {task.get('worker') or ''}")
        if task.get("trace"):
            lines.append("    " + task["trace"].replace("\n", "\n    "))
    if connector.get("connector_trace"):
        lines.append("    " + connector["connector_trace"].replace("\n", "\n    "))
    slot = report.get("slot")
    if slot:
        lines.append(
            f"slot          {'active' if slot['active'] else 'inactive':<9} "
            f"retained WAL {slot['retained_wal_bytes'] or 0:,} bytes, "
            f"confirmed {slot['confirmed_flush_lsn']}"
        )
    for worker in report.get("workers", []):
        lines.append(
            f"sync worker   {worker['state'].upper():<9} {worker['worker_id']}  "
            f"lag {worker['lag']}, {worker['events_per_sec']:.1f} events/s, "
            f"{worker['events_applied']} applied, {worker['embeddings']} embeddings, "
            f"heartbeat {worker['heartbeat_age_s']:.0f}s ago"
        )
        for table, hist in sorted(worker["freshness"].items()):
            if hist.get("p50") is None:
                continue
            lines.append(
                f"  freshness {table}: p50 {hist['p50'] * 1000:.0f} ms, "
                f"p99 {hist['p99'] * 1000:.0f} ms, max {hist['max'] * 1000:.0f} ms "
                f"({hist['count']} changes)"
            )
        if worker.get("last_error"):
            lines.append(f"  last error: {worker['last_error']}")
    if report.get("dead_letters") is not None:
        lines.append(f"dead letters  {report['dead_letters']}")
    lines.extend(_render_convergence(report))
    return "\n".join(lines)


def _render_convergence(report: dict[str, Any]) -> list[str]:
    """Supervised services, the last verify, hidden documents, mapping problems."""
    lines = []
    services = report.get("services") or {}
    supervisor = services.get("supervisor") or {}
    restarted = [
        f"{name} {info['restarts']}x"
        for name, info in services.items()
        if name != "supervisor" and info.get("restarts")
    ]
    died = [n for n, info in services.items() if info.get("state") == "DIED"]
    if supervisor:
        detail = f"restarts: {', '.join(restarted) or 'none'}"
        if supervisor.get("connector_restarts"):
            detail += f"; connector task restarts {supervisor['connector_restarts']}"
        lines.append(f"supervisor    {supervisor['state']:<9} {'local':<9} {detail}")
    if died:
        lines.append(f"  died (being restarted): {', '.join(died)}")
    verify = report.get("verify")
    if verify:
        counts = ", ".join(f"{k} {v}" for k, v in verify["counts"].items() if v) or "none"
        state = "IN SYNC" if verify["in_sync"] else "DIFFERS"
        lines.append(
            f"verify        {state:<9} {verify['rows_checked']} rows, "
            f"{verify['age_s']:.0f}s ago; differences: {counts}"
        )
    elif "verify" in report:
        lines.append("verify        never run (`freshet verify`)")
    if report.get("hidden_documents"):
        lines.append(
            f"hidden        {report['hidden_documents']} documents (oversized rows or a mapping "
            "that does not fit; `freshet verify` lists them)"
        )
    for problem in report.get("mapping_problems") or []:
        lines.append(
            f"mapping       PROBLEM   {problem['table']}.{problem['column']}: "
            f"{problem['problem'][:160]} ({problem['occurrences']} events, last "
            f"{problem['last_seen_at']})"
        )
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="freshet",
        description="Streaming RAG kept fresh: Debezium CDC -> Kafka -> pgvector -> answers.",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log debug details of Freshet's own modules"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("up", help="start PostgreSQL, Kafka, Connect, migrate, register connectors")
    sub.add_parser("down", help="stop what `up` started")
    status = sub.add_parser("status", help="components, connector and task state")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    sub.add_parser("demo", help="`up` with the demo data; Ctrl+C stops everything it started")
    verify = sub.add_parser(
        "verify", help="compare every captured row with the index; --repair fixes differences"
    )
    verify.add_argument(
        "--table", action="append", metavar="TABLE", help="only this table (repeatable)"
    )
    verify.add_argument(
        "--repair",
        action="store_true",
        help="re-snapshot differing rows through Debezium, remove orphans (guarded by version)",
    )
    verify.add_argument("--json", action="store_true", help="machine-readable output")
    verify.add_argument(
        "--settle",
        type=float,
        default=30.0,
        help="seconds to re-check differences while changes in flight land (default 30)",
    )
    verify.add_argument(
        "--wait",
        type=float,
        default=300.0,
        help="with --repair: seconds to wait for the repaired rows to arrive (default 300)",
    )
    sub.add_parser("supervise", help=argparse.SUPPRESS).add_argument(
        "--tag", default="", help=argparse.SUPPRESS
    )
    snap = sub.add_parser("snapshot", help="re-snapshot tables through Debezium's signal table")
    snap.add_argument("tables", nargs="+", metavar="TABLE", help="e.g. app.articles")
    sync = sub.add_parser("sync", help="run one sync worker in the foreground")
    sync.add_argument("--metrics-port", type=int, default=None, help="Prometheus port (0: off)")
    sync.add_argument("--tag", default="", help=argparse.SUPPRESS)  # names launcher-run workers
    for name, what in (
        ("infer", "rag.requests -> retrieve + answer -> rag.answers.raw"),
        ("validate", "rag.answers.raw -> answer rules -> rag.answers / rag.answers.rejected"),
    ):
        step = sub.add_parser(name, help=f"run one async workflow worker: {what}")
        step.add_argument("--tag", default="", help=argparse.SUPPRESS)
    dlq = sub.add_parser("dlq", help="list or replay dead letters")
    dlq_sub = dlq.add_subparsers(dest="action", required=True, metavar="ACTION")
    dlq_list = dlq_sub.add_parser("list", help="dead letters not yet resolved")
    dlq_list.add_argument("--all", action="store_true", help="include resolved ones")
    dlq_list.add_argument("--limit", type=int, default=100)
    dlq_list.add_argument("--json", action="store_true")
    dlq_replay = dlq_sub.add_parser("replay", help="re-run dead letters through the current code")
    dlq_replay.add_argument("ids", nargs="*", type=int, metavar="ID", help="default: all")
    web = sub.add_parser("web", help="serve the web UI and REST API in the foreground")
    web.add_argument("--host", default="127.0.0.1")
    web.add_argument("--port", type=int, default=None, help="default FRESHET_WEB_PORT")
    web.add_argument("--tag", default="", help=argparse.SUPPRESS)
    ask = sub.add_parser("ask", help="answer a question with citations")
    ask.add_argument("question")
    ask.add_argument("-k", type=int, default=5, help="passages to retrieve")
    ask.add_argument("--token", default="", help="API token whose access groups apply")
    ask.add_argument("--json", action="store_true")
    embed = sub.add_parser("embed", help="print a text's embedding as a pgvector literal")
    embed.add_argument("text")
    embed.add_argument("--sql", action="store_true", help="quote it and cast to vector")
    return parser


COMMANDS = {
    "up": cmd_up,
    "down": cmd_down,
    "status": cmd_status,
    "demo": cmd_demo,
    "snapshot": cmd_snapshot,
    "verify": cmd_verify,
    "supervise": cmd_supervise,
    "sync": cmd_sync,
    "infer": cmd_workflow_step,
    "validate": cmd_workflow_step,
    "dlq": cmd_dlq,
    "web": cmd_web,
    "ask": cmd_ask,
    "embed": cmd_embed,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.verbose:  # debug details of Freshet's own modules, not of every library
        for package in ("cdc", "freshet", "sync", "web", "workflow"):
            logging.getLogger(package).setLevel(logging.DEBUG)
    # A first start compiles the embedding model for ~20 s: say so, whatever the log level.
    logging.getLogger("freshet.fast_path").setLevel(logging.INFO)
    from freshet.answering.rules import RulesError
    from freshet.cdc.processes import StackError
    from freshet.embedder import EmbedderError

    try:
        settings = Settings.from_env()
        return COMMANDS[args.command](settings, args)
    except (StackError, SettingsError, RulesError, EmbedderError) as exc:
        print(f"freshet: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("freshet: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
