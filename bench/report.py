"""Where benchmarks read SciFact and write results, and how they print them: no service needed,
so a benchmark that runs on a bare GPU machine can use it too."""

from __future__ import annotations

import json
import os
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from freshet.settings import PROJECT_ROOT

SCIFACT = PROJECT_ROOT.parent / "shared" / "eval" / "scifact"
RESULTS = PROJECT_ROOT / "bench" / "results"


def scifact_corpus(
    limit: int | None = None, path: Path = SCIFACT / "corpus.jsonl"
) -> list[dict[str, str]]:
    if not path.exists():
        raise SystemExit(f"{path} is missing: the SciFact data lives in ../shared/eval/")
    docs = []
    with path.open() as handle:
        for line in handle:
            docs.append(json.loads(line))
            if limit is not None and len(docs) >= limit:
                break
    return docs


def print_table(title: str, rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"\n{title}")
    print("-" * (width + 30))
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print("-" * (width + 30))


def write_results(name: str, results: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    results = {
        "benchmark": name,
        "finished_at": datetime.now(UTC).isoformat(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        **results,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"results written to {path}")
    return path
