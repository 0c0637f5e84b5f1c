"""The answerer contract: answer(question, passages) -> Answer with citations, or a stream.

Citations map each [n] of the text to the chunk it came from and the row version (source LSN)
it was read at; ``as_of`` is the newest source commit time among the cited chunks.
"""

from __future__ import annotations

import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from web.retrieval import Passage

logger = logging.getLogger(__name__)

_CITE = re.compile(r"\[(\d{1,3})\]")

EMPTY_ANSWER = "The language model returned no text for this question; nothing is cited."


class LLMError(RuntimeError):
    """The answer backend failed or is misconfigured; the message says what to fix."""


@dataclass(frozen=True)
class Citation:
    """Where a cited passage came from, and which version of the source row it was."""

    n: int
    source_table: str
    doc_key: str
    chunk_id: int
    source_lsn: int
    source_ts: datetime | None
    title: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "source_table": self.source_table,
            "doc_key": self.doc_key,
            "chunk_id": self.chunk_id,
            "source_lsn": self.source_lsn,
            "source_ts": self.source_ts.isoformat() if self.source_ts else None,
            "title": self.title,
        }


@dataclass(frozen=True)
class Answer:
    """Generated text with its citations and the freshness of what it cites."""

    text: str
    citations: list[Citation] = field(default_factory=list)
    backend: str = ""
    as_of: datetime | None = None
    # The backend said it has no answer (nothing relevant, or no text): it claims nothing.
    declined: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "answer": self.text,
            "citations": [c.to_dict() for c in self.citations],
            "as_of": self.as_of.isoformat() if self.as_of else None,
            "backend": self.backend,
            "declined": self.declined,
        }


def markers(text: str) -> list[int]:
    """Every [n] marker of ``text``, in order."""
    return [int(match.group(1)) for match in _CITE.finditer(text)]


def defuse_markers(text: str) -> str:
    """Passage text with its own ``[n]`` (a reference list's "[7]") written ``［n］``
    (full-width brackets): a backend is shown, and can copy, only markers that are not
    citation markers, so every ``[n]`` of an answer is one the model added, and the answer
    rules judge those. It also keeps a passage's "[2]" from being read as passage 2."""
    return _CITE.sub(lambda m: f"\uff3b{m.group(1)}\uff3d", text)


def cited_numbers(text: str, count: int) -> list[int]:
    """The distinct [n] markers of ``text`` that name one of ``count`` passages, in order."""
    seen: list[int] = []
    for n in markers(text):
        if 1 <= n <= count and n not in seen:
            seen.append(n)
    return seen


def citation(n: int, passage: Passage) -> Citation:
    return Citation(
        n=n,
        source_table=passage.source_table,
        doc_key=passage.doc_key,
        chunk_id=passage.chunk_id,
        source_lsn=passage.source_lsn,
        source_ts=passage.source_ts,
        title=passage.title,
    )


def make_answer(
    text: str, passages: Sequence[Passage], backend: str, *, cite_all_unmarked: bool = True
) -> Answer:
    """The Answer for generated ``text`` over ``passages`` numbered [1]..[n].

    Citations are the passages the text names; a model that names none (small local models
    often do not) gets every passage it was shown, since the answer was drawn from them all.
    """
    if not text.strip():
        logger.warning("the %s backend produced no text", backend)
        return Answer(EMPTY_ANSWER, [], backend, None, declined=True)
    numbers = cited_numbers(text, len(passages))
    if not numbers and cite_all_unmarked and passages and text.strip():
        numbers = list(range(1, len(passages) + 1))
    citations = [citation(n, passages[n - 1]) for n in numbers]
    stamps = [c.source_ts for c in citations if c.source_ts is not None]
    return Answer(text.strip(), citations, backend, max(stamps) if stamps else None)


class Answerer(ABC):
    """Turns a question and its retrieved passages into an answer with citations."""

    name = "base"

    def fit(self, question: str, passages: Sequence[Passage]) -> Sequence[Passage]:
        """The leading passages that fit this backend's context (all, unless it is small)."""
        return passages

    @abstractmethod
    def stream(self, question: str, passages: Sequence[Passage]) -> Iterator[str]:
        """The answer text in pieces, as it is produced."""

    def answer(self, question: str, passages: Sequence[Passage]) -> Answer:
        """The whole answer; by default the joined stream over the passages that fit."""
        passages = self.fit(question, passages)
        return self.finish("".join(self.stream(question, passages)), passages)

    def finish(self, text: str, passages: Sequence[Passage]) -> Answer:
        """The Answer for a streamed text, with its citations."""
        return make_answer(text, passages, self.name)
