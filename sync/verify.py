"""`freshet verify`: compare every captured row of every mapped table with the index.

For each source row (read in key order, in pages, at a bounded rate) the mapping gives the
document it should be: its key, the hash of its text, its title, its access groups, and its
chunks (the same chunker as the sync worker). Compared with rag.documents and rag.chunks:

  missing     the row has no served document (or a document without the chunks its text needs)
  stale       the document's text, title or chunks are not the row's as it is now
  acl         the document's or one of its chunks' access groups are not the row's
  duplicated  the document holds a chunk more often than its text does
  hidden      the document is hidden on purpose (an event over the size limit, a mapping that
              no longer fits the row); listed with the reason
  unmappable  the current mapping cannot build a document from the row
  orphaned    a served document whose row no longer exists

Changes in flight look like differences for a moment, so what differs is checked again after a
short settling time, until it stops shrinking; what remains is reported. Read only: repairing
is sync/repair.py's job.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from freshet.sync import problems
from freshet.sync.chunking import Chunker
from freshet.sync.mapping import MappingError, Mappings, TableMapping
from freshet.sync.source_rows import debezium_value

logger = logging.getLogger(__name__)

KINDS = ("missing", "stale", "acl", "duplicated", "hidden", "unmappable", "orphaned")
SAMPLES = 10

Progress = Callable[[int], None]


@dataclass
class TableReport:
    table: str
    rows: int = 0
    documents: int = 0
    # kind -> {doc_key: detail}; the source key values of each row, for a targeted snapshot.
    found: dict[str, dict[str, str]] = field(default_factory=lambda: {k: {} for k in KINDS})
    key_values: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    # (doc_key, id, source_lsn, source_seq) of orphans, for a guarded removal.
    orphans: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    mapping_columns_missing: list[str] = field(default_factory=list)

    def count(self, kind: str) -> int:
        return len(self.found[kind])

    def differing(self) -> set[str]:
        return {key for kind in KINDS for key in self.found[kind]}

    def as_json(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "documents": self.documents,
            "counts": {k: self.count(k) for k in KINDS},
            "samples": {
                k: [{"key": key, "detail": detail} for key, detail in list(v.items())[:SAMPLES]]
                for k, v in self.found.items()
                if v
            },
            "mapping_columns_missing": self.mapping_columns_missing,
        }


@dataclass
class Report:
    started_at: datetime
    tables: dict[str, TableReport] = field(default_factory=dict)
    finished_at: datetime | None = None
    repair: dict[str, Any] | None = None

    @property
    def rows_checked(self) -> int:
        return sum(t.rows for t in self.tables.values())

    def counts(self) -> dict[str, int]:
        return {k: sum(t.count(k) for t in self.tables.values()) for k in KINDS}

    @property
    def in_sync(self) -> bool:
        return not any(self.counts().values())

    def as_json(self) -> dict[str, Any]:
        return {
            "in_sync": self.in_sync,
            "started_at": self.started_at.isoformat(),
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "rows_checked": self.rows_checked,
            "counts": self.counts(),
            "tables": {name: t.as_json() for name, t in self.tables.items()},
            "repair": self.repair,
        }


def _key_order(mapping: TableMapping) -> sql.Composable:
    return sql.SQL(", ").join(sql.Identifier(c) for c in mapping.key)


def _qualified(mapping: TableMapping) -> sql.Composable:
    schema, table = mapping.table.split(".", 1)
    return sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(table))


def source_pages(
    conn: psycopg.Connection, mapping: TableMapping, page: int, rows_per_sec: int
) -> Iterator[list[dict[str, Any]]]:
    """The table's rows in key order, ``page`` at a time, at most ``rows_per_sec`` (0: no
    limit); keyset pagination, so each page is one index range scan."""
    keys = [sql.Identifier(c) for c in mapping.key]
    after: tuple[Any, ...] | None = None
    while True:
        started = time.monotonic()
        where: sql.Composable = sql.SQL("")
        params: list[Any] = []
        if after is not None:
            where = sql.SQL(" WHERE ({}) > ({})").format(
                sql.SQL(", ").join(keys), sql.SQL(", ").join(sql.Placeholder() for _ in keys)
            )
            params = list(after)
        query = sql.SQL("SELECT * FROM {}{} ORDER BY {} LIMIT {}").format(
            _qualified(mapping), where, _key_order(mapping), sql.Literal(page)
        )
        rows = conn.cursor(row_factory=dict_row).execute(query, params).fetchall()
        if not rows:
            return
        yield rows
        if len(rows) < page:
            return
        after = tuple(rows[-1][c] for c in mapping.key)
        if rows_per_sec > 0:
            spare = len(rows) / rows_per_sec - (time.monotonic() - started)
            if spare > 0:
                time.sleep(spare)


def _expected(
    mapping: TableMapping, chunker: Chunker, row: Mapping[str, Any]
) -> tuple[str, dict[str, Any] | str]:
    """(doc_key, what the index should hold) or (doc_key, why the row cannot be mapped)."""
    values = {name: debezium_value(value) for name, value in row.items()}
    key = mapping.doc_key(values)
    try:
        doc = mapping.map_row(values, doc_key=key)
    except MappingError as exc:
        return key, str(exc)
    return key, {
        "hash": hashlib.sha256(doc.text.encode()).hexdigest(),
        "title": doc.title,
        "groups": sorted(doc.access_groups),
        "chunks": [c.hash for c in chunker.chunk(doc.text)],
    }


@dataclass
class _Indexed:
    id: int
    content_hash: str | None
    title: str | None
    groups: list[str]
    deleted: bool
    hidden: str | None
    lsn: int
    seq: int


def _documents(conn: psycopg.Connection, table: str, keys: list[str] | None) -> dict[str, _Indexed]:
    where = " AND doc_key = ANY(%s)" if keys is not None else ""
    rows = conn.execute(
        "SELECT doc_key, id, content_hash, title, access_groups, deleted_at IS NOT NULL,"
        " hidden_reason, source_lsn, source_seq FROM rag.documents WHERE source_table = %s" + where,
        (table, keys) if keys is not None else (table,),
    ).fetchall()
    return {
        r[0]: _Indexed(r[1], r[2], r[3], sorted(r[4] or []), r[5], r[6], r[7], r[8]) for r in rows
    }


def _chunks(
    conn: psycopg.Connection, ids: list[int]
) -> dict[int, tuple[list[str], list[list[str]]]]:
    """document id -> (chunk hashes in index order, each chunk's access groups)."""
    rows = conn.execute(
        "SELECT document_id, text_hash, access_groups FROM rag.chunks"
        " WHERE document_id = ANY(%s) ORDER BY document_id, chunk_index",
        (ids,),
    ).fetchall()
    found: dict[int, tuple[list[str], list[list[str]]]] = {}
    for doc_id, digest, groups in rows:
        hashes, acls = found.setdefault(doc_id, ([], []))
        hashes.append(digest)
        acls.append(sorted(groups or []))
    return found


def compare(
    report: TableReport,
    key: str,
    expected: dict[str, Any] | str,
    doc: _Indexed | None,
    chunks: tuple[list[str], list[list[str]]] | None,
) -> None:
    """File one source row under the kind of difference it has, if any."""
    if isinstance(expected, str):
        report.found["unmappable"][key] = expected
        return
    if doc is not None and doc.hidden:
        report.found["hidden"][key] = doc.hidden
        return
    if doc is None or doc.deleted:
        report.found["missing"][key] = "no document" if doc is None else "document deleted"
        return
    hashes, acls = chunks or ([], [])
    if doc.content_hash != expected["hash"] or (doc.title or "") != expected["title"]:
        report.found["stale"][key] = "text or title differs from the row"
    elif hashes != expected["chunks"]:
        want = expected["chunks"]
        if want and not hashes:
            report.found["missing"][key] = "document has no chunks"
        elif len(hashes) > len(want) and all(hashes.count(h) >= want.count(h) for h in set(want)):
            report.found["duplicated"][key] = f"{len(hashes)} chunks where the text has {len(want)}"
        else:
            report.found["stale"][key] = "chunks differ from the row's text"
    if doc.groups != expected["groups"] or any(a != expected["groups"] for a in acls):
        report.found["acl"][key] = f"index {doc.groups}, row {expected['groups']}"


def verify_table(
    source: psycopg.Connection,
    index: psycopg.Connection,
    mapping: TableMapping,
    chunker: Chunker,
    *,
    page: int = 500,
    rows_per_sec: int = 0,
    progress: Progress | None = None,
) -> TableReport:
    report = TableReport(mapping.table)
    report.mapping_columns_missing = missing_columns(source, mapping)
    documents = _documents(index, mapping.table, None)
    report.documents = sum(1 for d in documents.values() if not d.deleted)
    seen: set[str] = set()
    for rows in source_pages(source, mapping, page, rows_per_sec):
        expected = []
        for row in rows:
            key, want = _expected(mapping, chunker, row)
            expected.append((key, want))
            report.key_values[key] = tuple(row[c] for c in mapping.key)
            seen.add(key)
        ids = [documents[k].id for k, _ in expected if k in documents]
        chunks = _chunks(index, ids)
        for key, want in expected:
            doc = documents.get(key)
            compare(report, key, want, doc, chunks.get(doc.id) if doc else None)
        report.rows += len(rows)
        if progress is not None:
            progress(len(rows))
    for key, doc in documents.items():
        if key not in seen and (not doc.deleted or doc.hidden):
            report.found["orphaned"][key] = "the row no longer exists"
            report.orphans[key] = (doc.id, doc.lsn, doc.seq)
    return report


def recheck(
    source: psycopg.Connection,
    index: psycopg.Connection,
    report: TableReport,
    mapping: TableMapping,
    chunker: Chunker,
) -> TableReport:
    """The same comparison for only the rows that differed: their current state."""
    keys = sorted(report.differing())
    fresh = TableReport(mapping.table, rows=report.rows, documents=report.documents)
    fresh.mapping_columns_missing = report.mapping_columns_missing
    if not keys:
        return fresh
    documents = _documents(index, mapping.table, keys)
    rows = rows_by_keys(
        source, mapping, [report.key_values[k] for k in keys if k in report.key_values]
    )
    found: dict[str, dict[str, Any]] = {}
    for row in rows:
        key, _ = _expected(mapping, chunker, row)
        found[key] = row
        fresh.key_values[key] = tuple(row[c] for c in mapping.key)
    chunks = _chunks(index, [d.id for d in documents.values()])
    for key in keys:
        doc = documents.get(key)
        if key in found:
            _, want = _expected(mapping, chunker, found[key])
            compare(fresh, key, want, doc, chunks.get(doc.id) if doc else None)
        elif doc is not None and (not doc.deleted or doc.hidden):
            fresh.found["orphaned"][key] = "the row no longer exists"
            fresh.orphans[key] = (doc.id, doc.lsn, doc.seq)
    return fresh


def rows_by_keys(
    conn: psycopg.Connection, mapping: TableMapping, keys: list[tuple[Any, ...]]
) -> list[dict[str, Any]]:
    """The rows whose key columns equal one of ``keys`` (in batches of 500)."""
    found: list[dict[str, Any]] = []
    columns = sql.SQL(", ").join(sql.Identifier(c) for c in mapping.key)
    for start in range(0, len(keys), 500):
        batch = keys[start : start + 500]
        query = sql.SQL("SELECT * FROM {} WHERE ({}) IN ({})").format(
            _qualified(mapping),
            columns,
            sql.SQL(", ").join(
                sql.SQL("({})").format(sql.SQL(", ").join(sql.Literal(v) for v in values))
                for values in batch
            ),
        )
        found.extend(conn.cursor(row_factory=dict_row).execute(query).fetchall())
    return found


def missing_columns(conn: psycopg.Connection, mapping: TableMapping) -> list[str]:
    """Columns the mapping reads that the table does not have (renamed or dropped)."""
    schema, table = mapping.table.split(".", 1)
    present = {
        r[0]
        for r in conn.execute(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_schema = %s AND table_name = %s",
            (schema, table),
        )
    }
    return sorted(c for c in mapping.columns if c not in present)


def verify(
    source: psycopg.Connection,
    index: psycopg.Connection,
    mappings: Mappings,
    chunker: Chunker,
    *,
    tables: list[str] | None = None,
    page: int = 500,
    rows_per_sec: int = 0,
    settle: float = 30.0,
    progress: Callable[[int], Progress] | None = None,
) -> Report:
    """Compare every mapped table (or ``tables``); differences are rechecked until they stop
    shrinking or ``settle`` seconds pass."""
    report = Report(started_at=datetime.now(UTC))
    names = tables or sorted(mappings.tables)
    unknown = [t for t in names if mappings.get(t) is None]
    if unknown:
        raise MappingError(f"no mapping for {', '.join(unknown)} in the mapping file")
    for name in names:
        mapping = mappings.tables[name]
        tick = progress(_row_count(source, mapping)) if progress else None
        report.tables[name] = verify_table(
            source, index, mapping, chunker, page=page, rows_per_sec=rows_per_sec, progress=tick
        )
        fits = [c for c in mapping.columns if c not in report.tables[name].mapping_columns_missing]
        problems.clear(index, name, fits)
    deadline = time.monotonic() + settle
    while not report.in_sync and time.monotonic() < deadline:
        before = sum(report.counts().values())
        time.sleep(min(3.0, max(0.0, deadline - time.monotonic())))
        for name, table in report.tables.items():
            report.tables[name] = recheck(source, index, table, mappings.tables[name], chunker)
        if sum(report.counts().values()) >= before:
            break
    report.finished_at = datetime.now(UTC)
    return report


def _row_count(conn: psycopg.Connection, mapping: TableMapping) -> int:
    row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(_qualified(mapping))).fetchone()
    return int(row[0]) if row else 0


def save(index: psycopg.Connection, report: Report) -> None:
    """Record the run in rag.verify_runs (shown by status, the status page and metrics)."""
    data = report.as_json()
    index.execute(
        "INSERT INTO rag.verify_runs (started_at, finished_at, tables, rows_checked, counts,"
        " samples, in_sync, repair) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
        (
            report.started_at,
            report.finished_at,
            list(report.tables),
            report.rows_checked,
            Jsonb(data["counts"]),
            Jsonb({name: t["samples"] for name, t in data["tables"].items()}),
            report.in_sync,
            Jsonb(report.repair) if report.repair is not None else None,
        ),
    )


def last_run(index: psycopg.Connection) -> dict[str, Any] | None:
    """The newest verify run, for `freshet status` and the metrics endpoint."""
    if not index.execute("SELECT to_regclass('rag.verify_runs') IS NOT NULL").fetchone()[0]:  # type: ignore[index]
        return None
    row = index.execute(
        "SELECT finished_at, rows_checked, counts, in_sync, repair,"
        " (SELECT count(*) FROM rag.verify_runs WHERE finished_at IS NOT NULL),"
        " (SELECT count(*) FROM rag.verify_runs WHERE finished_at IS NOT NULL AND NOT in_sync)"
        " FROM rag.verify_runs WHERE finished_at IS NOT NULL ORDER BY id DESC LIMIT 1"
    ).fetchone()
    if row is None:
        return None
    return {
        "finished_at": row[0].isoformat(),
        "age_s": round((datetime.now(UTC) - row[0]).total_seconds(), 1),
        "rows_checked": row[1],
        "counts": row[2],
        "in_sync": row[3],
        "repaired": row[4] is not None,
        "runs": row[5],
        "runs_differing": row[6],
    }
