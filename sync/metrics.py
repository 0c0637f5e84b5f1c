"""The sync worker's figures: counters, lag, and freshness (source commit -> chunk commit) per
table, kept as histograms; rendered as Prometheus text and as JSON for the heartbeat row."""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

logger = logging.getLogger(__name__)

FRESHNESS_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


@dataclass
class Histogram:
    """Cumulative-bucket histogram plus a window of recent values for exact percentiles."""

    buckets: tuple[float, ...] = FRESHNESS_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(FRESHNESS_BUCKETS) + 1))
    total: float = 0.0
    count: int = 0
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=4096))

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1
        self.recent.append(value)

    def percentile(self, q: float) -> float | None:
        if not self.recent:
            return None
        ordered = sorted(self.recent)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def summary(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "sum": round(self.total, 6),
            "buckets": {
                str(b): c for b, c in zip((*self.buckets, "+Inf"), self.counts, strict=True)
            },
            "p50": self.percentile(0.50),
            "p95": self.percentile(0.95),
            "p99": self.percentile(0.99),
            "max": max(self.recent) if self.recent else None,
        }


TIMERS = ("plan_seconds", "embed_seconds", "write_seconds", "batch_seconds")

COUNTERS = (
    "events",
    "applied",
    "stale",
    "superseded",
    "deleted",
    "tombstones",
    "ignored",
    "dead_letters",
    "embeddings",
    "embed_calls",
    "chunks_written",
    "chunks_deleted",
    "metadata_only",
    "hidden",
    "truncated",
    "mapping_problems",
    "batches",
)


@dataclass
class SyncMetrics:
    worker_id: str
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    timers: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TIMERS, 0.0))
    freshness: dict[str, Histogram] = field(default_factory=dict)
    lag: dict[str, int] = field(default_factory=dict)
    # Per table: records not applied, and seconds since the oldest of them was committed.
    lag_tables: dict[str, dict[str, Any]] = field(default_factory=dict)
    assignment: list[str] = field(default_factory=list)
    events_per_sec: float = 0.0
    last_error: str | None = None
    # The newest `freshet verify` run (refreshed with each heartbeat), for the endpoint.
    verify: dict[str, Any] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _rate_window: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=64))

    def add(self, **increments: int) -> None:
        with self._lock:
            for name, value in increments.items():
                self.counters[name] = self.counters.get(name, 0) + value
            now = time.monotonic()
            self._rate_window.append((now, self.counters["events"]))
            first_t, first_n = self._rate_window[0]
            if now - first_t > 0:
                self.events_per_sec = (self.counters["events"] - first_n) / (now - first_t)

    def time(self, **seconds: float) -> None:
        with self._lock:
            for name, value in seconds.items():
                self.timers[name] = self.timers.get(name, 0.0) + value

    def set_assignment(self, partitions: list[str]) -> None:
        with self._lock:
            self.assignment = sorted(partitions)
            self.lag = {p: v for p, v in self.lag.items() if p in partitions}

    def set_table_lag(self, tables: dict[str, dict[str, Any]]) -> None:
        with self._lock:
            self.lag_tables = dict(tables)

    def observe_freshness(self, table: str, seconds: float) -> None:
        with self._lock:
            self.freshness.setdefault(table, Histogram()).observe(max(0.0, seconds))

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "counters": dict(self.counters),
                "timers": {k: round(v, 3) for k, v in self.timers.items()},
                "freshness": {t: h.summary() for t, h in self.freshness.items()},
                "lag": dict(self.lag),
                "lag_tables": {t: dict(v) for t, v in self.lag_tables.items()},
                "assignment": list(self.assignment),
                "events_per_sec": round(self.events_per_sec, 2),
                "last_error": self.last_error,
            }

    def prometheus(self) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        label = f'worker="{self.worker_id}"'
        lines = []
        with self._lock:
            for name, value in self.counters.items():
                lines.append(f"# TYPE freshet_sync_{name}_total counter")
                lines.append(f"freshet_sync_{name}_total{{{label}}} {value}")
            for name, seconds in self.timers.items():
                lines.append(f"# TYPE freshet_sync_{name}_total counter")
                lines.append(f"freshet_sync_{name}_total{{{label}}} {seconds:.6f}")
            lines.append("# TYPE freshet_sync_events_per_second gauge")
            lines.append(f"freshet_sync_events_per_second{{{label}}} {self.events_per_sec:.3f}")
            lines.append("# TYPE freshet_sync_consumer_lag gauge")
            for partition, lag in sorted(self.lag.items()):
                lines.append(f'freshet_sync_consumer_lag{{{label},partition="{partition}"}} {lag}')
            lines.append("# TYPE freshet_sync_lag_records gauge")
            for table, figures in sorted(self.lag_tables.items()):
                tl = f'{label},table="{table}"'
                lines.append(f"freshet_sync_lag_records{{{tl}}} {figures['records']}")
            lines.append("# TYPE freshet_sync_lag_seconds gauge")
            for table, figures in sorted(self.lag_tables.items()):
                tl = f'{label},table="{table}"'
                lines.append(f"freshet_sync_lag_seconds{{{tl}}} {figures['seconds']}")
            if self.verify is not None:
                lines.append("# TYPE freshet_verify_in_sync gauge")
                lines.append(f"freshet_verify_in_sync {int(bool(self.verify['in_sync']))}")
                lines.append("# TYPE freshet_verify_age_seconds gauge")
                lines.append(f"freshet_verify_age_seconds {self.verify['age_s']}")
                lines.append("# TYPE freshet_verify_rows_checked gauge")
                lines.append(f"freshet_verify_rows_checked {self.verify['rows_checked']}")
                lines.append("# TYPE freshet_verify_runs_total counter")
                lines.append(f"freshet_verify_runs_total {self.verify.get('runs', 0)}")
                lines.append("# TYPE freshet_verify_runs_differing_total counter")
                lines.append(
                    f"freshet_verify_runs_differing_total {self.verify.get('runs_differing', 0)}"
                )
                lines.append("# TYPE freshet_verify_differences gauge")
                for kind, count in sorted(self.verify["counts"].items()):
                    lines.append(f'freshet_verify_differences{{kind="{kind}"}} {count}')
            lines.append("# TYPE freshet_sync_freshness_seconds histogram")
            for table, hist in sorted(self.freshness.items()):
                tl = f'{label},table="{table}"'
                cumulative = 0
                for bound, count in zip((*hist.buckets, "+Inf"), hist.counts, strict=True):
                    cumulative += count
                    lines.append(
                        f'freshet_sync_freshness_seconds_bucket{{{tl},le="{bound}"}} {cumulative}'
                    )
                lines.append(f"freshet_sync_freshness_seconds_sum{{{tl}}} {hist.total:.6f}")
                lines.append(f"freshet_sync_freshness_seconds_count{{{tl}}} {hist.count}")
        return "\n".join(lines) + "\n"


def serve(metrics: SyncMetrics, port: int, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """Serve GET /metrics in a daemon thread; the caller shuts the server down."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404, "only /metrics is served here")
                return
            body = metrics.prometheus().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            logger.debug("metrics: " + format, *args)

    server = ThreadingHTTPServer((host, port), Handler)
    thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
    thread.start()
    return server
