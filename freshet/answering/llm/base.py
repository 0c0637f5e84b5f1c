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

from freshet.answering.retrieval import Passage
from freshet.errors import FreshetError

logger = logging.getLogger(__name__)

_CITE = re.compile(r"\[(\d{1,3})\]")

EMPTY_ANSWER = "The language model returned no text for this question; nothing is cited."


class LLMError(FreshetError, RuntimeError):
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
    # The [n] markers the model added to the text, in order (not those copied from a
    # passage): what the citation rules judge. None: every marker of the text.
    markers: tuple[int, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "answer": self.text,
            "citations": [c.to_dict() for c in self.citations],
            "as_of": self.as_of.isoformat() if self.as_of else None,
            "backend": self.backend,
            "declined": self.declined,
        }
        if self.markers is not None:
            body["markers"] = list(self.markers)
        return body


def markers(text: str) -> list[int]:
    """Every [n] marker of ``text``, in order."""
    return [int(match.group(1)) for match in _CITE.finditer(text)]


#: Characters of text beside a marker that, found verbatim in a passage, make the marker part
#: of a copy of the passage (a reference "[7]", an index "argv[0]"), not one the model added.
VERBATIM_CONTEXT = 12
_SPACE = re.compile(r"\s+")


def added_markers(text: str, sources: Sequence[str]) -> list[int]:
    """The [n] markers of ``text`` that the model added, in order: a marker is a copy when the
    marker and the ``VERBATIM_CONTEXT`` characters before it, or after it, occur verbatim
    (whitespace collapsed) in one of ``sources``, the passages the answer was drawn from."""
    flat = _SPACE.sub(" ", text)
    corpus = [_SPACE.sub(" ", source) for source in sources]

    def copied(snippet: str, marker: str) -> bool:
        if len(snippet.strip()) - len(marker) < VERBATIM_CONTEXT // 2:
            return False  # too little context to tell a copy from a coincidence
        return any(snippet in source for source in corpus)

    added: list[int] = []
    for match in _CITE.finditer(flat):
        start, end, marker = match.start(), match.end(), match.group(0)
        before = flat[max(0, start - VERBATIM_CONTEXT) : end]
        after = flat[start : end + VERBATIM_CONTEXT]
        if not (copied(before, marker) or copied(after, marker)):
            added.append(int(match.group(1)))
    return added


def cited_numbers(text: str, count: int, added: Sequence[int] | None = None) -> list[int]:
    """The distinct [n] markers of ``text`` (or the ``added`` ones) that name one of ``count``
    passages, in order."""
    seen: list[int] = []
    for n in markers(text) if added is None else added:
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
    text: str,
    passages: Sequence[Passage],
    backend: str,
    *,
    cite_all_unmarked: bool = True,
    added: Sequence[int] | None = None,
) -> Answer:
    """The Answer for generated ``text`` over ``passages`` numbered [1]..[n].

    Citations are the passages named by the markers the model added (``added``, when the
    backend knows them; else the markers of the text that are no copy of a passage, see
    ``added_markers``): a passage's own "[2]" copied into the answer cites nothing. A model
    that names none (small local models often do not) gets every passage it was shown, since
    the answer was drawn from them all.
    """
    if not text.strip():
        logger.warning("the %s backend produced no text", backend)
        return Answer(EMPTY_ANSWER, [], backend, None, declined=True, markers=())
    text = text.strip()
    if added is None:
        added = added_markers(text, [p.text for p in passages])
    numbers = cited_numbers(text, len(passages), added)
    if not numbers and cite_all_unmarked and passages:
        numbers = list(range(1, len(passages) + 1))
    citations = [citation(n, passages[n - 1]) for n in numbers]
    stamps = [c.source_ts for c in citations if c.source_ts is not None]
    return Answer(text, citations, backend, max(stamps) if stamps else None, markers=tuple(added))


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

    def complete(self, instruction: str, text: str) -> str | None:
        """``text`` transformed as ``instruction`` says (a workflow step's own LLM call, such
        as rewriting a question); None when this backend cannot follow instructions (the
        extractive one), and the step falls back to its own rules."""
        return None
