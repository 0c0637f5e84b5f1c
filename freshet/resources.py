"""Where the files that ship with Freshet are, in a source checkout and in an installed wheel.

The design card's top-level folders are the packages of one import namespace: ``cdc/`` is
``freshet.cdc``, ``sync/`` is ``freshet.sync``, ``migrations/`` is ``freshet.migrations`` and so
on (``pyproject.toml``, ``[tool.setuptools.package-dir]``). Their data files (templates, the
mappings, the answer rules, the connector templates, the Alembic scripts) are found through the
import system, so the same code finds them in a checkout (an editable install) and in a wheel.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def package_dir(package: str) -> Path:
    """The folder of ``package`` (for example ``freshet.sync``), without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {package} is not installed")
    return Path(next(iter(spec.submodule_search_locations))).resolve()


#: The source checkout this code runs from, or None for an installed wheel.
_here = Path(__file__).resolve().parent.parent
CHECKOUT: Path | None = _here if (_here / "pyproject.toml").is_file() else None

#: Where state shared by every stack of this user lives (the jars, compiled models): the
#: checkout's .freshet, or ~/.cache/freshet for an installed wheel.
SHARED_STATE: Path = (
    CHECKOUT / ".freshet" if CHECKOUT is not None else Path.home() / ".cache" / "freshet"
)


def migrations_dir() -> Path:
    return package_dir("freshet.migrations")


def connectors_dir() -> Path:
    return package_dir("freshet.connectors")


def default_mappings() -> Path:
    return package_dir("freshet.sync") / "mappings.toml"


def default_rules() -> Path:
    return package_dir("freshet.rules") / "answers.toml"
