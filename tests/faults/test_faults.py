"""One fault at a time during a steady mixed workload; afterwards the index must equal the
source by itself (`freshet verify` reports zero differences), with no manual step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
from kafka import KafkaProducer

from freshet.cdc.connect import ConnectClient, LocalConnect
from freshet.cdc.kafka import LocalKafka
from freshet.cdc.postgres import EmbeddedPostgres
from freshet.cdc.services import LocalSupervisor, LocalSyncWorker
from freshet.settings import PROJECT_ROOT, Settings
from tests.faults.conftest import (
    FaultRun,
    index_conn,
    kill9,
    settings_env,
    source_conn,
    wait_until,
)

pytestmark = pytest.mark.faults

TOPIC = "freshet.app.articles"


def new_pid(pid: int | None, old: int | None) -> bool:
    """A process of the service runs again, not the killed one."""
    return pid is not None and pid != old


def sync_pid(settings: Settings) -> int | None:
    return LocalSyncWorker(settings).process.pid()


def restarted(settings: Settings, old: int | None, timeout: float = 60) -> int:
    return wait_until(
        lambda: (pid := sync_pid(settings)) is not None and pid != old and pid,
        timeout,
        "the supervisor restarting the sync worker",
    )


def dead_letters(settings: Settings) -> list[tuple[Any, ...]]:
    with index_conn(settings) as conn:
        return conn.execute(
            "SELECT stage, source_table, doc_key, record_size, truncated, reason"
            " FROM rag.dead_letters ORDER BY id"
        ).fetchall()


def produce(settings: Settings, records: list[tuple[bytes | None, bytes | None]]) -> None:
    producer = KafkaProducer(
        bootstrap_servers=settings.bootstrap_servers, max_request_size=4 << 20, acks="all"
    )
    try:
        for key, value in records:
            producer.send(TOPIC, key=key, value=value)
        producer.flush(timeout=30)
    finally:
        producer.close()


PROBES = [
    ("app.articles", "5", "UPDATE app.articles SET body = body || %s WHERE id = 5"),
    ("app.module_docs", "csv", "UPDATE app.module_docs SET body = body || %s WHERE name = 'csv'"),
]


def freshness_probe(settings: Settings, seconds: float) -> list[float]:
    """Edit a module_docs row and an article every second; how long each took to be searchable."""
    latencies = []
    deadline = time.monotonic() + seconds
    with source_conn(settings) as src, index_conn(settings) as idx:
        n = 0
        while time.monotonic() < deadline:
            n += 1
            marker = f"probe{n}x{int(time.time() * 1000)}"
            table, key, sql = (
                (
                    "app.module_docs",
                    "csv",
                    "UPDATE app.module_docs SET body = body || %s WHERE name = 'csv'",
                )
                if n % 2
                else ("app.articles", "5", "UPDATE app.articles SET body = body || %s WHERE id = 5")
            )
            started = time.monotonic()
            src.execute(sql, (f" {marker}",))
            while time.monotonic() - started < 120:
                found = idx.execute(
                    "SELECT 1 FROM rag.chunks WHERE source_table = %s AND doc_key = %s"
                    " AND text LIKE %s",
                    (table, key, f"%{marker}%"),
                ).fetchone()
                if found:
                    break
                time.sleep(0.02)
            latencies.append(time.monotonic() - started)
            time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
    return latencies


def distinct_text(chars: int, seed: str) -> str:
    """Prose-like text of about ``chars`` characters, every paragraph different."""
    paragraphs = []
    size = 0
    n = 0
    while size < chars:
        n += 1
        line = (
            f"Paragraph {n} of {seed}: the quarterly ledger {n * 7919 % 10007} lists harbor "
            f"fees, orchard yields and lantern repairs for district {n % 97}. "
        ) * 3
        paragraphs.append(line)
        size += len(line) + 2
    return "\n\n".join(paragraphs)[:chars]


# --- processes killed -------------------------------------------------------------------------
def test_kill_9_of_the_sync_worker(fault_stack: Settings, run: FaultRun) -> None:
    with run.during("kill -9 of the sync worker"):
        old = sync_pid(fault_stack)
        kill9(old)
        started = time.monotonic()
        restarted(fault_stack, old)
        run.note(f"restarted by the supervisor in {time.monotonic() - started:.1f} s")
        time.sleep(10)


def test_kill_9_of_kafka_connect(fault_stack: Settings, run: FaultRun) -> None:
    with run.during("kill -9 of Kafka Connect"):
        old = LocalConnect(fault_stack).process.pid()
        kill9(old)
        started = time.monotonic()
        wait_until(lambda: new_pid(LocalConnect(fault_stack).process.pid(), old), 180, "Connect")
        run.note(f"Connect restarted in {time.monotonic() - started:.1f} s")
        time.sleep(10)


def test_kill_9_of_postgresql(fault_stack: Settings, run: FaultRun) -> None:
    with run.during("kill -9 of PostgreSQL"):
        old = EmbeddedPostgres(fault_stack).pid()
        kill9(old)
        started = time.monotonic()
        wait_until(lambda: new_pid(EmbeddedPostgres(fault_stack).pid(), old), 180, "PostgreSQL")
        run.note(f"PostgreSQL restarted in {time.monotonic() - started:.1f} s")
        time.sleep(10)
        run.note(f"{run.workload.failed} workload ops failed while it was down")


def test_postgresql_down_for_60_seconds(fault_stack: Settings, run: FaultRun) -> None:
    """PostgreSQL (source and index, one server here) is killed and stays down 60 s, the
    supervisor paused so it cannot restart it sooner: Debezium's task, the sync worker and the
    workload all lose their connections for longer than their first retries."""
    supervisor = LocalSupervisor(fault_stack).process.pid()
    assert supervisor is not None
    worker = sync_pid(fault_stack)
    with run.during("PostgreSQL killed, down 60 s"):
        os.kill(supervisor, signal.SIGSTOP)
        try:
            old = EmbeddedPostgres(fault_stack).pid()
            kill9(old)
            time.sleep(60)
        finally:
            os.kill(supervisor, signal.SIGCONT)
        started = time.monotonic()
        wait_until(lambda: new_pid(EmbeddedPostgres(fault_stack).pid(), old), 180, "PostgreSQL")
        run.note(f"PostgreSQL back {time.monotonic() - started:.1f} s after the supervisor resumed")
        time.sleep(10)
        survived = sync_pid(fault_stack) == worker
        run.note(
            ("the sync worker waited it out" if survived else "the worker was restarted")
            + f"; {run.workload.failed} workload ops failed while it was down"
        )


def test_kafka_broker_down_for_75_seconds(fault_stack: Settings, run: FaultRun) -> None:
    """The broker is killed with work pending and stays down 75 s (the supervisor is paused so
    it cannot restart it sooner), longer than every client timeout, and longer than Connect's
    poll timeout (60 s), so the Connect worker leaves its group and must take its task back."""
    supervisor = LocalSupervisor(fault_stack).process.pid()
    assert supervisor is not None
    worker = sync_pid(fault_stack)
    with run.during("Kafka broker killed, down 75 s"):
        os.kill(supervisor, signal.SIGSTOP)
        try:
            old = LocalKafka(fault_stack).process.pid()
            kill9(old)
            time.sleep(75)
        finally:
            os.kill(supervisor, signal.SIGCONT)
        started = time.monotonic()
        wait_until(lambda: new_pid(LocalKafka(fault_stack).process.pid(), old), 180, "Kafka")
        run.note(f"broker back {time.monotonic() - started:.1f} s after the supervisor resumed")
        time.sleep(10)
        survived = sync_pid(fault_stack) == worker
        run.note("the sync worker waited it out" if survived else "the worker was restarted")


def test_connector_task_restart(fault_stack: Settings, run: FaultRun) -> None:
    client = ConnectClient(fault_stack.connect_rest_url)
    with run.during("connector task restart"):
        client._request("POST", f"/connectors/{fault_stack.connector_name}/tasks/0/restart")
        time.sleep(10)


def test_rebalance_by_adding_and_removing_a_worker(fault_stack: Settings, run: FaultRun) -> None:
    env = {**os.environ, **settings_env(fault_stack), "PYTHONWARNINGS": "ignore"}
    log = (fault_stack.logs_dir / "second-sync.log").open("ab")
    with run.during("rebalance: a worker added, then removed"):
        second = subprocess.Popen(
            [sys.executable, "-m", "freshet.cli", "sync", "--tag", "fault-suite-second"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=PROJECT_ROOT,
        )
        try:

            def joined() -> bool:
                with index_conn(fault_stack) as conn:
                    row = conn.execute(
                        "SELECT lag FROM rag.workers WHERE pid = %s AND state = 'running'"
                        " AND heartbeat_at > now() - interval '10 seconds'",
                        (second.pid,),
                    ).fetchone()
                return bool(row and row[0])

            wait_until(joined, 180, "the second worker owning partitions")
            run.note("the second worker owned partitions, then left by SIGTERM")
            time.sleep(10)
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(timeout=60)
            log.close()
        time.sleep(5)


# --- records that cannot be read --------------------------------------------------------------
def test_a_burst_of_malformed_records(fault_stack: Settings, run: FaultRun) -> None:
    before = len(dead_letters(fault_stack))
    garbage: list[tuple[bytes | None, bytes | None]] = []
    for n in range(300):
        key = json.dumps({"id": 700_000 + n}).encode()
        value = [
            b"not json at all",
            b'{"op": "c"}',
            b'{"op": "u", "after": {"id": 1}}',
            json.dumps({"op": "c", "after": {"id": n}, "source": {"schema": "app"}}).encode(),
            b"\xff\xfe\x00",
        ][n % 5]
        garbage.append((key, value))
    worker = sync_pid(fault_stack)
    with run.during("a burst of 300 malformed records"):
        produce(fault_stack, garbage)
        wait_until(
            lambda: len(dead_letters(fault_stack)) >= before + 300, 120, "300 new dead letters"
        )
        assert sync_pid(fault_stack) == worker, "the worker died on a malformed record"
        run.note("300 dead letters, the worker never restarted")


def test_poison_records(fault_stack: Settings, run: FaultRun) -> None:
    """The records of the issue that each stopped a partition for good."""
    envelope = {
        "op": "c",
        "after": {"id": 1, "title": "x", "body": "y", "access_groups": []},
        "source": {"schema": "app", "table": "articles", "ts_ms": 1, "lsn": 1},
    }
    poison: list[tuple[bytes | None, bytes | None]] = [
        (b'{"id": 1}', b"[" * 50_000 + b"]" * 50_000),
        (b'{"id": 1}', json.dumps({**envelope, "ts_ms": "x"}).encode()),
        (b'{"id": 1}', json.dumps(envelope).replace('"ts_ms": 1', '"ts_us": 1e30').encode()),
        (b'{"id": 1}', json.dumps(envelope).replace('"lsn": 1', '"lsn": 1e400').encode()),
        (b'{"id": "a\\u0000b"}', json.dumps(envelope).encode()),
        (b'{"id": 2}', b"\x01" * 200_000),
    ]
    before = len(dead_letters(fault_stack))
    worker = sync_pid(fault_stack)
    with run.during("poison records (deep JSON, bad times, NUL key, 200 kB of \\x01)"):
        produce(fault_stack, poison)
        wait_until(
            lambda: len(dead_letters(fault_stack)) >= before + len(poison), 120, "dead letters"
        )
        assert sync_pid(fault_stack) == worker, "a poison record killed the worker"
        stored = dead_letters(fault_stack)[before:]
        assert any(r[3] == 200_000 for r in stored), "the 200 kB record is kept with its size"
        run.note(f"{len(poison)} dead letters, the worker never restarted")


# --- rows of any size -------------------------------------------------------------------------
def test_a_row_of_1_mib(fault_stack: Settings, run: FaultRun) -> None:
    """The fault is the event's size (1,051,913 bytes failed the task with the producer's 1 MiB
    default): the text repeats 40 paragraphs, so it carries 1 MiB but embeds few distinct
    chunks. The next test's row is the expensive one to embed."""
    paragraphs = distinct_text(40 * 260, "one-mib").split("\n\n")
    body = "\n\n".join(paragraphs[n % len(paragraphs)] for n in range(4200))[: 1 << 20]
    with run.during("a row of 1 MiB of text"):
        with source_conn(fault_stack) as src:
            src.execute(
                "INSERT INTO app.articles (id, title, body) VALUES (910001, 'one MiB', %s)",
                (body,),
            )
        wait_until(lambda: chunk_count(fault_stack, "910001") > 0, 600, "the 1 MiB row indexed")
    status = ConnectClient(fault_stack.connect_rest_url).status(fault_stack.connector_name)
    assert status is not None and status["tasks"][0]["state"] == "RUNNING"
    run.note(f"{chunk_count(fault_stack, '910001')} chunks; the task stayed RUNNING")
    with source_conn(fault_stack) as src:
        src.execute("DELETE FROM app.articles WHERE id = 910001")


def chunk_count(settings: Settings, key: str) -> int:
    with index_conn(settings) as conn:
        row = conn.execute(
            "SELECT count(*) FROM rag.chunks WHERE source_table = 'app.articles' AND doc_key = %s",
            (key,),
        ).fetchone()
    return int(row[0]) if row else 0


def test_a_million_character_row_does_not_hold_back_other_rows(
    fault_stack: Settings, run: FaultRun
) -> None:
    """Other rows' freshness is measured while the large lane embeds the row (its 1,600-odd
    distinct chunks take minutes on 2 cores); then the row is deleted, and the lane stops
    embedding it at its next slice instead of finishing a document that no longer exists."""
    with run.during("a 1,000,000-character row"):
        baseline = sorted(freshness_probe(fault_stack, 20))  # the same workload, no large row
        with source_conn(fault_stack) as src:
            src.execute(
                "INSERT INTO app.articles (id, title, body) VALUES (910002, 'a million', %s)",
                (distinct_text(1_000_000, "million"),),
            )
        wait_until(lambda: large_lane(fault_stack) == "app.articles 910002", 120, "lane busy")
        latencies = freshness_probe(fault_stack, 40)
        still_embedding = large_lane(fault_stack) == "app.articles 910002"
        assert still_embedding or chunk_count(fault_stack, "910002") > 0
        with source_conn(fault_stack) as src:
            src.execute("DELETE FROM app.articles WHERE id = 910002")
        deleted = time.monotonic()
        wait_until(lambda: large_lane(fault_stack) is None, 120, "the lane let the row go")
        let_go = time.monotonic() - deleted
    assert chunk_count(fault_stack, "910002") == 0
    latencies.sort()
    run.note(
        f"while the large lane embedded it, {len(latencies)} edits of other rows (both tables): "
        f"freshness p50 {latencies[len(latencies) // 2] * 1000:.0f} ms, max "
        f"{latencies[-1] * 1000:.0f} ms (the same workload just before: p50 "
        f"{baseline[len(baseline) // 2] * 1000:.0f} ms, max {baseline[-1] * 1000:.0f} ms); "
        f"deleted mid-embedding, the lane let it go in {let_go:.1f} s"
        if still_embedding
        else "(the row was indexed before the probe ended)"
    )


def large_lane(settings: Settings) -> str | None:
    """The document the sync worker's large lane is working on, from its heartbeat."""
    with index_conn(settings) as conn:
        rows = conn.execute(
            "SELECT progress->>'large_lane' FROM rag.workers"
            " WHERE heartbeat_at > now() - interval '15 seconds'"
        ).fetchall()
    busy = [r[0] for r in rows if r[0]]
    return busy[0] if busy else None


def test_a_primary_key_change_of_a_toasted_row(fault_stack: Settings, run: FaultRun) -> None:
    """The new key's event carries Debezium's placeholder for the unchanged (TOASTed) body; the
    row is read back from the source by its new key."""
    with source_conn(fault_stack) as src:
        src.execute(
            "INSERT INTO app.articles (id, title, body) VALUES (910003, 'toasted', %s)",
            (distinct_text(80_000, "toasted"),),
        )
        stored = src.execute(
            "SELECT pg_column_size(body) < length(body) FROM app.articles WHERE id = 910003"
        ).fetchone()
    assert stored is not None and stored[0], "the body is stored compressed out of line (TOAST)"
    wait_until(lambda: chunk_count(fault_stack, "910003") > 0, 600, "the TOASTed row indexed")
    with run.during("UPDATE ... SET id = id + 1 of a TOASTed row"):
        with source_conn(fault_stack) as src:
            src.execute("UPDATE app.articles SET id = 910004 WHERE id = 910003")
        wait_until(lambda: chunk_count(fault_stack, "910004") > 0, 600, "the new key indexed")
        assert chunk_count(fault_stack, "910003") == 0
    run.note(f"old key removed, new key indexed ({chunk_count(fault_stack, '910004')} chunks)")
    with source_conn(fault_stack) as src:
        src.execute("DELETE FROM app.articles WHERE id = 910004")


def test_a_row_over_the_event_size_limit(fault_stack: Settings, run: FaultRun) -> None:
    limit = fault_stack.max_event_bytes
    with run.during(f"a row over the {limit >> 20} MiB event limit"):
        with source_conn(fault_stack) as src:
            src.execute(
                "INSERT INTO app.articles (id, title, body) VALUES (910009, 'too big', %s)",
                ("z" * (limit + 1000),),
            )

        def letter() -> Any:
            return [r for r in dead_letters(fault_stack) if r[2] == "910009" and r[0] == "size"]

        found = wait_until(letter, 180, "the oversized row's dead letter")
        assert found[0][1] == "app.articles" and "over the limit" in found[0][5]
        env = {**os.environ, **settings_env(fault_stack)}
        listed = subprocess.run(
            [sys.executable, "-m", "freshet.cli", "verify", "--json", "--settle", "0"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        report = json.loads(listed.stdout)
        hidden = report["tables"]["app.articles"]["samples"].get("hidden", [])
        assert [h["key"] for h in hidden] == ["910009"], report
        assert listed.returncode == 1
        run.note("dead letter (key, size, table), verify listed it as hidden; row deleted")
        with source_conn(fault_stack) as src:
            src.execute("DELETE FROM app.articles WHERE id = 910009")
    status = ConnectClient(fault_stack.connect_rest_url).status(fault_stack.connector_name)
    assert status is not None and status["tasks"][0]["state"] == "RUNNING"


# --- the source changes shape -----------------------------------------------------------------
def test_a_renamed_metadata_column(fault_stack: Settings, run: FaultRun) -> None:
    with run.during("RENAME COLUMN updated_at TO modified_at"):
        with source_conn(fault_stack) as src:
            src.execute("ALTER TABLE app.articles RENAME COLUMN updated_at TO modified_at")
            time.sleep(3)
            # An access revocation while the mapping does not fit: it must still apply.
            src.execute("UPDATE app.articles SET access_groups = '{staff}' WHERE id = 7")
        wait_until(lambda: acl_of(fault_stack, "7") == ["staff"], 120, "the revocation applied")
        time.sleep(5)
    with index_conn(fault_stack) as conn:
        problems = conn.execute(
            "SELECT column_name FROM rag.mapping_problems WHERE source_table = 'app.articles'"
        ).fetchall()
    assert ("updated_at",) in problems
    run.note("revocation applied while drifted; reported in rag.mapping_problems")
    with source_conn(fault_stack) as src:
        src.execute("ALTER TABLE app.articles RENAME COLUMN modified_at TO updated_at")
        src.execute("UPDATE app.articles SET access_groups = '{}' WHERE id = 7")


def acl_of(settings: Settings, key: str) -> list[str] | None:
    with index_conn(settings) as conn:
        rows = conn.execute(
            "SELECT DISTINCT access_groups FROM rag.chunks WHERE source_table = 'app.articles'"
            " AND doc_key = %s",
            (key,),
        ).fetchall()
    return rows[0][0] if len(rows) == 1 else None


def test_truncate(fault_stack: Settings, run: FaultRun) -> None:
    with run.during("TRUNCATE app.articles"):
        with source_conn(fault_stack) as src:
            src.execute("TRUNCATE app.articles")
        time.sleep(6)  # the workload inserts after the truncate, on every partition
    run.note("the workload's inserts after it survived")


def test_the_documented_snapshot_remedy_works(fault_stack: Settings, run: FaultRun) -> None:
    env = {**os.environ, **settings_env(fault_stack)}
    log = fault_stack.logs_dir / "connect.log"
    before = log.read_text(errors="replace").count("permission denied")
    with run.during("freshet snapshot app.articles"):
        result = subprocess.run(
            [sys.executable, "-m", "freshet.cli", "snapshot", "app.articles"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        wait_until(
            lambda: (
                "incremental snapshotting of table 'app.articles' finished"
                in log.read_text(errors="replace")
            ),
            180,
            "the incremental snapshot to finish",
        )
    assert log.read_text(errors="replace").count("permission denied") == before
    run.note("snapshot ran to its end; no permission error in the Connect log")
