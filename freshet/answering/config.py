"""The answering core's configuration keys and their defaults (one place for each default).

The web app's config (``freshet.web.DEFAULTS``) starts from these; the workflow steps read the
same keys through :func:`from_env`, so a web process and an inference worker configured by the
same environment retrieve and answer the same way.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

DEFAULTS: dict[str, Any] = {
    # None: resolved at first use from Settings (DATABASE_URL or the embedded PostgreSQL).
    "DATABASE_URL": None,
    # None: Settings.embedding_model / Settings.llm_backend (EMBEDDING_MODEL, LLM_BACKEND).
    "EMBEDDING_MODEL": None,
    "LLM_BACKEND": None,
    "OPENAI_BASE_URL": "http://127.0.0.1:11434/v1",
    "OPENAI_API_KEY": "",
    "LLM_MODEL": "",
    "LLM_TIMEOUT": 60.0,
    "LLM_MAX_RETRIES": 3,
    "LLM_MAX_TOKENS": 256,
    "HNSW_EF_SEARCH": 100,
    # Hybrid search: weighted reciprocal rank fusion with the dense list at weight 1. Tuned on
    # SciFact's train queries (`python -m bench.quality --split train --tune`).
    "HYBRID_TEXT_WEIGHT": 0.3,
    "RRF_K": 10,
    "PUBLIC_DOCUMENTS": True,
    "DEFAULT_K": 5,
    # Cosine similarity below which the extractive answerer says it found nothing relevant.
    "EXTRACTIVE_MIN_SCORE": 0.35,
    # Where answers are kept: postgres (table rag.answers, shared by every web process and the
    # async workflow) or memory (this process only; tests without a database).
    "ANSWER_STORE_BACKEND": "postgres",
    "ANSWER_STORE_SIZE": 1000,
    # None: Settings.answer_rules (FRESHET_ANSWER_RULES); "" means no rules.
    "ANSWER_RULES": None,
    "POOL_MIN_SIZE": 1,
    "POOL_MAX_SIZE": 10,
    "CONNECT_TIMEOUT": 2.0,
}


def from_env(env: Mapping[str, str], defaults: Mapping[str, Any] = DEFAULTS) -> dict[str, Any]:
    """``defaults`` overridden by FRESHET_<KEY> variables, read as Flask's from_prefixed_env."""
    config = dict(defaults)
    for name, raw in env.items():
        if not name.startswith("FRESHET_"):
            continue
        key = name.removeprefix("FRESHET_")
        if key not in config:
            continue
        try:
            config[key] = json.loads(raw)
        except ValueError:
            config[key] = raw
    return config
