"""Model change without downtime, on the real stack: `freshet reembed` re-embeds 20,000 rows
to a second model while the sync worker applies live changes and a client searches throughout;
the gate passes a model as good as the current one and switches, and refuses a worse one. The
re-embed is killed (-9) a third of the way and resumes where it was.

The second models are built from the bundled one (tests/model_variants.py): ``rotated`` has
other vectors in 512 dimensions and the same similarities; ``perturbed`` has noisy weights."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flask.testing import FlaskClient

from bench.model_variants import perturbed, rotated
from freshet import group_indexes, index_model
from freshet.embedder import TransformersEmbedder
from freshet.index_model import ModelSwitched
from freshet.settings import PROJECT_ROOT, Settings
from freshet.sync.worker import build_worker
from freshet.web import close_app, create_app
from tests.conftest import freshet, wait_for
from tests.integration.sync_support import index, source

pytestmark = pytest.mark.integration

ROWS = int(os.environ.get("FRESHET_TEST_REEMBED_ROWS", "20000"))
FIRST_ID = 5_000_000
KEPT = 1_000  # rows kept for the refused model's run
REEMBED_THREADS = "2"
WORDS = [
    "amber",
    "basalt",
    "cedar",
    "dune",
    "ember",
    "fjord",
    "glacier",
    "harbor",
    "iris",
    "jasper",
    "kelp",
    "lagoon",
    "meadow",
    "nectar",
    "orchid",
    "prairie",
    "quartz",
    "reef",
    "savanna",
    "tundra",
    "umber",
    "valley",
    "willow",
    "yarrow",
    "zephyr",
    "anchor",
    "beacon",
    "canyon",
    "delta",
    "estuary",
    "falcon",
    "grove",
    "heron",
    "island",
    "jungle",
    "kestrel",
    "lichen",
    "marsh",
    "nebula",
    "oasis",
    "pebble",
    "quarry",
    "ravine",
    "summit",
    "thicket",
    "upland",
    "vortex",
    "wetland",
]
ADMIN = {"Authorization": "Bearer demo-admin"}
MINE = f"doc_key ~ '^[0-9]+$' AND doc_key::bigint >= {FIRST_ID}"


def body(i: int) -> str:
    return " ".join(random.Random(i).sample(WORDS, 7))


class RestartingWorker:
    """`freshet sync`'s loop on a thread: a worker built with the index's model, rebuilt when the
    index switches model."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stop_event = threading.Event()
        self.restarts = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            while not self.stop_event.is_set():
                try:
                    build_worker(self.settings).run(self.stop_event)
                except ModelSwitched:
                    self.restarts += 1
        except BaseException as exc:  # noqa: BLE001 - surfaced by stop()
            self.error = exc

    def start(self) -> RestartingWorker:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=60)
        if self.error is not None:
            raise self.error


class Searcher:
    """A client searching without pause (dense and hybrid, in turn); records every failure."""

    def __init__(self, client: FlaskClient) -> None:
        self.client = client
        self.stop_event = threading.Event()
        self.count = 0
        self.failures: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop_event.is_set():
            mode = ("dense", "hybrid")[self.count % 2]
            query = body(self.count % ROWS)
            response = self.client.get(
                f"/api/v1/search?q={query}&k=5&mode={mode}&table=app.articles", headers=ADMIN
            )
            self.count += 1
            if response.status_code != 200:
                self.failures.append(f"{mode}: HTTP {response.status_code} {response.text[:200]}")
            elif not response.get_json()["results"]:
                self.failures.append(f"{mode}: no result for {query!r}")
            time.sleep(0.1)

    def start(self) -> Searcher:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=60)


def indexed(settings: Settings) -> int:
    with index(settings) as conn:
        row = conn.execute(
            f"SELECT count(*) FROM rag.documents WHERE source_table = 'app.articles' AND {MINE}"
            " AND deleted_at IS NULL"
        ).fetchone()
    return int(row[0]) if row else 0


def write_queries(path: Path, ids: range, count: int = 60) -> Path:
    chosen = random.Random(5).sample(list(ids), count)
    path.write_text(
        "".join(
            json.dumps({"query": body(i), "relevant": {str(FIRST_ID + i): 1}}) + "\n"
            for i in chosen
        )
    )
    return path


def reembed(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "freshet.cli", "reembed", *args],
        # Unthrottled, on both cores (the defaults leave the sync worker room: 50 chunks/s,
        # one thread).
        env={
            **env,
            "PYTHONWARNINGS": "ignore",
            "FRESHET_REEMBED_RATE": "0",
            "FRESHET_REEMBED_THREADS": REEMBED_THREADS,
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=PROJECT_ROOT,
    )


def shadowed(settings: Settings) -> tuple[int, int]:
    """Chunks with a shadow vector, of all chunks."""
    with index(settings) as conn:
        row = conn.execute(
            f"SELECT count({index_model.SHADOW_COLUMN}), count(*) FROM rag.chunks"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def state(settings: Settings) -> index_model.IndexModel:
    with index(settings) as conn:
        return index_model.read(conn)


def test_a_model_change_re_embeds_20000_rows_without_downtime_behind_the_gate(
    running_stack: Settings, running_stack_env: dict[str, str], tmp_path: Path
) -> None:
    settings = running_stack
    env = running_stack_env
    # The worker embeds with the float model, so that the changed row's vector can be compared
    # with the new model's to 0.9999 below (int8 chunks agree with it to about 0.995).
    worker = RestartingWorker(settings.with_overrides(embed_int8=False)).start()
    app = create_app(
        {"TESTING": True, "SETTINGS": settings, "RATE_LIMIT_BACKEND": "off", "POOL_MAX_SIZE": 4}
    )
    good = rotated(tmp_path / "rotated")
    worse = perturbed(tmp_path / "perturbed")
    try:
        columns = "(id, title, body, access_groups)"
        with (
            source(settings) as conn,
            conn.cursor() as cur,
            cur.copy(f"COPY app.articles {columns} FROM STDIN") as copy,
        ):
            for i in range(ROWS):
                copy.write_row((FIRST_ID + i, f"Item {i}", body(i), "{}"))
        started = time.monotonic()
        assert wait_for(lambda: indexed(settings) == ROWS, 900, interval=1), indexed(settings)
        print(f"\n{ROWS:,} rows indexed in {time.monotonic() - started:.0f}s")
        queries = write_queries(tmp_path / "queries.jsonl", range(ROWS))
        # The public chunks' group index (`freshet group-index`): built again on the new column.
        with index(settings) as conn:
            assert group_indexes.build(conn, group_indexes.PUBLIC)
        before = state(settings)
        searcher = Searcher(app.test_client()).start()
        started = time.monotonic()
        run = reembed(
            env, "--model", str(good), "--queries", str(queries), "--table", "app.articles"
        )
        # A row changed while the shadow is built: its new text must be searchable with the new
        # model after the switch.
        assert wait_for(lambda: state(settings).building == str(good), 300, interval=0.5)
        changed = "zephyr-quasar nebula lighthouse marmalade"
        with source(settings) as conn:
            conn.execute("UPDATE app.articles SET body = %s WHERE id = %s", (changed, FIRST_ID + 1))
        # kill -9 a third of the way: the same command resumes where it was.
        total = shadowed(settings)[1]
        assert wait_for(lambda: shadowed(settings)[0] >= total // 3, 600, interval=0.5)
        run.kill()
        run.communicate(timeout=30)  # closes its pipe
        done_before = shadowed(settings)[0]
        print(f"killed the re-embed at {done_before:,} of {total:,} chunks")
        run = reembed(
            env, "--model", str(good), "--queries", str(queries), "--table", "app.articles"
        )
        output, _ = run.communicate(timeout=1200)
        resumed = re.search(r"([0-9,]+) chunks embedded", output)
        assert resumed and int(resumed.group(1).replace(",", "")) <= total - done_before + 100
        print(output[-3000:])
        print(f"re-embed and switch: {time.monotonic() - started:.0f}s")
        assert run.returncode == 0, output[-3000:]
        assert "verdict: passed" in output and "switched the index" in output
        assert "built the index of public documents on the new vectors" in output
        with index(settings) as conn:
            assert group_indexes.usable(conn) == {group_indexes.PUBLIC}
            group_indexes.drop(conn, group_indexes.PUBLIC)  # the stack is shared
        after = state(settings)
        assert after.model == str(good) and after.dim == 512
        assert after.generation == before.generation + 1
        assert after.previous_model == before.active(settings)
        time.sleep(2)  # the searcher meets the switch on its own
        searcher.stop()
        print(f"{searcher.count} searches during the change, failures: {searcher.failures[:5]}")
        assert searcher.count > 50
        assert searcher.failures == []

        # The changed row: indexed at its new text, with the new model's vector.
        new_model = TransformersEmbedder(str(good), fast_path="off")

        def changed_vector() -> Any:
            with index(settings) as conn:
                row = conn.execute(
                    "SELECT text, embedding FROM rag.chunks WHERE source_table = 'app.articles'"
                    " AND doc_key = %s",
                    (str(FIRST_ID + 1),),
                ).fetchone()
            return row if row and changed in row[0] else None

        row = wait_for(changed_vector, 60, interval=0.5)
        assert row is not None
        stored = np.asarray(row[1].to_numpy())
        assert float(np.dot(stored, new_model.embed([row[0]])[0])) > 0.9999
        client = app.test_client()
        hits = client.get(
            f"/api/v1/search?q={changed}&k=3&mode=dense&table=app.articles", headers=ADMIN
        ).get_json()["results"]
        assert hits and hits[0]["doc_key"] == str(FIRST_ID + 1)
        assert wait_for(lambda: worker.restarts >= 1, 30), "the worker did not follow the switch"

        # A worse model is refused on the same queries, and the current one keeps serving.
        with source(settings) as conn:
            conn.execute("DELETE FROM app.articles WHERE id >= %s", (FIRST_ID + KEPT,))
        assert wait_for(lambda: indexed(settings) == KEPT, 600, interval=1)
        dropped = freshet(env, "reembed", "--drop-previous")
        assert dropped.returncode == 0, dropped.stderr
        kept_queries = write_queries(tmp_path / "kept.jsonl", range(KEPT), count=40)
        run = reembed(
            env, "--model", str(worse), "--queries", str(kept_queries), "--table", "app.articles"
        )
        output, _ = run.communicate(timeout=900)
        print(output[-2000:])
        assert run.returncode == 3, output[-3000:]
        assert "verdict: refused" in output
        refused = state(settings)
        assert refused.model == str(good) and refused.shadow_state == "refused"
        assert refused.gate and refused.gate["new_ndcg"] < refused.gate["old_ndcg"] - 0.01
        hits = client.get(
            f"/api/v1/search?q={body(3)}&k=3&mode=dense&table=app.articles", headers=ADMIN
        ).get_json()["results"]
        assert hits and hits[0]["doc_key"] == str(FIRST_ID + 3)
        aborted = freshet(env, "reembed", "--abort")
        assert aborted.returncode == 0, aborted.stderr
        assert state(settings).shadow_model is None
    finally:
        _restore(settings, env, worker, app, tmp_path)


def _restore(
    settings: Settings, env: dict[str, str], worker: RestartingWorker, app: Any, tmp: Path
) -> None:
    """The session's later tests embed with the bundled model: back to it, test rows gone."""
    with source(settings) as conn:
        conn.execute("DELETE FROM app.articles WHERE id >= %s", (FIRST_ID,))
    wait_for(lambda: indexed(settings) == 0, 600, interval=1)
    freshet(env, "reembed", "--abort")
    current = state(settings)
    if current.active(settings) != settings.embedding_model:
        freshet(env, "reembed", "--drop-previous")
        back = reembed(env, "--model", settings.embedding_model, "--force")
        output, _ = back.communicate(timeout=900)
        assert back.returncode == 0, output[-3000:]
    freshet(env, "reembed", "--drop-previous")
    worker.stop()
    close_app(app)
