"""One Settings for every stage: the web app, the sync worker and the async workflow, built from
the same environment, embed with the same model, fuse the same way and take the same limits;
the web app reads the environment only through Settings.from_env."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flask import Flask

from freshet.answering.factory import Answering
from freshet.answering.messages import AnswerRequest, MessageError
from freshet.answering.retrieval import PgRetriever
from freshet.answering.users import User
from freshet.embedder import Embedder
from freshet.resources import package_dir
from freshet.settings import Settings, SettingsError
from freshet.sync.worker import build_worker
from freshet.web import app_settings, create_app
from freshet.web.services import get_embed, get_retriever
from freshet.workflow.inference import Inference

#: One deployment's environment, every value away from its default.
ENV = {
    "EMBEDDING_MODEL": "/models/one-model",
    "FRESHET_RRF_K": "30",
    "FRESHET_HYBRID_TEXT_WEIGHT": "0.5",
    "FRESHET_HNSW_EF_SEARCH": "200",
    "FRESHET_PUBLIC_DOCUMENTS": "false",
    "FRESHET_DEFAULT_K": "4",
    "FRESHET_MAX_ASK_K": "12",
    "FRESHET_MAX_SEARCH_K": "40",
    "FRESHET_LLM_MAX_TOKENS": "99",
    "FRESHET_ANSWER_STORE_BACKEND": "memory",
    "FRESHET_RATE_LIMIT_BACKEND": "memory",
}


class FakeTokenizer:
    def __call__(self, text: str, **kwargs: Any) -> dict[str, list[int]]:
        return {"input_ids": list(range(len(text.split())))}


class RecordingEmbedder(Embedder):
    """What embedder_from_settings returns here: it remembers the model it was built for."""

    built: list[str] = []

    def __init__(self, settings: Settings, **_options: object) -> None:
        super().__init__(4)
        self.model = settings.embedding_model
        self.tokenizer = FakeTokenizer()
        RecordingEmbedder.built.append(self.model)

    def _embed(self, texts: list[str]) -> np.ndarray:
        return np.ones((len(texts), 4), dtype=np.float32) / 2


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {**ENV, "FRESHET_HOME": str(tmp_path)}


@pytest.fixture(autouse=True)
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    RecordingEmbedder.built = []
    monkeypatch.setattr("freshet.embedder.embedder_from_settings", RecordingEmbedder)


def web_app(env: dict[str, str]) -> Flask:
    """The web app as `freshet web` builds it: create_app from Settings.from_env."""
    return create_app({"TESTING": True}, settings=Settings.from_env(env))


def test_every_stage_embeds_with_the_same_model(env: dict[str, str]) -> None:
    app = web_app(env)
    get_embed(app)  # the web app's query embedder
    build_worker(Settings.from_env(env))  # the sync worker's
    Answering(Settings.from_env(env)).embed()  # the inference worker's
    assert RecordingEmbedder.built == ["/models/one-model"] * 3
    assert app.config["EMBEDDING_MODEL"] == "/models/one-model"


def test_web_app_and_workflow_fuse_the_same_way(env: dict[str, str]) -> None:
    app = web_app(env)
    web = get_retriever(app)
    workflow = Answering(Settings.from_env(env)).retriever()
    assert isinstance(web, PgRetriever) and isinstance(workflow, PgRetriever)
    fusion = {"rrf_k": 30, "text_weight": 0.5, "ef_search": 200, "public_documents": False}
    for retriever in (web, workflow):
        assert {name: getattr(retriever, name) for name in fusion} == fusion
    assert app.config["RRF_K"] == 30 and app.config["HYBRID_TEXT_WEIGHT"] == 0.5


def test_the_tuned_fusion_is_what_every_stage_uses_by_default(tmp_path: Path) -> None:
    """RRF k 5 and text weight 1.2 (tuned on SciFact train), with no variable set."""
    app = web_app({"FRESHET_HOME": str(tmp_path)})
    web = get_retriever(app)
    workflow = Answering(Settings.from_env({"FRESHET_HOME": str(tmp_path)})).retriever()
    assert isinstance(web, PgRetriever) and isinstance(workflow, PgRetriever)
    for retriever in (web, workflow):
        assert (retriever.rrf_k, retriever.text_weight) == (5, 1.2)


def test_the_psql_search_functions_default_to_the_settings_defaults() -> None:
    """rag.search_text / rag.search_hybrid (migration 0006) take the ranking's defaults."""
    import importlib.util

    from freshet.resources import migrations_dir

    path = migrations_dir() / "versions" / "0006_bm25.py"
    spec = importlib.util.spec_from_file_location("migration_0006", path)
    assert spec is not None and spec.loader is not None
    migration = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(migration)
    defaults = Settings()
    assert {
        "k1": defaults.bm25_k1,
        "b": defaults.bm25_b,
        "cap": defaults.bm25_postings_cap,
        "text_weight": defaults.hybrid_text_weight,
        "rrf_k": defaults.rrf_k,
    } == migration.SQL_DEFAULTS


def test_sync_and_async_asks_take_the_same_largest_k(env: dict[str, str]) -> None:
    app = web_app(env)
    client = app.test_client()
    refused = client.post("/api/v1/ask", json={"question": "why?", "k": 13})
    assert refused.status_code == 400
    assert "between 1 and 12" in refused.get_json()["error"]["message"]
    search = client.get("/api/v1/search?q=x&k=41")
    assert search.status_code == 400 and "between 1 and 40" in search.get_json()["error"]["message"]
    inference = Inference.from_answering(Answering(Settings.from_env(env)))
    assert inference.max_k == app.config["MAX_ASK_K"] == 12
    request = AnswerRequest("r1", "why?", 13, User("ann"))
    with pytest.raises(MessageError, match="k must be an integer from 1 to 12"):
        AnswerRequest.decode(request.encode(), max_k=inference.max_k)
    document = client.get("/api/v1/openapi.json").get_json()
    ask_k = document["components"]["schemas"]["AskRequest"]["properties"]["k"]
    assert (ask_k["maximum"], ask_k["default"]) == (12, 4)


def test_the_default_largest_ask_k_is_one_value_for_both_paths(tmp_path: Path) -> None:
    settings = Settings.from_env({"FRESHET_HOME": str(tmp_path)})
    app = create_app({"TESTING": True}, settings=settings)
    inference = Inference.from_answering(Answering(settings))
    assert app.config["MAX_ASK_K"] == inference.max_k == settings.max_ask_k == 20


def test_the_app_settings_and_config_agree_after_test_overrides(env: dict[str, str]) -> None:
    app = create_app({"TESTING": True, "RRF_K": 3}, settings=Settings.from_env(env))
    assert app.config["RRF_K"] == app_settings(app).rrf_k == 3
    assert app_settings(app).llm_max_tokens == app.config["LLM_MAX_TOKENS"] == 99


def test_a_web_variable_reaches_the_app_only_through_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FRESHET_RRF_K", "42")
    monkeypatch.setenv("FRESHET_HOME", str(tmp_path))
    # Settings from another environment: the process's variable changes nothing.
    assert web_app({"FRESHET_HOME": str(tmp_path)}).config["RRF_K"] == 5
    # Settings from this process's environment: it does.
    assert create_app(settings=Settings.from_env()).config["RRF_K"] == 42
    # create_app as the entry point (no settings given) builds them, the same way, once.
    app = create_app({"TESTING": True})
    assert app.config["RRF_K"] == app_settings(app).rrf_k == 42


def test_nothing_in_the_app_or_the_answering_core_reads_the_environment() -> None:
    reads = re.compile(r"os\.environ|os\.getenv|\bgetenv\(|from os import|from_prefixed_env")
    offenders = []
    for package in ("freshet.web", "freshet.answering", "freshet.workflow"):
        root = package_dir(package)
        for path in sorted(root.rglob("*.py")):
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if reads.search(line):
                    offenders.append(f"{package}/{path.relative_to(root)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("FRESHET_RRF_K", "ten"),
        ("FRESHET_HYBRID_TEXT_WEIGHT", "heavy"),
        ("FRESHET_MAX_ASK_K", "0"),
        ("FRESHET_SEARCH_BURST", "-3"),
        ("FRESHET_RATE_LIMIT_BACKEND", "redis"),
        ("EMBEDDING_MODEL", None),
    ],
)
def test_a_bad_value_is_a_settings_error_naming_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str, value: str | None
) -> None:
    if value is None:  # the web-only alias of a shared setting
        variable, value = "FRESHET_EMBEDDING_MODEL", "/models/other"
    env = {"FRESHET_HOME": str(tmp_path), variable: value}
    with pytest.raises(SettingsError, match=variable):
        Settings.from_env(env)
    for name, raw in env.items():
        monkeypatch.setenv(name, raw)
    with pytest.raises(SettingsError, match=variable):
        create_app({"TESTING": True})


def test_a_bad_tokens_file_is_a_settings_error(env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "tokens.json").write_text("[1]")
    settings = Settings.from_env({**env, "FRESHET_API_TOKENS_FILE": str(tmp_path / "tokens.json")})
    with pytest.raises(SettingsError, match="FRESHET_API_TOKENS_FILE"):
        create_app({"TESTING": True}, settings=settings)
