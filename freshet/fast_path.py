"""Faster forward passes for one text (one changed chunk, a query) on CPU.

One text has no padding, so the model's forward pass for it can be captured once as a graph
and run without transformers' Python around each operation. ``FRESHET_EMBED_FAST_PATH``
picks how far that goes; measured here, one SciFact query (~21 tokens) on one thread, p50:

- ``compiled`` (default), ~6 ms: the graph exported with a variable token count and compiled
  to native code by AOTInductor, once per machine, model, torch version and thread count, and
  kept in ``FRESHET_EMBED_CACHE`` (compiling takes ~15-25 s; loading a compiled model ~0.1 s).
  Fused kernels round differently: vectors agree with the eager model's to a cosine of
  0.99998 or better, closer than the same text embedded alone and in a padded batch.
- ``traced``, ~8 ms: a TorchScript trace of the same kernels; bit-identical vectors.
- ``off``, ~10 ms: the eager model.

Every fast path is checked against the eager model on probe texts (one token, a sentence, the
length limit) before it is used. A mismatch or any failure (no C++ compiler, an unsupported
model) falls back one level, and the log says why.

A search query, which is never stored, may take a faster path still (``int8_query_runner``):
the model with its activations smoothed into its weights (freshet/smoothing.py), int8 weights
(one scale per output channel) and int8 activations scaled per call, traced; ~2.6 ms for the
same query. See the function for what it costs in quality.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import logging
import os
import platform
import shutil
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging as hf_logging

from freshet.settings import FAST_PATHS
from freshet.smoothing import smoothed

logger = logging.getLogger(__name__)

#: (input_ids, attention_mask) of one text -> the model's last hidden state.
Runner = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

PROBES = ("a", "How fast does a changed row reach the index after its commit?", "word " * 600)
#: A fast path is used when its mean-pooled output agrees with the eager model's this well.
MIN_COSINE = 0.9999
#: The int8 query model is used when its mean-pooled output agrees with the float model's this
#: well on every probe of INT8_PROBES (measured: 0.99; over the 300 SciFact test queries mean
#: 0.996, min 0.993). Lower means the quantization broke something, not rounding.
MIN_INT8_COSINE = 0.95
#: The int8 model's probes: a sentence, a question, the length limit. Not a one-token text:
#: on a text that short int8 rounding moves the vector most, with or without smoothing
#: (cosine 0.90-0.98 for single stopwords, 0.98-0.99 for content words), so it would measure
#: the rounding, not whether the quantization works.
INT8_PROBES = (PROBES[1], "Does aspirin lower the risk of a second heart attack?", PROBES[2])


class LastHiddenState(torch.nn.Module):
    """The model's last hidden state from plain tensors (the signature capture needs), under
    bf16 autocast when the embedder uses it."""

    def __init__(self, model: torch.nn.Module, bf16: bool) -> None:
        super().__init__()
        self.model = model
        self.bf16 = bf16

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            hidden: torch.Tensor = self.model(
                input_ids=input_ids, attention_mask=attention_mask
            ).last_hidden_state
        return hidden


@contextmanager
def _quiet() -> Iterator[None]:
    """Capture reads every attribute of the model, including properties that log about
    training-only settings, and warns about value branches that one unpadded text always
    takes the same way (the probes check the result); torch.jit warns it is deprecated."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)


def agreement(
    runner: Runner,
    module: LastHiddenState,
    encode: Callable[[str], Any],
    probes: tuple[str, ...] = PROBES,
) -> float:
    """The lowest cosine between the runner's and the eager model's mean-pooled outputs over
    the probe texts."""
    lowest = 1.0
    with torch.inference_mode():
        for probe in probes:
            encoded = encode(probe)
            ids, mask = encoded["input_ids"], encoded["attention_mask"]
            want = module(ids, mask).to(torch.float32).mean(dim=1)
            got = runner(ids, mask).to(torch.float32).mean(dim=1)
            if got.shape != want.shape:
                return 0.0
            cosine = torch.nn.functional.cosine_similarity(got, want).min().item()
            lowest = min(lowest, float(cosine))
    return lowest


def traced(module: LastHiddenState, sample: Any) -> Runner:
    """A TorchScript trace of ``module`` for one text."""
    with _quiet(), torch.inference_mode():
        runner: Runner = torch.jit.trace(
            module.eval(), (sample["input_ids"], sample["attention_mask"]), check_trace=False
        )
    return runner


# The files of a model directory that a compiled forward pass depends on, besides config.json.
GRAPH_SUFFIXES = frozenset({".safetensors", ".bin"})


def cache_key(
    model_path: Path, cpu_flags: str, bf16: bool, threads: int, max_seq_length: int
) -> str:
    """What a compiled model depends on: the transformer's files (its config and weights; not
    the tokenizer, pooling or Dense layer, which run outside the compiled graph: two model
    directories that share a transformer share its compiled model), torch, the CPU (its
    /proc/cpuinfo flags), the settings."""
    digest = hashlib.sha256()
    parts = [
        torch.__version__,
        platform.machine(),
        cpu_flags,
        f"bf16={bf16} threads={threads} max_seq_length={max_seq_length}",
    ]
    for path in sorted(model_path.iterdir()):
        if path.is_file() and (path.name == "config.json" or path.suffix in GRAPH_SUFFIXES):
            stat = path.stat()
            parts.append(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}")
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:20]


def compiled(
    module: LastHiddenState,
    sample: Any,
    *,
    cache: Path,
    key: str,
    max_seq_length: int,
) -> Runner:
    """``module`` compiled by AOTInductor for one text of 2..max_seq_length tokens, from the
    cache when a process compiled it before (processes that start together compile it once:
    the others wait on a file lock, then load it)."""
    cache.mkdir(parents=True, exist_ok=True)
    package = cache / f"embed-one-text-{key}.pt2"
    with (cache / f"{package.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not package.exists():
            started = time.monotonic()
            logger.info(
                "compiling the embedding model for one-text calls (once per machine and"
                " model, ~20 s) into %s",
                package,
            )
            tokens = torch.export.Dim("tokens", min=2, max=max_seq_length)
            with _quiet(), torch.no_grad():
                program = torch.export.export(
                    module.eval(),
                    (sample["input_ids"], sample["attention_mask"]),
                    dynamic_shapes=({1: tokens}, {1: tokens}),
                )
                partial = package.with_name(f"{package.stem}.{os.getpid()}.partial.pt2")
                try:
                    torch._inductor.aoti_compile_and_package(program, package_path=str(partial))
                    partial.replace(package)
                finally:
                    partial.unlink(missing_ok=True)
            logger.info("compiled in %.0f s", time.monotonic() - started)
        # Loaded from a .pt2 file, the package is unpacked into a new /tmp folder (89 MB) on
        # every load and never removed; unpacked once here, every process loads the folder.
        unpacked = package.with_suffix(".d")
        if not unpacked.is_dir():
            partial = unpacked.with_name(f"{unpacked.name}.{os.getpid()}.partial")
            shutil.rmtree(partial, ignore_errors=True)
            with zipfile.ZipFile(package) as archive:
                archive.extractall(partial)
            partial.replace(unpacked)
    with _quiet():
        runner: Runner = torch._inductor.aoti_load_package(str(unpacked))
    return runner


def load_cached(cache: Path, key: str) -> Runner | None:
    """The compiled model for ``key`` if a process compiled it before, else None; loads it
    without the eager model (no compiling, no probes: the caller checks agreement later)."""
    package = cache / f"embed-one-text-{key}.pt2"
    unpacked = package.with_suffix(".d")
    if not (package.exists() and unpacked.is_dir()):
        return None
    try:
        # The package's own loader: torch._inductor.aoti_load_package wraps the same one, but
        # importing torch._inductor (and with it torch._dynamo) takes ~1.1 s here.
        loader = torch._C._aoti.AOTIModelPackageLoader(str(unpacked), "model", False, 1, -1, False)
        outputs = json.loads(loader.get_call_spec()[1])
    except Exception as exc:  # noqa: BLE001 - the caller loads the usual way instead
        logger.warning("compiled model in %s not loadable (%s)", unpacked, exc)
        return None
    if outputs[1].get("type") is not None:  # not one tensor: the wrapper knows what to do
        with _quiet():
            wrapped: Runner = torch._inductor.aoti_load_package(str(unpacked))
        return wrapped

    def run(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden: torch.Tensor = loader.boxed_run([input_ids, attention_mask])[0]
        return hidden

    return run


def one_text_runner(
    mode: str,
    module: LastHiddenState,
    encode: Callable[[str], Any],
    *,
    cache: Path,
    key: str,
    max_seq_length: int,
) -> tuple[str, Runner | None]:
    """The fastest runner at or below ``mode`` that loads and agrees with the eager model:
    (the mode it runs in, the runner), or ("off", None) for the eager model."""
    if mode not in FAST_PATHS:
        raise ValueError(f"unknown fast path {mode!r} (use one of {', '.join(FAST_PATHS)})")
    sample = encode(PROBES[1])
    for level in FAST_PATHS[FAST_PATHS.index(mode) :]:
        if level == "off":
            return "off", None
        try:
            if level == "compiled":
                runner = compiled(
                    module, sample, cache=cache, key=key, max_seq_length=max_seq_length
                )
            else:
                runner = traced(module, sample)
            lowest = agreement(runner, module, encode)
        # Any failure of an optional speed-up leaves the next level in charge.
        except Exception as exc:  # noqa: BLE001
            logger.warning("embedding fast path %r unavailable (%s); trying the next", level, exc)
            continue
        if lowest >= MIN_COSINE:
            return level, runner
        logger.warning(
            "embedding fast path %r disagrees with the eager model (cosine %.6f < %s);"
            " trying the next",
            level,
            lowest,
            MIN_COSINE,
        )
    return "off", None


def quantized(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose Linear layers compute in int8 (dynamic quantization): weights
    rounded once with one scale per output channel, activations rounded per call. Per channel:
    one scale per tensor cost 3x as much nDCG on SciFact (below)."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    # The copy's modules share the float model's tensors (its embeddings alone are 47 MB);
    # quantizing replaces the copy's Linear modules and leaves those tensors as they are.
    shared = {id(tensor): tensor for tensor in (*model.parameters(), *model.buffers())}
    with _quiet():
        result: torch.nn.Module = quantize_dynamic(
            copy.deepcopy(model, shared).eval(),
            {torch.nn.Linear: per_channel_dynamic_qconfig},
            dtype=torch.qint8,
            inplace=True,
        )
    return result


def int8_query_runner(
    model: torch.nn.Module,
    encode: Callable[[str], Any],
    encode_many: Callable[[list[str]], Any] | None = None,
) -> Runner | None:
    """A traced int8 copy of ``model`` (fp32, CPU) for one query, or None (logged) when it
    cannot be built or does not agree with ``model`` to MIN_INT8_COSINE.

    For search queries, and for chunks under FRESHET_EMBED_INT8 (on by default), one text
    at a time (freshet.embedder: a padded batch would share one activation scale).
    ``encode_many`` (texts -> a padded batch) feeds the calibration of the activation
    smoothing (freshet.smoothing) done before quantizing; without it, or for a model that is
    not a BERT-family encoder, the model is quantized as it is.

    Measured (one thread, 300 SciFact queries, p50): 2.6 ms against 7.2 ms for the compiled
    float model on an AVX-512 machine; 5.2-5.4 ms against 11.6-12.1 ms on an AVX2-only one
    (smoothing costs no measurable time). It releases the GIL while it runs, which the
    compiled model does not. Cosine to the float model's query vectors, mean / min: 0.980 /
    0.963 without smoothing, 0.996 / 0.993 with it. SciFact test through the pipeline,
    hybrid nDCG@10: float 0.7249, int8 0.7230, smoothed int8 0.7243 (docs/web.md)."""
    try:
        try:
            source = smoothed(model, encode_many) if encode_many else model
        except ValueError as exc:
            logger.info("int8 query embedding without activation smoothing: %s", exc)
            source = model
        int8 = LastHiddenState(quantized(source), bf16=False).eval()
        runner = traced(int8, encode(PROBES[1]))
        exact = agreement(runner, int8, encode, INT8_PROBES)
        close = agreement(runner, LastHiddenState(model, bf16=False), encode, INT8_PROBES)
    # An optional speed-up: any failure leaves queries on the float model.
    except Exception as exc:  # noqa: BLE001
        logger.warning("int8 query embedding unavailable (%s); queries use the float model", exc)
        return None
    if exact < MIN_COSINE or close < MIN_INT8_COSINE:
        logger.warning(
            "int8 query embedding disagrees (trace %.6f, float model %.4f < %s);"
            " queries use the float model",
            exact,
            close,
            MIN_INT8_COSINE,
        )
        return None
    logger.info("int8 query embedding agrees with the float model to cosine %.4f", close)
    return runner
