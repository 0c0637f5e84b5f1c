"""Serve the app: waitress when installed (production-grade WSGI), else Flask's dev server."""

from __future__ import annotations

import gc
import ipaddress
import logging

from flask import Flask

from freshet.settings import Settings, SettingsError
from freshet.web import DEMO_API_TOKENS, close_app, create_app
from freshet.web.answers import get_rules
from freshet.web.services import get_embed

logger = logging.getLogger(__name__)

#: waitress's worker threads; MAX_CONCURRENT_ASKS (default 4) keeps some free for searches.
THREADS = 8


class ExposureError(SettingsError):
    """The app would listen beyond loopback with tokens that anyone can read."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (or ``localhost``); any other name is not."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]").split("%")[0]).is_loopback
    except ValueError:
        return False


def check_exposure(app: Flask, host: str) -> None:
    """Refuse to listen on a non-loopback ``host`` unless the tokens come from a tokens file
    that holds none of the published demo tokens."""
    if is_loopback(host):
        return
    path = app.config.get("API_TOKENS_FILE")
    if not path:
        raise ExposureError(
            f"the web app would listen on {host}, beyond loopback, with the demo tokens "
            f"({', '.join(DEMO_API_TOKENS)}), which are public and valid only on loopback "
            "(127.0.0.1, ::1, localhost): set FRESHET_API_TOKENS_FILE to a JSON file of your "
            'own tokens, {"<token>": {"user": "...", "groups": [...], "admin": false}}, or '
            "listen on 127.0.0.1"
        )
    demo = sorted(set(app.config.get("API_TOKENS") or {}) & set(DEMO_API_TOKENS))
    if demo:
        raise ExposureError(
            f"FRESHET_API_TOKENS_FILE={path!r} holds the public demo token(s) "
            f"{', '.join(demo)}; remove them before listening on {host}, beyond loopback"
        )


def run(settings: Settings, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Build the app for ``settings`` and serve it until interrupted."""
    app = create_app(settings=settings)
    try:
        _serve(app, host, port)
    finally:
        close_app(app)


def _serve(app: Flask, host: str, port: int) -> None:
    check_exposure(app, host)  # before anything slow: the message is the whole point
    get_rules(app)  # a bad rules file stops the server now, not the first question
    # The query model loads (and on a machine's first start compiles) before the first
    # request, which would otherwise wait for it; a missing model stops the server here.
    get_embed(app)
    # The model and libraries are loaded for good: keep the collector from rescanning their
    # objects (a full collection over them is a latency spike for whichever request meets it).
    gc.collect()
    gc.freeze()
    # waitress warns for every request that waits for a thread: under a flood of requests
    # (refused with 429 in microseconds, but many) that logging would itself be the load.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    logger.info("Freshet web on http://%s:%d/", host, port)
    try:
        from waitress import serve
    except ImportError:
        logger.info("waitress is not installed; using Flask's threaded development server")
        app.run(host=host, port=port, threaded=True, use_reloader=False)
        return
    serve(app, host=host, port=port, threads=THREADS)
