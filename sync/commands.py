"""The sync stage's subcommands: `freshet verify | sync | dlq | reindex-text | group-index | ...`.

The handlers import the worker (torch, transformers, the Kafka client) only when they run.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import threading
import time
from typing import TYPE_CHECKING

from freshet.commands import Subparsers, install_stop_handlers, say
from freshet.settings import Settings

if TYPE_CHECKING:
    from freshet.sync.worker import SyncWorker


def cmd_verify(settings: Settings, args: argparse.Namespace) -> int:
    """Compare the source with the index; with --repair, fix differences through Debezium."""
    from freshet.sync.verify_cli import run_verify

    return run_verify(settings, args)


def cmd_drift_watch(settings: Settings, args: argparse.Namespace) -> int:
    """`freshet verify` every FRESHET_VERIFY_EVERY_MIN minutes, until SIGINT/SIGTERM."""
    from freshet.sync.drift import watch
    from freshet.sync.verify_cli import chunker_for

    if settings.verify_every_min <= 0:
        print(
            "freshet drift-watch: FRESHET_VERIFY_EVERY_MIN is 0 (off); set it to the minutes"
            " between two runs of `freshet verify`",
            file=sys.stderr,
        )
        return 2
    stop = install_stop_handlers()
    say(f"drift-watch: verifying the index every {settings.verify_every_min:g} min")
    watch(settings, stop, chunker_for(settings))
    return 0


def cmd_sync(settings: Settings, args: argparse.Namespace) -> int:
    """One sync worker in the foreground, until SIGINT/SIGTERM."""
    from freshet.index_model import ModelSwitched
    from freshet.sync.worker import build_worker

    if args.metrics_port is not None:
        settings = settings.with_overrides(metrics_port=args.metrics_port)
    stop = install_stop_handlers()
    while True:
        try:
            _run_worker(build_worker(settings), settings, stop)
            return 0
        except ModelSwitched as exc:
            # `freshet reembed` switched the index's model: the batch in hand was not written;
            # a worker with the new model applies it again.
            say(f"sync: {exc}; restarting the worker with the new model")
            gc.unfreeze()  # the old model's objects can go


def _run_worker(worker: SyncWorker, settings: Settings, stop: threading.Event) -> None:
    from freshet.sync.metrics import serve
    from freshet.sync.worker import progress_printer

    worker.progress = progress_printer()
    # The model and libraries are loaded for good: keep the collector from rescanning their
    # objects. A full collection over them takes ~190 ms here, a latency spike for a change.
    # The full model may still be loading in the background (it starts on the compiled one):
    # its objects are frozen once it is there.
    gc.collect()
    gc.freeze()
    wait_ready = getattr(worker.embedder, "wait_ready", None)
    if wait_ready is not None:

        def freeze_when_loaded() -> None:
            try:
                wait_ready()
            except Exception:  # noqa: BLE001 - the worker's next batch reports it
                return
            gc.freeze()

        threading.Thread(target=freeze_when_loaded, name="freshet-gc-freeze", daemon=True).start()
    server = None
    if settings.metrics_port:
        try:
            server = serve(worker.metrics, settings.metrics_port)
            say(f"metrics on http://127.0.0.1:{settings.metrics_port}/metrics")
        except OSError as exc:
            say(f"metrics endpoint not started: port {settings.metrics_port}: {exc}")
    try:
        worker.run(stop)
    finally:
        if server is not None:
            server.shutdown()


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
                say("no dead letters")
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
            say("nothing to replay")
        return 0 if all(o.resolved for o in outcomes) else 1


def cmd_reindex_text(settings: Settings, args: argparse.Namespace) -> int:
    """Build the BM25 postings of chunks written before the text index existed."""
    from freshet.db import connect, database_url
    from freshet.sync import text_index

    stop = install_stop_handlers()
    with connect(database_url(settings), autocommit=True) as conn:
        if args.rebuild:
            text_index.rebuild(conn)
            say("text index cleared; indexing every chunk again")
        before = text_index.state(conn)
        if before.finished and not before.remaining:
            say("the text index is complete: nothing to index")
        else:
            started = time.monotonic()
            indexed = text_index.backfill(
                conn, batch=args.batch, progress=text_index.progress_bar(), stop=stop.is_set
            )
            after = text_index.state(conn)
            say(
                f"indexed {indexed:,} chunks in {time.monotonic() - started:.1f}s"
                + ("" if after.finished else f"; stopped, {after.remaining:,} to go (run again)")
            )
            if not after.finished:
                return 1
        if args.check:
            differences = text_index.recount_differences(conn)
            print(json.dumps(differences))
            if any(differences.values()):
                say("the text index differs from a recount: run `freshet reindex-text --rebuild`")
                return 1
            say("the text index equals a recount from the chunks")
    return 0


# A group holding more than this share of the chunks gains little from an index of its own.
LARGE_GROUP_SHARE = 0.5


def cmd_group_index(settings: Settings, args: argparse.Namespace) -> int:
    """List, build or drop the partial HNSW indexes of small access groups."""
    from freshet import group_indexes
    from freshet.db import connect, database_url
    from freshet.errors import FreshetError

    if any(not g.strip() for g in args.groups):
        raise FreshetError(
            "a group name cannot be empty (public documents get their index with any group's)"
        )
    with connect(database_url(settings), autocommit=True) as conn:
        wanted = list(dict.fromkeys(args.groups))
        if wanted and settings.public_documents and not args.drop:
            wanted.append(group_indexes.PUBLIC)  # every member's search also reads these
        if args.rebuild:
            wanted += [g for g in group_indexes.stale(conn) if g not in wanted]
        for group in wanted:
            name = group_indexes.describe(group)
            if args.drop:
                dropped = group_indexes.drop(conn, group)
                say(f"dropped the index of {name}" if dropped else f"{name} has no index")
                continue
            started = time.monotonic()
            if group_indexes.build(conn, group):
                say(f"built the index of {name} in {time.monotonic() - started:.1f}s")
            else:
                say(f"the index of {name} is there already")
        rows: list[tuple[str, int]] = conn.execute(
            "SELECT g, count(*) FROM rag.chunks AS c,"
            " unnest(CASE WHEN c.access_groups = '{}' THEN ARRAY[''] ELSE c.access_groups END)"
            " AS g GROUP BY g ORDER BY count(*)"
        ).fetchall()
        total = conn.execute("SELECT count(*) FROM rag.chunks").fetchone()
        indexes = group_indexes.found(conn)
    chunks = int(total[0]) if total else 0
    counts: dict[str, int] = dict(rows)
    rows += [(g, 0) for g in indexes if g not in counts]  # an index of a group with no chunks
    for group in args.groups if not args.drop else ():
        if chunks and counts.get(group, 0) / chunks > LARGE_GROUP_SHARE:
            say(
                f"note: group {group!r} holds {counts[group] / chunks:.0%} of the chunks: its"
                " index is nearly the whole graph and makes its members' searches no faster"
            )
    print(f"{'access group':<32} {'chunks':>10} {'share':>7}  index")
    for group, count in rows:
        have = indexes.get(group)
        state = (
            "-"
            if have is None
            else f"{have['name']} ({have['bytes'] / 2**20:.1f} MiB)"
            + ("" if have["valid"] and have["current"] else " STALE: run --rebuild")
        )
        label = "(public documents)" if group == group_indexes.PUBLIC else group
        print(f"{label:<32} {count:>10,} {count / max(chunks, 1):>7.1%}  {state}")
    return 0


def cmd_reembed(settings: Settings, args: argparse.Namespace) -> int:
    """Change the index's embedding model behind a quality gate (sync/reembed.py)."""
    from freshet.sync.reembed_cli import run_reembed

    return run_reembed(settings, args)


def cmd_publish_chunks(settings: Settings, args: argparse.Namespace) -> int:
    """Publish every live document of the index to the chunk stream (freshet.chunks)."""
    from freshet.db import connect, database_url
    from freshet.sync import chunk_stream
    from freshet.sync.text_index import progress_bar

    stop = install_stop_handlers()
    from freshet import index_model

    state = index_model.current(settings)
    model = chunk_stream.Model.of(state.active(settings) if state else settings.embedding_model)
    started = time.monotonic()
    with connect(database_url(settings), autocommit=True, vector=True) as conn:
        done = chunk_stream.publish_all(
            conn,
            settings.bootstrap_servers,
            model,
            page=args.batch,
            progress=progress_bar("documents", "publishing chunks"),
            stop=stop.is_set,
        )
    say(
        f"published {done:,} documents to {chunk_stream.TOPIC} in"
        f" {time.monotonic() - started:.1f}s"
        + ("; stopped before the end (run again)" if stop.is_set() else "")
    )
    if not settings.publish_chunks:
        say(
            "FRESHET_PUBLISH_CHUNKS is off: the sync worker does not publish later changes;"
            " turn it on to keep the topic current"
        )
    return 1 if stop.is_set() else 0


def register(subparsers: Subparsers) -> None:
    verify = subparsers.add_parser(
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
    verify.set_defaults(handler=cmd_verify)
    sync = subparsers.add_parser("sync", help="run one sync worker in the foreground")
    sync.add_argument("--metrics-port", type=int, default=None, help="Prometheus port (0: off)")
    sync.add_argument("--tag", default="", help=argparse.SUPPRESS)  # names launcher-run workers
    sync.set_defaults(handler=cmd_sync)
    reindex = subparsers.add_parser(
        "reindex-text",
        help="build the BM25 text index for chunks written before it existed (resumable)",
    )
    reindex.add_argument(
        "--rebuild", action="store_true", help="drop the text index and index every chunk again"
    )
    reindex.add_argument(
        "--check", action="store_true", help="then compare the index with a recount (slow)"
    )
    reindex.add_argument("--batch", type=int, default=500, help="chunks per transaction")
    reindex.set_defaults(handler=cmd_reindex_text)
    group = subparsers.add_parser(
        "group-index",
        help="list access groups, or build a partial HNSW index for small ones (faster search"
        " for their members)",
    )
    group.add_argument("groups", nargs="*", metavar="GROUP", help="groups to build an index for")
    group.add_argument("--drop", action="store_true", help="drop the GROUPs' indexes instead")
    group.add_argument(
        "--rebuild",
        action="store_true",
        help="build again every index left invalid or on the old column by a model switch",
    )
    group.set_defaults(handler=cmd_group_index)
    drift = subparsers.add_parser(
        "drift-watch",
        help="run `freshet verify` every FRESHET_VERIFY_EVERY_MIN minutes (freshet up starts it)",
    )
    drift.add_argument("--tag", default="", help=argparse.SUPPRESS)
    drift.set_defaults(handler=cmd_drift_watch)
    change = subparsers.add_parser(
        "reembed",
        help="change the embedding model without downtime, behind a quality gate (resumable)",
    )
    change.add_argument("--model", metavar="PATH_OR_PACKAGE", help="the new embedding model")
    change.add_argument(
        "--queries",
        metavar="FILE",
        help="the gate's query set: JSON Lines of {query, relevant: {key: grade}}"
        " (default: SciFact train over app.scifact)",
    )
    change.add_argument(
        "--table", help="with --queries: the table its judged documents are rows of"
    )
    change.add_argument(
        "--match",
        default="doc_key",
        help="with --queries: what a judgement's key is: doc_key (default) or metadata:NAME",
    )
    change.add_argument(
        "--force", action="store_true", help="switch even if the gate refuses the new model"
    )
    change.add_argument("--abort", action="store_true", help="drop the shadow embedding")
    change.add_argument(
        "--drop-previous",
        action="store_true",
        help="drop the vectors of the model switched away from",
    )
    change.add_argument("--status", action="store_true", help="show the index's model and shadow")
    change.add_argument("--json", action="store_true", help="with --status: machine-readable")
    change.set_defaults(handler=cmd_reembed)
    publish = subparsers.add_parser(
        "publish-chunks",
        help="publish every indexed document with its chunks and embeddings to freshet.chunks",
    )
    publish.add_argument("--batch", type=int, default=200, help="documents per round")
    publish.set_defaults(handler=cmd_publish_chunks)
    dlq = subparsers.add_parser("dlq", help="list or replay dead letters")
    dlq.set_defaults(handler=cmd_dlq)
    dlq_sub = dlq.add_subparsers(dest="action", required=True, metavar="ACTION")
    dlq_list = dlq_sub.add_parser("list", help="dead letters not yet resolved")
    dlq_list.add_argument("--all", action="store_true", help="include resolved ones")
    dlq_list.add_argument("--limit", type=int, default=100)
    dlq_list.add_argument("--json", action="store_true")
    dlq_replay = dlq_sub.add_parser("replay", help="re-run dead letters through the current code")
    dlq_replay.add_argument("ids", nargs="*", type=int, metavar="ID", help="default: all")
