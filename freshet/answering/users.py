"""Who asks: the user an answer or a search is for, with the access groups they belong to."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class User:
    """Who asks: a name, the access groups they belong to, and whether they see everything."""

    name: str
    groups: tuple[str, ...] = field(default_factory=tuple)
    admin: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"user": self.name, "groups": list(self.groups), "admin": self.admin}


ANONYMOUS = User("anonymous")
