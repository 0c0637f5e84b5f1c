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


# The CPU features that set the embedder's and pgvector's speed: the same code embeds a query in
# about half the time with AVX-512 as with AVX2 only, so a figure says which it ran on.
VECTOR_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def machine(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """What a result ran on: CPU count, platform, and (Linux) the CPU model and which of
    VECTOR_FLAGS it has; ``vector`` sums them up as the widest of AMX, AVX-512 and AVX2."""
    info: dict[str, Any] = {"cpus": os.cpu_count(), "platform": platform.platform()}
    try:
        text = cpuinfo.read_text()
    except OSError:
        return info
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:  # the first processor's entry
            fields[key.strip()] = value.strip()
    flags = set(fields.get("flags", "").split())
    info["cpu_model"] = fields.get("model name", "")
    info["cpu_flags"] = [flag for flag in VECTOR_FLAGS if flag in flags]
    info["vector"] = next(
        (
            name
            for name, flag in (("AMX", "amx_int8"), ("AVX-512", "avx512f"), ("AVX2", "avx2"))
            if flag in flags
        ),
        "none of AVX2, AVX-512, AMX",
    )
    return info


def write_results(name: str, results: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    results = {
        "benchmark": name,
        "finished_at": datetime.now(UTC).isoformat(),
        "machine": machine(),
        **results,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"results written to {path}")
    return path
