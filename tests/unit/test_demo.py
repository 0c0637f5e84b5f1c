"""Unit tests for the demo source data: pure, no database."""

from __future__ import annotations

from freshet.cdc.demo import (
    DEMO_SCHEMA,
    DEMO_TABLES,
    access_groups_for,
    article_rows,
    module_doc_rows,
)


def test_constants() -> None:
    assert DEMO_SCHEMA == "app"
    assert DEMO_TABLES == ("articles", "module_docs")


def test_rows_are_deterministic() -> None:
    assert article_rows() == article_rows()
    assert module_doc_rows() == module_doc_rows()


def test_article_ids_unique_and_contiguous() -> None:
    rows = article_rows()
    assert len(rows) >= 60
    assert [r.id for r in rows] == list(range(1, len(rows) + 1))


def test_article_text_is_real() -> None:
    rows = article_rows()
    for row in rows:
        assert row.title.strip()
        assert len(row.body) > 100
        assert "\n\n\n" not in row.body
        assert all(line == line.rstrip() for line in row.body.splitlines())
    by_title = {r.title: r for r in rows}
    loop = by_title['The "for" statement']
    assert "for" in loop.body and "iterable" in loop.body


def test_module_docs_are_real() -> None:
    rows = module_doc_rows()
    assert len(rows) >= 100
    names = [r.name for r in rows]
    assert names == sorted(names)
    assert len(set(names)) == len(names)
    assert not any(name.startswith("_") for name in names)
    for row in rows:
        assert row.summary and row.summary == row.body.splitlines()[0]
        assert len(row.body) >= 100
    by_name = {r.name: r for r in rows}
    assert "argparse" in by_name
    assert "argument" in by_name["argparse"].body.lower()


def test_module_docs_skip_bad_names() -> None:
    rows = module_doc_rows(["no_such_module_xyz", "_private", "json"])
    assert [r.name for r in rows] == ["json"]


def test_access_groups_mix() -> None:
    for rows in (article_rows(), module_doc_rows()):
        groups = [r.access_groups for r in rows]
        assert all(isinstance(g, list) and all(isinstance(x, str) for x in g) for g in groups)
        assert any(g == [] for g in groups)
        assert any(g == ["staff"] for g in groups)
        assert any(g == ["support"] for g in groups)
        assert sum(1 for g in groups if not g) > len(groups) // 2


def test_access_groups_rule() -> None:
    assert [access_groups_for(i) for i in range(5)] == [[], [], [], ["staff"], ["support"]]
