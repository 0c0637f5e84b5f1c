"""Real text for the query benchmark: SciFact abstracts plus documentation that Debian ships
(the PostgreSQL manual when postgresql-doc is installed, and man pages), read at run time."""

from __future__ import annotations

import gzip
import html
import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

from bench.report import SCIFACT, scifact_corpus

_ROFF_ESCAPES = re.compile(r"\\f[BIRPC]|\\f\(..|\\\*\(..|\\\*.|\\\(..|\\[&|^%]|\\s[+-]?\d")
_ROFF_MACRO = re.compile(r"^\.\s*([A-Za-z]{1,3})\s*(.*)$")


def scifact_texts(limit: int | None = None, path: Path = SCIFACT / "corpus.jsonl") -> Iterator[str]:
    """SciFact documents as the benchmarks embed them: title, blank line, abstract."""
    for doc in scifact_corpus(limit, path):
        yield f"{doc['title']}\n\n{doc['text']}"


def roff_to_text(source: str) -> str:
    """Crude but faithful enough: keep the words of a man page, drop the formatting."""
    lines: list[str] = []
    started = False  # the preamble before the first section is macro definitions
    for raw in source.splitlines():
        if raw.startswith(("'", '.\\"', ".de", "..")) or raw.strip() in {"\\}", "\\{\\"}:
            continue
        match = _ROFF_MACRO.match(raw)
        if match:
            macro, rest = match.groups()
            if macro in {"SH", "SS"}:
                started = True
                lines.extend(["", rest.strip('"'), ""])
            elif macro in {"PP", "P", "LP", "TP", "IP", "sp", "br"}:
                lines.append("")
            elif rest and macro in {"B", "I", "BR", "IR", "RB", "RI", "BI", "IB"}:
                lines.append(rest.replace('"', ""))
            continue
        if started:
            lines.append(raw)
    text = _ROFF_ESCAPES.sub("", "\n".join(lines)).replace("\\-", "-").replace("\\e", "\\")
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def man_pages(root: Path = Path("/usr/share/man")) -> Iterator[str]:
    for path in sorted(root.glob("man[1-8]/*.gz")):
        try:
            text = roff_to_text(gzip.decompress(path.read_bytes()).decode("utf-8", "replace"))
        except (OSError, EOFError):
            continue
        if len(text) > 400 and not text.startswith(".so "):
            yield text


class _HtmlText(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in {"script", "style", "head"}:
            self.skip += 1
        if tag in {"p", "div", "h1", "h2", "h3", "li", "pre", "tr", "dt", "dd"}:
            self.parts.append("\n\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in {"script", "style", "head"} and self.skip:
            self.skip -= 1

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.parts.append(data)


def postgres_manual() -> Iterator[str]:
    for root in sorted(Path("/usr/share/doc").glob("postgresql-doc-*/html")):
        for path in sorted(root.glob("*.html")):
            parser = _HtmlText()
            parser.feed(path.read_text(encoding="utf-8", errors="replace"))
            text = html.unescape("".join(parser.parts))
            text = re.sub(r"[ \t]+", " ", text)
            text = re.sub(r"\s*\n\s*\n\s*", "\n\n", text).strip()
            if len(text) > 400:
                yield text


def documents() -> Iterator[tuple[str, str]]:
    """(source, text) pairs: SciFact first, then the PostgreSQL manual, then man pages."""
    for text in scifact_texts():
        yield "scifact", text
    for text in postgres_manual():
        yield "postgresql-manual", text
    for text in man_pages():
        yield "man", text
