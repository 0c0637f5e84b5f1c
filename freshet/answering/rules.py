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
- ``max_chars``: the text is at most ``limit`` characters;
- ``max_sentences``: the text has at most ``limit`` sentences;
- ``requires_disclaimer``: when the question matches ``question_pattern`` (a regular
  expression, case-insensitive unless ``ignore_case = false``), the answer's text contains
  ``text`` (compared case-insensitively); ``message`` says why;
- ``grounded``: every sentence is supported by a passage it cites: at least ``min_overlap``
  (default 0.6) of its content words occur in that passage; sentences of fewer than
  ``min_words`` (default 3) content words are not judged. The violation quotes the unsupported
  sentences;
- ``banned_topics``: ``topics`` (a list of descriptions) and ``threshold`` (default 0.3): the
  answer, and each of its sentences, has a cosine similarity below ``threshold`` to every
  topic's embedding (the index's embedding model; loaded by a validator only when such a rule
  exists).

A rule may set ``enabled = false``. An unknown kind or a missing parameter is refused when the
file is loaded, naming the file and the rule.

Where the rules live (a file, a directory of files, or the table ``rag.answer_rules``) and how a
change reaches running processes without a restart: ``freshet.answering.live_rules``.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
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
    question: str = ""
    # The text of each cited passage by its [n]; None when the caller does not know them.
    sources: Mapping[int, str] | None = None

    @property
    def markers(self) -> tuple[int, ...]:
        return tuple(markers(self.text)) if self.added is None else self.added

    @classmethod
    def of(
        cls,
        answer: Mapping[str, Any],
        passages: int,
        question: str = "",
        sources: Mapping[int, str] | None = None,
    ) -> Judged:
        """From an answer's JSON form (``Answer.to_dict()``) and the question it answers."""
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
            question,
            sources,
        )


class Rule(ABC):
    kind: ClassVar[str]
    needs_embedder: ClassVar[bool] = False

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


class _Limit(Rule):
    """A rule with a positive ``limit``."""

    def __init__(self, name: str, limit: int) -> None:
        super().__init__(name)
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit


class MaxChars(_Limit):
    kind = "max_chars"

    def check(self, answer: Judged) -> str | None:
        if len(answer.text) <= self.limit:
            return None
        return f"the answer is {len(answer.text)} characters long; the limit is {self.limit}"


# A sentence ends at . ! or ? (and any closing quote or bracket) before white space or the end.
# Citation markers right after the punctuation ("... quickly. [2]") belong to that sentence.
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*(?:\s*\[\d{1,3}\])*(?=\s|$)")


def sentences(text: str) -> list[str]:
    """The sentences of ``text``, stripped, empty ones left out."""
    found, start = [], 0
    for end in _SENTENCE_END.finditer(text):
        found.append(text[start : end.end()].strip())
        start = end.end()
    found.append(text[start:].strip())
    return [s for s in found if s]


class MaxSentences(_Limit):
    kind = "max_sentences"

    def check(self, answer: Judged) -> str | None:
        count = len(sentences(answer.text))
        if count <= self.limit:
            return None
        return f"the answer has {count} sentences; the limit is {self.limit}"


class RequiresDisclaimer(Rule):
    kind = "requires_disclaimer"

    def __init__(
        self,
        name: str,
        question_pattern: str,
        text: str,
        message: str = "",
        ignore_case: bool = True,
    ) -> None:
        super().__init__(name)
        try:
            self.question = re.compile(question_pattern, re.IGNORECASE if ignore_case else 0)
        except re.error as exc:
            raise ValueError(
                f"question_pattern {question_pattern!r} is not a regular expression: {exc}"
            ) from None
        if not text.strip():
            raise ValueError("text must not be empty")
        self.text = text
        self.message = message or f"the answer lacks the required disclaimer {text!r}"

    def check(self, answer: Judged) -> str | None:
        if answer.declined or not self.question.search(answer.question):
            return None
        return None if self.text.casefold() in answer.text.casefold() else self.message


_WORD = re.compile(r"[^\W_]+")
_MARKER = re.compile(r"\[(\d{1,3})\]")
# Words that carry no claim: a sentence is grounded by what it says, not by its glue.
_STOPWORDS = """a about above after again against all also an and any are as at be because
    been before
    being below between both but by can could did do does doing down during each few for from
    further had has have having he her here hers him his how i if in into is it its itself just
    me more most my no nor not now of off on once only or other our ours out over own same she
    should so some such than that the their theirs them then there these they this those
    through to too under until up very was we were what when where which while who whom why
    will with would you your yours"""
STOPWORDS = frozenset(_STOPWORDS.split())  # noqa: SIM905 - a word list, wrapped


def content_words(text: str) -> set[str]:
    """The lower-cased words of ``text`` that can carry a claim (no stopwords, no markers)."""
    return {w for w in _WORD.findall(_MARKER.sub(" ", text).casefold()) if w not in STOPWORDS}


class Grounded(Rule):
    """Every sentence of the answer is supported by a passage it cites: at least
    ``min_overlap`` of the sentence's content words occur in one cited passage (the passages
    the sentence itself cites with [n], else any passage the answer cites). Sentences of fewer
    than ``min_words`` content words ("Yes.") are not judged."""

    kind = "grounded"

    def __init__(self, name: str, min_overlap: float = 0.6, min_words: int = 3) -> None:
        super().__init__(name)
        if not 0 < min_overlap <= 1:
            raise ValueError("min_overlap must be in (0, 1]")
        if min_words < 1:
            raise ValueError("min_words must be at least 1")
        self.min_overlap = min_overlap
        self.min_words = min_words

    def check(self, answer: Judged) -> str | None:
        if answer.declined or answer.passages == 0:
            return None
        if not answer.cited:
            return "the answer cites no passage, so nothing supports it"
        if answer.sources is None:
            return "the cited passages' texts are not available, so grounding cannot be checked"
        cited = {n: content_words(t) for n, t in answer.sources.items() if n in answer.cited}
        unsupported = []
        for sentence in sentences(answer.text):
            words = content_words(sentence)
            if len(words) < self.min_words:
                continue
            own = {int(n) for n in _MARKER.findall(sentence)} & set(cited)
            candidates = [cited[n] for n in sorted(own)] if own else list(cited.values())
            best = max((len(words & c) / len(words) for c in candidates), default=0.0)
            if best < self.min_overlap:
                unsupported.append(sentence if len(sentence) <= 160 else sentence[:157] + "...")
        if not unsupported:
            return None
        return "not supported by a cited passage: " + " | ".join(f'"{s}"' for s in unsupported)


Embed = Callable[[Sequence[str]], Any]  # texts -> unit vectors, one row per text


class BannedTopics(Rule):
    """The answer is not about a listed topic: the cosine similarity of the answer's embedding
    (and of each of its sentences) to each topic's description stays below ``threshold``.
    Needs the embedding model: a process gives it to the rules (``bind``); without it the
    rule fails closed."""

    kind = "banned_topics"
    needs_embedder = True

    def __init__(self, name: str, topics: list[str], threshold: float = 0.3) -> None:
        super().__init__(name)
        if (
            not isinstance(topics, list)
            or not topics
            or not all(isinstance(t, str) and t.strip() for t in topics)
        ):
            raise ValueError("topics must be a non-empty list of descriptions")
        if not -1 < threshold < 1:
            raise ValueError("threshold must be in (-1, 1)")
        self.topics = topics
        self.threshold = threshold
        self.embed: Embed | None = None
        self._topic_vectors: Any = None

    def check(self, answer: Judged) -> str | None:
        if answer.declined or not answer.text.strip():
            return None
        if self.embed is None:
            return "no embedding model was given to this rule, so the topics cannot be checked"
        if self._topic_vectors is None:
            self._topic_vectors = self.embed(self.topics)
        texts = [answer.text, *sentences(answer.text)]
        similarity = self.embed(texts) @ self._topic_vectors.T  # unit vectors: cosines
        row, column = divmod(int(similarity.argmax()), len(self.topics))
        best = float(similarity[row, column])
        if best < self.threshold:
            return None
        return (
            f"the answer is about a banned topic: {self.topics[column]!r}"
            f" (similarity {best:.2f} >= {self.threshold})"
        )


KINDS: dict[str, type[Rule]] = {
    r.kind: r
    for r in (
        MinCitations,
        CitationsResolve,
        ForbiddenPattern,
        MaxChars,
        MaxSentences,
        RequiresDisclaimer,
        Grounded,
        BannedTopics,
    )
}


@dataclass(frozen=True)
class Outcome:
    """One rule's outcome for one answer (what the audit keeps)."""

    rule: str
    kind: str
    passed: bool
    message: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "kind": self.kind,
            "passed": self.passed,
            "message": self.message,
        }


@dataclass(frozen=True)
class RuleSet:
    """The loaded rules, a short digest of their text and their version (when the source last
    changed, ISO 8601), recorded with every verdict."""

    rules: tuple[Rule, ...]
    source: str
    digest: str
    version: str = ""

    @property
    def label(self) -> str:
        """The digest and the version, as verdicts show it."""
        return f"{self.digest}@{self.version}" if self.version else self.digest

    @property
    def can_withhold(self) -> bool:
        """Whether some answer could be rejected: then no text is shown before its verdict.
        Every kind of rule can reject an answer, so any enabled rule counts."""
        return bool(self.rules)

    def bind(self, embed: Embed | None) -> RuleSet:
        """Gives the rules that need it the embedding model (called lazily, on first use)."""
        for rule in self.rules:
            if rule.needs_embedder:
                rule.embed = embed  # type: ignore[attr-defined]
        return self

    def outcomes(self, answer: Judged) -> list[Outcome]:
        found = []
        for rule in self.rules:
            reason = rule.check(answer)
            found.append(Outcome(rule.name, rule.kind, reason is None, reason))
        return found

    def check(self, answer: Judged) -> list[Violation]:
        return [Violation(o.rule, o.message or "") for o in self.outcomes(answer) if not o.passed]


NO_RULES = RuleSet((), "no rules", "none")


def build_rules(entries: Iterable[tuple[str, Mapping[str, Any]]]) -> tuple[Rule, ...]:
    """Rules from ``(where, table)`` pairs: ``where`` names the table's origin in messages
    (a file and position, a row), the table holds ``name``, ``kind``, ``enabled``,
    ``description`` and the kind's parameters. Names are unique across all entries."""
    rules: list[Rule] = []
    names: set[str] = set()
    for origin, entry in entries:
        params = dict(entry)
        name = str(params.pop("name", "") or origin)
        where = f"{origin} ({name})"
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
    return tuple(rules)


def rule_tables(text: str, source: str) -> list[tuple[str, Mapping[str, Any]]]:
    """The ``[[rule]]`` tables of a rules file's TOML ``text``, each with its origin."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RulesError(f"{source}: not valid TOML: {exc}") from None
    entries = data.get("rule", [])
    if not isinstance(entries, list):
        raise RulesError(f"{source}: `rule` must be an array of tables ([[rule]])")
    return [(f"{source}: rule {i}", entry) for i, entry in enumerate(entries, start=1)]


def digest_of(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def parse_rules(text: str, source: str = "<rules>", version: str = "") -> RuleSet:
    """Rules from the TOML ``text`` of a rules file named ``source`` (for messages)."""
    return RuleSet(build_rules(rule_tables(text, source)), source, digest_of(text), version)


def load_rules(path: Path | str | None) -> RuleSet:
    """The rules at ``path`` (a file, or a directory of ``*.toml`` files) once; no path means
    no rules. The table source and reloading: ``freshet.answering.live_rules``."""
    from freshet.answering.live_rules import read_path

    if path is None or str(path) == "":
        return NO_RULES
    return read_path(Path(path))
