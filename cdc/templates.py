"""Fill the launcher's `${NAME}` placeholders in the files under connectors/.

Only upper-case names are the launcher's; Kafka Connect's own config-provider references such
as `${file:/path:key}` or `${env:NAME}` pass through untouched, to be resolved by the worker.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from freshet.errors import FreshetError
from freshet.resources import connectors_dir

CONNECTORS_DIR = connectors_dir()
_PLACEHOLDER = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")


class TemplateError(FreshetError, KeyError):
    """A placeholder has no value; the message names it and the template."""

    def __str__(self) -> str:  # KeyError's quotes the message
        return str(self.args[0]) if self.args else ""


def render(text: str, values: Mapping[str, str], origin: str = "the template") -> str:
    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            raise TemplateError(
                f"no value for placeholder ${{{name}}} in {origin} (the placeholders "
                f"Freshet fills there: {', '.join(sorted(values)) or 'none'})"
            )
        return values[name]

    return _PLACEHOLDER.sub(substitute, text)


def render_file(name: str, values: Mapping[str, str]) -> str:
    path = CONNECTORS_DIR / name
    return render(path.read_text(), values, origin=str(path))


def write_rendered(name: str, values: Mapping[str, str], target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render_file(name, values))
    return target
