"""Okapi BM25, the full-text ranking of search (``mode=text`` and the text half of ``hybrid``).

The index lives in schema rag (migration 0006): postings, document frequencies and corpus
statistics that triggers on rag.chunks keep exact in the writer's transaction, and the SQL
function rag.text_scores() that scores a query. This module is the same formula in Python: the
reference the SQL is tested against, and what the documentation quotes.

For a query q and a chunk d, with N indexed chunks, df(t) the number of chunks holding term t,
tf(t, d) its frequency in d, |d| the length of d in terms and avgdl the mean length:

    idf(t)      = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))
    w(t, d)     = tf(t, d) * (k1 + 1) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))
    score(q, d) = sum over the terms t of q of qtf(t) * idf(t) * w(t, d)

Terms are the stemmed lexemes of ``to_tsvector('english', ...)`` (stop words dropped); a
query term repeated counts as often as it is repeated (qtf), as a Lucene query of the same
words does. Each query term reads at most ``cap`` postings, those with the best impact first
(the term's weight in the chunk, computed when it was written), so a query's cost is bounded by
its terms and not by the size of the corpus; scores of the postings read are exact.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class BM25:
    """The ranking's parameters (FRESHET_BM25_K1, FRESHET_BM25_B, FRESHET_BM25_POSTINGS_CAP,
    FRESHET_BM25_HYBRID_POSTINGS_CAP; a hybrid cap of 0 is the same as ``cap``)."""

    k1: float
    b: float
    cap: int
    hybrid_cap: int = 0


@dataclass(frozen=True)
class Corpus:
    """The statistics BM25 needs: chunks indexed, their total length, and term frequencies."""

    chunks: int
    length: int
    df: Mapping[str, int]

    @property
    def avgdl(self) -> float:
        return self.length / self.chunks if self.chunks else 0.0

    @classmethod
    def of(cls, documents: Iterable[Iterable[str]]) -> Corpus:
        docs = [list(d) for d in documents]
        df: Counter[str] = Counter()
        for terms in docs:
            df.update(set(terms))
        return cls(len(docs), sum(len(d) for d in docs), dict(df))


def idf(chunks: int, df: int) -> float:
    """Lucene's BM25 IDF: never negative, however common the term."""
    return math.log(1 + (chunks - df + 0.5) / (df + 0.5))


def term_weight(tf: int, dl: int, avgdl: float, k1: float, b: float) -> float:
    """The saturated, length-normalized frequency of one term in one chunk."""
    return tf * (k1 + 1) / (tf + k1 * (1 - b + b * dl / avgdl))


def score(
    query: Iterable[str], document: Iterable[str], corpus: Corpus, *, k1: float, b: float
) -> float:
    """BM25 of one tokenized document for one tokenized query."""
    terms = Counter(document)
    dl = sum(terms.values())
    total = 0.0
    for term, qtf in Counter(query).items():
        df = corpus.df.get(term, 0)
        if df and terms[term]:
            total += (
                qtf * idf(corpus.chunks, df) * term_weight(terms[term], dl, corpus.avgdl, k1, b)
            )
    return total
