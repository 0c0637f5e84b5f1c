"""Answer generation backends, chosen by LLM_BACKEND: extractive (default), openai, transformers."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from freshet.answering.llm.base import Answer, Answerer, Citation, LLMError
from freshet.settings import LLM_BACKENDS, Settings

logger = logging.getLogger(__name__)

BACKENDS = LLM_BACKENDS

__all__ = ["Answer", "Answerer", "BACKENDS", "Citation", "LLMError", "make_answerer"]


def make_answerer(
    settings: Settings, embed_many: Callable[[list[str]], Any] | None = None
) -> Answerer:
    """The answerer that LLM_BACKEND names, configured by its settings; the extractive one
    scores sentences with ``embed_many`` (the query embedder) when given, else lexically."""
    backend = settings.llm_backend
    if backend == "extractive":
        from freshet.answering.llm.extractive import (
            EmbeddingScorer,
            ExtractiveAnswerer,
            LexicalScorer,
        )

        scorer = EmbeddingScorer(embed_many) if embed_many is not None else LexicalScorer()
        return ExtractiveAnswerer(scorer, min_score=settings.extractive_min_score)
    if backend == "openai":
        from freshet.answering.llm.openai import OpenAIAnswerer

        return OpenAIAnswerer(
            base_url=settings.openai_base_url,
            api_key=settings.openai_api_key,
            model=settings.llm_model,
            timeout=settings.llm_timeout,
            max_retries=settings.llm_max_retries,
            max_tokens=settings.llm_max_tokens,
        )
    if backend == "transformers":
        from freshet.answering.llm.transformers_lm import TransformersAnswerer

        return TransformersAnswerer(settings.llm_model, max_new_tokens=settings.llm_max_tokens)
    raise LLMError(f"LLM_BACKEND={backend!r} is not one of {', '.join(BACKENDS)}")
