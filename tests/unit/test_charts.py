"""The benchmark charts (bench/charts.py) render from small result files."""

from __future__ import annotations

import json
from pathlib import Path

from bench.charts import draw

PNG = b"\x89PNG\r\n\x1a\n"


def write(folder: Path, name: str, data: dict[str, object]) -> None:
    (folder / f"{name}.json").write_text(json.dumps({"machine": {"cpus": 2}, **data}))


def test_every_chart_is_drawn_from_its_results_file(tmp_path: Path) -> None:
    write(
        tmp_path,
        "freshness",
        {
            "phases": {
                "edit-5/s": {"latencies_ms": [40, 45, 50, 80]},
                "edit-20/s": {"latencies_ms": [60, 90]},
            }
        },
    )
    cron = {"cron-1min": {"p50_ms": 31_000, "embeddings": 140}, "cron-5min": {"p50_ms": 150_000}}
    write(
        tmp_path,
        "freshness_load",
        {
            "load": {"neighbour": "a second process embedding with 1 thread(s)"},
            "phases": {
                "edit-5/s": {
                    "latencies_ms": [40, 45, 50, 80],
                    "p50_ms": 45,
                    "embeddings": 4,
                    "batch_baseline": cron,
                },
                "edit-20/s": {
                    "latencies_ms": [],
                    "p50_ms": 90,
                    "embeddings": 2,
                    "batch_baseline": cron,
                },
            },
        },
    )
    write(
        tmp_path,
        "recovery",
        {
            "rate": 40,
            "trials": {
                "dynamic": {"process_up_s": 6.0, "partitions_assigned_s": 8.1, "consuming_s": None},
                "static": {"process_up_s": 6.0, "partitions_assigned_s": 6.1, "consistent_s": 20},
            },
        },
    )
    write(
        tmp_path,
        "sync_throughput",
        {"pipeline_chunks_per_s": 47.0, "raw_chunks_per_s": 52.8, "ratio": 0.89},
    )
    user = {"p50_ms": 12.0, "p99_ms": 30.0}
    for mode in ("text", "hybrid"):
        write(
            tmp_path,
            f"query_{mode}",
            {"chunks": 100_000, "users": {"staff": user, "admin": user}, "targets": {"p50_ms": 15}},
        )
    written = draw(tmp_path, tmp_path / "charts")
    names = sorted(p.name for p in written)
    assert names == [
        "freshness.png",
        "freshness_load.png",
        "query.png",
        "recovery.png",
        "throughput.png",
    ]
    for path in written:
        assert path.read_bytes()[:8] == PNG and path.stat().st_size > 5_000


def test_a_missing_or_broken_results_file_draws_nothing(tmp_path: Path) -> None:
    (tmp_path / "freshness.json").write_text("{not json")
    write(tmp_path, "freshness_old", {"phases": {"edit-5/s": {"p50_ms": 70, "p99_ms": 120}}})
    assert draw(tmp_path, tmp_path / "charts") == []
    write(tmp_path, "freshness", {"phases": {"edit-5/s": {"p50_ms": 70, "p99_ms": 120}}})
    [bars] = draw(tmp_path, tmp_path / "charts")  # summary figures only: bars
    assert bars.read_bytes()[:8] == PNG
