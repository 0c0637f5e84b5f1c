"""One psycopg connection pool per app, pgvector registered on each connection.

Units of work borrow a connection with ``with get_pool().connection()``; a request may also
hold one connection through ``get_db()``, which ``init_app``'s teardown hands back.
"""

from __future__ import annotations

import logging
import threading

import psycopg
from flask import Flask, current_app, g
from pgvector.psycopg import register_vector
from psycopg_pool import ConnectionPool

from freshet.db import redact

logger = logging.getLogger(__name__)

_POOL = "freshet.pool"
_lock = threading.Lock()


def _configure(conn: psycopg.Connection) -> None:
    register_vector(conn)


def get_pool(app: Flask | None = None) -> ConnectionPool:
    """The app's pool, opened on first use (so a unit test never needs a database)."""
    from freshet.web import config_value

    app = app or current_app._get_current_object()  # type: ignore[attr-defined]
    pool = app.extensions.get(_POOL)
    if pool is not None:
        return pool
    with _lock:
        pool = app.extensions.get(_POOL)
        if pool is None:
            url = config_value(app, "DATABASE_URL")
            pool = ConnectionPool(
                url,
                min_size=int(app.config["POOL_MIN_SIZE"]),
                max_size=int(app.config["POOL_MAX_SIZE"]),
                configure=_configure,
                kwargs={"connect_timeout": 5},
                name="freshet-web",
                open=False,
            )
            pool.open()
            logger.info("database pool opened: %s", redact(url))
            app.extensions[_POOL] = pool
    return pool


def get_db() -> psycopg.Connection:
    """A connection held for the rest of this request; handed back on teardown."""
    conn = g.get("freshet_db")
    if conn is None:
        conn = get_pool().getconn()
        g.freshet_db = conn
    return conn


def release_db(_exc: BaseException | None = None) -> None:
    conn = g.pop("freshet_db", None)
    if conn is not None:
        # putconn rolls back an open transaction before the connection is reused.
        get_pool().putconn(conn)


def close_pool(app: Flask) -> None:
    """Close the app's pool (process shutdown, test teardown)."""
    pool = app.extensions.pop(_POOL, None)
    if pool is not None:
        pool.close()


def init_app(app: Flask) -> None:
    app.teardown_appcontext(release_db)
