"""Answer generation backends, chosen by LLM_BACKEND: extractive (default), openai, transformers."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from freshet.answering.llm.base import Answer, Answerer, Citation, LLMError

logger = logging.getLogger(__name__)

BACKENDS = ("extractive", "openai", "transformers")

__all__ = ["Answer", "Answerer", "BACKENDS", "Citation", "LLMError", "make_answerer"]


def make_answerer(
    backend: str, config: dict[str, Any], embed_many: Callable[[list[str]], Any] | None = None
) -> Answerer:
    """The answerer named by ``backend``, configured from the app config."""
    if backend == "extractive":
        from freshet.answering.llm.extractive import (
            EmbeddingScorer,
            ExtractiveAnswerer,
            LexicalScorer,
        )

        scorer = EmbeddingScorer(embed_many) if embed_many is not None else LexicalScorer()
        return ExtractiveAnswerer(scorer, min_score=float(config["EXTRACTIVE_MIN_SCORE"]))
    if backend == "openai":
        from freshet.answering.llm.openai import OpenAIAnswerer

        return OpenAIAnswerer(
            base_url=str(config["OPENAI_BASE_URL"]),
            api_key=str(config.get("OPENAI_API_KEY") or ""),
            model=str(config.get("LLM_MODEL") or ""),
            timeout=float(config["LLM_TIMEOUT"]),
            max_retries=int(config["LLM_MAX_RETRIES"]),
            max_tokens=int(config["LLM_MAX_TOKENS"]),
        )
    if backend == "transformers":
        from freshet.answering.llm.transformers_lm import TransformersAnswerer

        return TransformersAnswerer(
            str(config.get("LLM_MODEL") or ""), max_new_tokens=int(config["LLM_MAX_TOKENS"])
        )
    raise LLMError(f"LLM_BACKEND={backend!r} is not one of {', '.join(BACKENDS)}")
