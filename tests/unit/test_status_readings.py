"""`freshet status` and the web Status page read Connect through one reader
(freshet.cdc.readings) and keep the shapes they had: the command line's with traces and
Connect's version, the page's without."""

from __future__ import annotations

from typing import Any

import pytest

from freshet.cdc import readings
from freshet.cdc.connect import ConnectError
from freshet.settings import Settings

RAW = {
    "name": "freshet-postgres-source",
    "connector": {"state": "RUNNING", "worker_id": "w:8083"},
    "tasks": [
        {"id": 0, "state": "FAILED", "worker_id": "w:8083", "trace": "boom\nat x"},
        {"id": 1, "state": "RUNNING", "worker_id": "w:8083"},
    ],
}


class FakeClient:
    calls: list[str] = []
    raw: dict[str, Any] | None = RAW
    error: str | None = None

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        self.url = url

    def info(self) -> dict[str, Any]:
        FakeClient.calls.append("info")
        return {"version": "4.4.0"}

    def status(self, name: str) -> dict[str, Any] | None:
        FakeClient.calls.append("status")
        if FakeClient.error:
            raise ConnectError(FakeClient.error, 500)
        return FakeClient.raw


@pytest.fixture(autouse=True)
def fake_connect(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(readings, "ConnectClient", FakeClient)
    FakeClient.calls, FakeClient.raw, FakeClient.error = [], RAW, None


def test_the_reader_asks_for_the_version_only_when_asked() -> None:
    reading = readings.read_connect("http://c", "n", 5)
    assert FakeClient.calls == ["status"] and reading.version is None and reading.reachable
    reading = readings.read_connect("http://c", "n", 5, version=True)
    assert FakeClient.calls == ["status", "info", "status"] and reading.version == "4.4.0"


def test_the_command_lines_connector_has_its_traces() -> None:
    connector = readings.read_connect("http://c", "n", 5).connector()
    assert connector == {
        "name": "n",
        "state": "FAILED",
        "connector_state": "RUNNING",
        "connector_trace": None,
        "tasks": [
            {"id": 0, "state": "FAILED", "worker": "w:8083", "trace": "boom\nat x"},
            {"id": 1, "state": "RUNNING", "worker": "w:8083", "trace": None},
        ],
    }
    FakeClient.raw = None
    assert readings.read_connect("http://c", "n", 5).connector() == {
        "name": "n",
        "state": "MISSING",
    }


def test_a_refused_request_keeps_the_version_read_before_it() -> None:
    FakeClient.error = "GET /connectors/n/status -> 500: oops"
    reading = readings.read_connect("http://c", "n", 5, version=True)
    assert not reading.reachable and reading.error == FakeClient.error
    assert reading.version == "4.4.0"


def test_the_status_page_keeps_its_shape() -> None:
    from freshet.web.status import connector_status

    settings = Settings(connect_url="http://c", connector_name="n")
    assert connector_status(settings, 5) == {
        "connect": {"url": "http://c", "state": "RUNNING"},
        "connector": {
            "name": "n",
            "state": "FAILED",
            "connector_state": "RUNNING",
            "tasks": [
                {"id": 0, "state": "FAILED", "worker": "w:8083"},
                {"id": 1, "state": "RUNNING", "worker": "w:8083"},
            ],
        },
    }
    assert FakeClient.calls == ["status"]  # the page shows no version: not asked
    FakeClient.raw = None
    assert connector_status(settings, 5)["connector"] == {
        "name": "n",
        "state": "MISSING",
        "tasks": [],
    }
    FakeClient.error = "Kafka Connect is not reachable at http://c"
    assert connector_status(settings, 5) == {
        "connect": {"url": "http://c", "state": "UNKNOWN", "error": FakeClient.error},
        "connector": {"name": "n", "state": "UNKNOWN", "tasks": []},
    }
