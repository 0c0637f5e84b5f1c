"""Pure pieces of convergence: mapping drift, verify's comparison, retries, the supervisor's
restart policy, and the embedding gate shared by the two lanes."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest

from freshet.cdc import supervisor
from freshet.cdc.events import UNAVAILABLE, RecordPosition
from freshet.cdc.processes import StackError
from freshet.embedder import Embedder
from freshet.retry import Backoff, Stopped, retry, transient_db_error
from freshet.settings import Settings
from freshet.sync.changes import Change, Kind
from freshet.sync.lane import EmbedGate, Superseded, supersedes
from freshet.sync.mapping import DEFAULT_MAPPINGS, MappingError, Mappings
from freshet.sync.verify import TableReport, _Indexed, compare

ARTICLES = Mappings.load(DEFAULT_MAPPINGS).tables["app.articles"]


def row(**changes: Any) -> dict[str, Any]:
    base = {
        "id": 1,
        "title": "T",
        "body": "B",
        "access_groups": ["staff"],
        "updated_at": "2026-12-01T00:00:00Z",
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not ...}


# --- mapping drift ---------------------------------------------------------------------------
def test_a_missing_metadata_column_is_a_problem_not_a_failure() -> None:
    renamed = row(updated_at=..., modified_at="2026-12-01T00:00:00Z")
    doc = ARTICLES.map_row(renamed)
    assert doc.text == "T\n\nB" and doc.access_groups == ("staff",)
    assert doc.metadata == {}
    assert doc.problems == (("updated_at", "missing"),)


def test_a_missing_text_column_names_the_column() -> None:
    with pytest.raises(MappingError) as err:
        ARTICLES.map_row(row(body=..., content="B"))
    assert err.value.column == "body"
    assert "'body'" in str(err.value)


@pytest.mark.parametrize("groups", [..., "staff", ["staff", 3], {"a": 1}])
def test_unreadable_access_groups_fail_closed(groups: Any) -> None:
    with pytest.raises(MappingError) as err:
        ARTICLES.map_row(row(access_groups=groups))
    assert err.value.column == "access_groups"


def test_an_unavailable_needed_column_is_an_error_and_metadata_is_skipped() -> None:
    with pytest.raises(MappingError):
        ARTICLES.map_row(row(body=UNAVAILABLE))
    doc = ARTICLES.map_row(row(updated_at=UNAVAILABLE))
    assert "updated_at" not in doc.metadata and "updated_at" not in doc.row


# --- verify's comparison ---------------------------------------------------------------------
WANT = {"hash": "h", "title": "T", "groups": ["staff"], "chunks": ["a", "b"]}


def indexed(**changes: Any) -> _Indexed:
    values: dict[str, Any] = {
        "id": 1,
        "content_hash": "h",
        "title": "T",
        "groups": ["staff"],
        "deleted": False,
        "hidden": None,
        "lsn": 10,
        "seq": 1,
    }
    values.update(changes)
    return _Indexed(**values)


def kinds(doc: _Indexed | None, chunks: Any, want: Any = WANT) -> dict[str, str]:
    report = TableReport("app.articles")
    compare(report, "1", want, doc, chunks)
    return {kind: found["1"] for kind, found in report.found.items() if found}


def test_compare_finds_each_kind_of_difference() -> None:
    good = (["a", "b"], [["staff"], ["staff"]])
    assert kinds(indexed(), good) == {}
    assert "missing" in kinds(None, None)
    assert "missing" in kinds(indexed(deleted=True), None)
    assert "missing" in kinds(indexed(), ([], []))
    assert "stale" in kinds(indexed(content_hash="old"), good)
    assert "stale" in kinds(indexed(title="Old"), good)
    assert "stale" in kinds(indexed(), (["a", "c"], [["staff"], ["staff"]]))
    assert "duplicated" in kinds(indexed(), (["a", "b", "b"], [["staff"]] * 3))
    assert "acl" in kinds(indexed(groups=[]), good)
    assert "acl" in kinds(indexed(), (["a", "b"], [["staff"], []]))
    assert kinds(indexed(deleted=True, hidden="too big"), None) == {"hidden": "too big"}
    assert kinds(indexed(), good, want="no column 'body'") == {"unmappable": "no column 'body'"}


# --- retries -------------------------------------------------------------------------------
def test_transient_database_errors_are_told_from_data_errors() -> None:
    assert transient_db_error(psycopg.OperationalError("connection refused"))
    assert transient_db_error(psycopg.errors.AdminShutdown())
    assert transient_db_error(psycopg.errors.DeadlockDetected())
    assert not transient_db_error(psycopg.errors.ProgramLimitExceeded())  # an OperationalError
    assert not transient_db_error(psycopg.DataError("NUL"))
    assert not transient_db_error(ValueError("x"))


def test_retry_waits_out_transient_errors_and_raises_fatal_ones() -> None:
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("down")
        return "ok"

    stop = threading.Event()
    fast = Backoff(initial=0.001, cap=0.002)
    assert retry(flaky, what="t", stop=stop, transient=(ConnectionError,), backoff=fast) == "ok"
    with pytest.raises(KeyError):
        retry(
            lambda: {}["x"],
            what="t",
            stop=stop,
            transient=(KeyError,),
            fatal=lambda e: True,
            backoff=fast,
        )


def test_retry_ends_when_the_worker_is_told_to_stop() -> None:
    stop = threading.Event()
    threading.Timer(0.05, stop.set).start()

    def down() -> None:
        raise ConnectionError("down")

    with pytest.raises(Stopped):
        retry(down, what="t", stop=stop, transient=(ConnectionError,), backoff=Backoff(0.01, 0.02))


# --- the supervisor ------------------------------------------------------------------------
class FakeService:
    def __init__(self, alive: bool = True, fails: int = 0) -> None:
        self.alive = alive
        self.fails = fails
        self.starts = 0

    def running(self) -> bool:
        return self.alive

    def start(self) -> bool:
        self.starts += 1
        if self.fails > 0:
            self.fails -= 1
            raise StackError("exited during startup")
        self.alive = True
        return True


def test_supervisor_restarts_a_dead_service_and_counts_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(home=tmp_path, start_web=False, start_workflow=False)
    sync = FakeService(alive=False)
    monkeypatch.setattr(supervisor, "services", lambda s: {"sync": sync})
    supervisor.want(settings, ["sync"])
    clock = [100.0]
    sup = supervisor.Supervisor(settings, clock=lambda: clock[0])
    monkeypatch.setattr(sup, "_check_connector", lambda: None)
    sup.check_once()
    assert sync.starts == 1 and sync.alive
    assert supervisor.report(settings)["services"]["sync"]["restarts"] == 1
    # A new supervisor of the same `up` keeps the count.
    assert supervisor.Supervisor(settings).watches["sync"].restarts == 1


def test_supervisor_backs_off_after_a_failed_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(home=tmp_path)
    web = FakeService(alive=False, fails=1)
    monkeypatch.setattr(supervisor, "services", lambda s: {"web": web})
    supervisor.want(settings, ["web"])
    clock = [0.0]
    sup = supervisor.Supervisor(settings, clock=lambda: clock[0])
    monkeypatch.setattr(sup, "_check_connector", lambda: None)
    sup.check_once()
    sup.check_once()  # still inside the backoff: no second try yet
    assert web.starts == 1 and not web.alive
    clock[0] += 120
    sup.check_once()
    assert web.starts == 2 and web.alive


def test_nothing_is_restarted_after_down(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(home=tmp_path)
    sync = FakeService(alive=False)
    monkeypatch.setattr(supervisor, "services", lambda s: {"sync": sync})
    supervisor.want(settings, [])
    sup = supervisor.Supervisor(settings)
    monkeypatch.setattr(sup, "_check_connector", lambda: None)
    sup.check_once()
    assert sync.starts == 0


# --- the embedding gate ----------------------------------------------------------------------
class SlowEmbedder(Embedder):
    def __init__(self) -> None:
        super().__init__(2)
        self.calls: list[tuple[str, int]] = []

    def _embed(self, texts: list[str]) -> np.ndarray:
        self.calls.append((threading.current_thread().name, len(texts)))
        time.sleep(0.03)
        return np.ones((len(texts), 2), dtype=np.float32)


def test_the_large_lane_embeds_one_text_at_a_time_and_lets_the_main_loop_in_between() -> None:
    inner = SlowEmbedder()
    gate = EmbedGate(inner)
    cache: dict[str, np.ndarray] = {}
    background = gate.background(cache)
    lane = threading.Thread(
        target=lambda: background.embed([f"t{i}" for i in range(80)]), name="lane"
    )
    lane.start()
    while not cache:  # the lane has embedded its first slice
        time.sleep(0.001)
    gate.foreground().embed(["one change"])
    lane.join()
    names = [name for name, _ in inner.calls]
    assert names.count("lane") == 80, "80 texts, one per slice"
    assert "lane" in names[names.index("MainThread") + 1 :], "main waited for the whole document"
    assert len(cache) == 80
    # The lane's own second pass is served from its cache.
    before = len(inner.calls)
    background.embed(["t1", "t2"])
    assert len(inner.calls) == before


def change(kind: Kind, key: str = "1", **row_changes: Any) -> Change:
    return Change(
        kind,
        ARTICLES,
        key,
        RecordPosition("t", 0, 0),
        row=None if kind is not Kind.UPSERT else row(**row_changes),
    )


def test_a_large_change_is_moot_only_when_the_later_one_needs_nothing_it_stores() -> None:
    big = change(Kind.UPSERT, body="x" * 10)
    assert supersedes(change(Kind.DELETE), big)
    assert supersedes(change(Kind.TOMBSTONE), big)
    assert supersedes(change(Kind.UPSERT, title="new"), big)
    # A title-only update whose body is TOASTed completes the body from the stored row.
    assert not supersedes(change(Kind.UPSERT, body=UNAVAILABLE), big)
    assert not supersedes(change(Kind.DELETE, key="2"), big)


def test_the_large_lane_stops_embedding_a_superseded_document_at_the_next_slice() -> None:
    inner = SlowEmbedder()
    gate = EmbedGate(inner)
    calls = iter(range(1000))
    background = gate.background({}, abandon=lambda: next(calls) >= 3)
    with pytest.raises(Superseded, match="3 of 80"):
        background.embed([f"t{i}" for i in range(80)])
    assert len(inner.calls) == 3
