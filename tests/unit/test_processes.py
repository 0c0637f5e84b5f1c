"""The launcher's view of its processes: a starting service is not taken for a dead one."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import pytest

from cdc import processes
from cdc.processes import ManagedProcess


def reads(*contents: bytes) -> Any:
    """An `open` for /proc/<pid>/cmdline that returns ``contents`` in turn (the last repeats)."""
    queue = list(contents)

    def fake_open(path: str, mode: str = "r", **_kwargs: Any) -> io.BytesIO:
        assert path.endswith("/cmdline") and mode == "rb"
        return io.BytesIO(queue.pop(0) if len(queue) > 1 else queue[0])

    return fake_open


def test_a_command_line_read_mid_exec_is_read_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(processes, "open", reads(b"", b"", b"java\0--tag\0mark\0"), raising=False)
    monkeypatch.setattr(processes, "pid_alive", lambda _pid: True)
    assert processes._cmdline(123) == "java --tag mark "


def test_an_empty_command_line_gives_up_after_settling(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(processes, "open", reads(b""), raising=False)
    monkeypatch.setattr(processes, "pid_alive", lambda _pid: True)
    started = time.monotonic()
    assert processes._cmdline(123, settle=0.05) == ""
    assert 0.05 <= time.monotonic() - started < 1.0


def test_a_process_that_is_gone_is_not_waited_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(processes, "open", reads(b""), raising=False)
    monkeypatch.setattr(processes, "pid_alive", lambda _pid: False)
    started = time.monotonic()
    assert processes._cmdline(123) == ""
    assert time.monotonic() - started < 0.5


def test_a_starting_service_keeps_its_pid_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pid_file = tmp_path / "infer.pid"
    pid_file.write_text("123\n")
    process = ManagedProcess("infer", pid_file, tmp_path / "infer.log", "freshet-infer:/home")
    monkeypatch.setattr(
        processes,
        "open",
        reads(b"", b"python\0-m\0freshet.cli\0freshet-infer:/home\0"),
        raising=False,
    )
    monkeypatch.setattr(processes, "pid_alive", lambda _pid: True)
    assert process.pid() == 123
    assert pid_file.exists()
