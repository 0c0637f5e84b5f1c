"""The layers import only downwards: web/ and workflow/ are adapters over the answering core
(freshet.answering), which imports neither Flask nor Kafka; workflow/ never imports web/, and
`freshet infer` / `freshet validate` build no Flask app. The web runs a declared workflow's
steps in process for the synchronous /ask (workflow/synchronous.py: the definition, the step
kinds, the in-process runner), never a step worker (a consumer group: workflow/step.py) or the
workflow's commands.

Checked twice: statically over every import statement (lazy ones inside functions included) and
at run time, by importing every module of a package in a fresh interpreter and looking at
sys.modules.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from freshet.resources import package_dir

#: package -> prefixes of modules it must never import.
FORBIDDEN = {
    "freshet.web": ("freshet.workflow.step", "freshet.workflow.commands"),
    "freshet.workflow": ("freshet.web", "flask", "werkzeug"),
    "freshet.answering": ("freshet.web", "freshet.workflow", "flask", "werkzeug", "kafka"),
}


def _imports(path: Path, package: str) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against the package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                names.add(f"{base}.{node.module}" if node.module else base)
            elif node.module:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _forbidden(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_statement_crosses_the_layers(package: str) -> None:
    root = package_dir(package)
    offenders = []
    for path in sorted(root.rglob("*.py")):
        for name in sorted(_imports(path, package)):
            if _forbidden(name, FORBIDDEN[package]):
                offenders.append(f"{path.relative_to(root.parent)}: {name}")
    assert not offenders, "\n".join(offenders)


_PROBE = """
import importlib, json, pkgutil, sys
package = importlib.import_module(sys.argv[1])
for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
    importlib.import_module(info.name)
print(json.dumps(sorted(sys.modules)))
"""


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_importing_every_module_pulls_in_nothing_forbidden(package: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, package],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    loaded = json.loads(done.stdout)
    assert any(name.startswith(package + ".") for name in loaded)  # the walk did import it
    offenders = [name for name in loaded if _forbidden(name, FORBIDDEN[package])]
    assert not offenders, f"importing {package} loaded {offenders}"


def test_the_probe_sees_a_forbidden_import(tmp_path: Path) -> None:
    """The static check does find an import that crosses (so the tests above can fail)."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from freshet.web.services import get_retriever\n")
    assert _forbidden("freshet.web.services.get_retriever", FORBIDDEN["freshet.workflow"])
    assert "freshet.web.services" in _imports(bad, "freshet.workflow")
