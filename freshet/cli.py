"""The `freshet` command: the entry point that builds Settings and runs one subcommand.

Each stage contributes its own subcommands through the ``register(subparsers)`` of its
``commands`` module (``STAGES``); this module only joins them: it builds the parser, builds the
Settings once, runs the chosen subcommand's handler, and turns a ``FreshetError`` (a failure the
user can act on) into one line ``freshet: error: <message>`` on stderr and exit code 2. Anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from freshet.commands import Handler
from freshet.errors import FreshetError
from freshet.settings import Settings

logger = logging.getLogger("freshet")

#: The stages whose ``commands`` module adds subcommands, in the order `freshet --help` lists
#: them (the core, ``freshet.commands``, comes last).
STAGES = ("freshet.cdc", "freshet.sync", "freshet.workflow", "freshet.web")


def build_parser() -> argparse.ArgumentParser:
    """The `freshet` parser: each stage adds its own subcommands (``register(subparsers)``)."""
    from freshet import commands as core

    parser = argparse.ArgumentParser(
        prog="freshet",
        description="Streaming RAG kept fresh: Debezium CDC -> Kafka -> pgvector -> answers.",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log debug details of Freshet's own modules"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for stage in (*(importlib.import_module(f"{p}.commands") for p in STAGES), core):
        stage.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.verbose:  # debug details of Freshet's own modules, not of every library
        logging.getLogger("freshet").setLevel(logging.DEBUG)
    # A first start compiles the embedding model for ~20 s: say so, whatever the log level.
    logging.getLogger("freshet.fast_path").setLevel(logging.INFO)
    try:
        settings = Settings.from_env()
        handler: Handler = args.handler
        return handler(settings, args)
    except FreshetError as exc:  # the user can act on it: one line, no traceback
        print(f"freshet: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("freshet: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
