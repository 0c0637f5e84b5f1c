"""Okapi BM25 (freshet.answering.bm25) against a hand-computed 5-document corpus.

The same corpus is indexed through the real triggers and scored by rag.text_scores() in
tests/integration/test_text_index.py, which compares the SQL with this reference.
"""

from __future__ import annotations

import math

import pytest

from freshet.answering.bm25 import Corpus, idf, score, term_weight

DOCS = [
    ["cat", "sat", "mat"],
    ["dog", "sat", "log"],
    ["cat", "cat", "dog"],
    ["bird", "fli"],
    ["cat", "dog", "bird", "fish", "mat", "sat"],
]
K1, B = 0.9, 0.4


def test_corpus_statistics() -> None:
    corpus = Corpus.of(DOCS)
    assert (corpus.chunks, corpus.length) == (5, 17)
    assert corpus.avgdl == pytest.approx(3.4)
    assert corpus.df == {
        "cat": 3, "sat": 3, "mat": 2, "dog": 3, "log": 1, "bird": 2, "fli": 1, "fish": 1,
    }  # fmt: skip


def test_idf_by_hand() -> None:
    # ln(1 + (N - df + 0.5) / (df + 0.5)), N = 5
    assert idf(5, 3) == pytest.approx(math.log(1 + 2.5 / 3.5))  # 0.538997
    assert idf(5, 2) == pytest.approx(math.log(2.4))  # 0.875469
    assert idf(5, 5) > 0  # a term in every document still weighs something, never negative


def test_term_weight_by_hand() -> None:
    # tf (k1 + 1) / (tf + k1 (1 - b + b dl / avgdl)); dl 3, avgdl 3.4:
    # 1 - 0.4 + 0.4 * 3 / 3.4 = 0.952941; 1 * 1.9 / (1 + 0.9 * 0.952941) = 1.022799
    assert term_weight(1, 3, 3.4, K1, B) == pytest.approx(1.022799, abs=1e-6)
    # tf 2: 3.8 / (2 + 0.857647) = 1.329766 (saturates: less than twice the weight of tf 1)
    assert term_weight(2, 3, 3.4, K1, B) == pytest.approx(1.329766, abs=1e-6)
    # dl 6: 1.9 / (1 + 0.9 * 1.305882) = 0.873445 (a longer document weighs a term less)
    assert term_weight(1, 6, 3.4, K1, B) == pytest.approx(0.873445, abs=1e-6)


def test_scores_by_hand() -> None:
    corpus = Corpus.of(DOCS)
    query = ["cat", "mat"]
    scores = [score(query, d, corpus, k1=K1, b=B) for d in DOCS]
    # d1: (0.538997 + 0.875469) * 1.022799; d3: 0.538997 * 1.329766; d5: 1.414465 * 0.873445
    assert scores == pytest.approx([1.446714, 0.0, 0.716739, 0.0, 1.235458], abs=1e-6)
    ranking = sorted(range(5), key=lambda i: -scores[i])
    assert ranking[:3] == [0, 4, 2]


def test_repeated_query_term_counts_twice_and_unknown_terms_nothing() -> None:
    corpus = Corpus.of(DOCS)
    once = score(["mat"], DOCS[0], corpus, k1=K1, b=B)
    assert score(["mat", "mat"], DOCS[0], corpus, k1=K1, b=B) == pytest.approx(2 * once)
    assert score(["zebra"], DOCS[0], corpus, k1=K1, b=B) == 0.0


def test_b_zero_ignores_length_and_k1_zero_ignores_frequency() -> None:
    assert term_weight(1, 3, 3.4, K1, 0.0) == pytest.approx(term_weight(1, 30, 3.4, K1, 0.0))
    assert term_weight(1, 3, 3.4, 0.0, B) == pytest.approx(term_weight(5, 3, 3.4, 0.0, B))
