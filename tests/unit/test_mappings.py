"""The mapping file (sync/mapping.py): what a good one builds, what a bad one reports, and how a
row becomes a document. Mapping drift (a column gone) is in test_convergence_logic.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from freshet.cdc.events import UNAVAILABLE
from freshet.sync.mapping import (
    DEFAULT_MAPPINGS,
    MappingError,
    Mappings,
    TableMapping,
    complete_row,
    unavailable_columns,
)

BENCH_MAPPINGS = Path(__file__).parents[2] / "bench" / "mappings.toml"


def parse(**spec: Any) -> TableMapping:
    mapping = Mappings.parse({"tables": {"app.t": spec}}).get("app.t")
    assert mapping is not None
    return mapping


# --- the shipped files ---------------------------------------------------------------------
def test_the_shipped_mapping_file_maps_both_demo_tables() -> None:
    mappings = Mappings.load(DEFAULT_MAPPINGS)
    assert sorted(mappings.tables) == ["app.articles", "app.module_docs"]
    articles = mappings.get("app.articles")
    assert articles is not None
    assert articles.key == ("id",)
    assert articles.access_groups == "access_groups"
    assert articles.columns == {"id", "title", "body", "updated_at", "access_groups"}
    assert mappings.get("app.nothing") is None


def test_the_benchmarks_mapping_file_loads() -> None:
    assert "app.scifact" in Mappings.load(BENCH_MAPPINGS).tables


def test_a_demo_row_becomes_its_document() -> None:
    mapping = Mappings.load(DEFAULT_MAPPINGS).get("app.module_docs")
    assert mapping is not None
    doc = mapping.map_row(
        {
            "name": "json",
            "summary": "JSON encoder and decoder",
            "body": "  Encode and decode.  ",
            "access_groups": ["support", "staff", "support"],
            "updated_at": "2026-01-01",
            "unmapped": "never stored",
        }
    )
    assert (doc.source_table, doc.doc_key) == ("app.module_docs", "json")
    assert doc.title == "json: JSON encoder and decoder"
    assert doc.text == "json\n\n  Encode and decode."  # stripped at the ends only
    assert doc.metadata == {"summary": "JSON encoder and decoder", "updated_at": "2026-01-01"}
    assert doc.access_groups == ("staff", "support")  # sorted, each once
    assert "unmapped" not in doc.row and doc.row["body"] == "  Encode and decode.  "
    assert doc.problems == ()


# --- what a bad mappings file reports ----------------------------------------------------------
@pytest.mark.parametrize(
    ("tables", "message"),
    [
        ({}, 'no [tables."schema.table"] entries'),
        ({"articles": {"key": "id", "text": "{body}"}}, "the table must be named schema.table"),
        ({"a.b.c": {"key": "id", "text": "{body}"}}, "the table must be named schema.table"),
        ({"app.t": {"text": "{body}"}}, "'key' is required"),
        ({"app.t": {"key": "id"}}, "'text' is required"),
        ({"app.t": {"key": [], "text": "{b}"}}, "'key' must be a column or a list of columns"),
        ({"app.t": {"key": [1], "text": "{b}"}}, "'key' must be a column or a list of columns"),
        (
            {"app.t": {"key": "id", "text": "{b}", "colour": "red", "acl": "g"}},
            "unknown field(s) acl, colour",
        ),
        ({"app.t": {"key": "id", "text": "{body"}}, "bad template '{body'"),
        ({"app.t": {"key": "id", "text": "{row.body}"}}, "{row.body} must be a plain column"),
        ({"app.t": {"key": "id", "text": "{b}", "title": "{0}"}}, "{0} must be a plain column"),
    ],
)
def test_a_bad_mapping_says_which_table_and_what(tables: dict[str, Any], message: str) -> None:
    with pytest.raises(MappingError) as raised:
        Mappings.parse({"tables": tables}, origin="m.toml")
    assert message in str(raised.value)
    assert str(raised.value).startswith("m.toml")
    if tables:
        assert f"[tables.{next(iter(tables))!r}]" in str(raised.value)


def test_a_mapping_file_that_is_not_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "mappings.toml"
    path.write_text('[tables."app.t"\nkey = "id"\n')
    with pytest.raises(MappingError, match=f"mapping file {path} is not valid TOML"):
        Mappings.load(path)


def test_a_missing_mapping_file_names_the_file_and_the_setting(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(MappingError, match=r"absent.toml does not exist \(FRESHET_MAPPINGS\)"):
        Mappings.load(path)


def test_a_good_file_on_disk_loads_with_defaults(tmp_path: Path) -> None:
    path = tmp_path / "mappings.toml"
    path.write_text('[tables."app.notes"]\nkey = "id"\ntext = "{body}"\n')
    mapping = Mappings.load(path).get("app.notes")
    assert mapping == TableMapping("app.notes", ("id",), "", "{body}", (), None)


# --- keys and rows -------------------------------------------------------------------------
def test_a_single_key_is_its_value_as_text() -> None:
    assert parse(key="id", text="{b}").doc_key({"id": 42}) == "42"


def test_a_composite_key_keeps_the_mapping_order_and_types() -> None:
    mapping = parse(key=["region", "id"], text="{b}")
    assert mapping.doc_key({"id": 7, "region": "eu"}) == '["eu",7]'
    assert mapping.doc_key({"id": "7", "region": "eu"}) == '["eu","7"]'


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"other": 1}, "key column 'id' is missing"),
        ({"id": None}, "key column is null or unavailable"),
        ({"id": UNAVAILABLE}, "key column is null or unavailable"),
    ],
)
def test_a_key_that_cannot_be_read_is_a_mapping_error(values: dict[str, Any], message: str) -> None:
    with pytest.raises(MappingError, match=message):
        parse(key="id", text="{b}").doc_key(values)


def test_null_columns_render_empty_and_the_record_key_wins() -> None:
    mapping = parse(key="id", title="{title}", text="{title}\n\n{body}")
    doc = mapping.map_row({"id": 1, "title": None, "body": "Body."}, doc_key="from-the-key")
    assert doc.title == "" and doc.text == "Body."
    assert doc.doc_key == "from-the-key"
    assert doc.access_groups == ()  # no access-groups column: public


def test_null_access_groups_are_public_and_non_text_groups_fail_closed() -> None:
    mapping = parse(key="id", text="{b}", access_groups="g")
    assert mapping.map_row({"id": 1, "b": "x", "g": None}).access_groups == ()
    with pytest.raises(MappingError, match="is not a text array"):
        mapping.map_row({"id": 1, "b": "x", "g": [1, 2]})


def test_needed_columns_are_the_templates_and_the_groups_not_metadata() -> None:
    mapping = parse(key="id", title="{t}", text="{t} {b}", metadata=["m"], access_groups="g")
    assert mapping.needed_columns == {"t", "b", "g"}
    assert mapping.columns == {"id", "t", "b", "m", "g"}


def test_a_toast_gap_is_filled_from_the_stored_row_only() -> None:
    row = {"id": 1, "title": "New", "body": UNAVAILABLE, "other": UNAVAILABLE}
    completed = complete_row(row, {"body": "Stored body.", "title": "Old"})
    assert completed == {"id": 1, "title": "New", "body": "Stored body.", "other": UNAVAILABLE}
    assert complete_row(row, None) == row
    assert row["body"] is UNAVAILABLE  # the event's row is not changed


def test_unavailable_columns_lists_only_what_the_mapping_reads() -> None:
    mapping = parse(key="id", text="{body}", metadata=["m"])
    row = {"id": 1, "body": UNAVAILABLE, "m": UNAVAILABLE, "unmapped": UNAVAILABLE}
    assert unavailable_columns(mapping, row) == ["body", "m"]
    assert unavailable_columns(mapping, {"id": 1, "body": "x"}) == []
