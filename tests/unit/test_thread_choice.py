"""ThreadChoice (freshet/thread_choice.py): each count measured first, the faster one run,
the other one probed again now and then, and a change of load followed."""

from __future__ import annotations

from freshet.thread_choice import ThreadChoice, length_class


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run(choice: ThreadChoice, clock: Clock, speed: dict[int, float], tokens: int = 20) -> int:
    """One batch of 8 texts padded to ``tokens``; ``speed``: seconds per token per count."""
    threads = choice.choose(tokens)
    seconds = speed[threads] * tokens * 8
    clock.now += seconds
    choice.record(threads, tokens, 8, seconds)
    return threads


def test_both_counts_are_measured_first_then_the_faster_runs() -> None:
    clock = Clock()
    choice = ThreadChoice(2, clock=clock, probe_every=50, min_probe_s=5)
    busy = {1: 3.7e-4, 2: 6.0e-4}
    assert [run(choice, clock, busy) for _ in range(2)] == [2, 1]
    assert {run(choice, clock, busy) for _ in range(40)} == {1}


def test_the_other_count_is_probed_now_and_then_and_a_change_is_followed() -> None:
    clock = Clock()
    choice = ThreadChoice(2, clock=clock, probe_every=10, min_probe_s=0.1)
    busy, quiet = {1: 3.7e-4, 2: 6.0e-4}, {1: 3.7e-4, 2: 2.2e-4}
    busy_run = [run(choice, clock, busy) for _ in range(24)]
    assert busy_run.count(2) == 3, busy_run  # the first measurement and a probe per 10 batches
    # The other cores are left alone: 1 thread runs as before, so only a probe can tell.
    seen = [run(choice, clock, quiet) for _ in range(40)]
    first_two = seen.index(2)
    assert first_two <= 11, seen
    after = seen[first_two:]
    assert after.count(1) <= len(after) // 10 + 1, seen  # 2 from then on, 1 as a probe


def test_no_probe_sooner_than_min_probe_s() -> None:
    clock = Clock()
    choice = ThreadChoice(2, clock=clock, probe_every=1, min_probe_s=3600)
    busy = {1: 3.7e-4, 2: 6.0e-4}
    seen = [run(choice, clock, busy) for _ in range(200)]
    assert seen[:2] == [2, 1]
    assert seen.count(2) == 1  # the first measurement only: no probe within the hour
    assert clock.now < 3600


def test_a_probe_is_due_after_max_probe_s_even_with_few_batches() -> None:
    # Calls of a few batches each, far apart: the count chosen under a load that has gone must
    # not stay for good.
    clock = Clock()
    choice = ThreadChoice(2, clock=clock, probe_every=1000, min_probe_s=3, max_probe_s=30)
    busy, quiet = {1: 3.7e-4, 2: 6.0e-4}, {1: 3.7e-4, 2: 2.2e-4}
    assert [run(choice, clock, busy) for _ in range(4)] == [2, 1, 1, 1]
    clock.now += 31
    assert run(choice, clock, quiet) == 2  # the probe
    assert [run(choice, clock, quiet) for _ in range(3)] == [2, 2, 2]


def test_the_count_in_use_follows_a_load_that_arrives() -> None:
    clock = Clock()
    choice = ThreadChoice(2, clock=clock, probe_every=1000, min_probe_s=3600)
    busy, quiet = {1: 3.7e-4, 2: 6.0e-4}, {1: 3.7e-4, 2: 2.2e-4}
    assert [run(choice, clock, quiet) for _ in range(5)] == [2, 1, 2, 2, 2]
    # Load arrives: 2 threads get slower than 1 thread's figure without any probe.
    seen = [run(choice, clock, busy) for _ in range(10)]
    assert seen[-1] == 1 and seen.count(2) <= 4, seen


def test_length_classes_are_chosen_apart() -> None:
    clock = Clock()
    choice = ThreadChoice(2, clock=clock)
    short = {1: 3.7e-4, 2: 6.0e-4}
    long = {1: 3.4e-4, 2: 1.8e-4}
    for _ in range(5):
        run(choice, clock, short, tokens=20)
        run(choice, clock, long, tokens=256)
    assert length_class(20) != length_class(256)
    assert run(choice, clock, short, tokens=20) == 1
    assert run(choice, clock, long, tokens=256) == 2


def test_one_count_when_not_adaptive_or_one_core() -> None:
    clock = Clock()
    for choice, expected in (
        (ThreadChoice(4, adaptive=False, clock=clock), 4),
        (ThreadChoice(1, clock=clock), 1),
    ):
        assert {run(choice, clock, {1: 1e-4, 4: 9e-4}) for _ in range(20)} == {expected}
        assert choice.rate(expected, 20) is None  # nothing to compare, nothing kept
