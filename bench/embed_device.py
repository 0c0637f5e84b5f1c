"""Throughput of the shared embedder on one device, and how its vectors agree with the CPU's.

    .venv/bin/python -m bench.embed_device --device cuda [--texts 5183] [--batches 32,128,512]
    .venv/bin/python -m bench.embed_device --device cpu --texts 512 --save-reference ref.npy

Embeds SciFact documents (title and abstract, cut at the model's 256 tokens, as the sync worker
embeds a chunk) with freshet.embedder, the code the sync worker and the web app run, at each
batch size (FRESHET_EMBED_BATCH), and reports texts/s, wall time, and on CUDA the peak GPU
memory. With --reference (vectors saved by a CPU run with --save-reference), it reports the
lowest and mean cosine between this device's vectors and the CPU's for the same texts: the
check that an index built on one device can be queried from another.

Needs only torch, transformers and numpy (no database, no Kafka), so it runs on a bare GPU
machine; EMBEDDING_MODEL may point at a copy of the model directory there.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from bench.corpus import scifact_texts
from bench.report import SCIFACT, print_table, write_results
from freshet.embedder import DEFAULT_MODEL, TransformersEmbedder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cpu or cuda")
    parser.add_argument("--texts", type=int, default=5183, help="SciFact documents to embed")
    parser.add_argument("--batches", default="32,128,512", help="batch sizes, comma-separated")
    parser.add_argument("--corpus", type=Path, default=SCIFACT / "corpus.jsonl")
    parser.add_argument("--reference", type=Path, help="CPU vectors to compare with (.npy)")
    parser.add_argument("--save-reference", type=Path, help="save this run's vectors (.npy)")
    args = parser.parse_args()
    texts = list(scifact_texts(args.texts, args.corpus))
    model = os.environ.get("EMBEDDING_MODEL") or DEFAULT_MODEL
    rows: list[tuple[str, str]] = []
    runs: list[dict[str, float | int]] = []
    vectors: np.ndarray | None = None
    name, bf16 = args.device, False
    for batch in (int(b) for b in args.batches.split(",")):
        embedder = TransformersEmbedder(model, batch_size=batch, device=args.device)
        bf16 = embedder.bf16
        embedder.embed(texts[: 2 * batch])  # warm-up: kernels, allocator
        if args.device.startswith("cuda"):
            name = torch.cuda.get_device_name()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        vectors = embedder.embed(texts)  # returns host arrays: the device work is done
        seconds = time.perf_counter() - started
        peak = torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else 0.0
        rate = len(texts) / seconds
        runs.append({"batch": batch, "texts_per_s": rate, "seconds": seconds, "peak_mib": peak})
        memory = f", peak GPU memory {peak:.0f} MiB" if peak else ""
        rows.append((f"batch {batch}", f"{rate:,.0f} texts/s ({seconds:.1f} s{memory})"))
    assert vectors is not None
    agreement: dict[str, float] = {}
    if args.reference:
        reference = np.load(args.reference)
        count = min(len(reference), len(vectors))
        cosines = np.sum(reference[:count] * vectors[:count], axis=1)
        agreement = {"texts": count, "min": float(cosines.min()), "mean": float(cosines.mean())}
        rows.append(
            (
                f"cosine to CPU vectors ({count} texts)",
                f"min {cosines.min():.5f}, mean {cosines.mean():.6f}",
            )
        )
    if args.save_reference:
        np.save(args.save_reference, vectors)
    print_table(f"embedder on {name}: {len(texts)} SciFact documents, bf16={bf16}", rows)
    write_results(
        f"embed_device_{args.device.split(':')[0]}",
        {
            "device": name,
            "bf16": bf16,
            "texts": len(texts),
            "runs": runs,
            "agreement_with_cpu": agreement,
        },
    )


if __name__ == "__main__":
    main()
