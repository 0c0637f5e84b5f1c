"""Prepare the captured database for Debezium: heartbeat and signal tables, the publication,
the replication role's grants, and the file that hands the connector its credentials.

The publication names schema `app` and the two control tables only: tables of `rag` are never
published, so the index can never feed back into the change stream.
"""

from __future__ import annotations

import logging
from pathlib import Path

import psycopg
from psycopg import sql

from freshet.cdc.kafka import max_request_bytes
from freshet.db import CDC_ROLE, read_secret, url_parts
from freshet.settings import Settings

logger = logging.getLogger(__name__)

CAPTURED_SCHEMA = "app"
CONTROL_SCHEMA = "freshet_cdc"
PUBLICATION = "freshet_pub"
SLOT = "freshet_slot"


def prepare_source(conn: psycopg.Connection, *, cdc_role: str | None) -> None:
    """Create the control tables and the publication; grant `cdc_role` what Debezium needs.

    `cdc_role` is None when the connector logs in as the URL's own user (external databases).
    """
    with conn.transaction():
        conn.execute(
            sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(CAPTURED_SCHEMA))
        )
        conn.execute(
            sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(CONTROL_SCHEMA))
        )
        # Written by Debezium's heartbeat.action.query: a captured change every heartbeat keeps
        # the replication slot advancing while captured tables are idle.
        conn.execute(
            "CREATE TABLE IF NOT EXISTS freshet_cdc.heartbeat ("
            " id int PRIMARY KEY, beat_at timestamptz NOT NULL)"
        )
        # Debezium's signal table (ad-hoc incremental snapshots), in its documented shape, with
        # room in `data` for the key lists of `freshet verify --repair`.
        conn.execute(
            "CREATE TABLE IF NOT EXISTS freshet_cdc.signal ("
            " id varchar(64) PRIMARY KEY, type varchar(32) NOT NULL, data text)"
        )
        conn.execute("ALTER TABLE freshet_cdc.signal ALTER COLUMN data TYPE text")
        exists = conn.execute(
            "SELECT 1 FROM pg_publication WHERE pubname = %s", (PUBLICATION,)
        ).fetchone()
        if not exists:
            conn.execute(
                sql.SQL(
                    "CREATE PUBLICATION {} FOR TABLES IN SCHEMA {}, "
                    "TABLE freshet_cdc.heartbeat, freshet_cdc.signal"
                ).format(sql.Identifier(PUBLICATION), sql.Identifier(CAPTURED_SCHEMA))
            )
            logger.info("created publication %s", PUBLICATION)
        # TRUNCATE must travel too: it removes the table's documents (DESIGN rule 9).
        conn.execute(
            sql.SQL(
                "ALTER PUBLICATION {} SET (publish = 'insert, update, delete, truncate')"
            ).format(sql.Identifier(PUBLICATION))
        )
        if cdc_role is not None:
            role = sql.Identifier(cdc_role)
            for schema in (CAPTURED_SCHEMA, CONTROL_SCHEMA):
                ident = sql.Identifier(schema)
                conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(ident, role))
                conn.execute(
                    sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA {} TO {}").format(ident, role)
                )
                conn.execute(
                    sql.SQL(
                        "ALTER DEFAULT PRIVILEGES IN SCHEMA {} GRANT SELECT ON TABLES TO {}"
                    ).format(ident, role)
                )
            conn.execute(
                sql.SQL("GRANT INSERT, UPDATE ON freshet_cdc.heartbeat TO {}").format(role)
            )
            # An incremental snapshot writes its open/close window markers into the signal
            # table through the connector's own connection.
            conn.execute(
                sql.SQL("GRANT INSERT, UPDATE, DELETE ON freshet_cdc.signal TO {}").format(role)
            )


def write_connector_secrets(settings: Settings, source_url: str, embedded: bool) -> Path:
    """The properties file the worker's FileConfigProvider reads the login from."""
    parts = url_parts(source_url)
    if embedded:
        user, password = CDC_ROLE, read_secret(settings, f"{CDC_ROLE}.password")
    else:
        user, password = parts["user"], parts["password"]
    path = settings.secrets_dir / "source-connector.properties"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.parent.chmod(0o700)
    path.touch(mode=0o600)
    # Properties-file escaping: backslashes first, then the separators.
    escaped = password.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")
    path.write_text(f"user={user}\npassword={escaped}\n")
    return path


def connector_values(settings: Settings, source_url: str, secrets_file: Path) -> dict[str, str]:
    """Values for the `${NAME}` placeholders of connectors/postgres-source.json."""
    parts = url_parts(source_url)
    return {
        "CONNECTOR_NAME": settings.connector_name,
        "SOURCE_HOST": parts["host"],
        "SOURCE_PORT": parts["port"],
        "SOURCE_DBNAME": parts["dbname"],
        "SECRETS_FILE": str(secrets_file),
        "TOPIC_PREFIX": settings.topic_prefix,
        "HEARTBEAT_MS": str(settings.heartbeat_ms),
        "POLL_INTERVAL_MS": str(settings.cdc_poll_interval_ms),
        "PRODUCER_LINGER_MS": str(settings.cdc_linger_ms),
        "MAX_EVENT_BYTES": str(settings.max_event_bytes),
        "MAX_REQUEST_BYTES": str(max_request_bytes(settings)),
    }


def slot_status(conn: psycopg.Connection) -> dict[str, object] | None:
    """The replication slot's activity and retained WAL, for `freshet status`."""
    row = conn.execute(
        "SELECT active, pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint,"
        " confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
        (SLOT,),
    ).fetchone()
    if row is None:
        return None
    return {"active": row[0], "retained_wal_bytes": row[1], "confirmed_flush_lsn": row[2]}
