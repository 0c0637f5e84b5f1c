"""Any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, Ollama, llama.cpp server).

Plain ``requests``: timeouts on connect and read, retries with jittered exponential backoff on
429 and 5xx (honouring a numeric Retry-After), and streaming through server-sent events.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import requests

from freshet.answering.llm.base import Answer, Answerer, LLMError
from freshet.answering.prompting import build_prompt
from freshet.answering.retrieval import Passage

# A generator of our own: jitter drawn from worker threads leaves the global `random`
# state alone (other code, and tests, may depend on it).
_JITTER = random.Random()

logger = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
CONNECT_TIMEOUT = 5.0
MAX_BACKOFF = 20.0


def backoff_delay(attempt: int, base: float, retry_after: str | None = None) -> float:
    """Seconds before retry ``attempt`` (0-based): full jitter on base * 2**attempt."""
    if retry_after is not None:
        try:
            return min(max(float(retry_after), 0.0), MAX_BACKOFF)
        except ValueError:
            pass  # an HTTP date: fall back to our own schedule
    return min(base * 2**attempt, MAX_BACKOFF) * _JITTER.uniform(0.5, 1.0)


class OpenAIAnswerer(Answerer):
    """Chat completions at ``{base_url}/chat/completions`` with a bearer key."""

    name = "openai"

    def __init__(
        self,
        base_url: str,
        api_key: str = "",
        model: str = "",
        *,
        timeout: float,
        max_retries: int,
        max_tokens: int,
        backoff_base: float = 0.5,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not base_url:
            raise LLMError("LLM_BACKEND=openai needs FRESHET_OPENAI_BASE_URL")
        if not model:
            raise LLMError("LLM_BACKEND=openai needs FRESHET_LLM_MODEL (the model name)")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.api_key = api_key
        self.model = model
        self.timeout = timeout
        self.max_retries = max_retries
        self.max_tokens = max_tokens
        self.backoff_base = backoff_base
        self._sleep = sleep

    def _body(self, question: str, passages: Sequence[Passage], stream: bool) -> dict[str, Any]:
        prompt = build_prompt(question, passages)
        return {
            "model": self.model,
            "messages": prompt.messages(),
            "temperature": 0,
            "max_tokens": self.max_tokens,
            "stream": stream,
        }

    def _post(self, body: dict[str, Any], stream: bool) -> requests.Response:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        if stream:
            headers["Accept"] = "text/event-stream"
        for attempt in range(self.max_retries + 1):
            retry_after: str | None = None
            try:
                response = requests.post(
                    self.url,
                    json=body,
                    headers=headers,
                    timeout=(CONNECT_TIMEOUT, self.timeout),
                    stream=stream,
                )
            except (requests.ConnectionError, requests.Timeout) as exc:
                problem = f"{exc.__class__.__name__}"
            else:
                if response.status_code < 400:
                    return response
                problem = f"HTTP {response.status_code}: {response.text[:200]}"
                retry_after = response.headers.get("Retry-After")
                response.close()
                if response.status_code not in RETRY_STATUSES:
                    raise LLMError(f"the LLM endpoint {self.url} refused the request: {problem}")
            if attempt == self.max_retries:
                raise LLMError(
                    f"the LLM endpoint {self.url} failed {attempt + 1} times; last: {problem}"
                )
            delay = backoff_delay(attempt, self.backoff_base, retry_after)
            logger.warning(
                "LLM request failed (%s); retry %d in %.2fs", problem, attempt + 1, delay
            )
            self._sleep(delay)
        raise AssertionError("unreachable")

    def answer(self, question: str, passages: Sequence[Passage]) -> Answer:
        response = self._post(self._body(question, passages, stream=False), stream=False)
        try:
            text = response.json()["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise LLMError(f"the LLM endpoint {self.url} sent an unexpected reply") from exc
        return self.finish(text, passages)

    def complete(self, instruction: str, text: str) -> str | None:
        body = {
            "model": self.model,
            "messages": [
                {"role": "system", "content": instruction},
                {"role": "user", "content": text},
            ],
            "temperature": 0,
            "max_tokens": self.max_tokens,
            "stream": False,
        }
        response = self._post(body, stream=False)
        try:
            return str(response.json()["choices"][0]["message"]["content"] or "").strip()
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise LLMError(f"the LLM endpoint {self.url} sent an unexpected reply") from exc

    def stream(self, question: str, passages: Sequence[Passage]) -> Iterator[str]:
        response = self._post(self._body(question, passages, stream=True), stream=True)
        with response:
            yield from parse_sse(response.iter_lines(decode_unicode=True))


def parse_sse(lines: Iterator[Any]) -> Iterator[str]:
    """The content deltas of a chat-completions event stream, until ``data: [DONE]``."""
    for raw in lines:
        line = raw.decode() if isinstance(raw, bytes) else raw
        if not line or not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        try:
            event = json.loads(data)
        except ValueError as exc:
            raise LLMError("the LLM endpoint sent a malformed stream event") from exc
        if "error" in event:
            raise LLMError(f"the LLM endpoint reported an error: {event['error']}")
        for choice in event.get("choices") or []:
            content = (choice.get("delta") or {}).get("content")
            if content:
                yield content
