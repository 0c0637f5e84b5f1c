"""The `freshet verify [--table T] [--repair] [--json]` command: connections, progress, output.

Exit code 0 only when the index equals the source (after a repair: once the repaired rows
arrived); 1 when differences remain.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from freshet.db import connect, database_url, source_database_url
from freshet.settings import Settings
from freshet.sync import repair
from freshet.sync.chunking import TokenChunker
from freshet.sync.mapping import Mappings
from freshet.sync.verify import KINDS, Report, recheck, save, verify

logger = logging.getLogger(__name__)

# Seconds without a repaired row arriving after which `--repair` stops waiting.
STALL = 60.0


def _progress(enabled: bool) -> Callable[[int], Callable[[int], None]] | None:
    """A progress bar with ETA per table on a terminal; nothing otherwise."""
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    def start(total: int) -> Callable[[int], None]:
        bar = tqdm(total=total, unit="row", desc="verifying", leave=False)

        def tick(n: int) -> None:
            bar.update(n)
            if bar.n >= total:
                bar.close()

        return tick

    return start


def chunker_for(settings: Settings) -> TokenChunker:
    """The sync worker's chunker: the index's model's tokenizer, without loading the model."""
    from transformers import AutoTokenizer

    from freshet import index_model
    from freshet.embedder import resolve_model_path

    state = index_model.current(settings)
    path = resolve_model_path(state.active(settings) if state else settings.embedding_model)
    return TokenChunker(AutoTokenizer.from_pretrained(str(path), local_files_only=True))


def render(report: Report) -> str:
    lines = []
    for name, table in report.tables.items():
        counts = ", ".join(f"{k} {table.count(k)}" for k in KINDS)
        lines.append(f"{name}: {table.rows} rows, {table.documents} documents: {counts}")
        if table.mapping_columns_missing:
            lines.append(
                f"  mapping does not fit: the table has no column(s) "
                f"{', '.join(table.mapping_columns_missing)}"
            )
        for kind in KINDS:
            found = table.found[kind]
            if found:
                first = list(found.items())[:5]
                shown = "; ".join(f"{key} ({detail})" for key, detail in first)
                more = f" and {len(found) - len(first)} more" if len(found) > len(first) else ""
                lines.append(f"  {kind}: {shown}{more}")
    verdict = "index equals the source" if report.in_sync else "index differs from the source"
    lines.append(f"verify: {report.rows_checked} rows checked: {verdict}")
    if report.repair:
        lines.append(
            f"repair: {report.repair['resnapshot']} rows re-snapshotted, "
            f"{report.repair['orphans_removed']} orphans removed, "
            f"converged: {report.repair['converged']} in {report.repair['seconds']:.1f}s"
        )
    return "\n".join(lines)


@contextmanager
def databases(settings: Settings) -> Iterator[tuple[Any, Any]]:
    """The source and the index, autocommit."""
    with (
        connect(source_database_url(settings), autocommit=True) as source,
        connect(database_url(settings), autocommit=True) as index,
    ):
        yield source, index


def compare(
    settings: Settings,
    source: Any,
    index: Any,
    chunker: Any,
    *,
    tables: list[str] | None = None,
    settle: float,
    progress: Callable[[int], Callable[[int], None]] | None = None,
) -> Report:
    """One verify with the settings' mappings, page size and rate limit."""
    return verify(
        source,
        index,
        Mappings.load(settings.mappings_path),
        chunker,
        tables=tables,
        page=settings.verify_page,
        rows_per_sec=settings.verify_rows_per_sec,
        settle=settle,
        progress=progress,
    )


def run_verify(settings: Settings, args: argparse.Namespace) -> int:
    mappings = Mappings.load(settings.mappings_path)
    chunker = chunker_for(settings)
    with databases(settings) as (source, index):
        report = compare(
            settings,
            source,
            index,
            chunker,
            tables=args.table,
            settle=args.settle,
            progress=_progress(not args.json),
        )
        if args.repair and not report.in_sync:
            report.repair = _repair(source, index, mappings, chunker, report, args.wait)
        save(index, report)
    if args.json:
        print(json.dumps(report.as_json(), indent=2, default=str))
    else:
        print(render(report))
    return 0 if report.in_sync else 1


def _repair(
    source: Any, index: Any, mappings: Mappings, chunker: TokenChunker, report: Report, wait: float
) -> dict[str, Any]:
    """Request the fixes, then re-check the repaired rows until they match or ``wait`` ends."""
    started = time.monotonic()
    requested = removed = 0
    signals: list[str] = []
    for name, table in report.tables.items():
        mapping = mappings.tables[name]
        count, ids = repair.resnapshot(source, mapping, table)
        requested += count
        signals.extend(ids)
        removed += repair.remove_orphans(source, index, mapping, table)
    # Wait while the repaired rows keep arriving; stop once nothing improved for STALL seconds
    # (what is left, an unmappable row say, no snapshot fixes) or at the deadline.
    deadline = started + wait
    remaining = sum(report.counts().values())
    improved_at = time.monotonic()
    while True:
        for name, table in report.tables.items():
            report.tables[name] = recheck(source, index, table, mappings.tables[name], chunker)
        now = sum(report.counts().values())
        if now < remaining:
            remaining, improved_at = now, time.monotonic()
        if report.in_sync or time.monotonic() >= deadline or time.monotonic() - improved_at > STALL:
            break
        time.sleep(1.0)
    if not report.in_sync:
        logger.warning(
            "repair: differences remain after %.0fs; is the connector RUNNING (`freshet status`)?",
            time.monotonic() - started,
        )
    return {
        "resnapshot": requested,
        "orphans_removed": removed,
        "signals": signals,
        "converged": report.in_sync,
        "seconds": round(time.monotonic() - started, 1),
    }
