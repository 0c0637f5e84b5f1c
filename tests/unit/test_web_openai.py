"""The OpenAI-compatible client's pure parts: SSE parsing, backoff, configuration errors."""

from __future__ import annotations

import pytest

from freshet.answering.llm import LLMError, make_answerer
from freshet.answering.llm.openai import OpenAIAnswerer, backoff_delay, parse_sse
from freshet.settings import Settings


def test_parse_sse_yields_content_until_done() -> None:
    lines = [
        ": keep-alive",
        'data: {"choices":[{"delta":{"role":"assistant"}}]}',
        "",
        'data: {"choices":[{"delta":{"content":"Hello"}}]}',
        b'data: {"choices":[{"delta":{"content":" world [1]"}}]}',
        "data: [DONE]",
        'data: {"choices":[{"delta":{"content":"after done"}}]}',
    ]
    assert list(parse_sse(iter(lines))) == ["Hello", " world [1]"]


def test_parse_sse_raises_on_error_events_and_garbage() -> None:
    with pytest.raises(LLMError, match="overloaded"):
        list(parse_sse(iter(['data: {"error": {"message": "overloaded"}}'])))
    with pytest.raises(LLMError):
        list(parse_sse(iter(["data: {nope"])))


def test_backoff_grows_with_jitter_and_honours_retry_after() -> None:
    for attempt in range(4):
        delay = backoff_delay(attempt, 0.5)
        assert 0.25 * 2**attempt <= delay <= 0.5 * 2**attempt
    assert backoff_delay(0, 0.5, "3") == 3.0
    assert backoff_delay(0, 0.5, "999") == 20.0
    assert 0.25 <= backoff_delay(0, 0.5, "Wed, 21 Oct 2015 07:28:00 GMT") <= 0.5


def test_configuration_errors_are_clear() -> None:
    with pytest.raises(LLMError, match="LLM_MODEL"):
        OpenAIAnswerer("http://127.0.0.1:1/v1", model="", timeout=1, max_retries=0, max_tokens=8)
    with pytest.raises(LLMError, match="not one of"):
        make_answerer(Settings(llm_backend="gpt"))
    with pytest.raises(LLMError, match="local model"):
        make_answerer(
            Settings(llm_backend="transformers", llm_model="/no/such/dir", llm_max_tokens=8)
        )


def test_unreachable_endpoint_fails_after_retries() -> None:
    sleeps: list[float] = []
    answerer = OpenAIAnswerer(
        "http://127.0.0.1:9/v1",
        model="m",
        max_retries=2,
        sleep=sleeps.append,
        timeout=1,
        max_tokens=8,
    )
    with pytest.raises(LLMError, match="failed 3 times"):
        answerer.answer("q", [])
    assert len(sleeps) == 2
