"""REST API v1: health, search, ask (JSON or server-sent events), answers, documents, status.

Every input is validated here and refused with a 4xx ApiError that says why; JSON (a body,
the ``metadata`` parameter) is read by web.inputs, which bounds its nesting and walks it without
recursion. /search and /ask are rate limited per caller (web.limits: 429 with Retry-After). The
OpenAPI document in web/openapi.py lists exactly these routes (a unit test keeps the two in step).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from flask import Blueprint, Response, current_app, g, jsonify, request, stream_with_context
from psycopg_pool import PoolTimeout

from freshet.answering import answers as answers_mod
from freshet.answering import capability, timing
from freshet.answering.llm import LLMError
from freshet.answering.llm.base import citation
from freshet.answering.messages import AnswerRequest
from freshet.answering.retrieval import MODES, Filters
from freshet.answering.users import ANONYMOUS, User
from freshet.web import app_settings, inputs, limits
from freshet.web.answers import get_rules, get_store
from freshet.web.auth import current_user, require_admin
from freshet.web.errors import ApiError
from freshet.web.inputs import storable
from freshet.web.openapi import openapi_document
from freshet.web.publisher import QueueUnavailable, get_publisher
from freshet.web.services import get_answerer, get_ask_workflow, get_retriever

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
    if started is not None and current_app.config["SERVER_TIMING"]:
        spans["app"] = (time.perf_counter() - started) * 1000
        response.headers["Server-Timing"] = timing.header(spans)
    return response


MAX_QUERY_CHARS = 1000
MAX_QUESTION_CHARS = 2000
MAX_TABLES = 50
MAX_TABLE_CHARS = 200
MAX_METADATA_CHARS = 4096
#: A buffered stream (rules configured) sends an SSE comment at least this often while the
#: answer is generated and judged, so that proxies do not close a silent connection.
KEEPALIVE_S = 15.0
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


# --- validation ---------------------------------------------------------------------------
def parse_k(raw: Any, default: int, maximum: int) -> int:
    """k as an int in 1..maximum; anything else is a 400 naming the allowed range. The default
    and the maximum are settings (FRESHET_DEFAULT_K, FRESHET_MAX_SEARCH_K, FRESHET_MAX_ASK_K)."""
    if raw is None:
        return default
    if isinstance(raw, bool) or raw == "":  # `k=` is no integer: leave k out for the default
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


def parse_deadline(raw: Any, default: float, maximum: float) -> float:
    """An async ask's ``deadline_s``: seconds in (0, maximum]; None: the default setting."""
    if raw is None:
        return default
    message = f"deadline_s must be a number of seconds above 0 and at most {maximum:g}"
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise ApiError(message, 400, {"field": "deadline_s"})
    if not (0 < raw <= maximum):  # NaN fails this too
        raise ApiError(message, 400, {"field": "deadline_s"})
    return float(raw)


def parse_bool(raw: Any, name: str, default: bool = False) -> bool:
    if raw is None:
        return default
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.lower() in _TRUE | _FALSE:
        return raw.lower() in _TRUE
    raise ApiError(f"{name} must be true or false", 400, {"field": name})


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


def _bad(exc: inputs.BadInput) -> ApiError:
    return ApiError(exc.message, 400, {"field": exc.field} if exc.field else None)


def parse_filters(tables: Any, metadata: Any) -> Filters:
    if tables is None:
        tables = []
    if isinstance(tables, str):
        tables = [tables]
    if not isinstance(tables, list) or not all(isinstance(t, str) and t for t in tables):
        raise ApiError("table must be a table name or a list of them", 400, {"field": "table"})
    if len(tables) > MAX_TABLES or any(len(t) > MAX_TABLE_CHARS for t in tables):
        raise ApiError(
            f"table takes at most {MAX_TABLES} names of at most {MAX_TABLE_CHARS} characters",
            400,
            {"field": "table"},
        )
    try:
        if isinstance(metadata, str):
            if len(metadata) > MAX_METADATA_CHARS:
                raise inputs.BadInput(
                    f"metadata is longer than {MAX_METADATA_CHARS} characters", "metadata"
                )
            metadata = inputs.loads(metadata, "metadata") if metadata.strip() else None
        else:
            inputs.check_depth(metadata, "metadata")
    except inputs.BadInput as exc:
        if "not valid JSON" in exc.message:
            raise ApiError("metadata must be a JSON object", 400, {"field": "metadata"}) from None
        raise _bad(exc) from None
    if metadata is not None and not isinstance(metadata, dict):
        raise ApiError("metadata must be a JSON object", 400, {"field": "metadata"})
    _require_storable(tables, "table", "table names")
    _require_storable(metadata, "metadata", "a JSON object")
    if metadata and len(json.dumps(metadata)) > MAX_METADATA_CHARS:
        raise ApiError(
            f"metadata is larger than {MAX_METADATA_CHARS} characters as JSON",
            400,
            {"field": "metadata"},
        )
    return Filters(tuple(tables), metadata or None)


def json_body() -> dict[str, Any]:
    """The request's JSON object, nested at most inputs.MAX_JSON_DEPTH deep."""
    if not request.is_json:
        raise ApiError("the body must be JSON (Content-Type: application/json)", 415)
    try:
        body = inputs.loads(request.get_data(cache=True), None)
    except inputs.BadInput as exc:
        if "not valid JSON" in exc.message:
            raise ApiError("the body must be a JSON object", 400) from None
        raise _bad(exc) from None
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
    config = current_app.config
    k = parse_k(args.get("k"), int(config["DEFAULT_K"]), int(config["MAX_SEARCH_K"]))
    mode = args.get("mode") or "hybrid"
    if mode not in MODES:
        raise ApiError(f"mode must be one of {', '.join(MODES)}", 400, {"field": "mode"})
    dedupe = parse_bool(args.get("dedupe"), "dedupe")
    filters = parse_filters(args.getlist("table") or None, args.get("metadata"))
    limits.admit("search", user)  # after validation: a mistyped request costs no budget
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


class Asker:
    """The capability an anonymous asker gets with an answer: a fresh secret, and their
    session (the cookie they sent, else a new one set on the response)."""

    def __init__(self, user: User) -> None:
        self.secret: str | None = None
        self.session: str | None = None
        self.new_session = False
        if user.name == ANONYMOUS.name:
            self.secret = capability.new_key()
            self.session = capability.valid_key(request.cookies.get(capability.SESSION_COOKIE))
            if self.session is None:
                self.session, self.new_session = capability.new_key(), True

    @property
    def keys(self) -> capability.Keys:
        if self.secret is None or self.session is None:
            return capability.NO_KEYS
        return capability.Keys(capability.digest(self.secret), capability.digest(self.session))

    def body(self, answer: dict[str, Any]) -> dict[str, Any]:
        return {**answer, "secret": self.secret} if self.secret else answer

    def respond(self, response: Response, answer_id: str) -> Response:
        response.headers["Location"] = f"{bp.url_prefix}/answers/{answer_id}"
        if self.new_session and self.session:
            response.set_cookie(
                capability.SESSION_COOKIE,
                self.session,
                path=bp.url_prefix or "/",
                httponly=True,
                samesite="Strict",
                secure=request.is_secure,
            )
        return response


@bp.post("/ask")
def ask() -> Any:
    user = current_user()
    body = json_body()
    question = parse_text(body.get("question"), "question", MAX_QUESTION_CHARS)
    config = current_app.config
    k = parse_k(body.get("k"), int(config["DEFAULT_K"]), int(config["MAX_ASK_K"]))
    filters = parse_filters(body.get("table"), body.get("metadata"))
    run_async = parse_bool(body.get("async"), "async")
    # Checked for every ask; only an async ask has a deadline (a synchronous one ends with its
    # request).
    deadline_s = parse_deadline(
        body.get("deadline_s"),
        float(config["ASK_DEADLINE_S"]),
        float(config["MAX_ASK_DEADLINE_S"]),
    )
    stream = _wants_stream(body)
    limits.admit("ask", user)  # after validation: a mistyped request costs no budget
    asker = Asker(user)
    if run_async:
        return _submit(question, user, k, filters, asker, deadline_s)
    store = get_store()
    rules = get_rules()
    retriever, answerer = get_retriever(), get_answerer()
    try:
        if stream:
            pending = answers_mod.ask_stream(
                retriever,
                answerer,
                store,
                rules,
                question,
                user,
                k=k,
                filters=filters,
                keys=asker.keys,
            )
            response = _sse_response(pending, asker.secret, limits.detach())
            return asker.respond(response, pending.id)
        request_ = AnswerRequest(answers_mod.new_id(), question, k, user, filters)
        # The declared workflow's steps in process (FRESHET_ASK_WORKFLOW), the step
        # workers' own code; a failing answer backend is a `failed` verdict, not kept.
        stored = get_ask_workflow().answer(request_)
        if stored.status != "failed":
            stored = replace(stored, keys=asker.keys)
            store.put(stored)
    except (psycopg.OperationalError, PoolTimeout) as exc:
        raise _unavailable(exc) from None
    except LLMError as exc:
        logger.warning("answer backend failed: %s", exc)
        raise ApiError(f"the answer backend failed: {exc}", 502) from None
    if stored.status == "failed":
        logger.warning("answer %s failed: %s", stored.id, stored.error)
        raise ApiError(stored.error or "the answer backend failed", 502)
    return asker.respond(jsonify(asker.body(stored.to_dict())), stored.id)


def _submit(
    question: str, user: User, k: int, filters: Filters, asker: Asker, deadline_s: float
) -> Any:
    """The async path: keep a pending answer, publish the request, answer 202 at once. The
    request ends as ``timeout`` if it is not answered ``deadline_s`` seconds from now."""
    store = get_store()
    asked = datetime.now(UTC)
    deadline = asked + timedelta(seconds=deadline_s)
    pending = answers_mod.StoredAnswer(
        answers_mod.new_id(), question, user, created_at=asked, keys=asker.keys, deadline=deadline
    )
    try:
        store.put(pending)
    except (psycopg.OperationalError, PoolTimeout) as exc:
        raise _unavailable(exc) from None
    try:
        get_publisher().publish(
            AnswerRequest(pending.id, question, k, user, filters, asked, deadline)
        )
    except QueueUnavailable as exc:
        store.put(answers_mod.failed(pending, str(exc)))
        raise ApiError(str(exc), 503, asker.body({"id": pending.id})) from None
    response = jsonify(asker.body({**pending.to_dict(), "steps": []}))
    response.status_code = 202
    return asker.respond(response, pending.id)


def sse(event: str, data: Any) -> str:
    """One server-sent event; data is JSON on a single line."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def _sse_response(
    pending: answers_mod.AnswerStream, secret: str | None = None, slot: limits.Slot | None = None
) -> Response:
    """start, one passage event per passage (where it comes from, not its text), then token
    events as the text is generated, or none when the stream is buffered (rules that can
    withhold the answer are configured: its text waits for the verdict), then done."""

    def events() -> Iterator[str]:
        try:
            yield from _events(pending, secret)
        finally:
            if slot is not None:
                slot.release()

    response = Response(
        stream_with_context(events()),
        mimetype="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
    if slot is not None:  # the client may go away before the first event
        response.call_on_close(slot.release)
    return response


def _events(pending: answers_mod.AnswerStream, secret: str | None) -> Iterator[str]:
    start: dict[str, Any] = {
        "id": pending.id,
        "passages": len(pending.passages),
        "buffered": pending.buffered,
    }
    if secret:
        start["secret"] = secret
    yield sse("start", start)
    for n, passage in enumerate(pending.passages, start=1):
        yield sse("passage", {**citation(n, passage).to_dict(), "score": passage.score})
    quiet_since = time.monotonic()
    try:
        for piece in pending.pieces():
            if not pending.buffered:
                yield sse("token", {"text": piece})
            elif time.monotonic() - quiet_since >= KEEPALIVE_S:
                quiet_since = time.monotonic()
                yield ": the answer is being generated and judged\n\n"
    except Exception as exc:  # noqa: BLE001 - headers are sent; report in-band
        logger.exception("streamed answer %s failed", pending.id)
        message = str(exc) if isinstance(exc, LLMError) else "internal error"
        yield sse("error", {"id": pending.id, "message": f"answering failed: {message}"})
        return
    assert pending.result is not None
    yield sse("done", pending.result.to_dict())


@bp.get("/answers/<answer_id>")
def get_answer(answer_id: str) -> Any:
    """An answer to its asker's token, an admin, or (anonymous askers) with its secret or the
    asker's session; anyone else learns nothing, not even that it exists."""
    user = current_user()
    try:
        stored = get_store().get(answer_id) if storable(answer_id) else None
    except (psycopg.OperationalError, PoolTimeout) as exc:
        raise _unavailable(exc) from None
    secret = capability.presented_secret(
        request.headers.get(capability.SECRET_HEADER), request.args.get("secret")
    )
    session = capability.valid_key(request.cookies.get(capability.SESSION_COOKIE))
    if stored is None or not stored.visible_to(user, secret, session):
        raise ApiError("no such answer, or it is not yours", 404, {"id": answer_id})
    body = stored.to_dict()
    if stored.deadline is not None:  # an async ask: the workflow steps done so far
        try:
            body["steps"] = answers_mod.progress(get_store().steps(answer_id))
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise _unavailable(exc) from None
    return jsonify(body)


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
    from freshet.web.db import get_pool
    from freshet.web.status import collect

    settings = app_settings(current_app)
    pool, problem = None, None
    try:
        pool = get_pool()
    except Exception as exc:  # noqa: BLE001 - no database: status still reports the rest
        logger.warning("status: no database pool: %s", exc)
        problem = str(exc)
    result = collect(pool, settings, float(current_app.config["CONNECT_TIMEOUT"]), problem)
    result["llm_backend"] = settings.llm_backend
    return jsonify(result)


@bp.get("/openapi.json")
def openapi() -> Any:
    return jsonify(openapi_document(app_settings(current_app)))
