"""Rate limits and concurrency caps on the expensive routes (/search, /ask): a 429 with a
reason and ``Retry-After`` instead of a slower service for everyone.

Who is limited: a caller with a token by the token's user (tokens of one user share a budget),
an anonymous caller by address (an IPv6 address by its /64, which one host can hold whole).

Two mechanisms, checked in this order for every request to a limited route:

- a concurrency cap: at most ``<ROUTE>_CONCURRENCY_PER_CALLER`` requests of one caller in flight
  in this process, and at most ``MAX_CONCURRENT_ASKS`` asks of all callers together, so that
  asks can never hold every server thread; in memory, per process (it protects the process);
- a token bucket per caller and route: ``<ROUTE>_RATE_PER_MINUTE`` sustained, ``<ROUTE>_BURST``
  at once. With ``RATE_LIMIT_BACKEND=postgres`` (default) the buckets live in the unlogged table
  rag.rate_limits and every web process shares them (one upsert per admitted request); each
  process also keeps a copy of the buckets it has seen, so that a caller already over its limit
  is refused without a database round trip (the copy only ever holds more tokens than the
  shared bucket, so it never refuses what the shared bucket would admit). ``memory`` keeps the
  buckets per process (N processes admit up to N times the rate); ``off`` disables both.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flask import Flask, Response, current_app, g, request
from psycopg_pool import ConnectionPool

from freshet.answering.users import ANONYMOUS, User
from freshet.settings import RATE_LIMIT_BACKENDS, SettingsError
from freshet.web.auth import (
    FORWARDING_HEADERS,
    TokenError,
    authenticate,
    is_local,
    public_tokens,
    tokens_of,
)
from freshet.web.errors import ApiError

logger = logging.getLogger(__name__)

ROUTES = ("search", "ask")
BACKENDS = RATE_LIMIT_BACKENDS
_EXTENSION = "freshet.limits"


@dataclass(frozen=True)
class Limit:
    """A route's limits: the bucket (rate per second, burst) and the in-flight caps."""

    route: str
    rate: float
    burst: float
    per_caller: int
    total: int | None = None

    def __post_init__(self) -> None:
        if not (self.rate > 0 and self.burst >= 1 and self.per_caller >= 1):
            raise ValueError(
                f"{self.route} limits must be positive (rate {self.rate}/s, burst "
                f"{self.burst}, {self.per_caller} per caller)"
            )
        if self.total is not None and self.total < 1:
            raise ValueError(f"the {self.route} concurrency cap must be at least 1")

    @property
    def refill_s(self) -> float:
        """Seconds for an empty bucket to fill up."""
        return self.burst / self.rate

    def describe(self) -> str:
        return f"{self.rate * 60:g} per minute, bursts of {self.burst:g}"


@dataclass(frozen=True)
class Verdict:
    admitted: bool
    retry_after: float = 0.0


@dataclass
class Bucket:
    """A token bucket: ``tokens`` at monotonic time ``at``."""

    tokens: float
    at: float

    def level(self, limit: Limit, now: float) -> float:
        return min(limit.burst, self.tokens + (now - self.at) * limit.rate)

    def take(self, limit: Limit, now: float) -> Verdict:
        """Take one token when there is one; the time until one is there otherwise."""
        level = self.level(limit, now)
        if level >= 1:
            self.tokens, self.at = level - 1, now
            return Verdict(True)
        self.tokens, self.at = level, now
        return Verdict(False, (1 - level) / limit.rate)


class LocalBuckets:
    """This process's buckets, keyed by (route, caller); buckets idle long enough to be full
    again are dropped, so a stream of new addresses cannot grow it without bound."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[tuple[str, str], Bucket] = {}
        self._lock = threading.Lock()
        self._pruned = clock()

    def take(self, limit: Limit, caller: str) -> Verdict:
        now = self._clock()
        with self._lock:
            self._prune(limit, now)
            bucket = self._buckets.setdefault((limit.route, caller), Bucket(limit.burst, now))
            return bucket.take(limit, now)

    def peek(self, limit: Limit, caller: str) -> Verdict:
        """Whether a token is there, taking none."""
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get((limit.route, caller))
            level = limit.burst if bucket is None else bucket.level(limit, now)
        return Verdict(True) if level >= 1 else Verdict(False, (1 - level) / limit.rate)

    def record(self, limit: Limit, caller: str, tokens: float) -> None:
        """Set a bucket to what the shared bucket holds now."""
        with self._lock:
            self._buckets[(limit.route, caller)] = Bucket(tokens, self._clock())

    def _prune(self, limit: Limit, now: float) -> None:
        if now - self._pruned < 60 and len(self._buckets) < 10_000:
            return
        self._pruned = now
        # A bucket idle for longer than its refill time is full: the same as no bucket.
        idle = max(limit.refill_s, 1.0)
        self._buckets = {k: b for k, b in self._buckets.items() if now - b.at < idle}

    def __len__(self) -> int:
        return len(self._buckets)


class RateLimiter(ABC):
    @abstractmethod
    def take(self, limit: Limit, caller: str) -> Verdict:
        """Admit one request of ``caller`` to ``limit.route``, or say when to come back."""

    @abstractmethod
    def peek(self, limit: Limit, caller: str) -> Verdict:
        """Whether ``take`` could admit, from this process's buckets alone, taking nothing."""


class MemoryRateLimiter(RateLimiter):
    """Buckets in this process only."""

    def __init__(self, buckets: LocalBuckets | None = None) -> None:
        self.buckets = buckets or LocalBuckets()

    def take(self, limit: Limit, caller: str) -> Verdict:
        return self.buckets.take(limit, caller)

    def peek(self, limit: Limit, caller: str) -> Verdict:
        return self.buckets.peek(limit, caller)


# One statement per admitted request: refill by the time since the last update, take a token
# when there is one. EXCLUDED.updated_at is the statement's clock, read once.
_TAKE = """
INSERT INTO rag.rate_limits AS b (route, caller, tokens, admitted, updated_at)
VALUES (%(route)s, %(caller)s, %(burst)s - 1, true, clock_timestamp())
ON CONFLICT (route, caller) DO UPDATE SET
    tokens = CASE WHEN least(%(burst)s, b.tokens + %(rate)s * extract(epoch FROM
                 EXCLUDED.updated_at - b.updated_at)::float8) >= 1
             THEN least(%(burst)s, b.tokens + %(rate)s * extract(epoch FROM
                 EXCLUDED.updated_at - b.updated_at)::float8) - 1
             ELSE least(%(burst)s, b.tokens + %(rate)s * extract(epoch FROM
                 EXCLUDED.updated_at - b.updated_at)::float8) END,
    admitted = least(%(burst)s, b.tokens + %(rate)s * extract(epoch FROM
                 EXCLUDED.updated_at - b.updated_at)::float8) >= 1,
    updated_at = EXCLUDED.updated_at
RETURNING admitted, tokens
"""
_PRUNE = (
    "DELETE FROM rag.rate_limits WHERE updated_at < clock_timestamp() - make_interval(secs => %s)"
)


class PgRateLimiter(RateLimiter):
    """Buckets in rag.rate_limits, shared by every web process, with a local copy in front.

    When the database cannot be reached the local buckets decide alone (logged), rather than
    refusing everyone or admitting everyone.
    """

    def __init__(
        self,
        pool: Callable[[], ConnectionPool],
        *,
        timeout: float = 2.0,
        buckets: LocalBuckets | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pool = pool
        self.timeout = timeout
        self.local = buckets or LocalBuckets(clock)
        self._clock = clock
        self._pruned = clock()
        self._warned = -math.inf

    def take(self, limit: Limit, caller: str) -> Verdict:
        early = self.local.peek(limit, caller)
        if not early.admitted:
            return early  # the shared bucket holds no more than this copy: refused for sure
        try:
            with self._pool().connection(timeout=self.timeout) as conn:
                row = conn.execute(
                    _TAKE,
                    {
                        "route": limit.route,
                        "caller": caller,
                        "burst": float(limit.burst),
                        "rate": float(limit.rate),
                    },
                ).fetchone()
                self._prune(conn, limit)
        except Exception as exc:  # noqa: BLE001 - no database: this process's buckets decide
            now = self._clock()
            if now - self._warned > 60:
                self._warned = now
                logger.warning("rate limits: rag.rate_limits unavailable, per process now: %s", exc)
            return self.local.take(limit, caller)
        assert row is not None
        admitted, tokens = bool(row[0]), float(row[1])
        self.local.record(limit, caller, tokens)
        return Verdict(True) if admitted else Verdict(False, (1 - tokens) / limit.rate)

    def peek(self, limit: Limit, caller: str) -> Verdict:
        return self.local.peek(limit, caller)

    def _prune(self, conn: Any, limit: Limit) -> None:
        now = self._clock()
        if now - self._pruned < 60:
            return
        self._pruned = now
        conn.execute(_PRUNE, (max(limit.refill_s, 1.0) + 60,))


class Concurrency:
    """Requests in flight in this process, per (route, caller) and per route."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._callers: dict[tuple[str, str], int] = {}
        self._routes: dict[str, int] = {}

    def full(self, limit: Limit, caller: str) -> str | None:
        """Why ``caller`` gets no slot now (``caller`` or ``route``), or None."""
        if self._callers.get((limit.route, caller), 0) >= limit.per_caller:
            return "caller"
        if limit.total is not None and self._routes.get(limit.route, 0) >= limit.total:
            return "route"
        return None

    def acquire(self, limit: Limit, caller: str) -> Slot | str:
        """A slot, or why there is none: ``caller`` or ``route``."""
        key = (limit.route, caller)
        with self._lock:
            full = self.full(limit, caller)
            if full is not None:
                return full
            self._callers[key] = self._callers.get(key, 0) + 1
            self._routes[limit.route] = self._routes.get(limit.route, 0) + 1
        return Slot(self, key)

    def _release(self, key: tuple[str, str]) -> None:
        with self._lock:
            left = self._callers.get(key, 0) - 1
            if left > 0:
                self._callers[key] = left
            else:
                self._callers.pop(key, None)
            self._routes[key[0]] = max(self._routes.get(key[0], 0) - 1, 0)

    def in_flight(self, route: str, caller: str | None = None) -> int:
        with self._lock:
            if caller is None:
                return self._routes.get(route, 0)
            return self._callers.get((route, caller), 0)


@dataclass
class Slot:
    """One request's place in flight; released once, whoever calls first."""

    owner: Concurrency
    key: tuple[str, str]
    _released: bool = field(default=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self.owner._release(self.key)


def caller_of(user: User, address: str | None) -> str:
    """The identity limits count by: the token's user, else the address (IPv6: its /64)."""
    if user.name != ANONYMOUS.name:
        return f"user:{user.name}"
    try:
        ip = ipaddress.ip_address((address or "").split("%")[0])
    except ValueError:
        return f"addr:{address or 'unknown'}"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is None:
        return f"addr:{ipaddress.IPv6Network((ip, 64), strict=False)}"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return f"addr:{ip}"


@dataclass
class Limits:
    """The app's limits: per-route settings, the rate limiter and the in-flight counts."""

    limits: Mapping[str, Limit]
    limiter: RateLimiter | None
    concurrency: Concurrency = field(default_factory=Concurrency)

    def refusal(self, route: str, user: User, address: str | None) -> ApiError | None:
        """The 429 ``admit`` would answer a caller who is over a limit already, found without
        taking anything (and without a database round trip); None when they may try."""
        if self.limiter is None:
            return None
        limit = self.limits[route]
        caller = caller_of(user, address)
        full = self.concurrency.full(limit, caller)
        if full is not None:
            return self._busy(full, route, limit)
        verdict = self.limiter.peek(limit, caller)
        return None if verdict.admitted else self._over(route, verdict, limit)

    def _busy(self, why: str, route: str, limit: Limit) -> ApiError:
        if why == "caller":
            message = (
                f"too many {route} requests at once: {limit.per_caller} of yours are in "
                "progress; wait for one to finish"
            )
        else:
            message = (
                f"the server is answering {limit.total} {route} requests already; try again shortly"
            )
        return too_many(message, "concurrency", route, 1.0, limit)

    def _over(self, route: str, verdict: Verdict, limit: Limit) -> ApiError:
        return too_many(
            f"rate limit: {route} is limited to {limit.describe()} per caller; "
            f"retry in {max(1, math.ceil(verdict.retry_after))} s",
            "rate",
            route,
            verdict.retry_after,
            limit,
        )

    def admit(self, route: str, user: User, address: str | None) -> Slot | None:
        """A slot for this request, or a 429 ApiError that says why and when to retry."""
        if self.limiter is None:
            return None
        limit = self.limits[route]
        caller = caller_of(user, address)
        slot = self.concurrency.acquire(limit, caller)
        if isinstance(slot, str):
            raise self._busy(slot, route, limit)
        verdict = self.limiter.take(limit, caller)
        if not verdict.admitted:
            slot.release()
            raise self._over(route, verdict, limit)
        return slot


def too_many(message: str, reason: str, route: str, retry_after: float, limit: Limit) -> ApiError:
    seconds = max(1, math.ceil(retry_after))
    return ApiError(
        message,
        429,
        {
            "reason": reason,
            "route": route,
            "retry_after": seconds,
            "limit": {
                "per_minute": round(limit.rate * 60, 3),
                "burst": int(limit.burst),
                "concurrent_per_caller": limit.per_caller,
            },
        },
        headers={"Retry-After": str(seconds)},
    )


def limits_from_config(config: Mapping[str, Any], pool: Callable[[], ConnectionPool]) -> Limits:
    """The Limits the app config asks for (settings of freshet.settings, in docs/settings.md)."""
    backend = str(config["RATE_LIMIT_BACKEND"])
    if backend not in BACKENDS:
        raise SettingsError(
            f"FRESHET_RATE_LIMIT_BACKEND={backend!r} is not one of {', '.join(BACKENDS)}"
        )
    total_asks = config.get("MAX_CONCURRENT_ASKS")
    try:
        limits = {
            route: Limit(
                route,
                rate=float(config[f"{route.upper()}_RATE_PER_MINUTE"]) / 60,
                burst=float(config[f"{route.upper()}_BURST"]),
                per_caller=int(config[f"{route.upper()}_CONCURRENCY_PER_CALLER"]),
                total=int(total_asks) if route == "ask" and total_asks else None,
            )
            for route in ROUTES
        }
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"the FRESHET_SEARCH_* / FRESHET_ASK_* limits: {exc}") from None
    limiter: RateLimiter | None
    if backend == "off":
        limiter = None
    elif backend == "memory":
        limiter = MemoryRateLimiter()
    else:
        limiter = PgRateLimiter(pool)
    return Limits(limits, limiter)


def get_limits(app: Flask | None = None) -> Limits:
    app = app or current_app._get_current_object()  # type: ignore[attr-defined]
    limits = app.extensions[_EXTENSION]
    assert isinstance(limits, Limits)
    return limits


def admit(route: str, user: User) -> None:
    """Admit the current request to ``route`` (a 429 ApiError otherwise). Its slot is released
    when the request ends, unless a streamed response takes it over (``detach``)."""
    slot = get_limits().admit(route, user, request.remote_addr)
    if slot is not None:
        g.freshet_slot = slot


def detach() -> Slot | None:
    """Take the request's slot over (a streamed response, which releases it when the stream
    ends or the client goes away), so a streamed answer counts until its last event."""
    slot = g.pop("freshet_slot", None)
    return slot if isinstance(slot, Slot) else None


def _release(_exc: BaseException | None = None) -> None:
    slot = g.pop("freshet_slot", None)
    if slot is not None:
        slot.release()


class Prefilter:
    """WSGI middleware in front of Flask: a request to a limited route from a caller who is
    over a limit already gets its 429 here, before Flask dispatches it or reads its body. An
    abusive client's retries are most of its load, so they must cost the server (and everyone
    else it serves) as little as possible. Anything else, and a caller who may try, goes on to
    Flask, where ``admit`` decides (and bad input, an unknown token... get their own answer)."""

    ROUTES = {("GET", "/api/v1/search"): "search", ("POST", "/api/v1/ask"): "ask"}

    def __init__(self, app: Flask, wsgi_app: Any) -> None:
        self.app = app
        self.wsgi_app = wsgi_app

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        route = self.ROUTES.get((environ.get("REQUEST_METHOD", ""), environ.get("PATH_INFO", "")))
        error = self._refusal(route, environ) if route is not None else None
        if error is None:
            return self.wsgi_app(environ, start_response)
        response = Response(
            json.dumps(error.to_dict(), separators=(",", ":")),
            error.status,
            headers=error.headers,
            mimetype="application/json",
        )
        return response(environ, start_response)

    def _refusal(self, route: str, environ: dict[str, Any]) -> ApiError | None:
        limits = self.app.extensions.get(_EXTENSION)
        if not isinstance(limits, Limits) or limits.limiter is None:
            return None
        forwarded = {
            name: environ.get("HTTP_" + name.upper().replace("-", "_"), "")
            for name in FORWARDING_HEADERS
        }
        tokens = tokens_of(self.app)
        try:
            user = authenticate(
                environ.get("HTTP_AUTHORIZATION"),
                tokens,
                bool(self.app.config["ALLOW_ANONYMOUS"]),
                public=public_tokens(tokens),
                local=is_local(environ.get("REMOTE_ADDR"), forwarded),
            )
        except TokenError:
            return None
        return None if user is None else limits.refusal(route, user, environ.get("REMOTE_ADDR"))


def init_app(app: Flask) -> None:
    if _EXTENSION not in app.extensions:
        from freshet.web.db import get_pool

        app.extensions[_EXTENSION] = limits_from_config(app.config, lambda: get_pool(app))
    app.teardown_request(_release)
    app.wsgi_app = Prefilter(app, app.wsgi_app)  # type: ignore[method-assign]
