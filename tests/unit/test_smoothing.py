"""Activation smoothing for the int8 query model: exact in float, closer to the float model
once quantized, the float model untouched, padding not counted, other architectures refused."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from freshet.embedder import TransformersEmbedder
from freshet.fast_path import quantized
from freshet.smoothing import (
    REFERENCE_PASSAGES,
    Scaled,
    _activation_maxima,
    calibration_texts,
    smoothed,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: Not among the calibration texts.
HELD_OUT = (
    "Does aspirin reduce the risk of a second heart attack?",
    "Which enzymes break down starch in the small intestine?",
    "How do I rotate the logs of a web server every week?",
    "The ferry to the island leaves twice a day in summer.",
    "What are the side effects of long-term steroid use in children?",
    "Kafka keeps each partition's records in order.",
    "Glacier retreat in the Alps has accelerated since 1980.",
    "Can a landlord raise the rent during a fixed-term lease?",
)


@pytest.fixture(scope="module")
def embedder() -> TransformersEmbedder:
    return TransformersEmbedder(bf16=False, fast_path="off")


def pooled(model: torch.nn.Module, embedder: TransformersEmbedder, text: str) -> torch.Tensor:
    encoded = embedder._encode([text])
    with torch.inference_mode():
        hidden = model(
            input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]
        ).last_hidden_state
    return torch.nn.functional.normalize(hidden.mean(dim=1), dim=-1)[0]


def test_in_float_the_smoothed_model_computes_what_the_model_does(
    embedder: TransformersEmbedder,
) -> None:
    model = embedder._model
    smooth = smoothed(model, embedder._encode)
    assert sum(isinstance(m, Scaled) for m in smooth.modules()) == 5 * len(model.encoder.layer)
    for text in (*HELD_OUT[:3], "a", "streaming " * 400):
        encoded = embedder._encode([text])
        with torch.inference_mode():
            want = model(**encoded).last_hidden_state
            got = smooth(**encoded).last_hidden_state
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-3)


def test_the_float_model_is_left_as_it_was(embedder: TransformersEmbedder) -> None:
    model = embedder._model
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    modules = {name: type(m) for name, m in model.named_modules()}
    quantized(smoothed(model, embedder._encode))
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, before[name]), name
    assert {name: type(m) for name, m in model.named_modules()} == modules


def test_smoothed_int8_is_closer_to_the_float_model_than_plain_int8(
    embedder: TransformersEmbedder,
) -> None:
    """Measured on SciFact's 300 test queries: mean cosine 0.980 plain, 0.996 smoothed; on
    these held-out texts the smoothed model must be at least as close on average, and close."""
    model = embedder._model
    plain, smooth = quantized(model), quantized(smoothed(model, embedder._encode))
    closeness: dict[str, list[float]] = {"plain": [], "smooth": []}
    for text in HELD_OUT:
        want = pooled(model, embedder, text)
        closeness["plain"].append(float(pooled(plain, embedder, text) @ want))
        closeness["smooth"].append(float(pooled(smooth, embedder, text) @ want))
    assert np.mean(closeness["smooth"]) > np.mean(closeness["plain"]), closeness
    assert min(closeness["smooth"]) > 0.98, closeness


def test_padding_is_not_counted_in_the_activation_ranges(embedder: TransformersEmbedder) -> None:
    """A short text's ranges are the same alone and padded beside a long one."""
    model = embedder._model
    short = "Kafka keeps order."
    alone = _activation_maxima(model, [embedder._encode([short])])
    long = "word " * 50
    both = _activation_maxima(model, [embedder._encode([short, long])])
    long_alone = _activation_maxima(model, [embedder._encode([long])])
    for module, found in alone.items():
        expected = torch.maximum(found, long_alone[module])
        torch.testing.assert_close(both[module], expected, atol=1e-3, rtol=1e-3)


def test_another_architecture_is_refused() -> None:
    with pytest.raises(ValueError, match="not a BERT-family encoder"):
        smoothed(torch.nn.Sequential(torch.nn.Linear(4, 4)), lambda texts: {})


def test_calibration_texts_are_questions_and_language_reference_passages() -> None:
    texts = calibration_texts()
    assert texts == calibration_texts()
    assert len(texts) == 32 + REFERENCE_PASSAGES
    assert all(text.strip() for text in texts)
    assert not set(HELD_OUT) & set(texts)
