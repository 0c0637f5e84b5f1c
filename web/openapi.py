"""The OpenAPI 3.1 description of /api/v1, as data; a unit test checks it against the routes."""

from __future__ import annotations

import copy
from typing import Any

from freshet.settings import Settings

_ERROR = {"$ref": "#/components/responses/Error"}
_TOO_MANY = {"$ref": "#/components/responses/TooMany"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _query(name: str, schema: dict[str, Any], description: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "in": "query", "schema": schema, "description": description, **extra}


def _path(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
        "description": description,
    }


_TS = {"type": ["string", "null"], "format": "date-time"}
# Text the API strips before use: blank text is refused, so the schema asks for a non-space.
_NON_BLANK = {"type": "string", "minLength": 1, "pattern": r"\S"}
_TABLE = {"type": "string", "minLength": 1, "examples": ["app.articles"]}
# One server-sent event of POST /ask (OpenAPI 3.1: the schema of a stream describes an event).
_SSE_EVENT = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {"enum": ["start", "passage", "token", "done", "error"]},
        "data": {"type": "string", "contentMediaType": "application/json"},
    },
}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["status", "message"],
                "properties": {"status": {"type": "integer"}, "message": {"type": "string"}},
                "additionalProperties": True,
            }
        },
    },
    "User": {
        "type": "object",
        "properties": {
            "user": {"type": "string"},
            "groups": {"type": "array", "items": {"type": "string"}},
            "admin": {"type": "boolean"},
        },
    },
    "Passage": {
        "type": "object",
        "properties": {
            "chunk_id": {"type": "integer"},
            "document_id": {"type": "integer"},
            "source_table": {"type": "string", "examples": ["app.articles"]},
            "doc_key": {"type": "string", "examples": ["12"]},
            "chunk_index": {"type": "integer"},
            "title": {"type": ["string", "null"]},
            "text": {"type": "string"},
            "metadata": {"type": "object"},
            "access_groups": {"type": "array", "items": {"type": "string"}},
            "source_lsn": {"type": "integer", "description": "row version (source LSN)"},
            "source_ts": _TS,
            "score": {
                "type": "number",
                "description": "dense: 1 - distance; text: BM25; hybrid: RRF",
            },
            "distance": {"type": ["number", "null"], "description": "cosine distance"},
            "text_rank": {"type": ["number", "null"], "description": "BM25 score"},
        },
    },
    "Citation": {
        "type": "object",
        "properties": {
            "n": {"type": "integer", "description": "the [n] marker in the answer text"},
            "source_table": {"type": "string"},
            "doc_key": {"type": "string"},
            "chunk_id": {"type": "integer"},
            "source_lsn": {"type": "integer"},
            "source_ts": _TS,
            "title": {"type": ["string", "null"]},
        },
    },
    "Answer": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "question": {"type": "string"},
            "status": {
                "type": "string",
                "enum": ["pending", "approved", "rejected", "failed", "timeout"],
                "description": "pending: queued (async); approved: passed the answer rules; "
                "rejected: broke one (text withheld, see violations); failed: see error; "
                "timeout: an async ask passed its deadline first (error: where it was, which "
                "steps were done)",
            },
            "deadline": {
                **_TS,
                "description": "async asks: when a request not yet answered ends as timeout",
            },
            "stale": {
                "type": "object",
                "description": "present once a row the answer cited has changed or gone since "
                "it was cited: when first, and each change (one event each on "
                "rag.answers.stale)",
                "properties": {
                    "since": {"type": "string", "format": "date-time"},
                    "changes": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "source_table": {"type": "string"},
                                "doc_key": {"type": "string"},
                                "cited_lsn": {"type": "integer"},
                                "changed_lsn": {"type": "integer"},
                                "op": {
                                    "type": "string",
                                    "enum": ["update", "delete", "oversized", "truncate"],
                                },
                                "committed_at": _TS,
                                "detected_at": {"type": "string", "format": "date-time"},
                            },
                        },
                    },
                },
            },
            "steps": {
                "type": "array",
                "description": "async asks: the workflow steps done so far, in the order they "
                "first finished; a fanned-out step once, with its parts done",
                "items": {
                    "type": "object",
                    "properties": {
                        "step": {"type": "string"},
                        "done_at": {"type": "string", "format": "date-time"},
                        "parts_done": {"type": "integer"},
                        "parts": {"type": "integer"},
                    },
                },
            },
            "created_at": {"type": "string", "format": "date-time"},
            "answer": {"type": "string"},
            "violations": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"rule": {"type": "string"}, "message": {"type": "string"}},
                },
            },
            "error": {"type": "string"},
            "withheld": {
                "type": "boolean",
                "description": "true when the answer rules rejected the answer: its text and "
                "citations are not shown, `violations` says which rules it broke",
            },
            "rules_version": {
                "type": "string",
                "description": "the rule set that judged the answer: DIGEST@TIME (the digest of "
                "the rules' text and when their source last changed)",
            },
            "citations": {"type": "array", "items": _ref("Citation")},
            "as_of": {**_TS, "description": "newest source commit time among the citations"},
            "backend": {"type": "string"},
            "declined": {
                "type": "boolean",
                "description": "the backend found nothing to answer from; it claims nothing",
            },
            "markers": {
                "type": "array",
                "items": {"type": "integer"},
                "description": "the [n] markers the model added to the text, in order; a "
                "passage's own bracketed numbers copied into the answer are not among them",
            },
            "secret": {
                "type": "string",
                "description": "only in POST /ask's response to an anonymous caller: the "
                "answer's capability; GET /answers/{id} with it (Freshet-Answer-Secret header "
                "or secret parameter) reads the answer again",
            },
        },
    },
    "AskRequest": {
        "type": "object",
        "required": ["question"],
        "properties": {
            "question": {**_NON_BLANK, "maxLength": 2000},
            # Optional fields: null means the same as leaving the field out.
            # maximum and default: the settings' (openapi_document).
            "k": {"type": ["integer", "null"], "minimum": 1},
            "async": {
                "type": ["boolean", "null"],
                "default": False,
                "description": "answer through the async workflow (rag.requests): 202 with "
                "the pending answer's id; poll GET /answers/{id}",
            },
            "deadline_s": {
                "type": ["number", "null"],
                "exclusiveMinimum": 0,
                "description": "async asks: seconds until a request not yet answered ends as "
                "timeout (default FRESHET_ASK_DEADLINE_S); a synchronous ask ignores it",
            },
            "stream": {
                "type": ["boolean", "null"],
                "description": "server-sent events instead of JSON",
            },
            "table": {
                "oneOf": [
                    _TABLE,
                    {"type": "array", "items": _TABLE},
                    {"type": "null"},
                ]
            },
            "metadata": {"type": ["object", "null"], "description": "jsonb containment filter"},
        },
    },
    "Document": {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "source_table": {"type": "string"},
            "doc_key": {"type": "string"},
            "title": {"type": ["string", "null"]},
            "metadata": {"type": "object"},
            "access_groups": {"type": "array", "items": {"type": "string"}},
            "source_lsn": {"type": "integer"},
            "source_ts": _TS,
            "indexed_at": _TS,
            "chunks": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "chunk_id": {"type": "integer"},
                        "chunk_index": {"type": "integer"},
                        "text": {"type": "string"},
                        "source_lsn": {"type": "integer"},
                        "source_ts": _TS,
                    },
                },
            },
        },
    },
    "Status": {
        "type": "object",
        "description": "postgres, index counts, dead_letters, workers, connect, connector",
        "additionalProperties": True,
    },
}

PATHS: dict[str, Any] = {
    "/api/v1/health": {
        "get": {
            "summary": "Liveness of the web process",
            "security": [],
            "responses": {"200": _json({"type": "object"}, "The process serves requests")},
        }
    },
    "/api/v1/me": {
        "get": {
            "summary": "The user of the bearer token",
            "responses": {"200": _json(_ref("User"), "The caller"), "401": _ERROR},
        }
    },
    "/api/v1/search": {
        "get": {
            "summary": "Chunks the caller may see, best first",
            "parameters": [
                _query("q", {**_NON_BLANK, "maxLength": 1000}, "query text", required=True),
                _query("k", {"type": "integer", "minimum": 1}, "results"),
                _query("mode", {"enum": ["dense", "text", "hybrid"]}, "default hybrid (RRF)"),
                _query("table", _TABLE, "source table, repeatable", explode=True),
                {
                    "name": "metadata",
                    "in": "query",
                    "description": "JSON object, jsonb containment",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                _query("dedupe", {"type": "boolean"}, "one chunk per document"),
            ],
            "responses": {
                "200": _json(
                    {
                        "type": "object",
                        "properties": {"results": {"type": "array", "items": _ref("Passage")}},
                    },
                    "Results",
                ),
                "400": _ERROR,
                "401": _ERROR,
                "429": _TOO_MANY,
                "503": _ERROR,
            },
        }
    },
    "/api/v1/ask": {
        "post": {
            "summary": "Answer a question from the documents the caller may see",
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref("AskRequest")}},
            },
            "responses": {
                "200": {
                    "description": "The answer; with stream=true or Accept: text/event-stream, "
                    "events start, passage* (where each passage comes from), token* (none when "
                    "answer rules are configured: the text waits for its verdict), then done "
                    "(the judged Answer) or error",
                    "content": {
                        "application/json": {"schema": _ref("Answer")},
                        "text/event-stream": {"schema": _SSE_EVENT},
                    },
                },
                "202": _json(_ref("Answer"), "Accepted (async): the pending answer"),
                "400": _ERROR,
                "401": _ERROR,
                "413": _ERROR,
                "415": _ERROR,
                "429": _TOO_MANY,
                "502": _ERROR,
                "503": _ERROR,
            },
        }
    },
    "/api/v1/answers/{answer_id}": {
        "get": {
            "summary": "An answer by request id, pending or judged (asker or admin)",
            "parameters": [
                _path("answer_id", "the id returned by POST /ask"),
                _query("secret", {"type": "string"}, "an anonymous answer's secret"),
                {
                    "name": "Freshet-Answer-Secret",
                    "in": "header",
                    "schema": {"type": "string"},
                    "description": "an anonymous answer's secret (instead of the parameter)",
                },
            ],
            "responses": {
                "200": _json(_ref("Answer"), "The answer"),
                "401": _ERROR,
                "404": _ERROR,
                "503": _ERROR,
            },
        }
    },
    "/api/v1/documents/{source}/{key}": {
        "get": {
            "summary": "A document and its chunks' text, if the caller may see it",
            "parameters": [
                _path("source", "source table, e.g. app.articles"),
                _path("key", "the row's key, e.g. 12"),
            ],
            "responses": {
                "200": _json(_ref("Document"), "The document"),
                "401": _ERROR,
                "404": _ERROR,
            },
        }
    },
    "/api/v1/status": {
        "get": {
            "summary": "Pipeline state (admin only)",
            "responses": {"200": _json(_ref("Status"), "State"), "401": _ERROR, "403": _ERROR},
        }
    },
    "/api/v1/openapi.json": {
        "get": {
            "summary": "This document",
            "security": [],
            "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1")},
        }
    },
}

DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "Freshet API",
        "version": "1",
        "description": "Search and answers over a pgvector index kept fresh by CDC. "
        "Send `Authorization: Bearer <token>`; without one you are an anonymous public "
        "user (when allowed). Text that PostgreSQL cannot hold (NUL characters, unpaired "
        "surrogates), NaN or infinite numbers, and JSON nested deeper than 32 levels are "
        "refused with a 400. /search and /ask are rate limited per caller (429 with "
        "Retry-After).",
    },
    "servers": [{"url": "/"}],
    "security": [{"bearer": []}, {}],
    "paths": PATHS,
    "components": {
        "schemas": SCHEMAS,
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "responses": {
            "Error": _json(_ref("Error"), "An error with its reason"),
            "TooMany": {
                **_json(
                    _ref("Error"),
                    "Over a rate limit or a concurrency cap (reason: rate "
                    "or concurrency); retry after Retry-After seconds",
                ),
                "headers": {
                    "Retry-After": {
                        "description": "seconds to wait before retrying",
                        "schema": {"type": "integer", "minimum": 1},
                    }
                },
            },
        },
    },
}


def openapi_document(settings: Settings | None = None) -> dict[str, Any]:
    """A fresh copy, so a caller cannot change the served document, with the bounds of ``k``
    that ``settings`` set (FRESHET_DEFAULT_K, FRESHET_MAX_SEARCH_K, FRESHET_MAX_ASK_K; None:
    the defaults)."""
    settings = settings or Settings()
    doc = copy.deepcopy(DOCUMENT)
    ask_k = doc["components"]["schemas"]["AskRequest"]["properties"]["k"]
    ask_k.update(maximum=settings.max_ask_k, default=settings.default_k)
    ask_deadline = doc["components"]["schemas"]["AskRequest"]["properties"]["deadline_s"]
    ask_deadline.update(maximum=settings.max_ask_deadline_s, default=settings.ask_deadline_s)
    [search_k] = [
        p for p in doc["paths"]["/api/v1/search"]["get"]["parameters"] if p["name"] == "k"
    ]
    search_k["schema"].update(maximum=settings.max_search_k, default=settings.default_k)
    return doc
