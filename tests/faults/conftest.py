"""The fault suite's stack, workload and bookkeeping.

One private stack for the whole suite, started by the project's own launcher exactly as a user
starts it (`freshet up`: PostgreSQL, Kafka, Connect, Debezium, a background sync worker and the
supervisor). Each test runs a steady mixed workload against the captured tables, injects one
fault while it runs, stops the workload, and waits (bounded) until the index equals the source,
with no manual step. The counts of every fault go to RELIABILITY.md at the end of the session.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from freshet.cdc import stack
from freshet.db import connect, database_url, source_database_url
from freshet.settings import PROJECT_ROOT, Settings
from freshet.sync.mapping import Mappings
from freshet.sync.verify import KINDS, verify
from freshet.sync.verify_cli import chunker_for
from tests.conftest import freshet, wait_for

RELIABILITY = PROJECT_ROOT / "RELIABILITY.md"
# Keys the workload owns; the demo rows (ids below 1000) are edited too, never deleted.
WORKLOAD_IDS = range(800_000, 800_400)
CONVERGE_TIMEOUT = 420.0


@pytest.fixture(scope="session")
def fault_env(make_stack_env: Callable[[str], dict[str, str]]) -> dict[str, str]:
    env = make_stack_env("faults")
    # As a user runs it: a background sync worker, and the supervisor that restarts it.
    env.update(FRESHET_START_SYNC="true", FRESHET_SUPERVISE="true")
    # A third of the demo (30 rows per table): the faults need a table of some size, not the
    # minutes of embedding the whole demo takes on 2 cores; the workload adds its own rows.
    env.update(FRESHET_DEMO_ROWS="30")
    return env


@pytest.fixture(scope="session")
def fault_stack(fault_env: dict[str, str]) -> Iterator[Settings]:
    settings = Settings.from_env(fault_env)
    result = freshet(fault_env, "up")
    try:
        assert result.returncode == 0, result.stdout + result.stderr
        wait_converged(settings, timeout=CONVERGE_TIMEOUT)  # the initial snapshot is indexed
        yield settings
    finally:
        stack.down(settings)


# --- the workload --------------------------------------------------------------------------
PARAGRAPHS = [
    "Freshet keeps an index equal to its source while {w} changes all day.",
    "Operators edit the {w} paragraph and expect answers to follow within seconds.",
    "A committee reviews the {w} record before it is published to every reader.",
    "Nothing a record contains should stop the partition that carries the {w}.",
]
WORDS = ["river", "glacier", "ledger", "harbor", "meadow", "lantern", "quarry", "orchard"]


@dataclass
class Workload:
    """Inserts, body edits, title-only and groups-only updates, deletes, re-inserts and
    multi-row transactions at about ``rate`` operations per second, on app.articles and
    app.module_docs, until stopped. A source outage is waited out (the source is a service
    too); the ops that failed are counted apart."""

    settings: Settings
    rate: float = 5.0
    seed: int = 7
    ops: int = 0
    failed: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @contextmanager
    def running(self) -> Iterator[Workload]:
        self.ops = self.failed = 0
        self.counts = {}
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="workload", daemon=True)
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(timeout=60)

    def _run(self) -> None:
        rng = random.Random(self.seed + int(time.time()))
        conn: psycopg.Connection | None = None
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                if conn is None or conn.closed:
                    conn = connect(source_database_url(self.settings), autocommit=True)
                kind = self._one(conn, rng)
                self.ops += 1
                self.counts[kind] = self.counts.get(kind, 0) + 1
            except psycopg.Error:
                self.failed += 1
                if conn is not None:
                    conn.close()
                conn = None
                self._stop.wait(1.0)
            self._stop.wait(max(0.0, 1 / self.rate - (time.monotonic() - started)))
        if conn is not None:
            conn.close()

    @staticmethod
    def _body(rng: random.Random) -> str:
        return "\n\n".join(
            rng.choice(PARAGRAPHS).format(w=rng.choice(WORDS)) + f" ({rng.randrange(10**6)})"
            for _ in range(rng.randint(1, 3))
        )

    def _one(self, conn: psycopg.Connection, rng: random.Random) -> str:
        kind = rng.choices(
            ["insert", "body", "title", "groups", "delete", "multi", "module"],
            weights=[3, 4, 2, 2, 2, 1, 2],
        )[0]
        wid = rng.choice(WORKLOAD_IDS)
        if kind == "insert":
            conn.execute(
                "INSERT INTO app.articles (id, title, body, access_groups) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT (id) DO UPDATE SET body = EXCLUDED.body",
                (wid, f"Workload {wid}", self._body(rng), rng.choice([[], ["staff"]])),
            )
        elif kind == "body":
            target = rng.choice([wid, rng.randint(1, 79)])
            conn.execute(
                "UPDATE app.articles SET body = regexp_replace(body, '^[^\\n]*', %s) WHERE id = %s",
                (self._body(rng).split("\n\n")[0], target),
            )
        elif kind == "title":
            conn.execute(
                "UPDATE app.articles SET title = %s WHERE id = %s",
                (f"Title {rng.randrange(10**6)}", rng.choice([wid, rng.randint(1, 79)])),
            )
        elif kind == "groups":
            conn.execute(
                "UPDATE app.articles SET access_groups = %s WHERE id = %s",
                (rng.choice([[], ["staff"], ["support"]]), rng.choice([wid, rng.randint(1, 79)])),
            )
        elif kind == "delete":
            conn.execute("DELETE FROM app.articles WHERE id = %s", (wid,))
        elif kind == "multi":
            with conn.transaction():
                for other in rng.sample(WORKLOAD_IDS, 3):
                    conn.execute(
                        "INSERT INTO app.articles (id, title, body) VALUES (%s, %s, %s)"
                        " ON CONFLICT (id) DO UPDATE SET title = EXCLUDED.title",
                        (other, f"Multi {other} {rng.randrange(1000)}", self._body(rng)),
                    )
                conn.execute("DELETE FROM app.articles WHERE id = %s", (rng.choice(WORKLOAD_IDS),))
        else:
            conn.execute(
                "UPDATE app.module_docs SET summary = %s WHERE name = "
                "(SELECT name FROM app.module_docs ORDER BY random() LIMIT 1)",
                (f"Summary {rng.randrange(10**6)}",),
            )
        return kind


@pytest.fixture(scope="session")
def workload(fault_stack: Settings) -> Workload:
    return Workload(fault_stack)


# --- convergence ---------------------------------------------------------------------------
_chunkers: dict[str, Any] = {}


def check(settings: Settings) -> Any:
    """One verify of the whole index (no settling), in process."""
    chunker = _chunkers.setdefault("chunker", chunker_for(settings))
    with (
        connect(source_database_url(settings), autocommit=True) as source,
        connect(database_url(settings), autocommit=True) as index,
    ):
        return verify(source, index, Mappings.load(settings.mappings_path), chunker, settle=0)


@dataclass
class Outcome:
    seconds: float
    at_stop: dict[str, int]
    final: dict[str, Any]

    @property
    def in_sync(self) -> bool:
        return bool(self.final.get("in_sync"))


def wait_converged(settings: Settings, timeout: float = CONVERGE_TIMEOUT) -> Outcome:
    """Until the index equals the source (checked every 2 s, bounded), then once more with
    the real `freshet verify --json`, as a user runs it."""
    started = time.monotonic()
    first: dict[str, int] | None = None
    while True:
        report = check(settings)
        if first is None:
            first = report.counts()
        if report.in_sync or time.monotonic() - started > timeout:
            break
        time.sleep(2)
    seconds = time.monotonic() - started
    env = {**os.environ, **settings_env(settings)}
    result = freshet(env, "verify", "--json", "--settle", "5")
    try:
        final = json.loads(result.stdout)
    except ValueError:
        final = {"in_sync": False, "error": result.stdout[-2000:] + result.stderr[-2000:]}
    final["exit_code"] = result.returncode
    return Outcome(seconds, first or {}, final)


_envs: dict[str, dict[str, str]] = {}


def settings_env(settings: Settings) -> dict[str, str]:
    return _envs[str(settings.home)]


@pytest.fixture(scope="session", autouse=True)
def _remember_env(fault_env: dict[str, str]) -> None:
    _envs[fault_env["FRESHET_HOME"]] = fault_env


# --- results -------------------------------------------------------------------------------
@dataclass
class Result:
    fault: str
    ops: int
    outcome: Outcome | None
    note: str = ""
    passed: bool = False


RESULTS: list[Result] = []


@dataclass
class FaultRun:
    """One fault of the suite: the workload around it, notes, and the convergence after."""

    workload: Workload
    name: str = ""
    notes: list[str] = field(default_factory=list)
    outcome: Outcome | None = None

    @contextmanager
    def during(self, name: str) -> Iterator[None]:
        self.name = name
        with self.workload.running():
            time.sleep(3)  # the workload is under way when the fault hits
            yield
            time.sleep(3)
        self.outcome = wait_converged(self.workload.settings)
        assert self.outcome.in_sync, f"{name}: the index differs: {self.outcome.final}"
        assert self.outcome.final["exit_code"] == 0

    def note(self, text: str) -> None:
        self.notes.append(text)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture
def run(request: pytest.FixtureRequest, workload: Workload) -> Iterator[FaultRun]:
    """The fault of this test; its result goes to RELIABILITY.md whether it passed or not."""
    fault = FaultRun(workload)
    yield fault
    report = getattr(request.node, "report_call", None)
    passed = bool(report is not None and report.passed and fault.outcome is not None)
    RESULTS.append(
        Result(
            fault.name or request.node.name,
            workload.ops,
            fault.outcome,
            "; ".join(fault.notes),
            passed,
        )
    )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if RESULTS:
        RELIABILITY.write_text(render_reliability(RESULTS))


def render_reliability(results: list[Result]) -> str:
    lines = [
        "# Reliability: faults the pipeline survives",
        "",
        "Written by the fault suite (`make test-faults`, part of CI) on "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, load average {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} cores. Each fault ran during a steady mixed workload (~5 ops/s:",
        "inserts, body edits, title-only and groups-only updates, deletes, re-inserts, multi-row",
        "transactions, on app.articles and app.module_docs). After the fault the workload",
        "stopped and the suite waited, with no manual step, until `freshet verify` found the",
        "index equal to the source. *At stop*: what verify found the moment the workload",
        "stopped; *after*: the final `freshet verify --json`. Converge time counts from the",
        "workload's stop.",
        "",
        "| fault | result | ops | rows checked | at stop (missing/stale/acl/orphaned/dup)"
        " | after: missing | stale | orphaned | duplicated | acl | converged in | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.outcome is None:
            lines.append(f"| {r.fault} | FAILING | {r.ops} | | | | | | | | | {r.note} |")
            continue
        first = r.outcome.at_stop
        counts = r.outcome.final.get("counts") or {}
        at_stop = "/".join(
            str(first.get(k, 0)) for k in ("missing", "stale", "acl", "orphaned", "duplicated")
        )
        after = " | ".join(
            str(counts.get(k, "?")) for k in ("missing", "stale", "orphaned", "duplicated", "acl")
        )
        lines.append(
            f"| {r.fault} | {'passes' if r.passed else 'FAILING'} | {r.ops} | "
            f"{r.outcome.final.get('rows_checked', '?')} | {at_stop} | {after} | "
            f"{r.outcome.seconds:.1f} s | {r.note} |"
        )
    other = [k for k in KINDS if k not in ("missing", "stale", "orphaned", "duplicated", "acl")]
    lines += [
        "",
        f"Verify also counts {', '.join(other)} rows; they were 0 after every passing fault.",
        "Reproduce: `make test-faults` (about 13 minutes on 2 cores).",
        "",
    ]
    return "\n".join(lines)


# --- processes -----------------------------------------------------------------------------
def kill9(pid: int | None) -> None:
    assert pid is not None, "the process to kill is not running"
    os.kill(pid, signal.SIGKILL)


def wait_until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """``wait_for`` that fails the test, naming ``what`` did not happen."""
    value = wait_for(check, timeout, interval=0.5)
    if not value:
        raise AssertionError(f"{what} not within {timeout:.0f}s")
    return value


def source_conn(settings: Settings) -> psycopg.Connection:
    return connect(source_database_url(settings), autocommit=True)


def index_conn(settings: Settings) -> psycopg.Connection:
    return connect(database_url(settings), autocommit=True)


def home(settings: Settings) -> Path:
    return Path(settings.home)
