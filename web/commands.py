"""The web stage's subcommands: `freshet web | ask`.

The handlers import Flask and the app only when they run.
"""

from __future__ import annotations

import argparse
import json
import sys

from freshet.commands import Subparsers, say
from freshet.settings import Settings


def cmd_web(settings: Settings, args: argparse.Namespace) -> int:
    from freshet.web.server import run

    port = args.port or settings.web_port
    say(f"web app on http://{args.host}:{port}/")
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


def register(subparsers: Subparsers) -> None:
    web = subparsers.add_parser("web", help="serve the web UI and REST API in the foreground")
    web.add_argument("--host", default="127.0.0.1")
    web.add_argument("--port", type=int, default=None, help="default FRESHET_WEB_PORT")
    web.add_argument("--tag", default="", help=argparse.SUPPRESS)
    web.set_defaults(handler=cmd_web)
    ask = subparsers.add_parser("ask", help="answer a question with citations")
    ask.add_argument("question")
    ask.add_argument("-k", type=int, default=5, help="passages to retrieve")
    ask.add_argument("--token", default="", help="API token whose access groups apply")
    ask.add_argument("--json", action="store_true")
    ask.set_defaults(handler=cmd_ask)
