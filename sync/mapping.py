"""Declarative mapping of captured rows to documents (sync/mappings.toml, or FRESHET_MAPPINGS).

Pure: a row (column -> value) in, a `Document` out. Columns that Debezium did not send (unchanged
TOAST values, `cdc.events.UNAVAILABLE`) are filled from the stored row before mapping; a
column that is needed and unknown is a `MappingError`, which sends the event to dead letters.
"""

from __future__ import annotations

import json
import string
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdc.events import UNAVAILABLE

DEFAULT_MAPPINGS = Path(__file__).with_name("mappings.toml")


class MappingError(ValueError):
    """A row cannot be turned into a document; the message says which column and why."""


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

    def map_row(self, row: Mapping[str, Any]) -> Document:
        missing = sorted(c for c in self.columns if c not in row)
        if missing:
            raise MappingError(f"{self.table}: row has no column(s) {', '.join(missing)}")
        unavailable = sorted(c for c in self.columns if row[c] is UNAVAILABLE)
        if unavailable:
            raise MappingError(
                f"{self.table}: value of {', '.join(unavailable)} was not sent (unchanged TOAST) "
                "and no stored value exists; re-snapshot the row with `freshet snapshot`"
            )
        groups: tuple[str, ...] = ()
        if self.access_groups:
            raw = row[self.access_groups]
            if raw is None:
                groups = ()
            elif isinstance(raw, list) and all(isinstance(g, str) for g in raw):
                groups = tuple(sorted(set(raw)))
            else:
                raise MappingError(f"{self.table}: {self.access_groups} is not a text array")
        return Document(
            source_table=self.table,
            doc_key=self.doc_key(row),
            title=_render(self.title, row),
            text=_render(self.text, row),
            metadata={column: row[column] for column in self.metadata},
            access_groups=groups,
            row={column: row[column] for column in sorted(self.columns)},
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
