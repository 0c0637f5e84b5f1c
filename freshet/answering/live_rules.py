"""Answer rules that another team owns and changes while Freshet runs.

FRESHET_ANSWER_RULES names where the rules live:

- a TOML file of ``[[rule]]`` tables (the default, ``rules/answers.toml``);
- a directory: every ``*.toml`` file in it, in name order (one file per team or per policy);
  rule names are unique across the files;
- ``table``: the rows of ``rag.answer_rules`` (name, kind, params as JSON, enabled,
  description), edited through SQL by whoever owns the policy.

Every process that judges answers (a web process, a validator) holds a ``LiveRules`` and asks
it for the current rule set with each answer. At most every FRESHET_ANSWER_RULES_RELOAD_S
seconds (default 1) that call looks at the source again: a file's or directory's contents,
the table's last change. A changed source is parsed and replaces the rule set at once; a broken
one (invalid TOML, an unknown kind, a bad pattern) is refused with an error in the log and the
last good rule set stays in force, so a typo never turns every rule off. At start a broken
source is an error (the process does not start without the rules it was told to apply).

A rule set's version is its digest (the first 12 hex digits of the SHA-256 of its text or rows)
and when its source last changed (a file's modification time, the table's last change), both
recorded with every verdict (``rag.answer_audit``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from freshet.answering.rules import (
    NO_RULES,
    Embed,
    RulesError,
    RuleSet,
    build_rules,
    digest_of,
    parse_rules,
    rule_tables,
)

logger = logging.getLogger(__name__)

TABLE = "table"
DEFAULT_RELOAD_S = 1.0


def _when(timestamp: float | datetime) -> str:
    moment = (
        timestamp if isinstance(timestamp, datetime) else datetime.fromtimestamp(timestamp, UTC)
    )
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def read_path(path: Path) -> RuleSet:
    """The rules of a file, or of every ``*.toml`` file of a directory."""
    where = f"FRESHET_ANSWER_RULES={str(path)!r}"
    try:
        if path.is_dir():
            files = sorted(p for p in path.glob("*.toml") if p.is_file())
            texts = [(f, f.read_text(encoding="utf-8")) for f in files]
            entries = [e for f, text in texts for e in rule_tables(text, str(f))]
            joined = "\0".join(f"{f.name}\0{text}" for f, text in texts)
            newest = max((f.stat().st_mtime for f in files), default=path.stat().st_mtime)
            return RuleSet(build_rules(entries), str(path), digest_of(joined), _when(newest))
        text = path.read_text(encoding="utf-8")
        return parse_rules(text, str(path), _when(path.stat().st_mtime))
    except OSError as exc:
        raise RulesError(f"{where} cannot be read: {exc.strerror or exc}") from None


def read_table(conn: Any) -> RuleSet:
    """The rules of ``rag.answer_rules`` (``conn``: a psycopg connection)."""
    try:
        rows = conn.execute(
            "SELECT name, kind, params, enabled, description FROM rag.answer_rules ORDER BY name"
        ).fetchall()
        changed = conn.execute("SELECT changed_at FROM rag.answer_rules_changes").fetchone()
    except Exception as exc:  # an undefined table: migrations not run
        if type(exc).__name__ == "UndefinedTable":
            raise RulesError(
                "FRESHET_ANSWER_RULES=table, but rag.answer_rules does not exist: run "
                "`freshet migrate`"
            ) from None
        raise
    entries = []
    canonical = []
    for name, kind, params, enabled, description in rows:
        if not isinstance(params, dict):
            raise RulesError(f"rag.answer_rules ({name}): params must be a JSON object")
        entries.append(
            (
                "rag.answer_rules",
                {**params, "name": name, "kind": kind, "enabled": enabled},
            )
        )
        canonical.append([name, kind, params, enabled, description])
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), default=str)
    version = _when(changed[0]) if changed else ""
    return RuleSet(build_rules(entries), "rag.answer_rules", digest_of(text), version)


class LiveRules:
    """The current rules of one source, looked at again at most every ``reload_s`` seconds.

    ``connect`` opens a database connection (a context manager); it is needed only for the
    table source."""

    def __init__(
        self,
        source: str,
        *,
        reload_s: float = DEFAULT_RELOAD_S,
        connect: Callable[[], Any] | None = None,
        embed: Embed | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``embed``: the embedding model for the rules that need one (banned_topics)."""
        self.source = source
        self._embed = embed
        self.reload_s = reload_s
        self._connect = connect
        self._clock = clock
        self._lock = threading.Lock()
        self.last_error: str | None = None
        self.reloads = 0
        self._current = self._read()  # a broken source at start is an error
        self._checked = clock()

    @property
    def is_table(self) -> bool:
        return self.source.strip() == TABLE

    def _read(self) -> RuleSet:
        if self.source.strip() == "":
            return NO_RULES
        if self.is_table:
            if self._connect is None:
                raise RulesError("FRESHET_ANSWER_RULES=table needs the index database")
            with self._connect() as conn:
                return read_table(conn).bind(self._embed)
        return read_path(Path(self.source)).bind(self._embed)

    def current(self) -> RuleSet:
        """The rule set in force now (reloaded first when the source changed)."""
        if self.reload_s <= 0 or self._clock() - self._checked < self.reload_s:
            return self._current
        with self._lock:
            if self._clock() - self._checked < self.reload_s:
                return self._current
            self._checked = self._clock()
            try:
                found = self._read()
            except RulesError as exc:
                if str(exc) != self.last_error:
                    logger.error("answer rules not reloaded, the last good ones stay: %s", exc)
                self.last_error = str(exc)
                return self._current
            except Exception as exc:  # noqa: BLE001 - the database away: keep the rules
                if str(exc) != self.last_error:
                    logger.warning("answer rules not reloaded (%s); the last ones stay", exc)
                self.last_error = str(exc)
                return self._current
            self.last_error = None
            if found.digest != self._current.digest:
                logger.info(
                    "answer rules reloaded: %d from %s, %s (was %s)",
                    len(found.rules),
                    found.source,
                    found.label,
                    self._current.label,
                )
                self.reloads += 1
                self._current = found
            return self._current
