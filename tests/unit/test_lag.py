"""Lag per table (sync/lag.py) without Kafka: the commit time of a record, partitions summed by
table, the peek loop, the metrics lines and how `freshet status` shows it."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from freshet.cdc.commands import render_status
from freshet.cdc.events import decode
from freshet.settings import Settings, SettingsError
from freshet.sync import lag
from freshet.sync.metrics import SyncMetrics

FIXTURES = Path(__file__).parent.parent / "fixtures" / "debezium"
NOW = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)


@dataclass(frozen=True)
class TP:
    topic: str
    partition: int


@dataclass(frozen=True)
class Rec:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int = 0


def captured(name: str, offset: int = 0) -> Rec:
    f = json.loads((FIXTURES / f"{name}.json").read_text())
    return Rec(
        f["topic"],
        f["partition"],
        offset,
        f["key"].encode() if f["key"] is not None else None,
        f["value"].encode() if f["value"] is not None else None,
        timestamp=1_700_000_000_000,
    )


def test_a_change_records_time_is_its_source_commit_time() -> None:
    record = captured("update")
    event = decode(record.key, record.value)
    assert lag.commit_time(record) == event.source.commit_time  # type: ignore[union-attr]


def test_a_record_that_is_no_change_event_falls_back_to_its_kafka_timestamp() -> None:
    when = datetime.fromtimestamp(1_700_000_000, UTC)
    assert lag.commit_time(captured("tombstone")) == when
    poison = Rec("freshet.app.articles", 0, 3, b"{", b"not json", timestamp=1_700_000_000_000)
    assert lag.commit_time(poison) == when
    assert lag.commit_time(Rec("t", 0, 0, None, b"garbage")) is None


def test_partitions_are_summed_by_table_and_the_oldest_is_the_earliest_behind() -> None:
    a0, a1 = TP("freshet.app.articles", 0), TP("freshet.app.articles", 1)
    m0 = TP("freshet.app.module_docs", 0)
    old, older = NOW - timedelta(seconds=5), NOW - timedelta(seconds=40)
    tables = lag.per_table(
        {a0: 3, a1: 2, m0: 0},
        # m0 has a time but nothing behind: it is not the table's oldest change.
        {a0: old, a1: older, m0: NOW - timedelta(hours=1)},
        "freshet",
    )
    assert set(tables) == {"app.articles", "app.module_docs"}
    assert tables["app.articles"].records == 5
    assert tables["app.articles"].oldest_commit == older
    assert tables["app.articles"].seconds(NOW) == pytest.approx(40)
    assert tables["app.module_docs"].records == 0
    assert tables["app.module_docs"].seconds(NOW) == 0
    assert tables["app.module_docs"].as_dict(NOW) == {
        "records": 0,
        "seconds": 0.0,
        "oldest_commit": None,
    }
    # A partition behind whose record could not be read: counted, its age unknown.
    unknown = lag.per_table({a0: 4}, {a0: None}, "freshet")["app.articles"]
    assert (unknown.records, unknown.oldest_commit, unknown.seconds(NOW)) == (4, None, 0.0)


@dataclass
class FakePeek:
    """The calls oldest_commit_times makes of a KafkaConsumer."""

    log: dict[TP, list[Rec]]
    assigned: list[TP] = field(default_factory=list)
    positions: dict[TP, int] = field(default_factory=dict)
    paused: set[TP] = field(default_factory=set)
    polls: int = 0

    def assign(self, partitions: list[TP]) -> None:
        self.assigned = list(partitions)
        self.paused = set()

    def seek(self, tp: TP, offset: int) -> None:
        self.positions[tp] = offset

    def pause(self, tp: TP) -> None:
        self.paused.add(tp)

    def poll(self, timeout_ms: int, max_records: int) -> dict[TP, list[Rec]]:
        self.polls += 1
        out: dict[TP, list[Rec]] = {}
        for tp in self.assigned:
            if tp in self.paused:
                continue
            # Kafka may hand back a batch that starts before the offset asked for (compacted
            # or transactional batches); the reader must skip to the offset itself.
            batch = [r for r in self.log.get(tp, []) if r.offset >= self.positions[tp] - 1]
            if batch:
                out[tp] = batch[:2]
                self.positions[tp] = batch[:2][-1].offset + 1
        return out


def test_the_peek_reads_the_record_at_each_offset_and_gives_up_in_time() -> None:
    here, empty = TP("freshet.app.articles", 0), TP("freshet.app.articles", 1)
    records = [
        Rec(here.topic, 0, n, None, None, timestamp=1_700_000_000_000 + n * 1000) for n in range(10)
    ]
    peek = FakePeek({here: records})
    found = lag.oldest_commit_times(peek, {here: 6, empty: 0}, timeout_s=0.5)
    assert found[here] == datetime.fromtimestamp(1_700_000_006, UTC)
    assert found[empty] is None  # nothing arrived before the deadline
    assert peek.assigned == []  # left unassigned for the next call
    assert lag.oldest_commit_times(peek, {}) == {}


@dataclass
class SlowPeek(FakePeek):
    """A peek whose every poll takes ``seconds`` (a fetch from a freshly assigned partition)."""

    seconds: float = 0.3
    closed: bool = False
    reading: threading.Event = field(default_factory=threading.Event)

    def poll(self, timeout_ms: int, max_records: int) -> dict[TP, list[Rec]]:
        self.reading.set()
        time.sleep(self.seconds)
        return super().poll(timeout_ms, max_records)

    def close(self) -> None:
        self.closed = True


def test_the_lag_probe_dates_the_lag_on_its_own_thread_and_keeps_the_newest_request() -> None:
    tp = TP("freshet.app.articles", 0)
    records = [
        Rec(tp.topic, 0, n, None, None, timestamp=1_700_000_000_000 + n * 1000) for n in range(10)
    ]
    peek = SlowPeek({tp: records})
    published: list[tuple[dict[Any, int], dict[Any, Any]]] = []
    probe = lag.LagProbe(lambda: peek, lambda b, o: published.append((dict(b), dict(o))))
    started = time.monotonic()
    probe.submit({tp: 4}, {tp: 6})
    assert time.monotonic() - started < 0.1  # the caller never waits for the peek
    assert peek.reading.wait(10)
    # Two more while the first is read: only the newest is served after it.
    probe.submit({tp: 3}, {tp: 7})
    probe.submit({tp: 2}, {tp: 8})
    deadline = time.monotonic() + 10
    while not (probe.idle() and len(published) >= 2) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [b for b, _ in published] == [{tp: 4}, {tp: 2}]
    assert published[0][1][tp] == datetime.fromtimestamp(1_700_000_006, UTC)
    assert published[1][1][tp] == datetime.fromtimestamp(1_700_000_008, UTC)
    # Nothing behind: published without a peek.
    polls = peek.polls
    probe.submit({tp: 0}, {tp: 10})
    deadline = time.monotonic() + 10
    while len(published) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert published[2] == ({tp: 0}, {}) and peek.polls == polls
    probe.close()
    assert peek.closed
    probe.submit({tp: 1}, {tp: 9})  # after close: ignored
    time.sleep(0.1)
    assert len(published) == 3


def test_the_lag_probe_reports_a_kafka_error_and_goes_on() -> None:
    tp = TP("freshet.app.articles", 0)
    errors: list[BaseException] = []
    published: list[Any] = []
    attempts = iter([OSError("broker away")])

    def new_peek() -> FakePeek:
        for exc in attempts:
            raise exc
        return FakePeek({tp: [Rec(tp.topic, 0, 0, None, None, timestamp=1_700_000_000_000)]})

    probe = lag.LagProbe(new_peek, lambda b, o: published.append(o), errors.append)
    probe.submit({tp: 1}, {tp: 0})
    deadline = time.monotonic() + 10
    while not errors and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [str(e) for e in errors] == ["broker away"] and published == []
    probe.submit({tp: 1}, {tp: 0})
    while not published and time.monotonic() < deadline:
        time.sleep(0.02)
    assert published == [{tp: datetime.fromtimestamp(1_700_000_000, UTC)}]
    probe.close()


def test_the_metrics_endpoint_has_lag_per_table() -> None:
    metrics = SyncMetrics("w-1")
    metrics.set_table_lag(
        {"app.articles": {"records": 12, "seconds": 3.5, "oldest_commit": NOW.isoformat()}}
    )
    text = metrics.prometheus()
    assert 'freshet_sync_lag_records{worker="w-1",table="app.articles"} 12' in text
    assert 'freshet_sync_lag_seconds{worker="w-1",table="app.articles"} 3.5' in text
    assert metrics.snapshot()["lag_tables"]["app.articles"]["records"] == 12


def report(lag_reading: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "home": "/tmp/h",
        "postgres": {"state": "RUNNING", "embedded": True, "url": "u", "version": "18"},
        "kafka": {"state": "RUNNING", "bootstrap_servers": "127.0.0.1:1", "topics": []},
        "connect": {"state": "RUNNING", "url": "http://x/"},
        "connector": {"state": "RUNNING", "name": "c", "tasks": []},
        "lag": lag_reading,
    }


def test_status_says_which_table_is_behind_and_warns_over_the_setting() -> None:
    text = render_status(
        report(
            {
                "warning_s": 30.0,
                "tables": {
                    "app.articles": {
                        "records": 1234,
                        "seconds": 95.2,
                        "oldest_commit": NOW.isoformat(),
                        "warning": True,
                    },
                    "app.module_docs": {
                        "records": 2,
                        "seconds": 0.4,
                        "oldest_commit": NOW.isoformat(),
                        "warning": False,
                    },
                    "app.quiet": {
                        "records": 0,
                        "seconds": 0.0,
                        "oldest_commit": None,
                        "warning": False,
                    },
                },
            }
        )
    )
    assert (
        "lag           WARNING   app.articles: 1,234 changes not yet applied, the oldest"
        " committed 95.2 s ago (over FRESHET_LAG_WARNING_S=30)"
    ) in text
    assert "lag           behind    app.module_docs: 2 changes not yet applied" in text
    assert "app.quiet" not in text
    caught_up = {"app.articles": {"records": 0, "seconds": 0.0, "oldest_commit": None}}
    assert "lag           none" in render_status(report({"warning_s": 30.0, "tables": caught_up}))
    assert "lag           UNKNOWN   Kafka did not say: timed out" in render_status(
        report({"error": "timed out"})
    )
    assert "lag " not in render_status(report(None))


def test_the_warning_threshold_is_a_positive_number_of_seconds() -> None:
    assert Settings.from_env({}).lag_warning_s == 30.0
    assert Settings.from_env({"FRESHET_LAG_WARNING_S": "2.5"}).lag_warning_s == 2.5
    for bad in ("0", "-1", "soon"):
        with pytest.raises(SettingsError, match="FRESHET_LAG_WARNING_S"):
            Settings.from_env({"FRESHET_LAG_WARNING_S": bad})
