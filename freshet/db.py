"""Database addresses and connections, shared by the launcher, the sync worker and the web app."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import psycopg
from pgvector.psycopg import register_vector

from freshet.settings import Settings

EMBEDDED_DB = "freshet"
EMBEDDED_SUPERUSER = "freshet"
CDC_ROLE = "freshet_cdc"


def secret_path(settings: Settings, name: str) -> Path:
    return settings.secrets_dir / name


def read_secret(settings: Settings, name: str) -> str:
    path = secret_path(settings, name)
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        raise RuntimeError(
            f"{path} is missing: the embedded PostgreSQL has not been initialised in "
            f"FRESHET_HOME={settings.home}. Run `freshet up` first, or set DATABASE_URL."
        ) from None


def embedded_url(settings: Settings, user: str = EMBEDDED_SUPERUSER) -> str:
    password = read_secret(settings, f"{user}.password")
    return (
        f"postgresql://{quote(user)}:{quote(password, safe='')}@127.0.0.1:"
        f"{settings.pg_port}/{EMBEDDED_DB}"
    )


def database_url(settings: Settings) -> str:
    """The vector store (schema `rag`)."""
    return settings.database_url or embedded_url(settings)


def source_database_url(settings: Settings) -> str:
    """The captured database (schema `app`)."""
    return settings.source_database_url or database_url(settings)


def sqlalchemy_url(url: str) -> str:
    """A libpq URL rewritten for SQLAlchemy's psycopg 3 dialect."""
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    raise ValueError(f"not a PostgreSQL URL: {redact(url)}")


def redact(url: str) -> str:
    """The URL with its password hidden, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return parts._replace(netloc=netloc).geturl()


def url_parts(url: str) -> dict[str, str]:
    """host, port, dbname, user and password of a libpq URL (for the Debezium connector)."""
    parts = urlsplit(url)
    return {
        "host": parts.hostname or "127.0.0.1",
        "port": str(parts.port or 5432),
        "dbname": (parts.path or "/postgres").lstrip("/") or "postgres",
        "user": unquote(parts.username or "postgres"),
        "password": unquote(parts.password or ""),
    }


def connect(url: str, *, autocommit: bool = False, vector: bool = False) -> psycopg.Connection:
    """A connection with a short connect timeout; pgvector types registered when asked."""
    conn = psycopg.connect(url, autocommit=autocommit, connect_timeout=5)
    if vector:
        register_vector(conn)
    return conn
