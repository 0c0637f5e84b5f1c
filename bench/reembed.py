"""A model change under live traffic: `freshet reembed` on SciFact while rows are edited at 5/s.

    .venv/bin/python -m bench.reembed [--docs 3000] [--seconds 60]

A private stack with one `freshet sync` process. The SciFact documents that the train split
judges, and others up to --docs, go into app.scifact: the gate's default query set (SciFact
train over app.scifact) applies. bench.freshness's 20 multi-paragraph rows get one-paragraph
edits at 5/s, measured as there (commit to visible in rag.chunks):

1. for --seconds before any model change: the baseline, in the same run;
2. for --seconds while `freshet reembed --model <rotated>` backfills at its defaults
   (FRESHET_REEMBED_RATE 50 chunks/s, one thread); the sync worker writes both vectors then.
   ``rotated`` is the bundled transformer with an orthonormal Dense layer into 512 dimensions
   (bench/model_variants.py): other vectors, the same similarities, so the gate must pass it;
3. the re-embed's wall time and the gate's figures (nDCG@10 of both models), then the switch;
4. `freshet reembed --model <perturbed>` (noisy weights) on the same index: the gate's figures,
   and its refusal.

Writes bench/results/reembed.json.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.batch_baseline import Edit
from bench.common import (
    SCIFACT,
    Bench,
    count_documents,
    load_scifact,
    print_table,
    private_stack,
    scifact_corpus,
    sync_process,
    wait_until,
    write_results,
)
from bench.freshness import FIRST_ID, PARAGRAPHS, ROWS, Reader, run_phase, summary
from bench.model_variants import perturbed, rotated
from freshet import index_model
from freshet.cdc.demo import create_demo_schema
from freshet.db import connect, database_url, source_database_url
from freshet.settings import PROJECT_ROOT, Settings
from freshet.sync.reembed import drop_previous

GATE = re.compile(r"nDCG@10 (current|new) model\s+\S+: ([0-9.]+)")


def corpus(limit: int) -> list[dict[str, str]]:
    """The documents the train split judges first, then others up to ``limit``."""
    judged = set()
    with (SCIFACT / "qrels" / "train.tsv").open() as handle:
        next(handle)
        for line in handle:
            judged.add(line.split("\t")[1])
    docs = scifact_corpus()
    first = [d for d in docs if d["_id"] in judged]
    rest = [d for d in docs if d["_id"] not in judged]
    return (first + rest)[: max(limit, len(first))]


def state(settings: Settings) -> index_model.IndexModel:
    with connect(database_url(settings), autocommit=True) as conn:
        return index_model.read(conn)


def reembed(env: dict[str, str], model: Path, log: Path) -> subprocess.Popen[str]:
    with log.open("w") as out:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "freshet.cli", "reembed", "--model", str(model)],
            env={**env, "PYTHONWARNINGS": "ignore"},
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=PROJECT_ROOT,
        )


def gate_figures(log: Path) -> dict[str, float]:
    return {which: float(value) for which, value in GATE.findall(log.read_text())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=3000, help="SciFact documents to index")
    parser.add_argument("--seconds", type=float, default=60, help="each freshness phase")
    parser.add_argument(
        "--no-perturbed", action="store_true", help="skip step 4 (the refused model's run)"
    )
    args = parser.parse_args()
    docs = corpus(args.docs)
    abstracts = [d["text"] for d in scifact_corpus(ROWS * PARAGRAPHS * 3)]
    paragraphs = [abstracts[i * PARAGRAPHS : (i + 1) * PARAGRAPHS] for i in range(ROWS)]
    models = Path(tempfile.mkdtemp(prefix="freshet-models-"))
    good, worse = rotated(models / "rotated"), perturbed(models / "perturbed")
    results: dict[str, Any] = {"docs": len(docs), "seconds": args.seconds}
    with private_stack("bench-reembed") as bench:
        settings = bench.settings
        with connect(source_database_url(settings), autocommit=True) as conn:
            create_demo_schema(conn)
            for i in range(ROWS):
                conn.execute(
                    "INSERT INTO app.articles (id, title, body) VALUES (%s, %s, %s)",
                    (FIRST_ID + i, f"Freshness row {i}", "\n\n".join(paragraphs[i])),
                )
        load_scifact(settings, docs)
        with sync_process(bench, "bench-reembed-worker"):
            started = time.monotonic()
            print(f"indexing {len(docs):,} SciFact documents ...", flush=True)
            if not wait_until(lambda: count_documents(settings, "app.scifact") >= len(docs), 3600):
                raise SystemExit("the corpus was not indexed; see the worker's log")
            results["index_seconds"] = round(time.monotonic() - started, 1)
            with connect(database_url(settings), autocommit=True) as conn:
                row = conn.execute("SELECT count(*) FROM rag.chunks").fetchone()
                results["chunks"] = int(row[0]) if row else 0
            reader = Reader(settings)
            reader.start()
            current = [list(p) for p in paragraphs]
            edits: list[Edit] = []
            try:
                print(f"edits at 5/s for {args.seconds:.0f}s, no model change ...", flush=True)
                base = run_phase(
                    settings, reader, current, 5.0, args.seconds, False, abstracts, "base", edits
                )
                results["freshness_before"] = summary(base)
                results["freshness_before"]["loadavg_1m"] = os.getloadavg()[0]
                log = settings.logs_dir / "reembed-rotated.log"
                started = time.monotonic()
                run = reembed(bench.env, good, log)
                if not wait_until(lambda: state(settings).building is not None, 300, 0.2):
                    raise SystemExit(f"the re-embed did not start; see {log}")
                print(f"edits at 5/s for {args.seconds:.0f}s during the re-embed ...", flush=True)
                during = run_phase(
                    settings, reader, current, 5.0, args.seconds, False, abstracts, "during", edits
                )
                results["freshness_during"] = summary(during)
                results["freshness_during"]["loadavg_1m"] = os.getloadavg()[0]
                results["freshness_during"]["backfill_still_running"] = run.poll() is None
            finally:
                reader.stop.set()
            rc = run.wait(timeout=7200)
            results["rotated"] = {
                "returncode": rc,
                "seconds": round(time.monotonic() - started, 1),
                "gate": gate_figures(log),
                "switched": state(settings).model == str(good),
            }
            if args.no_perturbed:
                results["perturbed"] = None
            else:
                results["perturbed"] = run_perturbed(bench, worse)
    _report(results, len(docs))


def run_perturbed(bench: Bench, worse: Path) -> dict[str, Any]:
    """Step 4: the previous vectors dropped, a re-embed to the noisy model; the gate's verdict."""
    settings = bench.settings
    print("the perturbed model ...", flush=True)
    with connect(database_url(settings), autocommit=True) as conn:
        drop_previous(conn)
    log = settings.logs_dir / "reembed-perturbed.log"
    started = time.monotonic()
    rc = reembed(bench.env, worse, log).wait(timeout=7200)
    after = state(settings)
    return {
        "returncode": rc,
        "seconds": round(time.monotonic() - started, 1),
        "gate": gate_figures(log),
        "refused": after.shadow_state == "refused" and after.model is not None,
    }


def _report(results: dict[str, Any], docs: int) -> None:
    for phase in ("freshness_before", "freshness_during"):
        results[phase].pop("latencies_ms", None)
    rows = [
        ("indexed", f"{docs:,} SciFact documents, {results['chunks']:,} chunks"),
        *[
            (
                f"edits 5/s {phase.split('_')[1]} the re-embed",
                f"n={s['count']} p50 {s['p50_ms']:.1f} ms p99 {s['p99_ms']:.1f} ms"
                f" max {s['max_ms']:.1f} ms (load {s['loadavg_1m']:.2f})",
            )
            for phase, s in (
                ("freshness_before", results["freshness_before"]),
                ("freshness_during", results["freshness_during"]),
            )
        ],
    ]
    for name in ("rotated", "perturbed"):
        r = results[name]
        if r is None:
            continue
        gate = r["gate"]
        rows.append(
            (
                f"reembed {name}",
                f"exit {r['returncode']} in {r['seconds']:.0f}s; nDCG@10 current"
                f" {gate.get('current', float('nan')):.4f} new {gate.get('new', float('nan')):.4f}",
            )
        )
    print_table("Model change under live edits (SciFact train gate)", rows)
    write_results("reembed", results)


if __name__ == "__main__":
    main()
