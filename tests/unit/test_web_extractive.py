"""The extractive answerer on fixed passages: cited sentences, or an honest 'nothing relevant'."""

from __future__ import annotations

import os
from datetime import UTC, datetime

import pytest

from freshet.answering.llm.base import EMPTY_ANSWER, cited_numbers, make_answer
from freshet.answering.llm.extractive import (
    NOTHING_RELEVANT,
    EmbeddingScorer,
    ExtractiveAnswerer,
    LexicalScorer,
    split_sentences,
)
from freshet.embedder import TransformersEmbedder
from tests.unit.web_fakes import passage

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PASSAGES = [
    passage(
        1,
        "Kafka Connect runs connectors in distributed mode. Each connector is split into tasks "
        "that the workers share.",
        ts=datetime(2026, 3, 1, tzinfo=UTC),
    ),
    passage(
        2,
        "The HNSW index in pgvector answers nearest-neighbour queries quickly. It trades a little "
        "recall for speed, controlled by ef_search.",
        key="hnsw",
        ts=datetime(2026, 5, 1, tzinfo=UTC),
    ),
    passage(
        3,
        "Bread dough rises when yeast ferments the sugars in the flour. Bake it when it doubled.",
        ts=datetime(2026, 9, 1, tzinfo=UTC),
    ),
]


@pytest.fixture(scope="module")
def embedder() -> TransformersEmbedder:
    return TransformersEmbedder(bf16=False, fast_path="off")


def test_split_sentences_drops_fragments() -> None:
    assert split_sentences("One two three four. Tiny. Five six seven eight!") == [
        "One two three four.",
        "Five six seven eight!",
    ]


def test_lexical_answer_cites_the_passage_it_quotes() -> None:
    answerer = ExtractiveAnswerer(LexicalScorer())
    answer = answerer.answer("How does the HNSW index in pgvector trade recall?", PASSAGES)
    assert "[2]" in answer.text
    assert (
        "The HNSW index in pgvector answers nearest-neighbour queries quickly. [2]" in answer.text
    )
    assert [c.n for c in answer.citations] == [2]
    cited = answer.citations[0]
    assert (cited.source_table, cited.doc_key, cited.chunk_id) == ("app.articles", "hnsw", 2)
    assert cited.source_lsn == PASSAGES[1].source_lsn
    assert answer.as_of == datetime(2026, 5, 1, tzinfo=UTC)


def test_every_sentence_is_copied_from_a_passage_and_followed_by_its_number() -> None:
    answerer = ExtractiveAnswerer(LexicalScorer(), max_sentences=3, margin=1.0)
    text = answerer.compose("connectors tasks workers index yeast", PASSAGES)
    pieces = [p.strip() for p in text.split("]") if p.strip()]
    assert pieces
    for piece in pieces:
        sentence, _, number = piece.rpartition("[")
        assert sentence.strip() in PASSAGES[int(number) - 1].text


def test_nothing_relevant_when_best_score_is_below_threshold() -> None:
    answer = ExtractiveAnswerer(LexicalScorer()).answer("What is the capital of France?", PASSAGES)
    assert answer.text == NOTHING_RELEVANT
    assert answer.citations == [] and answer.as_of is None and answer.declined


def test_nothing_relevant_without_passages() -> None:
    declined = ExtractiveAnswerer(LexicalScorer()).answer("anything?", [])
    assert declined.text == NOTHING_RELEVANT and declined.declined


def test_stream_joins_to_the_same_text_as_answer() -> None:
    answerer = ExtractiveAnswerer(LexicalScorer())
    question = "What does Kafka Connect split connectors into?"
    streamed = list(answerer.stream(question, PASSAGES))
    assert len(streamed) > 1
    assert "".join(streamed) == answerer.answer(question, PASSAGES).text


def test_embedding_scorer_picks_the_semantically_closest_sentence(
    embedder: TransformersEmbedder,
) -> None:
    answerer = ExtractiveAnswerer(EmbeddingScorer(embedder.embed))
    answer = answerer.answer("How is the approximate vector search tuned?", PASSAGES)
    assert answer.citations and answer.citations[0].n == 2
    nothing = answerer.answer("Who won the football world cup in 1998?", PASSAGES)
    assert nothing.text == NOTHING_RELEVANT and not nothing.citations


def test_cited_numbers_ignore_unknown_and_repeated_markers() -> None:
    assert cited_numbers("a [2] b [9] c [2][1] [0]", 3) == [2, 1]


def test_generated_text_without_markers_cites_every_passage_shown() -> None:
    answer = make_answer("free text", PASSAGES, "x")
    assert [c.n for c in answer.citations] == [1, 2, 3]
    assert answer.as_of == datetime(2026, 9, 1, tzinfo=UTC)
    strict = make_answer("free text", PASSAGES, "x", cite_all_unmarked=False)
    assert strict.citations == []


def test_empty_generation_says_so_and_cites_nothing() -> None:
    answer = make_answer("  \n", PASSAGES, "x")
    assert answer.text == EMPTY_ANSWER and answer.citations == [] and answer.as_of is None
