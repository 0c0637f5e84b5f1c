"""Retrying calls to Kafka and PostgreSQL until they succeed or the worker is told to stop.

A worker never gives up on a component that is down: an outage of any length is waited out with
jittered exponential backoff (psycopg_pool's AttemptWithBackoff shape), and the wait ends early
when the worker's stop Event is set. What counts as transient is the caller's choice.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import psycopg

# A generator of our own: jitter drawn from worker threads leaves the global `random`
# state alone (other code, and tests, may depend on it).
_JITTER = random.Random()

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Stopped(Exception):  # noqa: N818 - a signal to unwind, not an error
    """The worker was told to stop while it waited for a component to come back."""


@dataclass
class Backoff:
    """Delays that double from ``initial`` up to ``cap``, each jittered by +-50%."""

    initial: float = 0.2
    cap: float = 15.0
    _next: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        self._next = self.initial

    def delay(self) -> float:
        current = self._next
        self._next = min(self._next * 2, self.cap)
        return current * _JITTER.uniform(0.5, 1.5)

    def reset(self) -> None:
        self._next = self.initial


# SQLSTATE classes that say "not now" rather than "never": connection exceptions, operator
# intervention (shutdown, restart), insufficient resources, transaction rollback (deadlock,
# serialization), lock not available, system (I/O) errors.
_TRANSIENT_SQLSTATE = ("08", "57", "53", "40", "55P03", "58")


def transient_db_error(exc: BaseException) -> bool:
    """Whether a PostgreSQL error is the server or the connection being away (retry it), as
    opposed to something about the data (a dead letter). psycopg files some permanent errors,
    such as an index row over its size limit (54000), under OperationalError too."""
    if not isinstance(exc, psycopg.Error):
        return False
    sqlstate = exc.sqlstate
    if sqlstate is None:
        return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)
    return sqlstate.startswith(_TRANSIENT_SQLSTATE)


def transient_kafka_errors() -> tuple[type[BaseException], ...]:
    """Kafka client errors worth waiting out: every KafkaError except a few that no wait fixes."""
    from kafka.errors import KafkaError

    return (KafkaError, OSError)


def retry(
    call: Callable[[], T],
    *,
    what: str,
    stop: threading.Event,
    transient: tuple[type[BaseException], ...],
    backoff: Backoff | None = None,
    on_error: Callable[[BaseException], None] | None = None,
    fatal: Callable[[BaseException], bool] | None = None,
) -> T:
    """``call()`` until it returns; a transient error waits and tries again (forever, or until
    ``stop`` is set, which raises Stopped). An error for which ``fatal`` is true is raised."""
    backoff = backoff or Backoff()
    failures = 0
    first_failure = 0.0
    while True:
        try:
            result = call()
        except transient as exc:
            if fatal is not None and fatal(exc):
                raise
            if failures == 0:
                first_failure = time.monotonic()
            failures += 1
            if on_error is not None:
                on_error(exc)
            wait = backoff.delay()
            log = logger.warning if failures <= 3 or failures % 20 == 0 else logger.debug
            log(
                "%s failed (%s: %s); attempt %d, down %.0fs, retrying in %.1fs",
                what,
                type(exc).__name__,
                str(exc).strip().splitlines()[0] if str(exc).strip() else "",
                failures,
                time.monotonic() - first_failure,
                wait,
            )
            if stop.wait(wait):
                raise Stopped(what) from exc
            continue
        if failures:
            logger.warning(
                "%s succeeded after %d failed attempts (%.0fs)",
                what,
                failures,
                time.monotonic() - first_failure,
            )
        return result
