"""Which index scans a user's dense search is the union of (freshet/group_indexes.py)."""

from __future__ import annotations

from psycopg import sql

from freshet.group_indexes import MAX_BRANCHES, PUBLIC, branches, index_name, predicate

INDEXED = frozenset({"research", "legal", PUBLIC})


def test_a_member_of_indexed_groups_searches_their_indexes_and_the_public_one() -> None:
    assert branches(("research",), True, INDEXED) == ["research", PUBLIC]
    assert branches(("research", "research"), False, INDEXED) == ["research"]
    assert branches(("research", "legal"), True, INDEXED) == ["legal", "research", PUBLIC]


def test_one_group_without_an_index_keeps_the_one_scan_of_the_whole_index() -> None:
    assert branches(("research", "staff"), True, INDEXED) is None
    assert branches(("research",), True, frozenset({"research"})) is None  # public not indexed
    assert branches((), False, INDEXED) is None  # sees nothing but what an admin grants


def test_a_group_named_like_the_public_key_never_reads_the_public_index() -> None:
    # Public documents off: a user in a group "" must not be given the public chunks' scan.
    assert branches(("",), False, INDEXED) is None
    assert branches(("", "research"), True, INDEXED) is None


def test_anonymous_users_search_the_public_index_alone() -> None:
    assert branches((), True, INDEXED) == [PUBLIC]


def test_more_branches_than_pay_off_keep_the_one_scan() -> None:
    many = frozenset({f"g{i}" for i in range(MAX_BRANCHES + 1)} | {PUBLIC})
    assert branches(tuple(sorted(many - {PUBLIC}))[: MAX_BRANCHES - 1], True, many) is not None
    assert branches(tuple(sorted(many - {PUBLIC})), True, many) is None


def test_index_names_are_stable_identifiers_for_any_group_name() -> None:
    assert index_name(PUBLIC) == "ix_chunks_embedding_public"
    odd = index_name("R&D 'labs'; DROP TABLE x")
    assert odd.startswith("ix_chunks_embedding_g_") and odd.replace("_", "").isalnum()
    assert len(odd) <= 63 and odd == index_name("R&D 'labs'; DROP TABLE x")
    assert index_name("a") != index_name("b")


def test_the_predicate_quotes_the_group_name() -> None:
    composed = predicate("it's")
    assert isinstance(composed, sql.Composable)
    assert "it''s" in composed.as_string(None)
    assert predicate(PUBLIC).as_string(None) == "access_groups = '{}'::text[]"
