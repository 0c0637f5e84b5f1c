"""Pure pieces of the model change (sync/model_gate.py, sync/reembed.py): nDCG, query sets,
the rate limit and the gate's report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from freshet.settings import Settings
from freshet.sync.model_gate import GateError, from_file, ndcg_at, scifact_train
from freshet.sync.reembed import GateReport, RateLimit


def test_ndcg_rewards_the_judged_documents_at_the_top() -> None:
    assert ndcg_at(["a", "b"], {"a": 1}) == 1.0
    assert ndcg_at(["b", "a"], {"a": 1}) == pytest.approx(1 / 1.5849625, rel=1e-6)
    assert ndcg_at(["x"] * 10 + ["a"], {"a": 1}) == 0.0
    assert ndcg_at(["b", "a"], {"a": 2, "b": 1}) < ndcg_at(["a", "b"], {"a": 2, "b": 1})


def test_a_query_file_is_read_and_a_bad_line_names_its_number(tmp_path: Path) -> None:
    good = tmp_path / "q.jsonl"
    good.write_text('{"query": "keys", "relevant": {"42": 1, "7": 2}}\n\n')
    queries = from_file(good, "app.articles")
    assert [(q.text, q.relevant) for q in queries.queries] == [("keys", {"42": 1, "7": 2})]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "a", "relevant": {"1": 1}}\n{"question": "b"}\n')
    with pytest.raises(GateError, match=r"bad.jsonl:2"):
        from_file(bad, "app.articles")
    with pytest.raises(GateError, match="metadata:NAME"):
        from_file(good, "app.articles", "title").key_expression()


def test_the_default_query_set_is_scifact_train_over_app_scifact() -> None:
    eval_dir = Settings().eval_dir
    if not (eval_dir / "scifact").is_dir():
        pytest.skip(f"no SciFact data in {eval_dir}")
    queries = scifact_train(eval_dir)
    assert queries.table == "app.scifact" and queries.match == "metadata:corpus_id"
    assert len(queries.queries) > 700  # SciFact train: 809 judged queries
    with pytest.raises(GateError, match="--queries"):
        scifact_train(eval_dir / "nowhere")


def test_the_rate_limit_sleeps_only_when_ahead() -> None:
    slept: list[float] = []
    limit = RateLimit(100, sleep=slept.append)
    limit.add(50)  # 0.5 s of work done at once
    assert slept and 0.4 < slept[0] <= 0.5
    unlimited = RateLimit(0, sleep=slept.append)
    unlimited.add(10_000)
    assert len(slept) == 1


def test_the_gate_report_shows_both_figures_and_the_verdict() -> None:
    report = GateReport("old", "new", "set", 50, 50, 50, 0.81, 0.62, 0.01, passed=False)
    text = "\n".join(report.lines())
    assert "0.8100" in text and "0.6200" in text and "-0.1900" in text and "refused" in text


def test_the_sync_worker_follows_the_shadow_and_stops_at_a_switch() -> None:
    from freshet.index_model import IndexModel, ModelSwitched
    from freshet.sync.index_models import IndexModels

    loaded: list[str] = []

    def load(name: str) -> Any:
        loaded.append(name)
        return f"embedder of {name}"

    settings = Settings()
    models = IndexModels(settings, settings.embedding_model, load)
    models._follow(IndexModel())
    assert models.shadow is None and loaded == []
    models._follow(IndexModel(shadow_model="/m/new", shadow_state="building"))
    models._follow(IndexModel(shadow_model="/m/new", shadow_state="building"))
    assert loaded == ["/m/new"] and models.shadow == "embedder of /m/new"
    models._follow(IndexModel(shadow_model="/m/new", shadow_state="refused"))
    assert models.shadow is None  # a refused shadow is no longer written
    lane = IndexModels(settings, settings.embedding_model, load, shadow_writes=False)
    lane._follow(IndexModel(shadow_model="/m/new", shadow_state="building"))
    assert lane.shadow is None and loaded == ["/m/new"]
    with pytest.raises(ModelSwitched, match="/m/new"):
        models._follow(IndexModel(generation=1, model="/m/new"))


def test_the_query_embedder_follows_a_switch_once() -> None:
    import numpy as np

    from freshet.answering.retrieval import EmbedThread
    from freshet.embedder import Embedder
    from freshet.index_model import IndexModel

    class Fixed(Embedder):
        def __init__(self, value: float) -> None:
            super().__init__(2)
            self.value = value

        def _embed(self, texts: list[str]) -> np.ndarray:
            return np.full((len(texts), 2), self.value, dtype=np.float32)

    built: list[str] = []

    def model_for(state: IndexModel) -> tuple[str, Any]:
        name = state.model or "old"
        return name, lambda: built.append(name) or Fixed(2.0)

    thread = EmbedThread(Fixed(1.0), generation=0, model_name="old", model_for=model_for)
    assert thread("q")[0] == 1.0
    assert not thread.follow(IndexModel(generation=0))
    assert thread.follow(IndexModel(generation=1, model="new"))
    assert thread.generation == 1 and thread.model_name == "new" and built == ["new"]
    assert thread("q")[0] == 2.0
    assert not thread.follow(IndexModel(generation=1, model="new"))


def test_status_shows_the_index_model_and_a_re_embed_under_way() -> None:
    from freshet.cdc.commands import render_status

    base = {
        "home": "/h",
        "postgres": {"state": "RUNNING"},
        "kafka": {"state": "RUNNING", "bootstrap_servers": "127.0.0.1:1", "topics": []},
        "connect": {"state": "RUNNING", "url": "http://x/"},
        "connector": {"state": "RUNNING", "name": "c", "tasks": []},
    }
    model = {"model": None, "generation": 0, "shadow_model": "/m/new", "shadow_state": "building"}
    text = render_status({**base, "embedding_model": {**model, "shadow_missing": 1234}})
    assert "EMBEDDING_MODEL (generation 0)" in text
    assert "re-embed to /m/new: building, 1,234 chunks to go" in text
