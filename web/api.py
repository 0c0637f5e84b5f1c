"""REST API v1: health, search, ask (JSON or server-sent events), answers, documents, status.

Every input is validated here and refused with a 4xx ApiError that says why; the OpenAPI
document in web/openapi.py lists exactly these routes (a unit test keeps the two in step).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator, Mapping
from typing import Any

import psycopg
from flask import Blueprint, Response, current_app, g, jsonify, request, stream_with_context
from psycopg_pool import PoolTimeout

from web import answers as answers_mod
from web import app_settings, config_value, timing
from web.auth import User, current_user, require_admin
from web.errors import ApiError
from web.llm import LLMError
from web.openapi import openapi_document
from web.publisher import QueueUnavailable, get_publisher
from web.retrieval import MODES, Filters
from web.services import get_answerer, get_retriever
from workflow.messages import AnswerRequest

logger = logging.getLogger(__name__)

bp = Blueprint("api", __name__, url_prefix="/api/v1")


@bp.before_request
def _start_timing() -> None:
    g.freshet_started = time.perf_counter()
    timing.begin()


@bp.after_request
def _server_timing(response: Response) -> Response:
    """Where the request's time went (embed, sql, text-sql, app: all of it), as Server-Timing."""
    spans = timing.end()
    started = g.get("freshet_started")
    if started is not None and current_app.config.get("SERVER_TIMING", True):
        spans["app"] = (time.perf_counter() - started) * 1000
        response.headers["Server-Timing"] = timing.header(spans)
    return response


MAX_QUERY_CHARS = 1000
MAX_QUESTION_CHARS = 2000
MAX_K = 100
MAX_ASK_K = 20
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


# --- validation ---------------------------------------------------------------------------
def parse_k(raw: Any, default: int, maximum: int = MAX_K) -> int:
    """k as an int in 1..maximum; anything else is a 400 naming the allowed range."""
    if raw is None or raw == "":
        return default
    if isinstance(raw, bool):
        raise ApiError(f"k must be an integer between 1 and {maximum}", 400, {"field": "k"})
    try:
        k = int(raw)
    except (TypeError, ValueError, OverflowError):  # OverflowError: JSON Infinity
        raise ApiError(
            f"k must be an integer between 1 and {maximum}", 400, {"field": "k"}
        ) from None
    if isinstance(raw, float) and raw != k:
        raise ApiError(f"k must be an integer between 1 and {maximum}", 400, {"field": "k"})
    if not 1 <= k <= maximum:
        raise ApiError(f"k must be between 1 and {maximum}, got {k}", 400, {"field": "k"})
    return k


def parse_bool(raw: Any, name: str, default: bool = False) -> bool:
    if raw is None:
        return default
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.lower() in _TRUE | _FALSE:
        return raw.lower() in _TRUE
    raise ApiError(f"{name} must be true or false", 400, {"field": name})


def storable(value: Any) -> bool:
    """Whether PostgreSQL can take the value as text or jsonb: no NUL character, no lone
    surrogate (not encodable as UTF-8) and no NaN or infinity, at any depth."""
    if isinstance(value, str):
        if "\x00" in value:
            return False
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(storable(k) and storable(v) for k, v in value.items())
    if isinstance(value, list):
        return all(storable(v) for v in value)
    return True


def _require_storable(value: Any, name: str, what: str) -> None:
    if not storable(value):
        raise ApiError(
            f"{name} must be {what} without NUL characters, unpaired surrogates, NaN or infinity",
            400,
            {"field": name},
        )


def parse_text(raw: Any, name: str, limit: int) -> str:
    if not isinstance(raw, str) or not raw.strip():
        raise ApiError(f"{name} must be a non-empty string", 400, {"field": name})
    if len(raw) > limit:
        raise ApiError(f"{name} is longer than {limit} characters", 400, {"field": name})
    _require_storable(raw, name, "text")
    return raw.strip()


def parse_filters(tables: Any, metadata: Any) -> Filters:
    if tables is None:
        tables = []
    if isinstance(tables, str):
        tables = [tables]
    if not isinstance(tables, list) or not all(isinstance(t, str) and t for t in tables):
        raise ApiError("table must be a table name or a list of them", 400, {"field": "table"})
    if isinstance(metadata, str):
        try:
            metadata = json.loads(metadata) if metadata.strip() else None
        except ValueError:
            raise ApiError("metadata must be a JSON object", 400, {"field": "metadata"}) from None
    if metadata is not None and not isinstance(metadata, dict):
        raise ApiError("metadata must be a JSON object", 400, {"field": "metadata"})
    _require_storable(tables, "table", "table names")
    _require_storable(metadata, "metadata", "a JSON object")
    return Filters(tuple(tables), metadata or None)


def json_body() -> dict[str, Any]:
    if not request.is_json:
        raise ApiError("the body must be JSON (Content-Type: application/json)", 415)
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise ApiError("the body must be a JSON object", 400)
    return body


def _unavailable(exc: Exception) -> ApiError:
    logger.warning("backend unavailable: %s", exc)
    return ApiError("the database is unavailable; try again shortly", 503)


# --- routes -------------------------------------------------------------------------------
@bp.get("/health")
def health() -> Any:
    """Liveness: the process serves requests (it does not touch the database)."""
    return jsonify(status="ok")


@bp.get("/me")
def me() -> Any:
    return jsonify(current_user().to_dict())


@bp.get("/search")
def search() -> Any:
    user = current_user()
    args = request.args
    query = parse_text(args.get("q"), "q", MAX_QUERY_CHARS)
    k = parse_k(args.get("k"), int(current_app.config["DEFAULT_K"]))
    mode = args.get("mode") or "hybrid"
    if mode not in MODES:
        raise ApiError(f"mode must be one of {', '.join(MODES)}", 400, {"field": "mode"})
    dedupe = parse_bool(args.get("dedupe"), "dedupe")
    filters = parse_filters(args.getlist("table") or None, args.get("metadata"))
    try:
        results = get_retriever().search(
            query,
            user,
            k=k,
            mode=mode,  # type: ignore[arg-type]
            filters=filters,
            dedupe=dedupe,
        )
    except (psycopg.OperationalError, PoolTimeout) as exc:
        raise _unavailable(exc) from None
    return jsonify(
        query=query, k=k, mode=mode, dedupe=dedupe, results=[p.to_dict() for p in results]
    )


def _wants_stream(body: Mapping[str, Any]) -> bool:
    if "stream" in body:
        return parse_bool(body["stream"], "stream")
    best = request.accept_mimetypes.best_match(["application/json", "text/event-stream"])
    return best == "text/event-stream" and "text/event-stream" in request.accept_mimetypes


@bp.post("/ask")
def ask() -> Any:
    user = current_user()
    body = json_body()
    question = parse_text(body.get("question"), "question", MAX_QUESTION_CHARS)
    k = parse_k(body.get("k"), int(current_app.config["DEFAULT_K"]), MAX_ASK_K)
    filters = parse_filters(body.get("table"), body.get("metadata"))
    if parse_bool(body.get("async"), "async"):
        return _submit(question, user, k, filters)
    stream = _wants_stream(body)
    store = answers_mod.get_store()
    rules = answers_mod.get_rules()
    try:
        if stream:
            pending = answers_mod.ask_stream(
                get_retriever(), get_answerer(), store, rules, question, user, k=k, filters=filters
            )
            return _sse_response(pending)
        stored = answers_mod.ask(
            get_retriever(), get_answerer(), store, rules, question, user, k=k, filters=filters
        )
    except (psycopg.OperationalError, PoolTimeout) as exc:
        raise _unavailable(exc) from None
    except LLMError as exc:
        logger.warning("answer backend failed: %s", exc)
        raise ApiError(f"the answer backend failed: {exc}", 502) from None
    response = jsonify(stored.to_dict())
    response.headers["Location"] = f"{bp.url_prefix}/answers/{stored.id}"
    return response


def _submit(question: str, user: User, k: int, filters: Filters) -> Any:
    """The async path: keep a pending answer, publish the request, answer 202 at once."""
    store = answers_mod.get_store()
    pending = answers_mod.StoredAnswer(answers_mod.new_id(), question, user)
    try:
        store.put(pending)
    except (psycopg.OperationalError, PoolTimeout) as exc:
        raise _unavailable(exc) from None
    try:
        get_publisher().publish(AnswerRequest(pending.id, question, k, user, filters))
    except QueueUnavailable as exc:
        store.put(answers_mod.failed(pending, str(exc)))
        raise ApiError(str(exc), 503, {"id": pending.id}) from None
    response = jsonify(pending.to_dict())
    response.status_code = 202
    response.headers["Location"] = f"{bp.url_prefix}/answers/{pending.id}"
    return response


def sse(event: str, data: Any) -> str:
    """One server-sent event; data is JSON on a single line."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def _sse_response(pending: answers_mod.AnswerStream) -> Response:
    def events() -> Iterator[str]:
        yield sse("start", {"id": pending.id, "passages": len(pending.passages)})
        try:
            for piece in pending.pieces():
                yield sse("token", {"text": piece})
        except Exception as exc:  # noqa: BLE001 - headers are sent; report in-band
            logger.exception("streamed answer %s failed", pending.id)
            message = str(exc) if isinstance(exc, LLMError) else "internal error"
            yield sse("error", {"id": pending.id, "message": f"answering failed: {message}"})
            return
        assert pending.result is not None
        yield sse("done", pending.result.to_dict())

    return Response(
        stream_with_context(events()),
        mimetype="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@bp.get("/answers/<answer_id>")
def get_answer(answer_id: str) -> Any:
    user = current_user()
    try:
        stored = answers_mod.get_store().get(answer_id) if storable(answer_id) else None
    except (psycopg.OperationalError, PoolTimeout) as exc:
        raise _unavailable(exc) from None
    if stored is None or not stored.visible_to(user):
        raise ApiError("no such answer, or it is not yours", 404, {"id": answer_id})
    return jsonify(stored.to_dict())


@bp.get("/documents/<source>/<path:key>")
def get_document(source: str, key: str) -> Any:
    user = current_user()
    if not (storable(source) and storable(key)):
        # No stored row can have such a key: PostgreSQL text cannot hold it.
        raise ApiError(
            "no such document, or you may not see it", 404, {"source": source, "key": key}
        )
    try:
        document = get_retriever().document(source, key, user)
    except (psycopg.OperationalError, PoolTimeout) as exc:
        raise _unavailable(exc) from None
    if document is None:
        raise ApiError(
            "no such document, or you may not see it", 404, {"source": source, "key": key}
        )
    return jsonify(document.to_dict())


@bp.get("/status")
def status() -> Any:
    require_admin()
    from web.db import get_pool
    from web.status import collect

    settings = app_settings(current_app)
    pool, problem = None, None
    try:
        pool = get_pool()
    except Exception as exc:  # noqa: BLE001 - no database: status still reports the rest
        logger.warning("status: no database pool: %s", exc)
        problem = str(exc)
    result = collect(pool, settings, float(current_app.config["CONNECT_TIMEOUT"]), problem)
    result["llm_backend"] = config_value(current_app, "LLM_BACKEND")
    return jsonify(result)


@bp.get("/openapi.json")
def openapi() -> Any:
    return jsonify(openapi_document())
