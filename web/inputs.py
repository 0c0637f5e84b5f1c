"""JSON from callers, read without recursion: nesting and size are bounded before anything
walks the value, so no input reaches a RecursionError (a 500) in the parser, in these checks,
in psycopg's Jsonb or in PostgreSQL.

Nothing here knows Flask; ``freshet.web.api`` turns a ``BadInput`` into a 400 naming the field.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

#: Deepest nesting accepted in a JSON body or a JSON parameter (a scalar is depth 0, ``[]``
#: and ``{}`` depth 1). A metadata filter needs a few levels; 32 leaves room for any real one.
MAX_JSON_DEPTH = 32


class BadInput(ValueError):
    """An input refused, with the field it came from (None: the whole body)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


def depth(value: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """The nesting depth of a JSON value, walked with an explicit stack; stops counting once
    past ``limit`` (returns ``limit + 1``), so the walk is bounded as well."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        level += 1
        if level > limit:
            return limit + 1
        deepest = max(deepest, level)
        stack.extend((child, level) for child in children if isinstance(child, dict | list))
    return deepest


def loads(text: str | bytes, field: str | None, limit: int = MAX_JSON_DEPTH) -> Any:
    """Parse JSON text nested at most ``limit`` deep; BadInput otherwise, never RecursionError."""
    where = f"{field} " if field else "the body "
    try:
        value = json.loads(text)
    except RecursionError:
        if field is None:
            key = deep_key(text if isinstance(text, str) else text.decode("utf-8", "replace"))
            if key is not None:
                raise BadInput(f"{key} is nested deeper than {limit - 1} levels", key) from None
        raise BadInput(f"{where}is nested deeper than {limit} levels", field) from None
    except ValueError:  # JSONDecodeError, UnicodeDecodeError, an integer over 4300 digits
        raise BadInput(f"{where}is not valid JSON", field) from None
    check_depth(value, field, limit)
    return value


_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}:,]')


def deep_key(text: str, limit: int = MAX_JSON_DEPTH) -> str | None:
    """The key of the top-level object under which ``text`` nests deeper than ``limit``
    (a scan of its brackets and strings, for a text the parser could not read)."""
    level, key, last = 0, None, None
    for match in _TOKEN.finditer(text):
        token = match.group(0)
        if token in "[{":
            level += 1
            if level > limit:
                return key
        elif token in "]}":
            level -= 1
        elif token == ":" and level == 1 and last is not None:
            key = last
        elif token[0] == '"':
            try:
                last = json.loads(token) if level == 1 else last
            except ValueError:
                last = None
    return None


def check_depth(value: Any, field: str | None, limit: int = MAX_JSON_DEPTH) -> None:
    """BadInput naming the deepest offender when ``value`` is nested more than ``limit``."""
    if depth(value, limit) <= limit:
        return
    if field is None and isinstance(value, dict):
        # Name the body's field that is too deep: its own nesting counts one level less.
        for key, child in value.items():
            if depth(child, limit - 1) > limit - 1:
                raise BadInput(f"{key} is nested deeper than {limit - 1} levels", str(key))
    raise BadInput(f"{field or 'the body'} is nested deeper than {limit} levels", field)


def storable(value: Any) -> bool:
    """Whether PostgreSQL can take the value as text or jsonb: no NUL character, no lone
    surrogate (not encodable as UTF-8) and no NaN or infinity, at any depth (walked with an
    explicit stack)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return False
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(item, float):
            if not math.isfinite(item):
                return False
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True
