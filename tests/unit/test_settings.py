"""Settings from the environment: defaults, parsing, and errors that name the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from freshet.settings import FAST_PATHS, PROJECT_ROOT, Settings, SettingsError


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
