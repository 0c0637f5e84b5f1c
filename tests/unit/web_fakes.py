"""Fakes for the web app's unit tests: passages and a retriever that needs no database."""

from __future__ import annotations

from datetime import UTC, datetime

from freshet.answering.retrieval import NO_FILTERS, Document, Filters, Mode, Passage, Retriever
from freshet.answering.users import User


def passage(
    chunk_id: int,
    text: str,
    *,
    table: str = "app.articles",
    key: str | None = None,
    groups: tuple[str, ...] = (),
    ts: datetime | None = None,
    lsn: int | None = None,
) -> Passage:
    return Passage(
        chunk_id=chunk_id,
        document_id=chunk_id,
        source_table=table,
        doc_key=key or str(chunk_id),
        chunk_index=0,
        text=text,
        access_groups=groups,
        source_lsn=lsn if lsn is not None else 1000 + chunk_id,
        source_ts=ts or datetime(2026, 1, 1, 12, chunk_id % 60, tzinfo=UTC),
        title=f"Title {chunk_id}",
    )


class FakeRetriever(Retriever):
    """Returns its passages the user may see, in order; records each call."""

    def __init__(self, passages: list[Passage]) -> None:
        self.passages = passages
        self.calls: list[dict[str, object]] = []

    def _visible(self, p: Passage, user: User) -> bool:
        return user.admin or not p.access_groups or bool(set(p.access_groups) & set(user.groups))

    def search(
        self,
        query: str,
        user: User,
        *,
        k: int = 5,
        mode: Mode = "hybrid",
        filters: Filters = NO_FILTERS,
        dedupe: bool = False,
    ) -> list[Passage]:
        self.calls.append({"query": query, "k": k, "mode": mode, "filters": filters})
        found = [p for p in self.passages if self._visible(p, user)]
        if filters.tables:
            found = [p for p in found if p.source_table in filters.tables]
        return found[:k]

    def document(self, source_table: str, doc_key: str, user: User) -> Document | None:
        for p in self.passages:
            if (p.source_table, p.doc_key) == (source_table, doc_key) and self._visible(p, user):
                return Document(
                    id=p.document_id,
                    source_table=p.source_table,
                    doc_key=p.doc_key,
                    title=p.title,
                    metadata={},
                    access_groups=p.access_groups,
                    source_lsn=p.source_lsn,
                    source_ts=p.source_ts,
                    indexed_at=p.source_ts,
                    chunks=[{"chunk_id": p.chunk_id, "chunk_index": 0, "text": p.text}],
                )
        return None
