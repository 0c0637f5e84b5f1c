"""The offline default answerer: the most relevant retrieved sentences, each with its citation.

Deterministic and honest: it never writes a word that is not in a passage, and when no sentence
is close enough to the question it says it found nothing relevant instead of guessing. It knows
which ``[n]`` markers it added (one after each sentence); a sentence's own "[7]" or "argv[0]"
is the passage's text, not a citation, and the answer rules do not judge it as one.
"""

from __future__ import annotations

import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from freshet.answering.llm.base import Answer, Answerer, make_answer
from freshet.answering.retrieval import Passage

logger = logging.getLogger(__name__)

NOTHING_RELEVANT = "I found nothing relevant to this question in the documents you can see."

_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(`])|\n\s*\n|\n(?=\s*[-*•]\s)")
_WORD = re.compile(r"[a-z0-9_]+")
_STOPWORDS_TEXT = (
    "a an and are as at be but by can do does for from had has have how i if in into is it "
    "its me my of on or so than that the their them then there these they this to was we "
    "were what when where which who whom why will with you your about should would could "
    "may might not no yes"
)
_STOPWORDS = frozenset(_STOPWORDS_TEXT.split(" "))


@dataclass(frozen=True)
class Sentence:
    """A candidate sentence and the passage number [n] it came from."""

    text: str
    n: int
    position: int


def split_sentences(text: str) -> list[str]:
    """Sentences of a passage, whitespace collapsed; fragments under 4 words are dropped."""
    out: list[str] = []
    for piece in _SENTENCE_SPLIT.split(text):
        sentence = " ".join(piece.split())
        if len(sentence.split()) >= 4:
            out.append(sentence)
    return out


def content_words(text: str) -> set[str]:
    """Lower-cased words minus stopwords, a trailing plural 's' removed."""
    words = set()
    for word in _WORD.findall(text.lower()):
        if word in _STOPWORDS or len(word) < 2:
            continue
        words.add(word[:-1] if len(word) > 3 and word.endswith("s") else word)
    return words


class SentenceScorer(ABC):
    """Scores sentences against a question; higher is more relevant."""

    default_min_score: float = 0.3

    @abstractmethod
    def scores(self, question: str, sentences: Sequence[str]) -> list[float]:
        """One score per sentence."""


class LexicalScorer(SentenceScorer):
    """Share of the question's content words that the sentence contains (0..1)."""

    default_min_score = 0.34

    def scores(self, question: str, sentences: Sequence[str]) -> list[float]:
        wanted = content_words(question)
        if not wanted:
            return [0.0 for _ in sentences]
        return [len(wanted & content_words(s)) / len(wanted) for s in sentences]


class EmbeddingScorer(SentenceScorer):
    """Cosine similarity of sentence and question embeddings (the shared Embedder)."""

    default_min_score = 0.35

    def __init__(self, embed_many: Callable[[list[str]], Any]) -> None:
        self._embed_many = embed_many

    def scores(self, question: str, sentences: Sequence[str]) -> list[float]:
        if not sentences:
            return []
        vectors = np.asarray(self._embed_many([question, *sentences]), dtype=np.float32)
        return [float(x) for x in vectors[1:] @ vectors[0]]


class ExtractiveAnswerer(Answerer):
    """Picks up to ``max_sentences`` sentences near the best score and cites each one."""

    name = "extractive"

    def __init__(
        self,
        scorer: SentenceScorer | None = None,
        *,
        min_score: float | None = None,
        max_sentences: int = 3,
        margin: float = 0.15,
    ) -> None:
        self.scorer = scorer or LexicalScorer()
        self.min_score = self.scorer.default_min_score if min_score is None else min_score
        self.max_sentences = max_sentences
        self.margin = margin

    def compose(self, question: str, passages: Sequence[Passage]) -> str:
        """The answer text: chosen sentences, best first, each followed by its [n]."""
        candidates = sentences_of(passages)
        if not candidates or not question.strip():
            return NOTHING_RELEVANT
        scores = self.scorer.scores(question, [c.text for c in candidates])
        best = max(scores)
        logger.debug("extractive: %d sentences, best score %.3f", len(candidates), best)
        if best < self.min_score:
            return NOTHING_RELEVANT
        floor = max(self.min_score, best - self.margin)
        ranked = sorted(
            (pair for pair in zip(scores, candidates, strict=True) if pair[0] >= floor),
            key=lambda pair: (-pair[0], pair[1].position),
        )[: self.max_sentences]
        return " ".join(f"{c.text} [{c.n}]" for _, c in ranked)

    def stream(self, question: str, passages: Sequence[Passage]) -> Iterator[str]:
        text = self.compose(question, passages)
        words = text.split(" ")
        for i, word in enumerate(words):
            yield word if i == 0 else " " + word

    def answer(self, question: str, passages: Sequence[Passage]) -> Answer:
        return self.finish(self.compose(question, passages), passages)

    def finish(self, text: str, passages: Sequence[Passage]) -> Answer:
        # Only what the text cites: "nothing relevant" cites nothing, and declines.
        added = () if text == NOTHING_RELEVANT else appended_markers(text, passages)
        answer = make_answer(text, passages, self.name, cite_all_unmarked=False, added=added)
        return replace(answer, declined=True) if text == NOTHING_RELEVANT else answer


def sentences_of(passages: Sequence[Passage]) -> list[Sentence]:
    """The candidate sentences of ``passages``, each once, with its passage's number."""
    candidates: list[Sentence] = []
    seen: set[str] = set()
    for n, passage in enumerate(passages, start=1):
        for sentence in split_sentences(passage.text):
            if sentence not in seen:
                seen.add(sentence)
                candidates.append(Sentence(sentence, n, len(candidates)))
    return candidates


def appended_markers(text: str, passages: Sequence[Passage]) -> list[int] | None:
    """The markers ``compose`` appended to ``text`` (one per sentence), read back by matching
    the text against the passages' sentences; None when the text is not such a composition
    (then ``make_answer`` tells copied markers from added ones by their context)."""
    pieces = sorted(
        ((f"{c.text} [{c.n}]", c.n) for c in sentences_of(passages)), key=lambda p: -len(p[0])
    )
    added: list[int] = []
    at = 0
    while at < len(text):
        for piece, n in pieces:  # longest first: a sentence may begin another one
            end = at + len(piece)
            if text.startswith(piece, at) and (end == len(text) or text[end] == " "):
                added.append(n)
                at = end + 1
                break
        else:
            return None
    return added
