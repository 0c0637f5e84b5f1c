"""Shared pieces of the benchmarks: a private stack, its processes, the SciFact corpus; result
tables come from bench.report (re-exported here)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

from bench.report import RESULTS, SCIFACT, print_table, scifact_corpus, write_results
from freshet.cdc import stack
from freshet.cdc.sandbox import private_home, sandbox_env
from freshet.db import connect, database_url, source_database_url
from freshet.settings import PROJECT_ROOT, Settings

__all__ = ["RESULTS", "SCIFACT", "print_table", "scifact_corpus", "write_results"]

MAPPINGS = PROJECT_ROOT / "bench" / "mappings.toml"


@dataclass(frozen=True)
class Bench:
    settings: Settings
    env: dict[str, str]


@contextmanager
def private_stack(tag: str, keep: Path | None = None, **overrides: str) -> Iterator[Bench]:
    """The real stack (launcher) in a private home on free ports; stopped and removed after,
    unless `keep` names a home to reuse between runs."""
    home = keep or private_home(tag)
    home.mkdir(parents=True, exist_ok=True)
    home.chmod(0o755)
    defaults = {
        "FRESHET_START_SYNC": "false",
        "FRESHET_START_WEB": "false",
        "FRESHET_START_WORKFLOW": "false",
        "FRESHET_LOAD_DEMO": "false",
        "FRESHET_MAPPINGS": str(MAPPINGS),
    }
    env = sandbox_env(home, **{**defaults, **overrides})
    if keep is not None and (home / "ports.json").exists():
        env.update(json.loads((home / "ports.json").read_text()))
    (home / "ports.json").write_text(
        json.dumps({k: v for k, v in env.items() if k.endswith("_PORT")})
    )
    settings = Settings.from_env(env)
    print(f"starting a private stack in {home} ...", flush=True)

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(f"benchmark stopped by signal {signum}")

    # A benchmark stopped with SIGTERM (a timeout, kill) still stops its stack below.
    signal.signal(signal.SIGTERM, stop)
    try:
        stack.up(settings)
        yield Bench(settings, env)
    finally:
        stack.down(settings)
        keep_logs(home, tag)
        if keep is None:
            shutil.rmtree(home, ignore_errors=True)


def keep_logs(home: Path, tag: str) -> None:
    """BENCH_KEEP_LOGS=DIR: copy the private stack's logs (the worker's, Kafka's, Connect's)
    to DIR/<tag>-<time>/ before the home is removed, to find where a run's tail came from."""
    target = os.environ.get("BENCH_KEEP_LOGS")
    if not target or not (home / "logs").is_dir():
        return
    kept = Path(target) / f"{tag}-{time.strftime('%Y%m%d-%H%M%S')}"
    shutil.copytree(home / "logs", kept, dirs_exist_ok=True)
    print(f"logs kept in {kept}", flush=True)


def load_scifact(settings: Settings, docs: list[dict[str, str]]) -> None:
    """Create app.scifact and COPY the corpus into it (captured by Debezium like any table)."""
    with connect(source_database_url(settings), autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS app.scifact (id bigint PRIMARY KEY, corpus_id text"
            " NOT NULL, title text NOT NULL, abstract text NOT NULL)"
        )
        conn.execute("TRUNCATE app.scifact")
        with (
            conn.cursor() as cur,
            cur.copy("COPY app.scifact (id, corpus_id, title, abstract) FROM STDIN") as copy,
        ):
            for i, doc in enumerate(docs, start=1):
                copy.write_row((i, doc["_id"], doc["title"], doc["text"]))


def count_documents(settings: Settings, table: str) -> int:
    with connect(database_url(settings), autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM rag.documents WHERE source_table = %s AND deleted_at IS NULL",
            (table,),
        ).fetchone()
    return int(row[0]) if row else 0


def wait_until(check: Callable[[], bool], timeout: float, interval: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return False


def peak_rss_mib(pid: int) -> float | None:
    """VmHWM: the process's peak resident set size."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


@contextmanager
def freshet_process(bench: Bench, command: str, name: str) -> Iterator[subprocess.Popen[bytes]]:
    """One `freshet <command>` process for the private stack, stopped with SIGTERM afterwards."""
    log = bench.settings.logs_dir / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    # BENCH_VERBOSE=1: the process logs debug details (where each sync batch's time went).
    verbose = ["-v"] if os.environ.get("BENCH_VERBOSE") else []
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "freshet.cli", *verbose, command],
            env={**bench.env, "PYTHONWARNINGS": "ignore"},
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=PROJECT_ROOT,
        )
    print(f"freshet {command}: pid {process.pid}, log {log}", flush=True)
    try:
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)


def sync_process(bench: Bench, name: str) -> AbstractContextManager[subprocess.Popen[bytes]]:
    """One `freshet sync` worker for the private stack."""
    return freshet_process(bench, "sync", name)


@contextmanager
def web_process(bench: Bench, name: str, timeout: float = 180.0) -> Iterator[str]:
    """`freshet web` for the private stack, served as in production; yields its base URL once
    /api/v1/health answers."""
    url = bench.settings.web_url
    with freshet_process(bench, "web", name) as process:

        def healthy() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"freshet web exited with {process.returncode}; see its log")
            try:
                return requests.get(f"{url}api/v1/health", timeout=2).status_code == 200
            except requests.RequestException:
                return False

        if not wait_until(healthy, timeout):
            raise RuntimeError(f"freshet web did not answer on {url} in {timeout:.0f}s")
        yield url
