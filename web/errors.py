"""One JSON error type for the API and the handlers that render it.

Every error under /api/ is JSON ``{"error": {"status", "message", ...payload}}``; bad input is a
4xx with a reason, and an unexpected failure is a logged 500 that leaks no internals.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed

logger = logging.getLogger(__name__)

API_PREFIX = "/api/"


class ApiError(Exception):
    """An API failure with an HTTP status and optional extra fields for the JSON body."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        payload: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.payload = dict(payload or {})
        self.headers = dict(headers or {})

    def to_dict(self) -> dict[str, Any]:
        return {"error": {**self.payload, "status": self.status, "message": self.message}}


def render(error: ApiError) -> tuple[Response, int]:
    """The one renderer for API errors."""
    response = jsonify(error.to_dict())
    response.headers.update(error.headers)
    if error.status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="freshet"'
    return response, error.status


def _http_error(exc: HTTPException) -> Any:
    """JSON for routing/protocol errors (404, 405, 413, 400...) under /api/, HTML elsewhere."""
    if not request.path.startswith(API_PREFIX):
        return exc
    status = exc.code or 500
    payload: dict[str, Any] = {}
    if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
        payload["allowed"] = sorted(exc.valid_methods)
    response, code = render(ApiError(exc.description or exc.name, status, payload))
    if "allowed" in payload:
        response.headers["Allow"] = ", ".join(payload["allowed"])
    return response, code


def _unexpected(exc: Exception) -> Any:
    """A logged, opaque 500 for API routes; other routes keep Flask's default page."""
    if isinstance(exc, HTTPException):
        return _http_error(exc)
    logger.exception("unhandled error on %s %s", request.method, request.path)
    if not request.path.startswith(API_PREFIX):
        return "Internal Server Error", 500
    return render(ApiError("internal error; see the server log", 500))


def init_app(app: Flask) -> None:
    app.register_error_handler(ApiError, render)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected)
