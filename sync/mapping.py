"""Declarative mapping of captured rows to documents (sync/mappings.toml, or FRESHET_MAPPINGS).

Pure: a row (column -> value) in, a `Document` out. Columns are found by name, so added or
reordered columns change nothing. Columns that Debezium did not send (unchanged TOAST values,
`cdc.events.UNAVAILABLE`) are filled from the stored row (or the source row) before mapping.

When the table no longer fits the mapping (a renamed, dropped or retyped column):
- a metadata column is optional: the document is built without it and the problem is reported
  in `Document.problems` (the writer records it in rag.mapping_problems);
- a column of the title or text, or the access-groups column, is needed: `MappingError` names
  the column, the event becomes a dead letter and the document is hidden until the mapping is
  fixed. Access groups that cannot be read never make a document public (fail closed).
"""

from __future__ import annotations

import json
import string
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from freshet.cdc.events import UNAVAILABLE
from freshet.errors import FreshetError

DEFAULT_MAPPINGS = Path(__file__).with_name("mappings.toml")


class MappingError(FreshetError, ValueError):
    """A row cannot be turned into a document; the message says which column and why."""

    def __init__(self, message: str, column: str | None = None) -> None:
        super().__init__(message)
        self.column = column


@dataclass(frozen=True)
class Document:
    source_table: str
    doc_key: str
    title: str
    text: str
    metadata: dict[str, Any]
    access_groups: tuple[str, ...]
    # The values of every column the mapping reads, kept so a later event whose TOASTed
    # columns are unavailable can be completed.
    row: dict[str, Any]
    # (column, problem) for each optional column the row lacks: the mapping no longer fits.
    problems: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class TableMapping:
    table: str
    key: tuple[str, ...]
    title: str
    text: str
    metadata: tuple[str, ...] = ()
    access_groups: str | None = None

    @property
    def template_columns(self) -> frozenset[str]:
        return _fields(self.title) | _fields(self.text)

    @property
    def columns(self) -> frozenset[str]:
        """Every column the mapping reads."""
        extra = {self.access_groups} if self.access_groups else set()
        return self.template_columns | set(self.key) | set(self.metadata) | extra

    def doc_key(self, values: Mapping[str, Any]) -> str:
        """The document key: the key column's value, or a JSON list for composite keys."""
        try:
            parts = [values[column] for column in self.key]
        except KeyError as exc:
            raise MappingError(f"{self.table}: key column {exc.args[0]!r} is missing") from None
        if any(part is None or part is UNAVAILABLE for part in parts):
            raise MappingError(f"{self.table}: key column is null or unavailable")
        if len(parts) == 1:
            return str(parts[0])
        return json.dumps(parts, separators=(",", ":"), default=str)

    @property
    def needed_columns(self) -> frozenset[str]:
        """Columns without which the document cannot be built: title, text, access groups."""
        extra = {self.access_groups} if self.access_groups else set()
        return self.template_columns | extra

    def map_row(self, row: Mapping[str, Any], doc_key: str | None = None) -> Document:
        """The document of ``row``; ``doc_key`` when the caller already knows it (the record
        key), else it is read from the row's key columns."""
        for column in sorted(self.needed_columns):
            if column not in row:
                raise MappingError(
                    f"{self.table}: the row has no column {column!r}, which the mapping needs "
                    f"(renamed or dropped?); fix {column!r} in the mapping file (FRESHET_MAPPINGS)",
                    column,
                )
            if row[column] is UNAVAILABLE:
                raise MappingError(
                    f"{self.table}: value of {column} was not sent (unchanged TOAST) and no "
                    "stored or source value exists; re-snapshot the row with `freshet snapshot`",
                    column,
                )
        groups: tuple[str, ...] = ()
        if self.access_groups:
            raw = row[self.access_groups]
            if raw is None:
                groups = ()
            elif isinstance(raw, list) and all(isinstance(g, str) for g in raw):
                groups = tuple(sorted(set(raw)))
            else:
                raise MappingError(
                    f"{self.table}: access groups column {self.access_groups!r} is not a text "
                    f"array (got {type(raw).__name__}); the document stays hidden until the "
                    "mapping or the column is fixed",
                    self.access_groups,
                )
        problems = []
        metadata = {}
        for column in self.metadata:
            if column not in row:
                problems.append((column, "missing"))
            elif row[column] is UNAVAILABLE:
                problems.append((column, "unavailable"))
            else:
                metadata[column] = row[column]
        return Document(
            source_table=self.table,
            doc_key=self.doc_key(row) if doc_key is None else doc_key,
            title=_render(self.title, row),
            text=_render(self.text, row),
            metadata=metadata,
            access_groups=groups,
            row={
                column: row[column]
                for column in sorted(self.columns)
                if column in row and row[column] is not UNAVAILABLE
            },
            problems=tuple(problems),
        )


def complete_row(row: Mapping[str, Any], stored: Mapping[str, Any] | None) -> dict[str, Any]:
    """The row with each unavailable (TOAST) value replaced by the stored one, when known."""
    result = dict(row)
    if stored:
        for column, value in row.items():
            if value is UNAVAILABLE and column in stored:
                result[column] = stored[column]
    return result


@dataclass(frozen=True)
class Mappings:
    tables: dict[str, TableMapping]

    def get(self, table: str) -> TableMapping | None:
        return self.tables.get(table)

    @classmethod
    def load(cls, path: Path = DEFAULT_MAPPINGS) -> Mappings:
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise MappingError(f"mapping file {path} does not exist (FRESHET_MAPPINGS)") from None
        except tomllib.TOMLDecodeError as exc:
            raise MappingError(f"mapping file {path} is not valid TOML: {exc}") from None
        return cls.parse(data, origin=str(path))

    @classmethod
    def parse(cls, data: Mapping[str, Any], origin: str = "<mappings>") -> Mappings:
        tables: dict[str, TableMapping] = {}
        for table, spec in dict(data.get("tables", {})).items():
            where = f"{origin}: [tables.{table!r}]"
            if table.count(".") != 1:
                raise MappingError(f"{where}: the table must be named schema.table")
            unknown = set(spec) - {"key", "title", "text", "metadata", "access_groups"}
            if unknown:
                raise MappingError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
            for required in ("key", "text"):
                if required not in spec:
                    raise MappingError(f"{where}: '{required}' is required")
            key = spec["key"]
            if isinstance(key, str):
                key = [key]
            if not key or not all(isinstance(k, str) for k in key):
                raise MappingError(f"{where}: 'key' must be a column or a list of columns")
            mapping = TableMapping(
                table=table,
                key=tuple(key),
                title=str(spec.get("title", "")),
                text=str(spec["text"]),
                metadata=tuple(spec.get("metadata", ())),
                access_groups=spec.get("access_groups"),
            )
            for template in (mapping.title, mapping.text):
                _fields(template, where)
            tables[table] = mapping
        if not tables:
            raise MappingError(f'{origin}: no [tables."schema.table"] entries')
        return cls(tables)


def _fields(template: str, where: str = "") -> frozenset[str]:
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise MappingError(f"{where}: bad template {template!r}: {exc}") from None
    names = set()
    for _, name, _, _ in parsed:
        if name is None:
            continue
        if not name.isidentifier():
            raise MappingError(f"{where}: template field {{{name}}} must be a plain column name")
        names.add(name)
    return frozenset(names)


def _render(template: str, row: Mapping[str, Any]) -> str:
    values = {name: "" if row[name] is None else row[name] for name in _fields(template)}
    return template.format_map(values).strip()


def unavailable_columns(mapping: TableMapping, row: Mapping[str, Any]) -> list[str]:
    """Columns the mapping reads whose value the event did not carry (unchanged TOAST)."""
    return sorted(c for c in mapping.columns if row.get(c) is UNAVAILABLE)
