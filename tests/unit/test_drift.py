"""Drift on a schedule without services: the history the status shows, and the watcher that
refuses to start when the schedule is off."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from freshet.cli import main
from freshet.sync.drift import history

T0 = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)


class Runs:
    """Answers history's query with rows newest first, as the SQL orders them."""

    def __init__(self, rows: list[tuple[Any, ...]]) -> None:
        self.rows = rows

    def execute(self, sql: str, params: Any) -> Runs:
        self.limit = params[0]
        return self

    def fetchall(self) -> list[tuple[Any, ...]]:
        return self.rows[: self.limit]


def test_history_is_oldest_first_with_every_difference_counted() -> None:
    rows = [
        (T0 + timedelta(minutes=10), 500, {"missing": 2, "stale": 1, "hidden": 1}, False),
        (T0, 498, {"missing": 0, "stale": 0}, True),
    ]
    assert history(Runs(rows)) == [
        {"finished_at": T0.isoformat(), "rows_checked": 498, "in_sync": True, "differences": 0},
        {
            "finished_at": (T0 + timedelta(minutes=10)).isoformat(),
            "rows_checked": 500,
            "in_sync": False,
            "differences": 4,
        },
    ]
    assert len(history(Runs(rows), limit=1)) == 1


def test_drift_watch_with_the_schedule_off_says_which_setting(
    capsys: Any, monkeypatch: Any, tmp_path: Any
) -> None:
    monkeypatch.setenv("FRESHET_HOME", str(tmp_path))
    monkeypatch.setenv("FRESHET_VERIFY_EVERY_MIN", "0")
    assert main(["drift-watch"]) == 2
    assert "FRESHET_VERIFY_EVERY_MIN" in capsys.readouterr().err
