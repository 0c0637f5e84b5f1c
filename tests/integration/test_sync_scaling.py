"""Sync workers as a consumer group: sharing partitions, surviving kill -9, atomic replaces."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from freshet.cdc.demo import module_doc_rows
from freshet.embedder import Embedder
from freshet.settings import PROJECT_ROOT, Settings
from freshet.sync.chunking import TokenChunker
from tests.conftest import wait_for
from tests.integration.conftest import WorkerThread
from tests.integration.sync_support import (
    caught_up,
    chunk_texts,
    expected_index,
    index,
    indexed,
    source,
)

pytestmark = pytest.mark.integration

ARTICLES = "app.articles"
StartWorker = Callable[..., WorkerThread]
SCIFACT = PROJECT_ROOT.parent / "shared" / "eval" / "scifact" / "corpus.jsonl"


def real_sentences(count: int) -> list[str]:
    """Real text for bulk rows: SciFact titles when the eval data is beside the repo,
    otherwise paragraphs of standard-library docstrings (cycled with a counter)."""
    if SCIFACT.exists():
        titles = []
        with SCIFACT.open() as handle:
            for line in handle:
                doc = json.loads(line)
                titles.append(f"{doc['title']} {doc['text'][:200]}")
                if len(titles) >= count:
                    return titles
    paragraphs = [p for r in module_doc_rows() for p in r.body.split("\n\n") if len(p) > 60]
    return [f"{paragraphs[i % len(paragraphs)]} (row {i})" for i in range(count)]


def insert_rows(settings: Settings, first_id: int, texts: list[str]) -> list[str]:
    with (
        source(settings) as src,
        src.cursor() as cur,
        cur.copy("COPY app.articles (id, title, body) FROM STDIN") as copy,
    ):
        for i, text in enumerate(texts):
            copy.write_row((first_id + i, f"Bulk row {first_id + i}", text))
    return [str(first_id + i) for i in range(len(texts))]


def count_indexed(settings: Settings, keys: list[str]) -> int:
    with index(settings) as idx:
        row = idx.execute(
            "SELECT count(*) FROM rag.documents WHERE source_table = %s AND doc_key = ANY(%s)"
            " AND deleted_at IS NULL",
            (ARTICLES, keys),
        ).fetchone()
    return int(row[0]) if row else 0


def test_two_workers_share_partitions_and_hand_over_on_stop(
    running_stack: Settings, start_worker: StartWorker
) -> None:
    first = start_worker(own_embedder=True, worker_id="share-a")
    caught_up(first)  # a member busy with a long batch delays the group's rebalance
    second = start_worker(own_embedder=True, worker_id="share-b")

    def assigned(worker: WorkerThread) -> set[str]:
        return set(worker.worker.metrics.assignment)

    both = wait_for(lambda: assigned(first) and assigned(second), timeout=60, interval=0.5)
    assert both, "both workers should receive partitions"
    topic = f"{running_stack.topic_prefix}.app.articles"
    mine_a = {p for p in assigned(first) if p.startswith(topic)}
    mine_b = {p for p in assigned(second) if p.startswith(topic)}
    assert mine_a and mine_b and not (mine_a & mine_b)
    assert len(mine_a | mine_b) == 4

    keys = insert_rows(running_stack, 771000, real_sentences(80))
    assert wait_for(lambda: count_indexed(running_stack, keys) == 80, timeout=120, interval=0.5)
    applied_a = first.worker.metrics.snapshot()["counters"]["applied"]
    applied_b = second.worker.metrics.snapshot()["counters"]["applied"]
    assert applied_a > 0 and applied_b > 0, (applied_a, applied_b)

    def redelivered() -> int:  # changes the first worker found applied already
        return int(first.worker.metrics.snapshot()["counters"]["stale"])

    before = redelivered()
    second.stop()  # leaves the group: its partitions move to the first worker
    assert wait_for(lambda: len({p for p in assigned(first) if p.startswith(topic)}) == 4, 60, 0.5)
    more = insert_rows(running_stack, 772000, real_sentences(120)[80:])
    assert wait_for(lambda: count_indexed(running_stack, more) == 40, timeout=120, interval=0.5)
    # The second worker committed what it had applied before it left (its commits are sent
    # without waiting for the answer; a stop commits and waits): nothing of it comes again.
    assert redelivered() == before
    with source(running_stack) as src:
        src.execute("DELETE FROM app.articles WHERE id >= 771000 AND id < 773000")
    caught_up(first)


def test_kill_9_mid_backfill_then_restart_ends_equal_to_the_source(
    running_stack: Settings, running_stack_env: dict[str, str], embedder: Embedder
) -> None:
    """The worker is a static member (FRESHET_SYNC_INSTANCE_ID, as `freshet up` runs it): the
    restarted process takes the killed one's partitions without a rebalance."""
    # 2,000 one-paragraph rows take ~2 minutes on 2 cores: long enough to kill mid-way.
    total = 2000
    keys = insert_rows(running_stack, 800000, real_sentences(total))
    env = {
        **running_stack_env,
        "PYTHONWARNINGS": "ignore",
        "FRESHET_EMBED_THREADS": "2",
        "FRESHET_SYNC_GROUP": "kill-test",
        "FRESHET_SYNC_INSTANCE_ID": "kill-test-worker",
    }
    log = Path(running_stack.home) / "logs" / "kill-test-worker.log"
    log.parent.mkdir(parents=True, exist_ok=True)

    def spawn() -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "freshet.cli", "-v", "sync"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=PROJECT_ROOT,
            )

    worker = spawn()
    try:
        midway = wait_for(lambda: 300 <= count_indexed(running_stack, keys) < total - 700, 600, 0.2)
        assert midway, f"backfill never reached the middle; log: {log}"
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)
        killed_at = count_indexed(running_stack, keys)
        assert killed_at < total

        restarted_from = log.stat().st_size
        worker = spawn()
        assert wait_for(lambda: count_indexed(running_stack, keys) == total, 900, 1.0), (
            f"backfill did not finish after the restart; log: {log}"
        )
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
    # The new process took the dead member's place in the group's current generation (a
    # rebalance would have started a new one) with every partition in its first assignment.
    raw = log.read_bytes()
    before, after = (
        part.decode(errors="replace") for part in (raw[:restarted_from], raw[restarted_from:])
    )
    text = before + after
    generations = [
        re.findall(r"Successfully joined group kill-test <Generation (\d+)", t)
        for t in (before, after)
    ]
    assert generations[0] and generations[1], text[-3000:]
    assert generations[1][0] == generations[0][-1]
    assignments = [line for line in after.splitlines() if "partitions assigned:" in line]
    assert assignments and "freshet.app.articles[3]" in assignments[0], after[-3000:]

    chunker = TokenChunker(embedder.tokenizer)  # type: ignore[attr-defined]
    expected = expected_index(
        running_stack, chunker, ARTICLES, "id >= %s AND id < %s", (800000, 800000 + total)
    )
    actual = indexed(running_stack, ARTICLES, keys)
    assert len(expected) == total
    mismatched = [k for k in expected if expected[k] != actual.get(k)]
    assert mismatched == [], f"{len(mismatched)} rows differ from the source, e.g. {mismatched[:3]}"
    with index(running_stack) as idx:
        duplicates = idx.execute(
            "SELECT document_id, chunk_index, count(*) FROM rag.chunks"
            " GROUP BY 1, 2 HAVING count(*) > 1"
        ).fetchall()
    assert duplicates == []
    with source(running_stack) as src:
        src.execute("DELETE FROM app.articles WHERE id >= 800000")


def test_a_second_worker_with_the_same_instance_id_fences_the_first_which_stops(
    running_stack: Settings, running_stack_env: dict[str, str]
) -> None:
    """Two processes with one FRESHET_SYNC_INSTANCE_ID would fence each other in turn: the
    fenced one stops with a one-line error that names the id, and the other goes on."""
    env = {
        **running_stack_env,
        "PYTHONWARNINGS": "ignore",
        "FRESHET_SYNC_GROUP": "fence-test",
        "FRESHET_SYNC_INSTANCE_ID": "fence-test-worker",
    }
    logs = Path(running_stack.home) / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    def spawn(name: str) -> tuple[subprocess.Popen[bytes], Path]:
        log = logs / f"{name}.log"
        with log.open("ab") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "freshet.cli", "-v", "sync"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=PROJECT_ROOT,
            )
        return process, log

    first, first_log = spawn("fence-first")
    second: subprocess.Popen[bytes] | None = None
    keys: list[str] = []
    try:
        assert wait_for(lambda: "partitions assigned: freshet" in first_log.read_text(), 180, 0.5)
        second, second_log = spawn("fence-second")
        assert wait_for(lambda: "partitions assigned: freshet" in second_log.read_text(), 180, 0.5)
        # Records for the partitions both believe they own: the fenced one finds out when it
        # commits (or heartbeats), and stops.
        for round_ in range(30):
            keys += insert_rows(running_stack, 760000 + 10 * round_, real_sentences(4))
            if wait_for(lambda: first.poll() is not None, 5, 0.2):
                break
        assert first.poll() == 2, first_log.read_text()[-3000:]
        assert "freshet: error: another consumer joined group 'fence-test'" in first_log.read_text()
        assert "'fence-test-worker'" in first_log.read_text()
        assert second.poll() is None  # the member that joined last goes on
        assert wait_for(lambda: count_indexed(running_stack, keys) == len(keys), 300, 0.5)
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=60)
        with source(running_stack) as src:
            src.execute("DELETE FROM app.articles WHERE id >= 760000 AND id < 770000")


def test_a_row_updated_5_times_a_second_is_never_missing_or_half_written(
    running_stack: Settings, start_worker: StartWorker
) -> None:
    worker = start_worker()
    caught_up(worker)
    key = 770300
    paragraphs = [p for r in module_doc_rows()[:3] for p in r.body.split("\n\n")[:3]]

    def body(n: int) -> str:
        edited = list(paragraphs)
        edited[4] = f"Revision {n}. {edited[4]}"
        return "\n\n".join(edited)

    with source(running_stack) as src, index(running_stack) as idx:
        src.execute(
            "INSERT INTO app.articles (id, title, body) VALUES (%s, 'Busy row', %s)",
            (key, body(0)),
        )
        assert wait_for(lambda: chunk_texts(idx, ARTICLES, key), 10)
        # Every paragraph must be present in whatever revision a reader sees.
        markers = [p.strip()[:40] for i, p in enumerate(paragraphs) if i != 4]

        problems: list[str] = []
        polls = [0]
        done = threading.Event()

        def poll() -> None:
            with index(running_stack) as conn:
                while not done.is_set():
                    texts = chunk_texts(conn, ARTICLES, key)
                    joined = "\n\n".join(texts)
                    revisions = joined.count("Revision ")
                    missing = sum(1 for m in markers if m not in joined)
                    if not texts or revisions != 1 or missing:
                        problems.append(
                            f"{len(texts)} chunks, {revisions} revisions, {missing} missing"
                        )
                    polls[0] += 1
                    time.sleep(0.01)

        poller = threading.Thread(target=poll)
        poller.start()
        try:
            started = time.monotonic()
            n = 0
            while time.monotonic() - started < 60:
                n += 1
                src.execute("UPDATE app.articles SET body = %s WHERE id = %s", (body(n), key))
                time.sleep(max(0.0, started + n * 0.2 - time.monotonic()))
            assert wait_for(
                lambda: f"Revision {n}." in "".join(chunk_texts(idx, ARTICLES, key)), 10
            )
        finally:
            done.set()
            poller.join(timeout=30)
        src.execute("DELETE FROM app.articles WHERE id = %s", (key,))
    assert n >= 290
    assert polls[0] > 1000
    assert problems == []
