"""The `freshet` entry point: each stage adds its own subcommands, cheap commands stay cheap.

`freshet --help`, `freshet down` and `freshet status` run in a fresh interpreter (the way a user
runs them, `python -m freshet.cli`) that then reports which heavy libraries it loaded: none of
torch, transformers or Flask, which only the handlers of `sync`, `embed`, `web`, `ask`... need.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from freshet import cli
from freshet.cdc import commands as cdc_commands
from freshet.errors import FreshetError
from freshet.settings import Settings

HEAVY = ("torch", "transformers", "flask")
#: Every subcommand `freshet` has had, with the stage that owns it now.
COMMANDS = {
    "up": "freshet.cdc.commands",
    "down": "freshet.cdc.commands",
    "migrate": "freshet.cdc.commands",
    "status": "freshet.cdc.commands",
    "demo": "freshet.cdc.commands",
    "supervise": "freshet.cdc.commands",
    "snapshot": "freshet.cdc.commands",
    "verify": "freshet.sync.commands",
    "sync": "freshet.sync.commands",
    "dlq": "freshet.sync.commands",
    "reindex-text": "freshet.sync.commands",
    "group-index": "freshet.sync.commands",
    "publish-chunks": "freshet.sync.commands",
    "reembed": "freshet.sync.commands",
    "drift-watch": "freshet.sync.commands",
    "infer": "freshet.workflow.commands",
    "validate": "freshet.workflow.commands",
    "rules": "freshet.workflow.commands",
    "step": "freshet.workflow.commands",
    "stale-watch": "freshet.workflow.commands",
    "web": "freshet.web.commands",
    "ask": "freshet.web.commands",
    "embed": "freshet.commands",
    "bench": "freshet.commands",
}

# Runs `freshet ARGS...` through freshet.cli.main, then prints (last line) the exit code and
# which heavy modules the process loaded.
_PROBE = """
import json, sys
from freshet.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:  # --help
    code = exc.code
print(json.dumps({"rc": code, "loaded": [m for m in HEAVY if m in sys.modules]}))
""".replace("HEAVY", repr(HEAVY))


def isolated_env(home: Path, **extra: str) -> dict[str, str]:
    """This environment without any Freshet setting, a private FRESHET_HOME, and every
    service address on port 1 (nothing listens there: no stack on this machine is reached)."""
    ours = ("FRESHET_", "DATABASE_URL", "SOURCE_DATABASE_URL", "KAFKA_", "CONNECT_URL", "LLM_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    env.update(
        FRESHET_HOME=str(home),
        FRESHET_PG_PORT="1",
        FRESHET_KAFKA_PORT="1",
        FRESHET_KAFKA_CONTROLLER_PORT="1",
        FRESHET_CONNECT_PORT="1",
        FRESHET_WEB_PORT="1",
        PYTHONWARNINGS="ignore",
    )
    env.update(extra)
    return env


def probe(
    env: dict[str, str], *args: str
) -> tuple[dict[str, Any], subprocess.CompletedProcess[str]]:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines, done.stderr
    return json.loads(lines[-1]), done


@pytest.mark.parametrize("args", [["--help"], ["down"], ["status"]])
def test_cheap_commands_load_no_model_and_no_flask(tmp_path: Path, args: list[str]) -> None:
    result, done = probe(isolated_env(tmp_path), *args)
    assert result["loaded"] == [], f"freshet {' '.join(args)} loaded {result['loaded']}"
    if args == ["--help"]:
        assert result["rc"] == 0
        for name in COMMANDS:
            if name != "supervise":  # hidden: the launcher runs it
                assert re.search(rf"^    {re.escape(name)}(\s|$)", done.stdout, re.M), name
    elif args == ["down"]:
        assert result["rc"] == 0
        assert "freshet: postgres: not running" in done.stdout
    else:  # nothing runs: the connector is UNKNOWN, exit code 3, and every part is reported
        assert result["rc"] == 3
        assert "postgres      DOWN" in done.stdout and "connect       DOWN" in done.stdout


def test_python_dash_m_freshet_cli_runs(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "freshet.cli", "status", "--json"],
        env=isolated_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 3, done.stderr
    report = json.loads(done.stdout)
    assert report["connector"]["state"] == "UNKNOWN"
    assert report["connect"]["state"] == "DOWN" and "freshet up" in report["connect"]["error"]
    assert report["kafka"]["state"] == "DOWN"


def test_every_command_is_registered_by_its_stage() -> None:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(action.choices) == set(COMMANDS)
    for name, module in COMMANDS.items():
        extra = {
            "snapshot": ["app.a"],
            "dlq": ["list"],
            "ask": ["q"],
            "embed": ["t"],
            "bench": ["all"],
            "rules": ["check"],
            "step": ["answer"],
        }
        args = parser.parse_args([name, *extra.get(name, [])])
        assert args.handler.__module__ == module, name


def test_options_are_kept() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["sync", "--tag", "x", "--metrics-port", "0"])
    assert (args.tag, args.metrics_port) == ("x", 0)
    args = parser.parse_args(["verify", "--table", "app.a", "--table", "app.b", "--json"])
    assert (args.table, args.json, args.settle, args.wait) == (
        ["app.a", "app.b"],
        True,
        30.0,
        300.0,
    )
    args = parser.parse_args(["dlq", "replay", "3", "4"])
    assert (args.action, args.ids) == ("replay", [3, 4])
    args = parser.parse_args(["ask", "why?", "-k", "3", "--token", "t", "--json"])
    assert (args.question, args.k, args.token, args.json) == ("why?", 3, "t", True)
    for name in ("supervise", "infer", "validate", "stale-watch", "drift-watch", "web"):
        assert parser.parse_args([name, "--tag", "m"]).tag == "m"


def test_a_bug_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(settings: Settings, args: Any) -> int:
        raise RuntimeError("a bug")

    monkeypatch.setattr(cdc_commands, "cmd_down", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["down"])


def test_ctrl_c_is_one_line_and_exit_code_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(settings: Settings, args: Any) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cdc_commands, "cmd_down", interrupted)
    assert cli.main(["down"]) == 130
    assert capsys.readouterr().err == "freshet: interrupted\n"


def test_the_demo_admin_token_is_named_only_with_the_demo_tokens() -> None:
    assert cdc_commands.demo_admin_token({}) == "demo-admin"
    assert cdc_commands.demo_admin_token({"FRESHET_API_TOKENS_FILE": "/etc/tokens.json"}) is None
    own = json.dumps({"s3cret": {"user": "ops", "admin": True}})
    assert cdc_commands.demo_admin_token({"FRESHET_API_TOKENS": own}) is None


def test_the_demo_admin_token_is_the_web_apps() -> None:
    from freshet.web import DEMO_API_TOKENS
    from freshet.web.ui import DEMO_ADMIN_TOKEN

    assert cdc_commands.DEMO_ADMIN_TOKEN == DEMO_ADMIN_TOKEN
    assert DEMO_API_TOKENS[cdc_commands.DEMO_ADMIN_TOKEN]["admin"] is True


def test_demo_says_which_token_opens_the_status_page(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from freshet.cdc import stack

    monkeypatch.delenv("FRESHET_API_TOKENS_FILE", raising=False)
    monkeypatch.delenv("FRESHET_API_TOKENS", raising=False)
    settings = Settings(home=tmp_path, web_port=18000)
    monkeypatch.setattr(stack, "up", lambda settings, report: {"web": False})
    monkeypatch.setattr(stack, "down", lambda settings, report: {})
    monkeypatch.setattr(cdc_commands, "render_status", lambda report: "(status)")

    def status(settings: Settings) -> dict[str, Any]:
        # Ctrl+C once the demo runs.
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
        return {}

    monkeypatch.setattr(stack, "status", status)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        assert cdc_commands.cmd_demo(settings, cli.build_parser().parse_args(["demo"])) == 0
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])
    out = capsys.readouterr().out
    assert (
        "freshet: the Status page (http://127.0.0.1:18000/status) needs an admin token: paste "
        "the demo token demo-admin into its API token field"
    ) in out.splitlines()
    # Without the web app, or with tokens of one's own, no token is named.
    monkeypatch.setattr(stack, "status", status)
    monkeypatch.setenv("FRESHET_API_TOKENS_FILE", str(tmp_path / "tokens.json"))
    try:
        cdc_commands.cmd_demo(settings, cli.build_parser().parse_args(["demo"]))
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])
    assert "demo-admin" not in capsys.readouterr().out


def test_bench_runs_the_benchmark_modules_then_the_charts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import subprocess

    from freshet import commands, settings

    calls: list[list[str]] = []
    monkeypatch.setattr(subprocess, "call", lambda argv, cwd: calls.append(argv[1:]) or 0)
    args = cli.build_parser().parse_args(["bench", "recovery", "--rate", "20"])
    assert commands.cmd_bench(Settings(), args) == 0
    assert calls == [["-m", "bench.recovery", "--rate", "20"], ["-m", "bench.charts"]]

    calls.clear()
    args = cli.build_parser().parse_args(["bench", "all"])
    assert commands.cmd_bench(Settings(), args) == 0
    assert [c[1] for c in calls] == [*commands.BENCHMARKS.values(), "bench.charts"]

    # A failing benchmark stops the run with its exit code.
    calls.clear()
    monkeypatch.setattr(subprocess, "call", lambda argv, cwd: calls.append(argv[1:]) or 3)
    assert commands.cmd_bench(Settings(), args) == 3 and len(calls) == 1

    # Outside a source checkout (an installed wheel) it says where the benchmarks are.
    monkeypatch.setattr(settings, "PROJECT_ROOT", tmp_path)
    with pytest.raises(FreshetError, match="source checkout"):
        commands.cmd_bench(Settings(), args)


def test_rules_check_says_valid_or_names_the_problem(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[[rule]]\nname = "brief"\nkind = "max_sentences"\nlimit = 5\n')
    bad = tmp_path / "bad.toml"
    bad.write_text('[[rule]]\nname = "brief"\nkind = "max_sentence"\n')
    env = {**os.environ, "FRESHET_HOME": str(tmp_path / "home")}
    for path, rc, expected in ((good, 0, "1 rule(s), valid"), (bad, 1, "kind must be one of")):
        done = subprocess.run(
            [sys.executable, "-m", "freshet.cli", "rules", "check", str(path)],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert done.returncode == rc, done.stdout + done.stderr
        assert expected in done.stdout + done.stderr
    shown = subprocess.run(
        [sys.executable, "-m", "freshet.cli", "rules", "show", str(good)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert shown.returncode == 0 and "brief (max_sentences)" in shown.stdout
