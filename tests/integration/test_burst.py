"""A burst of changes on the real stack (Debezium -> Kafka -> sync worker): changes to many
documents are embedded together, in fewer embedding calls than changes, and a document changed
many times before the worker reads it is embedded once, at its newest version.

A captured table of its own and a consumer group of its own. The worker first catches up with
everything the group has not read (the demo tables' events are skipped: the mapping names the
probe table only) and stops; the burst is then written and waits in Kafka, so that the restarted
worker reads it in one poll.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from freshet.db import connect, database_url, source_database_url
from freshet.embedder import Embedder, TransformersEmbedder
from freshet.settings import Settings
from freshet.sync.chunking import TokenChunker
from freshet.sync.worker import SyncWorker
from tests.conftest import wait_for
from tests.integration.conftest import WorkerThread
from tests.integration.sync_support import caught_up, probe_table

pytestmark = pytest.mark.integration

PROBE = "app.burst_probe"
DOCS = 200
HOT = 1000  # the document changed ten times
VERSIONS = 10


class Recording(Embedder):
    """The real model; remembers every text it was asked to embed."""

    def __init__(self, model: Embedder) -> None:
        super().__init__(model.dim)
        self.model = model
        self.tokenizer = model.tokenizer  # type: ignore[attr-defined]
        self.calls: list[list[str]] = []

    def _embed(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        return self.model.embed(texts)


@pytest.fixture
def burst_settings(running_stack: Settings, tmp_path: Path) -> Iterator[Settings]:
    mappings = probe_table(running_stack, PROBE, tmp_path)
    with connect(source_database_url(running_stack), autocommit=True) as src:
        src.execute(f"TRUNCATE {PROBE}")
        src.execute(f"INSERT INTO {PROBE} VALUES (0, 'Start', 'the first row')")
    yield running_stack.with_overrides(
        mappings_path=mappings, sync_group=f"burst-probe-{time.monotonic_ns()}"
    )


@pytest.mark.parametrize(
    ("overlap", "int8"),
    [(False, False), (True, False), (False, True)],
    ids=["serial", "overlap", "int8"],
)
def test_a_burst_is_embedded_in_few_calls_and_a_hot_document_once_at_its_newest(
    burst_settings: Settings, embedder: Embedder, overlap: bool, int8: bool
) -> None:
    """With FRESHET_SYNC_OVERLAP the next transaction's texts are embedded ahead, on the
    prefetch thread: still every text once, the hot document once at its newest. With
    FRESHET_EMBED_INT8 the same, each chunk through the int8 model on two threads, and the
    stored vectors are close to the float model's."""
    burst_settings = burst_settings.with_overrides(sync_overlap=overlap, embed_int8=int8)
    url = database_url(burst_settings)
    model = Recording(
        TransformersEmbedder(threads=2, chunk_int8=True, bf16=False) if int8 else embedder
    )

    def worker() -> WorkerThread:
        return WorkerThread(
            SyncWorker(burst_settings, model, TokenChunker(model.tokenizer))
        ).start()

    with connect(url, autocommit=True) as idx:

        def indexed(key: int) -> str | None:
            row = idx.execute(
                "SELECT string_agg(c.text, ' ') FROM rag.chunks AS c"
                " WHERE c.source_table = %s AND c.doc_key = %s",
                (PROBE, str(key)),
            ).fetchone()
            return row[0] if row else None

        first = worker()
        try:
            assert wait_for(lambda: indexed(0), 180, interval=0.2), "row 0 never indexed"
            caught_up(first)
        finally:
            first.stop()

        # The burst, while no worker of the group runs: 200 new documents in one transaction,
        # then one document changed ten times (ten transactions).
        with connect(source_database_url(burst_settings), autocommit=True) as src:
            with src.transaction():
                for n in range(1, DOCS + 1):
                    src.execute(
                        f"INSERT INTO {PROBE} VALUES (%s, %s, %s)",
                        (n, f"Document {n}", f"burst document number {n} of the probe"),
                    )
            src.execute(f"INSERT INTO {PROBE} VALUES ({HOT}, 'Hot', 'hot document version 0')")
            for version in range(1, VERSIONS + 1):
                src.execute(
                    f"UPDATE {PROBE} SET body = %s WHERE id = {HOT}",
                    (f"hot document version {version}",),
                )
        time.sleep(3)  # Debezium has put the burst in Kafka (the next check waits if not)
        model.calls.clear()

        second = worker()
        try:
            assert wait_for(
                lambda: indexed(DOCS) and f"version {VERSIONS}" in (indexed(HOT) or ""),
                240,
                interval=0.2,
            ), "the burst was not indexed"
            caught_up(second)
            counters = second.worker.metrics.snapshot()["counters"]
            ahead = second.worker.prefetch
            served = second.worker.writer.embedder.served  # type: ignore[attr-defined]
        finally:
            second.stop()

        changes = DOCS + 1 + VERSIONS
        embedded = [text for call in model.calls for text in call]
        print(
            f"\n{changes} changes applied in {len(model.calls)} embedding calls"
            f" ({len(embedded)} texts; counters: embed_calls {counters['embed_calls']},"
            f" superseded {counters['superseded']})"
        )
        assert 0 < len(model.calls) < changes
        assert len(embedded) == len(set(embedded))  # nothing embedded twice
        if overlap:
            print(f"{ahead.texts} texts embedded ahead in {ahead.calls} calls, {served} served")
            assert ahead.texts > 0 and served > 0  # several transactions, overlapped
            # A transaction's call served wholly from what was embedded ahead reaches no model.
            assert len(model.calls) <= counters["embed_calls"] + ahead.calls
        else:
            assert ahead.calls == 0 and counters["embed_calls"] == len(model.calls)
        hot = [text for text in embedded if "hot document" in text]
        assert len(hot) == 1 and f"version {VERSIONS}" in hot[0], hot
        assert counters["superseded"] >= VERSIONS
        for n in range(1, DOCS + 1):
            assert f"burst document number {n} of the probe" in (indexed(n) or "")
        assert idx.execute(
            "SELECT count(*) FROM rag.documents WHERE source_table = %s AND deleted_at IS NULL",
            (PROBE,),
        ).fetchone() == (DOCS + 2,)
        if int8:
            stored = idx.execute(
                "SELECT text, embedding::text FROM rag.chunks WHERE source_table = %s"
                " ORDER BY id DESC LIMIT 20",
                (PROBE,),
            ).fetchall()
            vectors = np.array([np.array(v[1:-1].split(","), dtype=np.float32) for _, v in stored])
            cosines = np.sum(vectors * embedder.embed([t for t, _ in stored]), axis=1)
            print(f"int8 chunks' cosine to the float model's: min {cosines.min():.4f}")
            assert cosines.min() > 0.95 and cosines.max() < 0.99999
