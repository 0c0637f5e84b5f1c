"""The web UI: server-rendered page shells; the data comes from /api/v1 through static JS.

The pages hold no data themselves, so the bearer token (kept in the browser's localStorage)
decides what each user sees, exactly as for API clients. What a page is opened with (the
search in the address bar, the hint about where an admin token comes from) is rendered here,
so it is there before any script runs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flask import Blueprint, current_app, render_template, request

from freshet.answering.retrieval import MODES
from freshet.web.auth import is_local

logger = logging.getLogger(__name__)

bp = Blueprint("ui", __name__)

#: Source tables offered by the search filter (the demo's).
KNOWN_TABLES = ("app.articles", "app.module_docs")
#: The search form's modes, in the order offered, with their labels (the API's MODES).
SEARCH_MODES = (("hybrid", "hybrid"), ("dense", "dense (vectors)"), ("text", "text (full-text)"))
DEFAULT_MODE = "hybrid"  # the API's default too
#: The search form's results when the address does not say (the form's own choice: a page of
#: results to scan); at most FRESHET_MAX_SEARCH_K, the API's bound.
DEFAULT_RESULTS = 10
#: The demo token the status page points at (public: see freshet.web.DEMO_API_TOKENS).
DEMO_ADMIN_TOKEN = "demo-admin"


@bp.get("/")
def ask_page() -> Any:
    config = current_app.config
    return render_template(
        "ask.html", page="ask", default_k=config["DEFAULT_K"], max_k=config["MAX_ASK_K"]
    )


@bp.get("/search")
def search_page() -> Any:
    """The search form, filled from ``?q=&mode=&table=&k=&dedupe=``: a search as a link.

    With a query the page runs it on load; a value that does not fit is ignored (the form's
    default), never an error page."""
    return render_template(
        "search.html",
        page="search",
        tables=KNOWN_TABLES,
        modes=SEARCH_MODES,
        form=search_form(),
        max_k=current_app.config["MAX_SEARCH_K"],
    )


def search_form() -> dict[str, Any]:
    """The search form's values from the request's query string."""
    args = request.args
    largest = int(current_app.config["MAX_SEARCH_K"])
    default = min(DEFAULT_RESULTS, largest)
    query = args.get("q", "").strip()
    mode = args.get("mode", "")
    table = args.get("table", "")
    try:
        k = int(args.get("k", ""))
    except ValueError:
        k = default
    return {
        "q": query,
        "mode": mode if mode in MODES else DEFAULT_MODE,
        "table": table if table in KNOWN_TABLES else "",
        "k": k if 1 <= k <= largest else default,
        "dedupe": args.get("dedupe", "").lower() in ("true", "1", "on", "yes"),
        "run": bool(query),
    }


@bp.get("/documents/<source>/<path:key>")
def document_page(source: str, key: str) -> Any:
    return render_template("document.html", page="document", source=source, key=key)


@bp.get("/status")
def status_page() -> Any:
    return render_template("status.html", page="status", hint=admin_token_hint())


def admin_token_hint() -> str:
    """Which hint the status page gives about its admin token.

    ``demo``: the app runs with the built-in demo tokens and this request comes from this host,
    so the public ``demo-admin`` token works here; ``demo-remote``: demo tokens, but this
    request does not come from loopback (or came through a proxy), where they are refused;
    ``configure``: the tokens come from FRESHET_API_TOKENS_FILE (or the config): none is named.
    """
    config = current_app.config
    tokens = config.get("API_TOKENS") or {}
    entry = tokens.get(DEMO_ADMIN_TOKEN) if isinstance(tokens, Mapping) else None
    demo = (
        not config.get("API_TOKENS_FILE")
        and isinstance(entry, Mapping)
        and entry.get("admin") is True
    )
    if not demo:
        return "configure"
    return "demo" if is_local(request.remote_addr, request.headers) else "demo-remote"
