"""Demo source data for the captured database: real text shipped with Python's standard library.

Two tables in schema ``app``: the language-reference topics from ``pydoc_data.topics`` and the
docstrings of a fixed list of pure-Python standard-library modules; nobody on the project
wrote them.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import psycopg
from psycopg import sql

logger = logging.getLogger(__name__)

DEMO_SCHEMA = "app"
DEMO_TABLES = ("articles", "module_docs")

#: Docstrings shorter than this are too thin to be worth retrieving.
MIN_DOCSTRING_CHARS = 200

#: Pure-Python stdlib modules whose import has no side effects and no warnings on CPython 3.11,
#: and whose docstring has at least ``MIN_DOCSTRING_CHARS`` characters. Sorted; never private.
DEMO_MODULES: tuple[str, ...] = (
    "argparse", "ast", "asyncio.base_events", "calendar", "cmd", "codeop", "collections",
    "colorsys", "compileall", "concurrent.futures.process", "configparser", "copy", "csv",
    "curses", "dbm", "dbm.dumb", "difflib", "doctest", "email.base64mime", "email.feedparser",
    "email.quoprimime", "encodings", "encodings.aliases", "encodings.bz2_codec",
    "encodings.charmap", "encodings.hp_roman8", "encodings.mac_latin2", "encodings.ptcp154",
    "encodings.undefined", "encodings.utf_8_sig", "encodings.uu_codec", "fileinput", "fnmatch",
    "ftplib", "getopt", "getpass", "gettext", "hashlib", "heapq", "http.client",
    "http.cookiejar", "http.cookies", "http.server", "imaplib", "inspect", "io", "json",
    "json.tool", "keyword", "locale", "logging.config", "logging.handlers", "lzma", "mimetypes",
    "operator", "optparse", "os", "pdb", "pickle", "pickletools", "platform", "plistlib",
    "posixpath", "pprint", "pyclbr", "pydoc", "random", "re", "rlcompleter", "runpy", "sched",
    "secrets", "shelve", "site", "smtplib", "socket", "socketserver", "sqlite3", "ssl",
    "statistics", "string", "stringprep", "struct", "subprocess", "tabnanny", "tempfile",
    "timeit", "tokenize", "trace", "typing", "unittest", "urllib.error", "urllib.parse",
    "urllib.request", "urllib.response", "urllib.robotparser", "uuid", "wave", "wsgiref",
    "wsgiref.headers", "wsgiref.simple_server", "wsgiref.validate", "xml", "xml.dom",
    "xml.dom.minidom", "xml.etree.ElementTree", "xml.sax", "xml.sax.handler", "xmlrpc.client",
    "xmlrpc.server", "zipimport",
)  # fmt: skip

_UNDERLINE = re.compile(r"^([*=\-~^#])\1{2,}$")


@dataclass(frozen=True)
class Article:
    """One row of ``app.articles``: a Python language-reference topic."""

    id: int
    title: str
    body: str
    access_groups: list[str]


@dataclass(frozen=True)
class ModuleDoc:
    """One row of ``app.module_docs``: a standard-library module's docstring."""

    name: str
    summary: str
    body: str
    access_groups: list[str]


def access_groups_for(index: int) -> list[str]:
    """Groups for the row at 0-based sorted ``index``: ``% 5 == 3`` staff, ``== 4`` support.

    Every other row (three in five) is public, i.e. ``[]``.
    """
    remainder = index % 5
    if remainder == 3:
        return ["staff"]
    if remainder == 4:
        return ["support"]
    return []


def _normalise(text: str) -> str:
    """Strip trailing whitespace on each line and keep exactly one blank line between paragraphs."""
    lines = [line.rstrip() for line in text.strip("\n").splitlines()]
    out: list[str] = []
    for line in lines:
        if line or (out and out[-1]):
            out.append(line)
    return "\n".join(out).strip()


def _title(topic: str, body: str) -> str:
    """The heading that opens ``body`` when it is underlined, else the topic name."""
    lines = [line.strip() for line in body.splitlines() if line.strip()]
    if len(lines) >= 2 and _UNDERLINE.match(lines[1]):
        return lines[0]
    return topic


def article_rows() -> list[Article]:
    """The language-reference topics, ids 1..N in sorted topic-name order."""
    from pydoc_data.topics import topics

    rows: list[Article] = []
    for topic in sorted(topics):
        body = _normalise(topics[topic])
        if not body:
            continue
        rows.append(
            Article(
                id=len(rows) + 1,
                title=_title(topic, body),
                body=body,
                access_groups=access_groups_for(len(rows)),
            )
        )
    logger.debug("built %d article rows", len(rows))
    return rows


def _docstring(name: str) -> str | None:
    """The module's docstring, or None when it fails to import or has no usable docstring."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = importlib.import_module(name)
    except Exception as exc:  # a missing C extension, a platform without the module
        logger.debug("skipping module %s: %s", name, exc)
        return None
    doc = module.__doc__
    if not isinstance(doc, str) or len(doc) < MIN_DOCSTRING_CHARS:
        return None
    return doc


def module_doc_rows(names: Sequence[str] = DEMO_MODULES) -> list[ModuleDoc]:
    """Docstrings of ``names`` (sorted) that import and are long enough; skipped ones are logged."""
    rows: list[ModuleDoc] = []
    for name in sorted(names):
        if name.startswith("_"):
            continue
        doc = _docstring(name)
        if doc is None:
            continue
        body = _normalise(inspect.cleandoc(doc))
        summary = body.splitlines()[0].strip() if body else ""
        if not summary:
            continue
        rows.append(
            ModuleDoc(
                name=name,
                summary=summary,
                body=body,
                access_groups=access_groups_for(len(rows)),
            )
        )
    logger.debug("built %d module_doc rows", len(rows))
    return rows


def _ddl(schema: str) -> list[sql.Composed]:
    """CREATE statements for the demo schema and its tables."""
    ident = sql.Identifier(schema)
    return [
        sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident),
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {}.{} ("
            " id bigint PRIMARY KEY,"
            " title text NOT NULL,"
            " body text NOT NULL,"
            " access_groups text[] NOT NULL DEFAULT '{{}}',"
            " updated_at timestamptz NOT NULL DEFAULT now())"
        ).format(ident, sql.Identifier("articles")),
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {}.{} ("
            " name text PRIMARY KEY,"
            " summary text NOT NULL,"
            " body text NOT NULL,"
            " access_groups text[] NOT NULL DEFAULT '{{}}',"
            " updated_at timestamptz NOT NULL DEFAULT now())"
        ).format(ident, sql.Identifier("module_docs")),
    ]


def create_demo_schema(conn: psycopg.Connection) -> None:
    """Create schema ``app`` and both demo tables if they do not exist."""
    # REPLICA IDENTITY stays at DEFAULT on purpose: the sync worker relies on it. With DEFAULT an
    # UPDATE carries only the new row (no "before"), and unchanged TOASTed columns arrive from
    # Debezium as the placeholder '__debezium_unavailable_value'.
    with conn.transaction(), conn.cursor() as cur:
        for statement in _ddl(DEMO_SCHEMA):
            cur.execute(statement)


def _insert(cur: psycopg.Cursor, table: str, columns: Sequence[str], rows: list[tuple]) -> int:
    """INSERT ... ON CONFLICT DO NOTHING ``rows`` into ``app.table``; the number inserted."""
    if not rows:
        return 0
    statement = sql.SQL("INSERT INTO {}.{} ({}) VALUES ({}) ON CONFLICT DO NOTHING").format(
        sql.Identifier(DEMO_SCHEMA),
        sql.Identifier(table),
        sql.SQL(", ").join(sql.Identifier(c) for c in columns),
        sql.SQL(", ").join(sql.Placeholder() for _ in columns),
    )
    cur.executemany(statement, rows)
    return max(cur.rowcount, 0)


def load_demo(conn: psycopg.Connection, limit: int | None = None) -> dict[str, int]:
    """Create the demo tables and insert their rows in one transaction; rows inserted per table.
    ``limit``: at most that many rows of each table, the first by key (a smaller demo).

    Idempotent: rows already present are left alone, so a second run inserts 0 and keeps updated_at.
    """
    articles = [(a.id, a.title, a.body, a.access_groups) for a in article_rows()][:limit]
    docs = [(d.name, d.summary, d.body, d.access_groups) for d in module_doc_rows()][:limit]
    with conn.transaction():
        create_demo_schema(conn)
        with conn.cursor() as cur:
            counts = {
                "articles": _insert(
                    cur, "articles", ("id", "title", "body", "access_groups"), articles
                ),
                "module_docs": _insert(
                    cur, "module_docs", ("name", "summary", "body", "access_groups"), docs
                ),
            }
    logger.info("demo data loaded into schema %s: %s", DEMO_SCHEMA, counts)
    return counts
