"""Database addresses and connections, shared by the launcher, the sync worker and the web app."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import psycopg
from pgvector.psycopg import register_vector

from freshet.errors import FreshetError, ServiceUnavailable
from freshet.settings import Settings

EMBEDDED_DB = "freshet"
EMBEDDED_SUPERUSER = "freshet"
CDC_ROLE = "freshet_cdc"


class SecretMissing(FreshetError, RuntimeError):
    """A password file of the embedded PostgreSQL is missing (`freshet up` writes it)."""

    def __init__(self, path: Path, home: Path) -> None:
        super().__init__(
            f"{path} is missing: the embedded PostgreSQL has not been initialised in "
            f"FRESHET_HOME={home}. Run `freshet up` first (it creates that file), or set "
            "DATABASE_URL."
        )
        self.path = path


class PostgresUnavailable(ServiceUnavailable, psycopg.OperationalError):
    """PostgreSQL did not accept a connection (down, wrong address, timed out)."""

    def __init__(self, url: str, detail: str) -> None:
        super().__init__(
            "PostgreSQL",
            redact(url),
            "Start it with `freshet up`, or set DATABASE_URL (and SOURCE_DATABASE_URL) to a "
            "running server.",
            detail,
        )


def secret_path(settings: Settings, name: str) -> Path:
    return settings.secrets_dir / name


def read_secret(settings: Settings, name: str) -> str:
    path = secret_path(settings, name)
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        raise SecretMissing(path, settings.home) from None


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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
    return text.removeprefix("connection failed: ")


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
    """A connection with a short connect timeout; pgvector types registered when asked.

    A server that cannot be reached raises ``PostgresUnavailable`` (a FreshetError, still a
    psycopg.OperationalError for the callers that wait it out)."""
    try:
        conn = psycopg.connect(url, autocommit=autocommit, connect_timeout=5)
    except psycopg.OperationalError as exc:
        if exc.sqlstate is not None:  # the server answered: not an unreachable service
            raise
        raise PostgresUnavailable(url, _first_line(exc)) from exc
    if vector:
        register_vector(conn)
    return conn
