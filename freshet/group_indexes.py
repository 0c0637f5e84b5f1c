"""Partial HNSW indexes for small access groups: `freshet group-index`, read by dense search.

A user whose groups hold a small share of the chunks pays for everyone else's: the HNSW scan
over rag.chunks visits the nearest chunks of the whole corpus and drops the ones the user may
not see, so a group holding 5% of the chunks visits about 20 chunks per one it keeps (at
100,000 chunks: 4.5-5.9 ms of SQL where a user who sees 95% takes 2.7-3.1 ms). A partial index
over one group's chunks (``WHERE access_groups && '{group}'``) holds only that group's chunks,
and pgvector's documentation recommends this for filters on few distinct values.

Dense search (freshet.answering.retrieval) uses them when every branch a user needs has one:
a search for a member of groups A and B, with public documents on, becomes the union of three
index scans (A's, B's, and the public chunks' ``WHERE access_groups = '{}'``), each its own top
k, merged by distance. A user with a group that has no index keeps the one filtered scan over
the whole index, so the indexes change speed, never results or access.

The indexes are found by their comment (``freshet group index: <group>``) and must be on the
column ``embedding``: after a model switch (`freshet reembed`) they follow the renamed column
to ``embedding_previous``, are ignored by search, and `freshet group-index --rebuild` (run by
the switch) builds them again on the new column.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import psycopg
from psycopg import sql

#: The key of the public chunks' index (documents with no access groups).
PUBLIC = ""
COMMENT_PREFIX = "freshet group index: "
# The same graph parameters as the main index (migration 0001).
WITH = "WITH (m = 16, ef_construction = 64)"
# A union of more index scans than this costs more than the one filtered scan it replaces
# (each branch is a graph search of its own: 1.2-1.6 ms at 5,000 chunks).
MAX_BRANCHES = 3


def index_name(group: str) -> str:
    """A stable identifier for ``group``'s index (group names may hold any character)."""
    if group == PUBLIC:
        return "ix_chunks_embedding_public"
    return "ix_chunks_embedding_g_" + hashlib.sha1(group.encode()).hexdigest()[:16]


def predicate(group: str) -> sql.Composable:
    """The index's WHERE, written exactly as dense search writes its branch's condition."""
    if group == PUBLIC:
        return sql.SQL("access_groups = '{}'::text[]")
    return sql.SQL("access_groups && {}::text[]").format(sql.Literal([group]))


def describe(group: str) -> str:
    return "public documents" if group == PUBLIC else f"group {group!r}"


def found(conn: psycopg.Connection[Any]) -> dict[str, dict[str, Any]]:
    """Every group index on rag.chunks by group: its name, whether it is valid (a build killed
    half-way leaves an invalid one) and whether it is on the column ``embedding``."""
    rows = conn.execute(
        "SELECT obj_description(i.indexrelid, 'pg_class') AS comment, c.relname, i.indisvalid,"
        " a.attname = 'embedding' AS current, pg_relation_size(i.indexrelid) AS bytes"
        " FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
        " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]"
        " WHERE i.indrelid = to_regclass('rag.chunks') AND i.indpred IS NOT NULL"
    ).fetchall()
    out: dict[str, dict[str, Any]] = {}
    for comment, name, valid, current, size in rows:
        if comment and comment.startswith(COMMENT_PREFIX):
            out[comment[len(COMMENT_PREFIX) :]] = {
                "name": name,
                "valid": bool(valid),
                "current": bool(current),
                "bytes": int(size),
            }
    return out


def usable(conn: psycopg.Connection[Any]) -> frozenset[str]:
    """The groups (PUBLIC for the public chunks) whose index dense search can use now."""
    return frozenset(g for g, i in found(conn).items() if i["valid"] and i["current"])


def build(conn: psycopg.Connection[Any], group: str) -> bool:
    """``group``'s index, built concurrently (writes go on; autocommit connection). False if a
    valid one on the current column was there already; an invalid or stale one is replaced."""
    if not conn.autocommit:
        raise ValueError("group indexes are built concurrently: pass an autocommit connection")
    have = found(conn).get(group)
    if have is not None and have["valid"] and have["current"]:
        return False
    name = sql.Identifier(index_name(group))
    conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS rag.{}").format(name))
    conn.execute(
        sql.SQL(
            "CREATE INDEX CONCURRENTLY {} ON rag.chunks USING hnsw (embedding vector_cosine_ops) "
            + WITH
            + " WHERE {}"
        ).format(name, predicate(group))
    )
    conn.execute(
        sql.SQL("COMMENT ON INDEX rag.{} IS {}").format(name, sql.Literal(COMMENT_PREFIX + group))
    )
    return True


def drop(conn: psycopg.Connection[Any], group: str) -> bool:
    """Drop ``group``'s index; False if there was none."""
    have = found(conn).get(group)
    if have is None:
        return False
    conn.execute(
        sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS rag.{}").format(sql.Identifier(have["name"]))
    )
    return True


def stale(conn: psycopg.Connection[Any]) -> list[str]:
    """Groups whose index is invalid or on another column than ``embedding``."""
    return sorted(g for g, i in found(conn).items() if not (i["valid"] and i["current"]))


def branches(
    user_groups: Iterable[str], public_documents: bool, indexed: frozenset[str]
) -> list[str] | None:
    """The index branches a user's dense search is the union of, or None when one of them has
    no usable index (the search then keeps the one filtered scan over the whole index)."""
    wanted = sorted(set(user_groups))
    if PUBLIC in wanted:  # a group named "" is not the public chunks: keep the filtered scan
        return None
    if public_documents:
        wanted.append(PUBLIC)
    if not wanted or len(wanted) > MAX_BRANCHES or any(g not in indexed for g in wanted):
        return None
    return wanted
