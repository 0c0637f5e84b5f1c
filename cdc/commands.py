"""The capture stage's subcommands: `freshet up | down | status | demo | supervise | snapshot`.

Also the human form of `freshet status` (``render_status``). The handlers import the stack
(Alembic, the Kafka admin client, psycopg) only when they run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
from collections.abc import Mapping
from typing import Any

from freshet.commands import Subparsers, install_stop_handlers, say
from freshet.settings import Settings

#: The demo token that opens the web app's Status page (an admin one; public, loopback only:
#: see freshet.web.DEMO_API_TOKENS). Named here so that `freshet demo` loads no Flask.
DEMO_ADMIN_TOKEN = "demo-admin"


def cmd_up(settings: Settings, args: argparse.Namespace) -> int:
    from freshet.cdc import stack

    started = stack.up(settings, report=say)
    fresh = [name for name, was_started in started.items() if was_started]
    say("started: " + (", ".join(fresh) if fresh else "nothing (all already running)"))
    print(render_status(stack.status(settings)))
    return 0


def cmd_down(settings: Settings, args: argparse.Namespace) -> int:
    from freshet.cdc import stack

    stack.down(settings, report=say)
    return 0


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    """Upgrade schema `rag` to the newest revision: DATABASE_URL, else the embedded PostgreSQL
    (started first when it is not running; `freshet down` stops it)."""
    from freshet.cdc import stack
    from freshet.cdc.postgres import EmbeddedPostgres
    from freshet.db import database_url, redact

    if settings.embedded_postgres:
        settings.home.mkdir(parents=True, exist_ok=True)
        if EmbeddedPostgres(settings).start():
            say(f"PostgreSQL: started (embedded, 127.0.0.1:{settings.pg_port})")
    url = database_url(settings)
    stack.migrate(url)
    say(f"migrations: schema rag is at the newest revision ({redact(url)})")
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


def demo_admin_token(env: Mapping[str, str]) -> str | None:
    """The demo admin token when the web app runs with the built-in demo tokens, else None.

    The web app reads its tokens from FRESHET_API_TOKENS_FILE or FRESHET_API_TOKENS (JSON) of
    the environment it is started in, this one; without either it uses the demo tokens."""
    if env.get("FRESHET_API_TOKENS_FILE"):
        return None
    raw = env.get("FRESHET_API_TOKENS")
    if not raw:
        return DEMO_ADMIN_TOKEN
    try:
        tokens = json.loads(raw)
    except ValueError:
        return None
    entry = tokens.get(DEMO_ADMIN_TOKEN) if isinstance(tokens, dict) else None
    return DEMO_ADMIN_TOKEN if isinstance(entry, dict) and entry.get("admin") is True else None


def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    """Bring everything up, show where it is, and stop it all on Ctrl+C."""
    from freshet.cdc import stack

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    started = stack.up(settings, report=say)
    print(render_status(stack.status(settings)))
    web = f"web UI and API on {settings.web_url}; " if settings.start_web else ""
    say(
        f"demo running: {web}connector {settings.connector_name} streams schema app to "
        f"{settings.topic_prefix}.app.*; press Ctrl+C to stop what this command started"
    )
    token = demo_admin_token(os.environ) if settings.start_web else None
    if token:
        say(
            f"the Status page ({settings.web_url}status) needs an admin token: paste the demo "
            f"token {token} into its API token field"
        )
    while not stop.wait(timeout=1.0):
        pass
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl+C exits hard
    if any(started.values()):
        stack.down(settings, report=say)
    return 0


def cmd_supervise(settings: Settings, args: argparse.Namespace) -> int:
    """Restart what `freshet up` started when it dies, until SIGINT/SIGTERM."""
    from freshet.cdc.supervisor import Supervisor

    stop = install_stop_handlers()
    Supervisor(settings).run(stop)
    return 0


def cmd_snapshot(settings: Settings, args: argparse.Namespace) -> int:
    from freshet.cdc.signals import request_snapshot
    from freshet.db import connect, source_database_url

    with connect(source_database_url(settings), autocommit=True) as conn:
        signal_id = request_snapshot(conn, args.tables)
    say(f"incremental snapshot of {', '.join(args.tables)} requested (signal {signal_id})")
    return 0


def register(subparsers: Subparsers) -> None:
    subparsers.add_parser(
        "up", help="start PostgreSQL, Kafka, Connect, migrate, register connectors"
    ).set_defaults(handler=cmd_up)
    subparsers.add_parser("down", help="stop what `up` started").set_defaults(handler=cmd_down)
    subparsers.add_parser(
        "migrate", help="upgrade schema rag (DATABASE_URL, or the embedded PostgreSQL)"
    ).set_defaults(handler=cmd_migrate)
    status = subparsers.add_parser("status", help="components, connector and task state")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=cmd_status)
    subparsers.add_parser(
        "demo", help="`up` with the demo data; Ctrl+C stops everything it started"
    ).set_defaults(handler=cmd_demo)
    supervise = subparsers.add_parser("supervise", help=argparse.SUPPRESS)
    supervise.add_argument("--tag", default="", help=argparse.SUPPRESS)
    supervise.set_defaults(handler=cmd_supervise)
    snap = subparsers.add_parser(
        "snapshot", help="re-snapshot tables through Debezium's signal table"
    )
    snap.add_argument("tables", nargs="+", metavar="TABLE", help="e.g. app.articles")
    snap.set_defaults(handler=cmd_snapshot)


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
    lines.extend(_render_lag(report.get("lag")))
    if report.get("dead_letters") is not None:
        lines.append(f"dead letters  {report['dead_letters']}")
    text = report.get("text_index")
    if text:
        waiting = text["to_backfill"]
        lines.append(
            f"text index    BM25, {text['chunks']:,} chunks, {text['terms']:,} terms"
            + (
                f"; {waiting:,} older chunks not indexed: run `freshet reindex-text`"
                if waiting
                else ""
            )
        )
    model = report.get("embedding_model")
    if model:
        name = model["model"] or "EMBEDDING_MODEL"
        line = f"embedding     {name} (generation {model['generation']})"
        if model.get("shadow_model"):
            line += (
                f"; re-embed to {model['shadow_model']}: {model['shadow_state']},"
                f" {model.get('shadow_missing', 0):,} chunks to go (`freshet reembed --status`)"
            )
        lines.append(line)
    lines.extend(_render_convergence(report))
    return "\n".join(lines)


def _render_lag(lag: dict[str, Any] | None) -> list[str]:
    """Changes captured but not yet in the index, per table; a WARNING over the setting."""
    if not lag:
        return []
    if lag.get("error"):
        return [f"lag           UNKNOWN   Kafka did not say: {lag['error']}"]
    behind = {t: v for t, v in (lag.get("tables") or {}).items() if v["records"]}
    if not behind:
        return ["lag           none      every captured change is in the index"]
    lines = []
    for table, v in sorted(behind.items()):
        state = "WARNING" if v.get("warning") else "behind"
        age = (
            f"the oldest committed {v['seconds']:.1f} s ago"
            if v.get("oldest_commit")
            else ("the oldest one's commit time unknown")
        )
        over = f" (over FRESHET_LAG_WARNING_S={lag['warning_s']:g})" if v.get("warning") else ""
        lines.append(
            f"lag           {state:<9} {table}: {v['records']:,} changes not yet applied, "
            f"{age}{over}"
        )
    return lines


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
    runs = report.get("history") or []
    if len(runs) > 1:
        differing = [r for r in runs if not r["in_sync"]]
        trend = " ".join(str(r["differences"]) for r in runs[-12:])
        lines.append(
            f"drift         {len(runs)} runs, {len(differing)} differing; differences, oldest"
            f" first: {trend}"
        )
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
