"""Where a request's time goes, reported to the client in a ``Server-Timing`` header.

Retrieval wraps its expensive steps in ``span("embed")``, ``span("sql")``...; the API starts a
record per request and turns it into ``Server-Timing: embed;dur=7.9, sql;dur=2.1, app;dur=11.2``
(milliseconds), which browsers' developer tools show and benchmarks read. Outside a request
(the workflow workers) nothing is recorded and a span costs one context-variable lookup.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from contextvars import ContextVar

_record: ContextVar[dict[str, float] | None] = ContextVar("freshet_timing", default=None)


def begin() -> None:
    """Start recording this request's spans (in this thread's context)."""
    _record.set({})


def end() -> dict[str, float]:
    """Stop recording; the spans recorded since ``begin``, in milliseconds."""
    record = _record.get() or {}
    _record.set(None)
    return record


@contextmanager
def span(name: str) -> Iterator[None]:
    """Time the block under ``name``; spans of one name add up."""
    record = _record.get()
    if record is None:
        yield
        return
    started = time.perf_counter()
    try:
        yield
    finally:
        elapsed = (time.perf_counter() - started) * 1000
        record[name] = record.get(name, 0.0) + elapsed


def header(spans: dict[str, float]) -> str:
    """The Server-Timing header value for ``spans`` (W3C Server Timing)."""
    return ", ".join(f"{name};dur={ms:.2f}" for name, ms in spans.items())


def parse_header(value: str) -> dict[str, float]:
    """The durations of a Server-Timing header; entries without ``dur`` are skipped."""
    spans: dict[str, float] = {}
    for entry in value.split(","):
        name, *params = (part.strip() for part in entry.split(";"))
        for param in params:
            key, _, number = param.partition("=")
            if name and key.strip() == "dur":
                with suppress(ValueError):
                    spans[name] = float(number)
    return spans
