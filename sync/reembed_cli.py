"""`freshet reembed`: change the index's embedding model behind a quality gate (sync/reembed.py).

freshet reembed --model PATH_OR_PACKAGE [--queries FILE --table T --match KEY] [--force]
freshet reembed --status | --abort | --drop-previous
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from freshet import group_indexes
from freshet.commands import install_stop_handlers, say
from freshet.settings import Settings

if TYPE_CHECKING:
    import psycopg

    from freshet.embedder import Embedder
    from freshet.sync.model_gate import QuerySet
    from freshet.sync.reembed import GateReport


def run_reembed(settings: Settings, args: argparse.Namespace) -> int:
    from psycopg.errors import LockNotAvailable

    from freshet.db import connect, database_url
    from freshet.index_model import read
    from freshet.sync import reembed

    with connect(database_url(settings), autocommit=True, vector=True) as conn:
        if args.abort:
            dropped = reembed.abort(conn)
            say(f"dropped the shadow of {dropped}" if dropped else "no re-embed to abort")
            return 0
        if args.drop_previous:
            dropped = reembed.drop_previous(conn)
            say(f"dropped the vectors of {dropped}" if dropped else "no previous embedding kept")
            return 0
        if args.status or not args.model:
            state = read(conn)
            if args.json:
                print(json.dumps({**state.__dict__, "active": state.active(settings)}, default=str))
            else:
                for line in reembed.describe(state, settings):
                    print(line)
                if state.shadow_model:
                    print(f"  chunks without a shadow vector: {reembed.missing(conn):,}")
            return 0
        try:
            return _change_model(conn, settings, args)
        except LockNotAvailable as exc:
            raise reembed.ReembedError(
                f"rag.chunks stayed locked for {reembed.LOCK_TIMEOUT} ({exc}); a long transaction"
                " holds it: run the command again once it ends (the work done so far is kept)"
            ) from exc


# The re-embed yields the CPU to the sync worker's live changes (and search) on shared cores.
NICENESS = 10


def _lower_priority() -> None:
    """Before any model or thread exists, so every thread of the process inherits it."""
    import os

    try:
        os.nice(NICENESS)
    except OSError as exc:  # not permitted: run as it is
        say(f"priority left as it is ({exc})")


def _model_name(value: str) -> str:
    """A directory is kept as its absolute path (every process finds it); a package name as is."""
    from freshet.embedder import BUNDLED_MODEL_NAMES, resolve_model_path

    if value in BUNDLED_MODEL_NAMES:
        return value
    return str(resolve_model_path(value))


def _change_model(
    conn: psycopg.Connection[Any], settings: Settings, args: argparse.Namespace
) -> int:
    from freshet.embedder import embedder_from_settings
    from freshet.index_model import read
    from freshet.sync import model_gate, reembed
    from freshet.sync.text_index import progress_bar

    if args.queries and not args.table:
        raise reembed.ReembedError("--queries needs --table: the table its documents are rows of")
    stop = install_stop_handlers()
    _lower_priority()
    name = _model_name(args.model)
    state = read(conn)
    old = state.active(settings)
    try:
        query_set: QuerySet | str = (
            model_gate.from_file(Path(args.queries), args.table, args.match)
            if args.queries
            else model_gate.scifact_train(settings.eval_dir)
        )
    except model_gate.GateError as exc:
        if not args.force:
            raise
        query_set = str(exc)  # --force switches without a gate; the report says why
    # Batches only: a compiled one-text model (~20 s to build for a model not seen before)
    # would serve no call here.
    tuned = settings.with_overrides(
        embed_threads=settings.reembed_threads,
        embed_batch=settings.reembed_batch,
        embed_fast_path="off",
    )
    started = time.monotonic()
    say(f"loading {name} ...")
    new = embedder_from_settings(tuned, model=name)
    say(f"re-embedding the index from {old} to {new.model_path.name} ({new.dim} dimensions)")
    reembed.begin(conn, settings, name, new.dim)
    say("the sync worker writes both models' vectors from its next batch on")
    embedded = reembed.backfill(
        conn,
        new,
        batch=settings.reembed_batch,
        rate=settings.reembed_rate,
        progress=progress_bar("chunks", "re-embedding"),
        stop=stop.is_set,
    )
    if stop.is_set():
        say(f"stopped after {embedded:,} chunks; run the same command again to resume")
        return 1
    say(f"{embedded:,} chunks embedded in {time.monotonic() - started:.0f}s; building the index")
    index_started = time.monotonic()
    reembed.build_index(conn)
    say(f"HNSW index of the new embedding built in {time.monotonic() - index_started:.1f}s")
    report = _gate(conn, settings, query_set, old, name, new, forced=args.force)
    for line in report.lines():
        print(line, flush=True)
    if not report.passed and not args.force:
        reembed.refuse(conn, report)
        say(
            f"kept {old}: the new model was refused. `freshet reembed --model {args.model}"
            " --force` switches anyway; `freshet reembed --abort` drops the shadow"
        )
        return 3
    for _ in range(10):
        result = reembed.switch(conn, settings, name, report)
        if not isinstance(result, int):
            say(
                f"switched the index to {name} (generation {result.generation}) after"
                f" {time.monotonic() - started:.0f}s; the vectors of {old} are kept until"
                " `freshet reembed --drop-previous`"
            )
            rebuilt = time.monotonic()
            for group in group_indexes.stale(conn):  # they followed the renamed column
                group_indexes.build(conn, group)
                say(
                    f"built the index of {group_indexes.describe(group)} on the new vectors"
                    f" in {time.monotonic() - rebuilt:.1f}s"
                )
                rebuilt = time.monotonic()
            if settings.publish_chunks:
                say("run `freshet publish-chunks` to publish every document with the new vectors")
            return 0
        reembed.backfill(conn, new, batch=settings.reembed_batch, rate=0, stop=stop.is_set)
    raise reembed.ReembedError(
        "chunks kept arriving without a shadow vector; run the command again"
    )


def _gate(
    conn: psycopg.Connection[Any],
    settings: Settings,
    query_set: QuerySet | str,
    old_name: str,
    new_name: str,
    new: Embedder,
    *,
    forced: bool,
) -> GateReport:
    from freshet.embedder import embedder_from_settings
    from freshet.index_model import SHADOW_COLUMN
    from freshet.sync import model_gate
    from freshet.sync.reembed import GateReport

    if isinstance(query_set, str):
        return GateReport(
            old_name, new_name, "none", 0, 0, 0, None, None, settings.reembed_max_drop,
            passed=False, forced=forced, reason=f"the gate did not run: {query_set}",
        )  # fmt: skip
    found, total = model_gate.judged_in_index(conn, query_set)
    common: dict[str, Any] = dict(
        old_model=old_name,
        new_model=new_name,
        query_set=query_set.name,
        queries=len(query_set.queries),
        judged_found=found,
        judged_total=total,
        max_drop=settings.reembed_max_drop,
        forced=forced,
    )
    if found == 0:
        return GateReport(
            old_ndcg=None,
            new_ndcg=None,
            passed=False,
            reason=(
                f"none of the query set's judged documents is in the index (table"
                f" {query_set.table}): pass --queries FILE --table T for your data"
            ),
            **common,
        )
    say(f"quality gate: {len(query_set.queries)} queries of {query_set.name}, both models")
    current = embedder_from_settings(
        settings.with_overrides(embed_threads=settings.reembed_threads, embed_fast_path="off"),
        model=old_name,
    )
    old_score = model_gate.evaluate(conn, query_set, current, "embedding")
    new_score = model_gate.evaluate(conn, query_set, new, SHADOW_COLUMN)
    passed = new_score.ndcg >= old_score.ndcg - settings.reembed_max_drop
    return GateReport(
        old_ndcg=round(old_score.ndcg, 4),
        new_ndcg=round(new_score.ndcg, 4),
        passed=passed,
        **common,
    )
