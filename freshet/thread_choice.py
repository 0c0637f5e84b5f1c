"""How many torch threads a batch of texts runs on, chosen by measured speed.

On a machine whose cores are shared (the database, Kafka and Debezium beside the sync worker, or
another process altogether), torch's parallel regions wait for their slowest thread, and a
thread preempted by another process stalls all of them. Measured on 2 cores with one core kept
busy by another process, one-line texts embed in 3.7 ms each on 1 thread and 6.0-6.3 ms on 2;
SciFact abstracts in 86-87 ms on 1 thread and 94-96 ms on 2. On the same cores left quiet, 2
threads are faster (2.2-2.3 ms and 46 ms). Neither count is right for every moment, so the
embedder measures both.

For each padded length class (short inputs are dominated by per-region overhead, long ones by
arithmetic), `ThreadChoice` keeps a moving average of the seconds per token of each count and
runs the faster one. The other count is tried again now and then, so a change of load is
followed: after ``probe_every`` batches of the chosen count or ``max_probe_s`` seconds,
whichever comes first, and never sooner than ``min_probe_s`` (a probe of the slower count costs
one batch's difference). The figure of the
count in use is a moving average; a probe's figure replaces the other count's, measured
under another load.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

# Padded input lengths (tokens) up to each bound share a class.
LENGTH_CLASSES = (32, 96)


def length_class(tokens: int) -> int:
    for index, bound in enumerate(LENGTH_CLASSES):
        if tokens <= bound:
            return index
    return len(LENGTH_CLASSES)


class ThreadChoice:
    """Chooses between 1 thread and ``most`` threads for each batch by their measured speed
    (always ``most`` when not ``adaptive``)."""

    def __init__(
        self,
        most: int,
        *,
        adaptive: bool = True,
        probe_every: int = 20,
        min_probe_s: float = 3.0,
        max_probe_s: float = 30.0,
        weight: float = 0.3,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        most = max(most, 1)
        self.options: tuple[int, ...] = (most, 1) if adaptive and most > 1 else (most,)
        self.probe_every = probe_every
        self.min_probe_s = min_probe_s
        self.max_probe_s = max_probe_s
        self.weight = weight
        self.clock = clock
        self._lock = threading.Lock()
        # (threads, length class) -> seconds per token (moving average)
        self._rate: dict[tuple[int, int], float] = {}
        # length class -> batches run on the chosen count since the last probe, and its time
        self._since_probe: dict[int, int] = {}
        self._probed_at: dict[int, float] = {}
        self._chosen: dict[int, int] = {}

    def choose(self, tokens: int) -> int:
        """The thread count for a batch padded to ``tokens`` tokens."""
        if len(self.options) == 1:
            return self.options[0]
        cls = length_class(tokens)
        with self._lock:
            for option in self.options:  # each count is measured once first
                if (option, cls) not in self._rate:
                    return option
            best = min(self.options, key=lambda o: self._rate[(o, cls)])
            now = self.clock()
            waited = now - self._probed_at.setdefault(cls, now)
            due = self._since_probe.get(cls, 0) >= self.probe_every or waited >= self.max_probe_s
            if due and waited >= self.min_probe_s:
                self._since_probe[cls] = 0
                self._probed_at[cls] = now
                return next(o for o in self.options if o != best)
            self._since_probe[cls] = self._since_probe.get(cls, 0) + 1
            if self._chosen.get(cls) != best:
                self._chosen[cls] = best
                logger.debug(
                    "batches of up to %s tokens: %d thread(s) (%s)",
                    LENGTH_CLASSES[cls] if cls < len(LENGTH_CLASSES) else "more",
                    best,
                    self.describe(cls),
                )
            return best

    def record(self, threads: int, tokens: int, texts: int, seconds: float) -> None:
        """A batch of ``texts`` texts padded to ``tokens`` ran on ``threads`` in ``seconds``."""
        if len(self.options) == 1 or texts <= 0 or tokens <= 0:
            return
        cls = length_class(tokens)
        key = (threads, cls)
        rate = seconds / (tokens * texts)
        with self._lock:
            old = self._rate.get(key)
            # The count in use is averaged over its batches; a probe of the other one replaces
            # its figure, which was measured under another load.
            if old is not None and threads == self._chosen.get(cls):
                rate = old + self.weight * (rate - old)
            self._rate[key] = rate

    def rate(self, threads: int, tokens: int) -> float | None:
        """The measured seconds per token of ``threads`` for batches padded to ``tokens``."""
        with self._lock:
            return self._rate.get((threads, length_class(tokens)))

    def describe(self, cls: int) -> str:
        return ", ".join(
            f"{o} thread(s): {self._rate[(o, cls)] * 1e6:.1f} us/token"
            for o in self.options
            if (o, cls) in self._rate
        )
