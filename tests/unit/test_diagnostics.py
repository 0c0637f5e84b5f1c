"""The failure report of a test on a real stack (tests/diagnostics.py)."""

from __future__ import annotations

from pathlib import Path

from freshet.settings import Settings
from tests.diagnostics import homes_of, report


def test_homes_come_from_settings_and_environments_once(tmp_path: Path) -> None:
    settings = Settings.from_env({"FRESHET_HOME": str(tmp_path)})
    other = tmp_path / "other"
    homes = homes_of([settings, {"FRESHET_HOME": str(tmp_path)}, {"FRESHET_HOME": str(other)}, 3])
    assert homes == [tmp_path, other]


def test_the_report_has_the_end_of_each_log(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    lines = [f"line {n}" for n in range(100)]
    (tmp_path / "logs" / "infer.log").write_text("\n".join(lines) + "\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "infer.pid").write_text("not a pid\n")
    text = report(tmp_path)
    assert "--- infer.log (last 60 lines) ---" in text
    assert "line 99" in text and "line 40" in text and "line 39\n" not in text
    assert "py-spy" not in text  # no process to dump
