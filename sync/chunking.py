"""Split a document's text into chunks sized by the embedding model's own tokenizer.

Goal: an edit to one paragraph changes only the chunk(s) around that paragraph, so the sync
worker re-embeds only what changed (design rule 4: chunks are matched by ``Chunk.hash``).

Scheme ("anchored paragraph packing"):

* Paragraphs are separated by blank lines; each is stripped of surrounding whitespace.
* A paragraph longer than ``max_tokens`` is cut into word-aligned windows of at most
  ``max_tokens`` tokens with about ``overlap_tokens`` of overlap, ending at a sentence end when
  one lies in the second half of the window. Its windows are chunks of their own.
* Other paragraphs are packed greedily, joined with "\\n\\n", while the chunk fits in
  ``max_tokens``. A paragraph *anchors* (always starts a new chunk) if it is a Markdown heading
  or if its content hash falls below ``tokens / anchor_tokens``: a content-defined cut, as in
  rsync or restic, so that about one paragraph per ``anchor_tokens`` tokens is an anchor. The
  one exception: a paragraph right after a heading joins it, so a heading is never left alone.

Why: greedy packing alone is stable before an edit (packing is causal) but can shift every
boundary after it; a boundary chosen from content alone resets the packing, so an edit only
reaches the chunk before it (the edited paragraph may gain or lose its anchor) and the chunks up
to the next anchor (about ``anchor_tokens`` tokens later); typically 1-3 chunks. One chunk per
paragraph would be perfectly local but would produce many tiny chunks that embed poorly; the
anchors trade chunk fullness for a bounded worst case. Measured on synthetic 30-paragraph
documents (max_tokens=200): a paragraph edit re-embeds ~1.4 chunks on average either way, at
worst 5-6 chunks with anchors vs 9 without; chunks average ~125-130 tokens vs ~175-180.

Chunk texts are never decoded from token ids: each is a substring of the original text, or
whole paragraphs joined with "\\n\\n". ``Chunk.hash`` is the sha256 of exactly that text (utf-8),
with no further normalisation, so identical text always yields the identical hash.
``Chunk.index`` is the position in the document and may move when an earlier chunk is added or
removed; identity for re-embedding is the hash, not the index.
"""

from __future__ import annotations

import hashlib
import logging
import re
from abc import ABC, abstractmethod
from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

logger = logging.getLogger(__name__)

_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n\s*")
_WORD = re.compile(r"\S+")
_HEADING = re.compile(r"#{1,6}\s")
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")
#: Paragraphs whose measurements a chunker keeps (``TokenChunker._known``): an edit to one
#: paragraph of a long document then tokenizes that paragraph alone. A full memo is emptied,
#: not evicted entry by entry.
MEMO_PARAGRAPHS = 4096


class Tokenizer(Protocol):
    """What the chunker needs from a tokenizer (a transformers tokenizer satisfies it)."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


@dataclass(frozen=True)
class Chunk:
    """One piece of a document, embedded on its own; ``hash`` = sha256 hex of ``text``."""

    index: int
    text: str
    token_count: int
    hash: str


def text_hash(text: str) -> str:
    """sha256 hex of the exact text (utf-8), the identity used to skip re-embedding."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class Chunker(ABC):
    """Turns a document's text into chunks; pure, deterministic, no I/O."""

    @abstractmethod
    def chunk(self, text: str) -> list[Chunk]:
        """The chunks of ``text`` in document order; no chunks for blank text."""


@dataclass(frozen=True)
class _Span:
    """A half-open character range of the source text and its token count."""

    start: int
    end: int
    tokens: int


@dataclass(frozen=True)
class _Paragraph:
    """What chunking needs to know of one paragraph, from its text alone: its token count, the
    uniform value its anchor decision compares, and, for a paragraph over ``max_tokens``, its
    windows (start, end, tokens), relative to the paragraph's start."""

    tokens: int
    anchor_value: float
    windows: tuple[tuple[int, int, int], ...] | None


def _context_free(tokenizer: Any) -> bool:
    """True for a fast WordPiece tokenizer (BERT's family, the bundled model's): its tokens
    never cross whitespace and do not depend on the text around a paragraph, so a paragraph's
    measurements can be reused in any document. Other tokenizers are measured every time."""
    try:
        model = tokenizer.backend_tokenizer.model
    except AttributeError:
        return False
    return type(model).__name__ == "WordPiece"


class TokenChunker(Chunker):
    """Anchored paragraph packing, counting tokens with the embedding model's tokenizer."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        max_tokens: int = 200,
        overlap_tokens: int = 32,
        anchor_tokens: int | None = None,
    ) -> None:
        if max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if not 0 <= overlap_tokens < max_tokens:
            raise ValueError("overlap_tokens must be >= 0 and smaller than max_tokens")
        # Any: fast transformers tokenizers are also called directly for offsets.
        self.tokenizer: Any = tokenizer
        self.max_tokens = max_tokens
        self.overlap_tokens = overlap_tokens
        # Mean tokens between content-defined anchors; defaults to one chunk's worth.
        self.anchor_tokens = anchor_tokens if anchor_tokens is not None else max_tokens
        if self.anchor_tokens < 1:
            raise ValueError("anchor_tokens must be at least 1")
        # transformers tokenizers log "sequence longer than the model's maximum" on long input;
        # counting a long paragraph before splitting it is expected, so silence that.
        self._encode_kwargs: dict[str, Any] = (
            {"verbose": False} if hasattr(tokenizer, "model_max_length") else {}
        )
        # Paragraph text -> its measurements, for a tokenizer where they do not depend on the
        # document (chunking a 6-paragraph SciFact document after one paragraph's edit: 4.8 ms
        # measuring every paragraph, most of it tokenizing the whole text; a fifth of the sync
        # worker's time in a transaction at 10 edits/s with int8 embedding, by py-spy).
        self._known: dict[str, _Paragraph] | None = {} if _context_free(tokenizer) else None

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` without the model's special tokens."""
        return len(self.tokenizer.encode(text, add_special_tokens=False, **self._encode_kwargs))

    def chunk(self, text: str) -> list[Chunk]:
        pieces: list[tuple[str, int]] = []
        current: list[str] = []
        current_tokens = 0
        after_heading = False
        for para, measured in self._paragraphs(text):
            tokens = measured.tokens
            if measured.windows is not None:
                if current:
                    pieces.append(("\n\n".join(current), current_tokens))
                    current, current_tokens = [], 0
                pieces.extend((para[start:end], n) for start, end, n in measured.windows)
                after_heading = False
                continue
            heading = _HEADING.match(para) is not None
            anchor = heading or (
                not after_heading and measured.anchor_value < tokens / self.anchor_tokens
            )
            if current and (anchor or current_tokens + tokens > self.max_tokens):
                pieces.append(("\n\n".join(current), current_tokens))
                current, current_tokens = [], 0
            current.append(para)
            current_tokens += tokens
            after_heading = heading
        if current:
            pieces.append(("\n\n".join(current), current_tokens))
        return [
            Chunk(index=i, text=piece, token_count=tokens, hash=text_hash(piece))
            for i, (piece, tokens) in enumerate(pieces)
        ]

    def _paragraphs(self, text: str) -> list[tuple[str, _Paragraph]]:
        """Each paragraph of ``text`` with its measurements. With a context-free tokenizer,
        from the memo, or from tokenizing that paragraph alone (an edit to one paragraph of a
        long document tokenizes only that paragraph); otherwise from one tokenization of the
        whole text."""
        spans = _paragraph_spans(text)
        known = self._known
        if known is None:
            counter = self._counter(text)
            return [(text[s:e], self._measure(text, s, e, counter)) for s, e in spans]
        found = []
        for start, end in spans:
            para = text[start:end]
            measured = known.get(para)
            if measured is None:
                measured = self._measure(para, 0, len(para), self._counter(para))
                if len(known) >= MEMO_PARAGRAPHS:
                    known.clear()
                known[para] = measured
            found.append((para, measured))
        return found

    def _measure(
        self, text: str, start: int, end: int, counter: Callable[[int, int], int]
    ) -> _Paragraph:
        tokens = counter(start, end)
        windows = None
        if tokens > self.max_tokens:
            spans = self._word_spans(text, start, end, counter)
            windows = tuple(
                (w.start - start, w.end - start, w.tokens) for w in self._windows(text, spans)
            )
        return _Paragraph(tokens, self._anchor_value(text[start:end]), windows)

    def _counter(self, text: str) -> Callable[[int, int], int]:
        """Tokens in text[start:end], for paragraph and word boundaries of ``text``.

        A fast tokenizer encodes the document once and counts the tokens that start in the
        range (WordPiece and BPE tokens never straddle whitespace, so this equals encoding
        the piece alone); other tokenizers encode each piece."""
        starts = self._token_starts(text)
        if starts is None:
            return lambda start, end: self.count_tokens(text[start:end])
        return lambda start, end: bisect_left(starts, end) - bisect_left(starts, start)

    def _token_starts(self, text: str) -> list[int] | None:
        if not getattr(self.tokenizer, "is_fast", False):
            return None
        try:
            encoding = self.tokenizer(
                text, add_special_tokens=False, return_offsets_mapping=True, verbose=False
            )
            offsets: Sequence[tuple[int, int]] = encoding["offset_mapping"]
        except (TypeError, KeyError, NotImplementedError, ValueError):
            return None
        return sorted(start for start, _ in offsets)

    @staticmethod
    def _anchor_value(para: str) -> float:
        """A uniform value from the paragraph's own content (the anchor decision compares it
        with ``tokens / anchor_tokens``): the decision ignores its neighbours."""
        return int.from_bytes(hashlib.sha256(para.encode("utf-8")).digest()[:8], "big") / 2**64

    def _word_spans(
        self, text: str, start: int, end: int, counter: Callable[[int, int], int]
    ) -> list[_Span]:
        """Whitespace-separated words of text[start:end] with their token counts; oversized
        words are cut."""
        spans: list[_Span] = []
        for match in _WORD.finditer(text, start, end):
            tokens = counter(match.start(), match.end())
            if tokens > self.max_tokens:
                spans.extend(self._cut_word(text, match.start(), match.end()))
            else:
                spans.append(_Span(match.start(), match.end(), tokens))
        return spans

    def _cut_word(self, text: str, start: int, end: int) -> list[_Span]:
        """Split a single word longer than max_tokens (a URL, a blob) by halving it."""
        tokens = self.count_tokens(text[start:end])
        if tokens <= self.max_tokens or end - start <= 1:
            return [_Span(start, end, tokens)]
        mid = (start + end) // 2
        return self._cut_word(text, start, mid) + self._cut_word(text, mid, end)

    def _windows(self, text: str, spans: list[_Span]) -> list[_Span]:
        """Word-aligned windows of at most max_tokens with ~overlap_tokens of overlap."""
        windows: list[_Span] = []
        first = 0
        while first < len(spans):
            total, last = 0, first
            while last < len(spans) and total + spans[last].tokens <= self.max_tokens:
                total += spans[last].tokens
                last += 1
            last = max(last, first + 1)  # always progress, even past a pathological span
            if last < len(spans):
                last = self._sentence_cut(text, spans, first, last)
            tokens = sum(s.tokens for s in spans[first:last])
            windows.append(_Span(spans[first].start, spans[last - 1].end, tokens))
            if last >= len(spans):
                break
            nxt, overlap = last, 0
            while nxt - 1 > first and overlap + spans[nxt - 1].tokens <= self.overlap_tokens:
                nxt -= 1
                overlap += spans[nxt].tokens
            first = nxt
        return windows

    def _sentence_cut(self, text: str, spans: list[_Span], first: int, last: int) -> int:
        """End the window after the last sentence end in its second half, if there is one."""
        half = self.max_tokens // 2
        tokens = sum(s.tokens for s in spans[first:last])
        for i in range(last - 1, first, -1):
            if tokens < half:
                break
            if _SENTENCE_END.search(text[spans[i].start : spans[i].end]):
                return i + 1
            tokens -= spans[i].tokens
        return last


def _paragraph_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of the blank-line separated paragraphs, stripped, empty ones dropped."""
    spans: list[tuple[int, int]] = []
    position = 0
    for separator in [*_PARAGRAPH_BREAK.finditer(text), None]:
        end = separator.start() if separator else len(text)
        piece = text[position:end]
        stripped = piece.strip()
        if stripped:
            first = position + (len(piece) - len(piece.lstrip()))
            spans.append((first, first + len(stripped)))
        if separator:
            position = separator.end()
    return spans
