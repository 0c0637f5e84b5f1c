"""The web tier's end of the async workflow: publish answer requests to rag.requests."""

from __future__ import annotations

import logging
import socket
import threading
from abc import ABC, abstractmethod

from flask import Flask, current_app
from kafka import KafkaProducer
from kafka.errors import KafkaError

from freshet.answering.messages import REQUESTS, AnswerRequest
from freshet.errors import FreshetError

logger = logging.getLogger(__name__)


class QueueUnavailable(FreshetError, RuntimeError):
    """The request could not be handed to Kafka; the message says where and what to do."""


class RequestPublisher(ABC):
    @abstractmethod
    def publish(self, request: AnswerRequest) -> None:
        """Hand the request to the workflow, acknowledged, or raise QueueUnavailable."""


class KafkaRequestPublisher(RequestPublisher):
    """One producer per web process (created on the first async request), acks=all."""

    def __init__(self, bootstrap_servers: str, timeout_s: float = 10.0) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.timeout_s = timeout_s
        self._producer: KafkaProducer | None = None
        self._lock = threading.Lock()

    def _unavailable(self, exc: Exception) -> QueueUnavailable:
        return QueueUnavailable(
            f"Kafka at {self.bootstrap_servers} did not take the request ({exc!r}); start it "
            "with `freshet up`, or point KAFKA_BOOTSTRAP_SERVERS at your cluster, or ask "
            "with async=false"
        )

    def publish(self, request: AnswerRequest) -> None:
        try:
            with self._lock:
                if self._producer is None:
                    # Fail in seconds, not after the client's 30 s bootstrap (whose half-built
                    # client also leaks a socket), when no broker listens at all.
                    reachable(self.bootstrap_servers, self.timeout_s)
                    self._producer = KafkaProducer(
                        bootstrap_servers=self.bootstrap_servers,
                        acks="all",
                        max_block_ms=int(self.timeout_s * 1000),
                        client_id="freshet-web",
                    )
                producer = self._producer
            future = producer.send(REQUESTS, key=request.id.encode(), value=request.encode())
            future.get(timeout=self.timeout_s)
        except (KafkaError, OSError) as exc:
            raise self._unavailable(exc) from None
        logger.info("request %s for %s published to %s", request.id, request.user.name, REQUESTS)

    def close(self) -> None:
        with self._lock:
            if self._producer is not None:
                self._producer.close(timeout=5)
                self._producer = None


def reachable(bootstrap_servers: str, timeout_s: float) -> None:
    """Return when one of the comma-separated host:port servers accepts a TCP connection;
    otherwise raise the last OSError."""
    error: OSError = OSError(f"no server in {bootstrap_servers!r}")
    for server in bootstrap_servers.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
                return
        except ValueError:
            error = OSError(f"{server!r} is not host:port")
        except OSError as exc:
            error = exc
    raise error


def close_publisher(app: Flask) -> None:
    """Close the app's producer, if it made one (process shutdown, test teardown)."""
    publisher = app.extensions.get("freshet.request_publisher")
    if isinstance(publisher, KafkaRequestPublisher):
        publisher.close()


def get_publisher(app: Flask | None = None) -> RequestPublisher:
    app = app or current_app._get_current_object()  # type: ignore[attr-defined]
    publisher = app.extensions.get("freshet.request_publisher")
    if publisher is None:
        from freshet.web import app_settings

        publisher = KafkaRequestPublisher(app_settings(app).bootstrap_servers)
        app.extensions["freshet.request_publisher"] = publisher
    assert isinstance(publisher, RequestPublisher)
    return publisher
