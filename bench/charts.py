"""Charts of the benchmark results: PNG files drawn with matplotlib from bench/results/*.json.

    .venv/bin/python -m bench.charts [--results DIR] [--out DIR]

Each chart is drawn when its results file exists (a benchmark writes one when it runs):

  freshness.png   source commit -> visible, per phase (edit rate): the share of edits visible
                  within x ms when the file has every edit's latency, else p50/p95/p99/max
                  bars; beside it, the median staleness of streaming against the batch job
                  every 1 and 5 minutes over the same edits, with the embeddings each computed
  freshness_load.png  the same, run with a noisy neighbour (bench.freshness --load)
  recovery.png    a worker killed at 40 edits/s and restarted: seconds from the restart to
                  each milestone, per trial (dynamic / static membership, paced or not)
  query.png       /api/v1/search p50 and p99 per user, per search mode, with the targets
  throughput.png  the pipeline's chunks/s against the raw embedder's on the same chunks

Nothing here needs a service; the figures are the files' own.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from bench.report import RESULTS  # noqa: E402

Chart = Callable[[dict[str, Any], Path], None]


def _load(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _subtitle(data: dict[str, Any]) -> str:
    machine = data.get("machine", {})
    when = str(data.get("finished_at", ""))[:16].replace("T", " ")
    vector = f" ({machine['vector']})" if machine.get("vector") else ""
    return f"{machine.get('cpus', '?')} CPUs{vector}, {when} UTC"


def freshness(data: dict[str, Any], out: Path) -> None:
    phases: dict[str, dict[str, Any]] = data.get("phases", {})
    baseline = phases and all("batch_baseline" in p for p in phases.values())
    fig, axes = plt.subplots(1, 2 if baseline else 1, figsize=(13 if baseline else 8, 4.5))
    ax = axes[0] if baseline else axes
    if all("latencies_ms" in p for p in phases.values()) and phases:
        # The share of edits visible within x ms, per phase (log x: loaded phases reach
        # seconds while calm ones stay in tens of milliseconds).
        for label, phase in phases.items():
            xs = sorted(phase["latencies_ms"])
            if xs:
                ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=label)
        ax.set_xscale("log")
        ax.set_xlabel("source commit -> visible in rag.chunks (ms, log scale)")
        ax.set_ylabel("share of edits visible")
        ax.grid(True, which="both", alpha=0.3)
    else:
        stats = ("p50_ms", "p95_ms", "p99_ms", "max_ms")
        width = 0.8 / max(1, len(phases))
        for i, (label, phase) in enumerate(phases.items()):
            xs = [j + i * width for j in range(len(stats))]
            ax.bar(xs, [phase.get(s, 0) for s in stats], width, label=label)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(stats))], [s[:-3] for s in stats])
        ax.set_ylabel("ms")
    load = data.get("load") or {}
    loaded = ", with a noisy neighbour" if load.get("neighbour") else ""
    ax.set_title(f"Freshness per phase{loaded} ({_subtitle(data)})", fontsize="medium")
    ax.legend(fontsize="small")
    if baseline:
        _against_batch(axes[1], phases)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def _against_batch(ax: Any, phases: dict[str, dict[str, Any]]) -> None:
    """Median staleness per phase: streaming against the batch job every 1 and 5 minutes,
    each bar labelled with the embeddings it computed for the same edits."""
    methods = ["streaming", *next(iter(phases.values()))["batch_baseline"]]
    width = 0.8 / len(methods)
    for j, method in enumerate(methods):
        xs, heights, notes = [], [], []
        for i, phase in enumerate(phases.values()):
            figures = phase if method == "streaming" else phase["batch_baseline"][method]
            xs.append(i + j * width)
            heights.append(figures.get("p50_ms", 0) or 0)
            notes.append(f"{figures.get('embeddings', 0):.0f}")
        bars = ax.bar(xs, heights, width, label=method)
        ax.bar_label(bars, notes, fontsize="x-small", padding=2)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(phases))], list(phases))
    ax.set_yscale("log")
    low, high = ax.get_ylim()
    ax.set_ylim(low, high * 10)  # room for the legend above the bars
    ax.set_ylabel("median staleness (ms, log scale)")
    ax.set_title("Streaming vs a batch job (bar labels: embeddings computed)", fontsize="medium")
    ax.legend(fontsize="small", loc="upper left", ncols=len(methods))


RECOVERY_STEPS = (
    ("process_up_s", "process up"),
    ("partitions_assigned_s", "partitions assigned"),
    ("consuming_s", "first change visible"),
    ("consistent_s", "index equals source"),
)


def recovery(data: dict[str, Any], out: Path) -> None:
    trials: dict[str, dict[str, Any]] = data.get("trials", {})
    fig, ax = plt.subplots(figsize=(8, 4.5))
    height = 0.8 / max(1, len(RECOVERY_STEPS))
    for j, (key, label) in enumerate(RECOVERY_STEPS):
        ys = [i + j * height for i in range(len(trials))]
        values = [t.get(key) or 0.0 for t in trials.values()]
        ax.barh(ys, values, height, label=label)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(trials))], list(trials))
    ax.set_xlabel("seconds after the restart")
    ax.axvline(5, color="grey", linestyle=":", label="target: consuming 5 s")
    ax.axvline(15, color="black", linestyle=":", label="target: consistent 15 s")
    ax.set_title(f"Sync worker killed at {data.get('rate', '?')} edits/s ({_subtitle(data)})")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def query(runs: dict[str, dict[str, Any]], out: Path) -> None:
    """``runs``: mode -> the results of `bench.query --mode MODE`."""
    fig, axes = plt.subplots(1, len(runs), figsize=(4 * len(runs), 4.5), squeeze=False)
    for ax, (mode, data) in zip(axes[0], runs.items(), strict=True):
        users: dict[str, dict[str, Any]] = data.get("users", {})
        names = list(users)
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], [users[n]["p50_ms"] for n in names], 0.4, label="p50")
        ax.bar([x + 0.2 for x in xs], [users[n]["p99_ms"] for n in names], 0.4, label="p99")
        for target, value in data.get("targets", {}).items():
            if target.endswith("_ms"):
                ax.axhline(value, linestyle=":", color="grey")
                ax.annotate(f"target {target[:-3]}", (len(names) - 0.6, value), fontsize="small")
        ax.set_xticks(list(xs), names)
        ax.set_ylabel("ms over HTTP")
        ax.set_title(f"{mode}, {data.get('chunks', '?'):,} chunks")
        ax.legend(fontsize="small")
    fig.suptitle("Search latency per user")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def throughput(data: dict[str, Any], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = ["pipeline", "raw embedder"]
    values = [data.get("pipeline_chunks_per_s", 0.0), data.get("raw_chunks_per_s", 0.0)]
    ax.bar(labels, values, color=["tab:blue", "tab:grey"])
    ax.set_ylabel("chunks per second")
    # Two lines: the subtitle (machine, time) does not fit beside the ratio in 6 inches.
    ax.set_title(
        f"Sync throughput: ratio {data.get('ratio', 0):.3f}\n({_subtitle(data)})",
        fontsize="medium",
    )
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def draw(results: Path = RESULTS, out: Path | None = None) -> list[Path]:
    """Every chart whose results exist; returns the files written."""
    out = out or results / "charts"
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    single: dict[str, Chart] = {
        "freshness": freshness,
        "freshness_load": freshness,
        "recovery": recovery,
        "sync_throughput": throughput,
    }
    for name, chart in single.items():
        data = _load(results / f"{name}.json")
        if data is not None:
            target = out / f"{name.removeprefix('sync_')}.png"
            chart(data, target)
            written.append(target)
    runs = {
        mode: data
        for mode in ("dense", "text", "hybrid")
        if (data := _load(results / f"query_{mode}.json")) is not None
    }
    if runs:
        query(runs, out / "query.png")
        written.append(out / "query.png")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    for path in draw(args.results, args.out):
        print(f"chart written to {path}")


if __name__ == "__main__":
    main()
