"""Batches embedded on a fixed thread count against the measured choice (freshet/thread_choice.py),
on a quiet machine and beside the noisy neighbour of `--load` (bench/load.py: a second process
embedding continuously with one thread).

    .venv/bin/python -m bench.thread_choice [--rounds 2]

Two kinds of text, each embedded in one call (batches of FRESHET_EMBED_BATCH) by two embedders
of the same model in this process: FRESHET_EMBED_THREADS on every batch
(FRESHET_EMBED_ADAPTIVE_THREADS=false), and the measured choice (the default). Short texts are
one line of 7 words (as test_reembed's rows); paragraphs are SciFact abstracts cut at 700
characters (~150 tokens, one paragraph of an edit). Rounds alternate quiet and loaded, so the
choice has to follow the load both ways; the table gives each round's ms per text and the
median ratio fixed / chosen (above 1: the choice is faster).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from typing import Any

from bench.load import neighbour
from bench.report import print_table, scifact_corpus, write_results
from freshet.embedder import TransformersEmbedder
from freshet.settings import Settings

WORDS = ("amber", "basalt", "cedar", "dune", "ember", "fjord", "glacier", "harbor", "iris", "kelp")


def short_texts(count: int) -> list[str]:
    return [f"Item {i} " + " ".join(random.Random(i).sample(WORDS, 7)) for i in range(count)]


def paragraphs(count: int) -> list[str]:
    return [d["text"][:700] for d in scifact_corpus(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="quiet/loaded pairs")
    parser.add_argument("--short", type=int, default=2000, help="short texts per call")
    parser.add_argument("--paragraphs", type=int, default=240, help="paragraphs per call")
    args = parser.parse_args()
    settings = Settings.from_env(dict(os.environ))
    texts = {"short": short_texts(args.short), "paragraph": paragraphs(args.paragraphs)}
    embedders = {
        label: TransformersEmbedder(
            settings.embedding_model,
            batch_size=settings.embed_batch,
            threads=settings.embed_threads,
            adaptive_threads=adaptive,
            fast_path="off",
        )
        for label, adaptive in (("fixed", False), ("chosen", True))
    }
    for embedder in embedders.values():
        embedder.embed(texts["short"][:64])
    threads = embedders["fixed"].threads
    runs: list[dict[str, Any]] = []
    for round_ in range(args.rounds):
        for loaded in (False, True):
            if loaded:
                with neighbour() as noisy:
                    measured = measure(embedders, texts)
                load = noisy.describe()
            else:
                measured = measure(embedders, texts)
                load = {"neighbour": None}
            runs.append(
                {"round": round_ + 1, "loaded": loaded, "ms_per_text": measured, "load": load}
            )
            print(f"round {round_ + 1}, {'loaded' if loaded else 'quiet'}: {measured}", flush=True)
    rows: list[tuple[str, str]] = []
    ratios: dict[str, float] = {}
    for kind in texts:
        for loaded in (False, True):
            mine = [r["ms_per_text"][kind] for r in runs if r["loaded"] == loaded]
            ratio = statistics.median(m["fixed"] / m["chosen"] for m in mine)
            where = "beside the neighbour" if loaded else "quiet"
            ratios[f"{kind}, {where}"] = ratio
            rows.append(
                (
                    f"{kind}, {where}",
                    f"fixed {threads} threads "
                    + " / ".join(f"{m['fixed']:.2f}" for m in mine)
                    + " ms; chosen "
                    + " / ".join(f"{m['chosen']:.2f}" for m in mine)
                    + f" ms; fixed/chosen {ratio:.2f}",
                )
            )
    rows.append(("load average (1 min, at the end)", f"{os.getloadavg()[0]:.2f}"))
    print_table("embedding batches: a fixed thread count against the measured choice", rows)
    write_results(
        "thread_choice",
        {
            "threads": threads,
            "batch": settings.embed_batch,
            "texts": {kind: len(values) for kind, values in texts.items()},
            "runs": runs,
            "fixed_over_chosen_median": ratios,
        },
    )


def measure(
    embedders: dict[str, TransformersEmbedder], texts: dict[str, list[str]]
) -> dict[str, dict[str, float]]:
    """ms per text of each embedder on each kind of text, embedders alternating."""
    out: dict[str, dict[str, float]] = {}
    for kind, values in texts.items():
        out[kind] = {}
        for label, embedder in embedders.items():
            started = time.perf_counter()
            embedder.embed(values)
            out[kind][label] = round((time.perf_counter() - started) / len(values) * 1000, 3)
    return out


if __name__ == "__main__":
    main()
