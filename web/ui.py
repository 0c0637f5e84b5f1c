"""The web UI: server-rendered page shells; the data comes from /api/v1 through static JS.

The pages hold no data themselves, so the bearer token (kept in the browser's localStorage)
decides what each user sees, exactly as for API clients.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, render_template

logger = logging.getLogger(__name__)

bp = Blueprint("ui", __name__)

#: Source tables offered by the search filter (the demo's); any other name can be typed.
KNOWN_TABLES = ("app.articles", "app.module_docs")


@bp.get("/")
def ask_page() -> Any:
    return render_template("ask.html", page="ask")


@bp.get("/search")
def search_page() -> Any:
    return render_template("search.html", page="search", tables=KNOWN_TABLES)


@bp.get("/documents/<source>/<path:key>")
def document_page(source: str, key: str) -> Any:
    return render_template("document.html", page="document", source=source, key=key)


@bp.get("/status")
def status_page() -> Any:
    return render_template("status.html", page="status")
