"""Business rules every answer must pass before anyone sees it (the post-processing step).

The rules are data, not code: a TOML file owned by whoever owns the policy (compliance, a
product team), pointed to by FRESHET_ANSWER_RULES, so they change without a release of Freshet.
The same rules judge the synchronous answers in the web process and the async workflow's
validator group. The file is a list of ``[[rule]]`` tables, each with a ``name``, a ``kind``
and the kind's parameters:

- ``min_citations``: ``min`` (default 1) citations, unless the answer had no passages to cite
  or declined to answer ("nothing relevant was found");
- ``citations_resolve``: every ``[n]`` the model added to the text names a citation the
  answer carries. A marker copied from a passage (a reference "[7]" or an index "argv[0]" in
  a quoted sentence) is the data's, not the model's: it is neither a citation nor a violation
  (``Answer.markers``, see ``freshet.answering.llm.base.added_markers``);
- ``forbidden_pattern``: ``pattern`` (a Python regular expression, case-insensitive unless
  ``ignore_case = false``) must not occur in the text; ``message`` says why;
- ``max_chars``: the text is at most ``limit`` characters.

A rule may set ``enabled = false``. An unknown kind or a missing parameter is refused when the
file is loaded, naming the file and the rule.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from freshet.answering.llm.base import markers
from freshet.errors import FreshetError


class RulesError(FreshetError, ValueError):
    """The rules file cannot be read or holds a rule that cannot be applied."""


@dataclass(frozen=True)
class Violation:
    """A rule an answer broke, and how."""

    rule: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"rule": self.rule, "message": self.message}


@dataclass(frozen=True)
class Judged:
    """What an answer is judged on: its text, the numbers it cites, how many passages it had."""

    text: str
    cited: tuple[int, ...]
    passages: int
    declined: bool = False
    # The [n] markers the model added (None: every marker of the text, for an answer made
    # before answers carried them).
    added: tuple[int, ...] | None = None

    @property
    def markers(self) -> tuple[int, ...]:
        return tuple(markers(self.text)) if self.added is None else self.added

    @classmethod
    def of(cls, answer: Mapping[str, Any], passages: int) -> Judged:
        """From an answer's JSON form (``Answer.to_dict()``)."""
        citations = answer.get("citations") or []
        added = answer.get("markers")
        if added is not None and not isinstance(added, list):
            raise TypeError("markers must be a list of numbers")
        return cls(
            str(answer.get("answer") or ""),
            tuple(int(c["n"]) for c in citations),
            passages,
            bool(answer.get("declined", False)),
            None if added is None else tuple(int(n) for n in added),
        )


class Rule(ABC):
    kind: ClassVar[str]

    def __init__(self, name: str) -> None:
        self.name = name

    @abstractmethod
    def check(self, answer: Judged) -> str | None:
        """Why ``answer`` breaks this rule, or None when it passes."""


class MinCitations(Rule):
    kind = "min_citations"

    def __init__(self, name: str, min: int = 1) -> None:  # noqa: A002 - the TOML key
        super().__init__(name)
        if min < 0:
            raise ValueError("min must not be negative")
        self.min = min

    def check(self, answer: Judged) -> str | None:
        if answer.passages == 0 or answer.declined or len(answer.cited) >= self.min:
            return None
        return f"the answer cites {len(answer.cited)} source(s); at least {self.min} required"


class CitationsResolve(Rule):
    kind = "citations_resolve"

    def check(self, answer: Judged) -> str | None:
        unknown = sorted(set(answer.markers) - set(answer.cited))
        if not unknown:
            return None
        return "the text cites " + ", ".join(f"[{n}]" for n in unknown) + " with no source"


class ForbiddenPattern(Rule):
    kind = "forbidden_pattern"

    def __init__(
        self, name: str, pattern: str, message: str = "", ignore_case: bool = True
    ) -> None:
        super().__init__(name)
        try:
            self.pattern = re.compile(pattern, re.IGNORECASE if ignore_case else 0)
        except re.error as exc:
            raise ValueError(f"pattern {pattern!r} is not a regular expression: {exc}") from None
        self.message = message or f"the text matches the forbidden pattern {pattern!r}"

    def check(self, answer: Judged) -> str | None:
        return self.message if self.pattern.search(answer.text) else None


class MaxChars(Rule):
    kind = "max_chars"

    def __init__(self, name: str, limit: int) -> None:
        super().__init__(name)
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit

    def check(self, answer: Judged) -> str | None:
        if len(answer.text) <= self.limit:
            return None
        return f"the answer is {len(answer.text)} characters long; the limit is {self.limit}"


KINDS: dict[str, type[Rule]] = {
    r.kind: r for r in (MinCitations, CitationsResolve, ForbiddenPattern, MaxChars)
}


@dataclass(frozen=True)
class RuleSet:
    """The loaded rules and a short digest of the file, recorded with every verdict."""

    rules: tuple[Rule, ...]
    source: str
    digest: str

    @property
    def can_withhold(self) -> bool:
        """Whether some answer could be rejected: then no text is shown before its verdict.
        Every kind of rule can reject an answer, so any enabled rule counts."""
        return bool(self.rules)

    def check(self, answer: Judged) -> list[Violation]:
        found = []
        for rule in self.rules:
            reason = rule.check(answer)
            if reason is not None:
                found.append(Violation(rule.name, reason))
        return found


NO_RULES = RuleSet((), "no rules", "none")


def parse_rules(text: str, source: str = "<rules>") -> RuleSet:
    """Rules from the TOML ``text`` of a rules file named ``source`` (for messages)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RulesError(f"{source}: not valid TOML: {exc}") from None
    entries = data.get("rule", [])
    if not isinstance(entries, list):
        raise RulesError(f"{source}: `rule` must be an array of tables ([[rule]])")
    rules: list[Rule] = []
    names: set[str] = set()
    for i, entry in enumerate(entries, start=1):
        params = dict(entry)
        name = str(params.pop("name", "") or f"rule {i}")
        where = f"{source}: rule {i} ({name})"
        if name in names:
            raise RulesError(f"{where}: the name is used twice")
        names.add(name)
        kind = params.pop("kind", None)
        if kind not in KINDS:
            raise RulesError(f"{where}: kind must be one of {', '.join(sorted(KINDS))}")
        if not params.pop("enabled", True):
            continue
        params.pop("description", None)
        try:
            rules.append(KINDS[kind](name, **params))
        except TypeError as exc:
            raise RulesError(f"{where}: wrong parameters for {kind}: {exc}") from None
        except ValueError as exc:
            raise RulesError(f"{where}: {exc}") from None
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    return RuleSet(tuple(rules), source, digest)


def load_rules(path: Path | str | None) -> RuleSet:
    """The rules of the file at ``path``; no path means no rules."""
    if path is None or str(path) == "":
        return NO_RULES
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise RulesError(
            f"FRESHET_ANSWER_RULES={str(path)!r} cannot be read: {exc.strerror or exc}"
        ) from None
    return parse_rules(text, str(path))
