"""The launcher's view of its processes: a starting service is not taken for a dead one."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import pytest

from freshet.cdc import processes
from freshet.cdc.processes import ManagedProcess


class Reads:
    """An `open` for /proc/<pid>/cmdline that returns ``contents`` in turn (the last repeats)
    and counts the reads."""

    def __init__(self, *contents: bytes) -> None:
        self.queue = list(contents)
        self.count = 0

    def __call__(self, path: str, mode: str = "r", **_kwargs: Any) -> io.BytesIO:
        assert path.endswith("/cmdline") and mode == "rb"
        self.count += 1
        return io.BytesIO(self.queue.pop(0) if len(self.queue) > 1 else self.queue[0])


def test_a_command_line_read_mid_exec_is_read_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(processes, "open", Reads(b"", b"", b"java\0--tag\0mark\0"), raising=False)
    monkeypatch.setattr(processes, "pid_alive", lambda _pid: True)
    assert processes._cmdline(123) == "java --tag mark "


def test_an_empty_command_line_gives_up_after_settling(monkeypatch: pytest.MonkeyPatch) -> None:
    empty = Reads(b"")
    monkeypatch.setattr(processes, "open", empty, raising=False)
    monkeypatch.setattr(processes, "pid_alive", lambda _pid: True)
    started = time.monotonic()
    assert processes._cmdline(123, settle=0.05) == ""
    assert time.monotonic() - started >= 0.05 and empty.count > 1


def test_a_process_that_is_gone_is_not_waited_for(monkeypatch: pytest.MonkeyPatch) -> None:
    empty = Reads(b"")
    monkeypatch.setattr(processes, "open", empty, raising=False)
    monkeypatch.setattr(processes, "pid_alive", lambda _pid: False)
    assert processes._cmdline(123) == ""
    assert empty.count == 1


def test_a_starting_service_keeps_its_pid_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pid_file = tmp_path / "infer.pid"
    pid_file.write_text("123\n")
    process = ManagedProcess("infer", pid_file, tmp_path / "infer.log", "freshet-infer:/home")
    monkeypatch.setattr(
        processes,
        "open",
        Reads(b"", b"python\0-m\0freshet.cli\0freshet-infer:/home\0"),
        raising=False,
    )
    monkeypatch.setattr(processes, "pid_alive", lambda _pid: True)
    assert process.pid() == 123
    assert pid_file.exists()
