"""A noisy neighbour: a second process that embeds continuously with one thread, beside the
stack under test, so a "busy machine" is the same load in every run.

    .venv/bin/python -m bench.load [--seconds 600] [--threads 1]

It embeds SciFact abstracts (read from ../shared/eval at run time) in batches of 16 with the
project's own embedder until SIGTERM or --seconds, whichever comes first, and prints how many
texts it embedded per second. Benchmarks use it through `neighbour()`; on a 2-core machine it
takes about one core for the whole run.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from freshet.settings import PROJECT_ROOT

BATCH = 16


@dataclass
class Neighbour:
    """What the neighbour process reported; filled when it stops."""

    threads: int
    log: Path
    loadavg: list[float] = field(default_factory=list)  # 1-minute load, sampled while it ran
    summary: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {
            "neighbour": f"a second process embedding continuously with {self.threads} thread(s)",
            "loadavg_1m_max": max(self.loadavg) if self.loadavg else None,
            "loadavg_1m_mean": (sum(self.loadavg) / len(self.loadavg)) if self.loadavg else None,
            **self.summary,
        }


@contextmanager
def neighbour(
    threads: int = 1, seconds: float = 3600, log_dir: Path | None = None
) -> Iterator[Neighbour]:
    """Run the neighbour for the duration of the block (stopped at its end, or by itself after
    ``seconds``); waits until it embeds before the block starts."""
    log = (log_dir or Path("/tmp")) / "freshet-bench-neighbour.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    state = Neighbour(threads, log)
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.load",
                "--seconds",
                str(seconds),
                "--threads",
                str(threads),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=PROJECT_ROOT,
        )
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(5):
            state.loadavg.append(os.getloadavg()[0])

    sampler = threading.Thread(target=sample, daemon=True)
    try:
        deadline = time.monotonic() + 120
        while "embedding" not in log.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the noisy neighbour did not start; see {log}")
            time.sleep(0.5)
        print(f"noisy neighbour: pid {process.pid}, {threads} thread(s), log {log}", flush=True)
        sampler.start()
        yield state
    finally:
        stop.set()
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("embedded "):
                # "embedded N texts in S s: R texts/s"
                parts = line.split()
                state.summary = {
                    "neighbour_texts": int(parts[1]),
                    "neighbour_texts_per_s": float(parts[-2]),
                }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600, help="stop after this long")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    from bench.report import scifact_corpus
    from freshet.embedder import TransformersEmbedder
    from freshet.settings import Settings

    settings = Settings.from_env(os.environ)
    embedder = TransformersEmbedder(settings.embedding_model, threads=args.threads)
    texts = [d["text"] for d in scifact_corpus(BATCH * 8)]
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    print(f"embedding batches of {BATCH} with {args.threads} thread(s)", flush=True)
    started = time.monotonic()
    done = 0
    i = 0
    while not stopping.is_set() and time.monotonic() - started < args.seconds:
        batch = texts[(i * BATCH) % len(texts) :][:BATCH]
        embedder.embed(batch)
        done += len(batch)
        i += 1
    elapsed = time.monotonic() - started
    print(f"embedded {done} texts in {elapsed:.1f} s: {done / elapsed:.1f} texts/s", flush=True)


if __name__ == "__main__":
    main()
