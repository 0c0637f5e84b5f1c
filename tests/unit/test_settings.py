"""Settings from the environment: defaults, parsing, and errors that name the variable."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from freshet.settings import (
    FAST_PATHS,
    PROJECT_ROOT,
    REGENERATE,
    STAGES,
    Settings,
    SettingsError,
    default_of,
    main,
    markdown,
    settings_fields,
)


def test_embedding_fast_path_defaults_to_compiled_with_a_project_cache() -> None:
    settings = Settings.from_env({})
    assert settings.embed_fast_path == "compiled"
    assert settings.embed_cache == PROJECT_ROOT / ".freshet" / "compiled"


@pytest.mark.parametrize("value", FAST_PATHS)
def test_every_fast_path_is_accepted_in_any_case(value: str) -> None:
    settings = Settings.from_env({"FRESHET_EMBED_FAST_PATH": f" {value.upper()} "})
    assert settings.embed_fast_path == value


def test_an_unknown_fast_path_names_the_variable_and_the_choices() -> None:
    with pytest.raises(SettingsError, match=r"FRESHET_EMBED_FAST_PATH='jit' is not one of"):
        Settings.from_env({"FRESHET_EMBED_FAST_PATH": "jit"})


def test_embed_cache_is_resolved(tmp_path: Path) -> None:
    settings = Settings.from_env({"FRESHET_EMBED_CACHE": str(tmp_path / "x" / ".." / "c")})
    assert settings.embed_cache == tmp_path / "c"


def test_a_bad_integer_names_the_variable() -> None:
    with pytest.raises(SettingsError, match="FRESHET_EMBED_SMALL_CALL_THREADS='two'"):
        Settings.from_env({"FRESHET_EMBED_SMALL_CALL_THREADS": "two"})


def test_demo_rows_is_all_by_default_and_never_negative() -> None:
    assert Settings.from_env({}).demo_rows == 0
    assert Settings.from_env({"FRESHET_DEMO_ROWS": "30"}).demo_rows == 30
    with pytest.raises(SettingsError, match="FRESHET_DEMO_ROWS=-1 must be 0 or more"):
        Settings.from_env({"FRESHET_DEMO_ROWS": "-1"})


def test_docs_settings_md_is_generated_from_the_class() -> None:
    docs = PROJECT_ROOT / "docs" / "settings.md"
    assert docs.read_text(encoding="utf-8") == markdown(), (
        f"docs/settings.md differs from the Settings class: regenerate it with `{REGENERATE}`"
    )


def test_every_setting_has_one_variable_a_stage_and_a_description() -> None:
    variables = [f.metadata["env"] for f in settings_fields()]
    assert len(variables) == len(set(variables)), "two settings share a variable"
    for f in settings_fields():
        assert f.metadata["stage"] in STAGES, f.name
        assert f.metadata["doc"] and "\n" not in f.metadata["doc"], f.name
        assert default_of(f), f.name
        assert f.metadata["env"] in markdown(), f.name


def test_every_setting_is_read_from_its_variable() -> None:
    """Each field's variable changes that field, and only through Settings.from_env."""
    defaults = Settings.from_env({})
    for f in settings_fields():
        value = getattr(defaults, f.name)
        if isinstance(value, bool):
            raw = "false" if value else "true"
        elif isinstance(value, int):
            raw = str(value + 1)
        elif isinstance(value, float):
            raw = str(value + 0.5 if value < 0.5 else value - 0.5)  # fractions stay in 0..1
        else:
            continue
        changed = Settings.from_env({f.metadata["env"]: raw})
        assert getattr(changed, f.name) != value, f.metadata["env"]


def test_web_settings_come_from_their_freshet_variables() -> None:
    settings = Settings.from_env(
        {
            "FRESHET_HNSW_EF_SEARCH": "250",
            "FRESHET_PUBLIC_DOCUMENTS": "false",
            "FRESHET_RRF_K": "60",
            "FRESHET_HYBRID_TEXT_WEIGHT": "1",
            "FRESHET_MAX_ASK_K": "30",
            "FRESHET_OPENAI_BASE_URL": "http://llm:8000/v1",
            "FRESHET_RATE_LIMIT_BACKEND": " OFF ",
            "FRESHET_API_TOKENS": '{"t": {"user": "ops", "groups": ["staff"]}}',
        }
    )
    assert settings.hnsw_ef_search == 250 and settings.public_documents is False
    assert (settings.rrf_k, settings.hybrid_text_weight, settings.max_ask_k) == (60, 1.0, 30)
    assert settings.openai_base_url == "http://llm:8000/v1"
    assert settings.rate_limit_backend == "off"
    assert settings.api_tokens == {"t": {"user": "ops", "groups": ["staff"]}}
    config = settings.app_config()
    assert config["HNSW_EF_SEARCH"] == 250 and config["RRF_K"] == 60
    assert config["EMBEDDING_MODEL"] == settings.embedding_model


def test_the_tuned_fusion_and_the_largest_k_are_the_defaults() -> None:
    settings = Settings()
    assert (settings.rrf_k, settings.hybrid_text_weight) == (5, 1.2)
    assert (settings.default_k, settings.max_ask_k, settings.max_search_k) == (5, 20, 100)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FRESHET_HNSW_EF_SEARCH": "many"}, "FRESHET_HNSW_EF_SEARCH='many' is not an integer"),
        ({"FRESHET_HNSW_EF_SEARCH": "5000"}, "FRESHET_HNSW_EF_SEARCH=5000 must be from 1 to 1000"),
        ({"FRESHET_HYBRID_TEXT_WEIGHT": "-1"}, "FRESHET_HYBRID_TEXT_WEIGHT=-1 must be 0 or more"),
        ({"FRESHET_LLM_TIMEOUT": "soon"}, "FRESHET_LLM_TIMEOUT='soon' is not a number"),
        ({"FRESHET_LLM_TIMEOUT": "nan"}, "FRESHET_LLM_TIMEOUT='nan' is not a finite number"),
        ({"FRESHET_ALLOW_ANONYMOUS": "maybe"}, "FRESHET_ALLOW_ANONYMOUS='maybe' is not a boolean"),
        ({"LLM_BACKEND": "gpt"}, "LLM_BACKEND='gpt' is not one of extractive, openai"),
        ({"FRESHET_RATE_LIMIT_BACKEND": "redis"}, "FRESHET_RATE_LIMIT_BACKEND='redis' is not one"),
        ({"FRESHET_ANSWER_STORE_BACKEND": "disk"}, "FRESHET_ANSWER_STORE_BACKEND='disk'"),
        ({"FRESHET_API_TOKENS": "{not json"}, "FRESHET_API_TOKENS is not JSON"),
        ({"FRESHET_API_TOKENS": "[1]"}, "FRESHET_API_TOKENS must be a JSON object"),
        ({"FRESHET_MAX_ASK_K": "0"}, "FRESHET_MAX_ASK_K=0 must be a positive integer"),
        ({"FRESHET_MAX_ASK_K": "200"}, "FRESHET_MAX_ASK_K=200 is larger than FRESHET_MAX_SEARCH_K"),
        ({"FRESHET_DEFAULT_K": "25"}, "FRESHET_DEFAULT_K=25 is larger than FRESHET_MAX_ASK_K=20"),
        ({"FRESHET_POOL_MIN_SIZE": "20"}, "FRESHET_POOL_MIN_SIZE=20 is larger than"),
        ({"FRESHET_METRICS_PORT": "70000"}, "FRESHET_METRICS_PORT=70000 is not a TCP port"),
        ({"FRESHET_JVM_NICE": "25"}, "FRESHET_JVM_NICE=25 must be from 0 to 19"),
        ({"FRESHET_SYNC_INSTANCE_ID": "x" * 250}, "FRESHET_SYNC_INSTANCE_ID must be at most 249"),
        ({"FRESHET_SYNC_INSTANCE_ID": ".."}, "FRESHET_SYNC_INSTANCE_ID must be at most 249"),
    ],
)
def test_a_bad_web_or_stage_value_names_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(message)):
        Settings.from_env(env)


def test_a_secret_in_a_bad_tokens_value_is_not_repeated() -> None:
    with pytest.raises(SettingsError) as error:
        Settings.from_env({"FRESHET_API_TOKENS": "s3cret-token"})
    assert "s3cret" not in str(error.value)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("FRESHET_EMBEDDING_MODEL", "EMBEDDING_MODEL"),
        ("FRESHET_LLM_BACKEND", "LLM_BACKEND"),
        ("FRESHET_DATABASE_URL", "DATABASE_URL"),
    ],
)
def test_a_web_only_alias_of_a_shared_setting_is_refused(old: str, new: str) -> None:
    with pytest.raises(SettingsError, match=f"{old} is no longer read: set {new}"):
        Settings.from_env({old: "x"})


def test_app_config_overrides_fold_into_the_settings() -> None:
    settings = Settings().with_app_config({"RRF_K": 3, "LLM_BACKEND": None, "TESTING": True})
    assert settings.rrf_k == 3 and settings.llm_backend == "extractive"


def test_settings_markdown_command_prints_the_docs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--markdown"]) == 0
    assert capsys.readouterr().out == markdown()


def test_up_gives_its_sync_worker_a_static_instance_id_per_home(tmp_path: Path) -> None:
    """`freshet up` runs one sync worker per FRESHET_HOME: its static group.instance.id names
    the host and the home, so two homes never fence each other; a set value wins."""
    from freshet.cdc.services import LocalSyncWorker, sync_instance_id

    one = Settings.from_env({"FRESHET_HOME": str(tmp_path / "a")})
    two = Settings.from_env({"FRESHET_HOME": str(tmp_path / "b")})
    assert one.sync_instance_id == ""  # a worker started by hand: dynamic membership
    assert sync_instance_id(one) == sync_instance_id(one) != sync_instance_id(two)
    assert LocalSyncWorker(one).extra_env() == {"FRESHET_SYNC_INSTANCE_ID": sync_instance_id(one)}
    chosen = Settings.from_env({"FRESHET_HOME": str(tmp_path), "FRESHET_SYNC_INSTANCE_ID": "w-7"})
    assert sync_instance_id(chosen) == "w-7"
