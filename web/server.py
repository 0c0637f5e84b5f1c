"""Serve the app: waitress when installed (production-grade WSGI), else Flask's dev server."""

from __future__ import annotations

import gc
import logging

from freshet.settings import Settings
from web import create_app
from web.answers import get_rules
from web.services import get_embed

logger = logging.getLogger(__name__)


def run(settings: Settings, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Build the app for ``settings`` and serve it until interrupted."""
    app = create_app(settings=settings)
    get_rules(app)  # a bad rules file stops the server now, not the first question
    # The query model loads (and on a machine's first start compiles) before the first
    # request, which would otherwise wait for it; a missing model stops the server here.
    get_embed(app)
    # The model and libraries are loaded for good: keep the collector from rescanning their
    # objects (a full collection over them is a latency spike for whichever request meets it).
    gc.collect()
    gc.freeze()
    logger.info("Freshet web on http://%s:%d/", host, port)
    try:
        from waitress import serve
    except ImportError:
        logger.info("waitress is not installed; using Flask's threaded development server")
        app.run(host=host, port=port, threaded=True, use_reloader=False)
        return
    serve(app, host=host, port=port, threads=8)
