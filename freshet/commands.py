"""The core's subcommand (`freshet embed`) and what every stage's commands share.

Each stage adds its own subcommands to the `freshet` parser through a ``register(subparsers)``
of its ``commands`` module (freshet.cdc.commands, freshet.sync.commands,
freshet.workflow.commands, freshet.web.commands, and this one); ``freshet.cli`` only joins them.
A subcommand's parser sets ``handler``: a function of the Settings and the parsed arguments that
returns the exit code. A handler imports its stage's heavy modules (torch, transformers, Flask,
Kafka clients, psycopg pools) itself, so that `freshet --help` or `freshet down` loads none.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    from freshet.settings import Settings

#: What ``register`` receives: the `freshet` parser's subcommands.
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
#: A subcommand: the Settings (built once by freshet.cli) and the arguments in, exit code out.
Handler: TypeAlias = "Callable[[Settings, argparse.Namespace], int]"


def say(message: str) -> None:
    """One line of the command's progress on stdout: ``freshet: <message>``."""
    print(f"freshet: {message}", flush=True)


def install_stop_handlers() -> threading.Event:
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


def cmd_embed(settings: Settings, args: argparse.Namespace) -> int:
    """Print the query vector of a text as a pgvector literal, for psql."""
    from freshet import index_model
    from freshet.embedder import embedder_from_settings, vector_literal

    # The index's model (another one than EMBEDDING_MODEL after `freshet reembed`), if the
    # database can be read; EMBEDDING_MODEL otherwise.
    state = index_model.current(settings)
    model = state.active(settings) if state is not None else None
    vector = embedder_from_settings(settings, model=model).embed([args.text])[0]
    print(f"'{vector_literal(vector)}'::vector" if args.sql else vector_literal(vector))
    return 0


# `freshet bench NAME`: the module of each benchmark (bench/README.md says what each measures).
BENCHMARKS = {
    "freshness": "bench.freshness",
    "throughput": "bench.sync_throughput",
    "quality": "bench.quality",
    "query": "bench.query",
    "recovery": "bench.recovery",
    "workflow": "bench.workflow",
}


def cmd_bench(settings: Settings, args: argparse.Namespace) -> int:
    """Run benchmarks (each starts its own private stack), then draw their charts."""
    import subprocess

    from freshet.errors import FreshetError
    from freshet.settings import PROJECT_ROOT

    if not (PROJECT_ROOT / "bench" / "__init__.py").is_file():
        raise FreshetError(
            f"no bench/ folder in {PROJECT_ROOT}: the benchmarks run from a source checkout of"
            " Freshet; run `freshet bench` from its root"
        )
    names = list(BENCHMARKS) if args.name == "all" else [args.name]
    for name in names:
        command = [sys.executable, "-m", BENCHMARKS[name], *args.options]
        say(f"benchmark {name}: {' '.join(command[1:])}")
        status = subprocess.call(command, cwd=PROJECT_ROOT)
        if status != 0:
            say(f"benchmark {name} failed (exit {status}); its output is above")
            return status
    return subprocess.call([sys.executable, "-m", "bench.charts"], cwd=PROJECT_ROOT)


def register(subparsers: Subparsers) -> None:
    bench = subparsers.add_parser(
        "bench",
        help="run a benchmark (or all) on a private stack, write bench/results/ and draw charts",
    )
    bench.add_argument("name", choices=(*BENCHMARKS, "all"))
    bench.add_argument(
        "options", nargs=argparse.REMAINDER, help="passed to the benchmark, e.g. --seconds 30"
    )
    bench.set_defaults(handler=cmd_bench)
    embed = subparsers.add_parser("embed", help="print a text's embedding as a pgvector literal")
    embed.add_argument("text")
    embed.add_argument("--sql", action="store_true", help="quote it and cast to vector")
    embed.set_defaults(handler=cmd_embed)
