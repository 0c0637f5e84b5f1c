"""A failure the user can act on reaches them as one line, exit code 2, no traceback.

Every such failure is a ``FreshetError`` (freshet/errors.py has the tree) that keeps the
built-in base it had before, so the code that catches it by that base still does. The command
line tests run `python -m freshet.cli` in a fresh interpreter, as a user would, with no service
reachable (every address on port 1) and an empty FRESHET_HOME.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from freshet.cdc.connect import ConnectClient, ConnectError, ConnectUnavailable
from freshet.cdc.kafka import KafkaUnavailable, require_broker
from freshet.cdc.processes import PortTakenError, StackError
from freshet.cdc.templates import TemplateError, render
from freshet.db import PostgresUnavailable, SecretMissing, connect, read_secret
from freshet.errors import FreshetError, ServiceUnavailable
from freshet.retry import transient_db_error
from freshet.settings import Settings, SettingsError
from freshet.sync.mapping import MappingError, Mappings
from tests.unit.test_cli import isolated_env

BROKEN_TOML = 'tables = [\n[tables."app.articles"]\nkey = \n'


def freshet(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "freshet.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    """The message of a failure reported the way a FreshetError is: exit code 2, one line."""
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("freshet: error: ")
    return lines[0].removeprefix("freshet: error: ")


def test_a_broken_mappings_file_is_one_line(tmp_path: Path) -> None:
    broken = tmp_path / "mappings.toml"
    broken.write_text(BROKEN_TOML)
    with pytest.raises(MappingError) as raised:
        Mappings.load(broken)
    assert isinstance(raised.value, FreshetError) and isinstance(raised.value, ValueError)
    # `freshet verify` loads the mappings before it connects anywhere.
    message = one_line_error(
        freshet(isolated_env(tmp_path, FRESHET_MAPPINGS=str(broken)), "verify")
    )
    assert message.startswith(f"mapping file {broken} is not valid TOML: ")


def test_a_missing_mappings_file_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    env = isolated_env(tmp_path, FRESHET_MAPPINGS=str(missing))
    message = one_line_error(freshet(env, "verify"))
    assert message == f"mapping file {missing} does not exist (FRESHET_MAPPINGS)"


def test_a_missing_secret_says_which_file_and_that_up_creates_it(tmp_path: Path) -> None:
    with pytest.raises(SecretMissing) as raised:
        read_secret(Settings(home=tmp_path), "freshet.password")
    assert isinstance(raised.value, RuntimeError)  # what callers caught before
    secret = tmp_path / "secrets" / "freshet.password"
    # No DATABASE_URL: the embedded PostgreSQL's password file is read first.
    message = one_line_error(freshet(isolated_env(tmp_path), "dlq", "list"))
    assert message.startswith(f"{secret} is missing")
    assert "`freshet up`" in message and "creates that file" in message
    assert f"FRESHET_HOME={tmp_path}" in message


def test_an_unreachable_database_names_it_and_how_to_start_it(tmp_path: Path) -> None:
    env = isolated_env(tmp_path, DATABASE_URL="postgresql://freshet:s3cret@127.0.0.1:1/x")
    message = one_line_error(freshet(env, "dlq", "list"))
    assert message.startswith(
        "PostgreSQL is not reachable at postgresql://freshet:***@127.0.0.1:1/x"
    )
    assert "s3cret" not in message
    assert "Start it with `freshet up`" in message and "DATABASE_URL" in message


def test_an_unreachable_database_is_still_an_operational_error() -> None:
    # The sync worker waits out a database outage by catching psycopg.OperationalError.
    with pytest.raises(PostgresUnavailable) as raised:
        connect("postgresql://127.0.0.1:1/x")
    assert isinstance(raised.value, psycopg.OperationalError)
    assert isinstance(raised.value, ServiceUnavailable)
    assert transient_db_error(raised.value)
    assert raised.value.service == "PostgreSQL"


def test_a_bad_setting_is_one_line(tmp_path: Path) -> None:
    message = one_line_error(freshet(isolated_env(tmp_path, FRESHET_PG_PORT="abc"), "down"))
    assert message == "FRESHET_PG_PORT='abc' is not an integer"
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({"FRESHET_PG_PORT": "abc"})
    assert isinstance(raised.value, FreshetError) and isinstance(raised.value, ValueError)


def test_snapshot_of_an_unreachable_source_is_one_line(tmp_path: Path) -> None:
    env = isolated_env(tmp_path, DATABASE_URL="postgresql://127.0.0.1:1/x")
    message = one_line_error(freshet(env, "snapshot", "app.articles"))
    assert message.startswith("PostgreSQL is not reachable at postgresql://127.0.0.1:1/x")


def test_unreachable_connect_and_kafka_are_service_unavailable() -> None:
    with pytest.raises(ConnectUnavailable) as connect_down:
        ConnectClient("http://127.0.0.1:1", timeout=2).info()
    assert isinstance(connect_down.value, ConnectError)  # status, the supervisor catch it so
    assert isinstance(connect_down.value, StackError) and isinstance(
        connect_down.value, RuntimeError
    )
    assert isinstance(connect_down.value, ServiceUnavailable) and connect_down.value.status is None
    assert str(connect_down.value) == (
        "Kafka Connect is not reachable at http://127.0.0.1:1 (ConnectionError). Start it with "
        "`freshet up`, or set CONNECT_URL to a running worker."
    )
    with pytest.raises(KafkaUnavailable, match=r"^Kafka is not reachable at 127\.0\.0\.1:1 "):
        require_broker("127.0.0.1:1")


def test_the_other_roots_keep_their_old_bases() -> None:
    assert issubclass(StackError, FreshetError) and issubclass(StackError, RuntimeError)
    assert issubclass(PortTakenError, StackError)
    with pytest.raises(TemplateError) as raised:
        render("name=${NAME}", {"OTHER": "x"}, origin="kafka-server.properties")
    assert isinstance(raised.value, KeyError) and isinstance(raised.value, FreshetError)
    # One readable line (a KeyError would print it in quotes).
    assert str(raised.value) == (
        "no value for placeholder ${NAME} in kafka-server.properties "
        "(the placeholders Freshet fills there: OTHER)"
    )
    from freshet.embedder import EmbedderError

    assert issubclass(EmbedderError, FreshetError) and issubclass(EmbedderError, RuntimeError)
