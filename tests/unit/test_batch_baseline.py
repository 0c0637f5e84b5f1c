"""The cron-job baseline of bench.freshness: staleness and embeddings of a job every N
seconds, replayed over recorded edits."""

from __future__ import annotations

import pytest

from bench.batch_baseline import Edit, replay


def test_each_edit_waits_for_the_next_run_plus_that_runs_embedding() -> None:
    # One offset: runs at 10, 20, 30 ... (start 0, interval 10).
    edits = [Edit(1.0, "a"), Edit(9.0, "b"), Edit(12.0, "a")]
    result = replay(edits, 10.0, {"a": 3, "b": 2}, 0.5, start=0.0, offsets=1)
    # Run at 10 embeds a (3 chunks) + b (2): 2.5 s; run at 20 embeds a: 1.5 s.
    # Staleness: 10 + 2.5 - 1 = 11.5, 10 + 2.5 - 9 = 3.5, 20 + 1.5 - 12 = 9.5.
    assert result["count"] == 3
    assert result["embeddings"] == 8
    assert result["runs"] == 2
    assert result["mean_ms"] == pytest.approx((11.5 + 3.5 + 9.5) / 3 * 1000)
    assert result["max_ms"] == pytest.approx(11500)


def test_a_row_edited_twice_between_runs_is_embedded_once() -> None:
    edits = [Edit(1.0, "a"), Edit(2.0, "a"), Edit(3.0, "a")]
    result = replay(edits, 60.0, {"a": 4}, 0.0, start=0.0, offsets=1)
    assert result["embeddings"] == 4 and result["runs"] == 1


def test_offsets_spread_the_schedule_and_the_mean_is_about_half_the_interval() -> None:
    edits = [Edit(float(t) / 10, "r") for t in range(6000)]  # 10 edits/s for 600 s
    result = replay(edits, 60.0, {"r": 1}, 0.0, start=0.0)
    assert result["mean_ms"] == pytest.approx(30_000, rel=0.05)
    assert result["max_ms"] <= 60_000


def test_no_edits_and_bad_arguments() -> None:
    assert replay([], 60.0, {}, 0.1, start=0.0)["count"] == 0
    with pytest.raises(ValueError):
        replay([Edit(1.0, "a")], 0.0, {}, 0.1, start=0.0)
