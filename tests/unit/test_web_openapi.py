"""The OpenAPI document lists exactly the Flask routes under /api/v1, with their methods."""

from __future__ import annotations

import re
from pathlib import Path

from flask import Flask

from freshet.settings import Settings
from freshet.web import create_app
from freshet.web.openapi import openapi_document

IGNORED_METHODS = {"HEAD", "OPTIONS"}


def app_for(tmp_path: Path) -> Flask:
    return create_app(
        {"TESTING": True, "SETTINGS": Settings.from_env({"FRESHET_HOME": str(tmp_path)})}
    )


def flask_routes(tmp_path: Path) -> dict[str, set[str]]:
    app = create_app(
        {"TESTING": True, "SETTINGS": Settings.from_env({"FRESHET_HOME": str(tmp_path)})}
    )
    routes: dict[str, set[str]] = {}
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/api/v1"):
            continue
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule)
        routes.setdefault(path, set()).update((rule.methods or set()) - IGNORED_METHODS)
    return routes


def test_every_route_is_documented_and_vice_versa(tmp_path: Path) -> None:
    documented = {
        path: {method.upper() for method in operations}
        for path, operations in openapi_document()["paths"].items()
    }
    assert flask_routes(tmp_path) == documented


def test_path_parameters_match_the_template() -> None:
    for path, operations in openapi_document()["paths"].items():
        names = set(re.findall(r"{(\w+)}", path))
        for operation in operations.values():
            params = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
            assert params == names, path


def test_document_is_openapi_31_and_served(tmp_path: Path) -> None:
    doc = openapi_document()
    assert doc["openapi"].startswith("3.1")
    app = create_app(
        {"TESTING": True, "SETTINGS": Settings.from_env({"FRESHET_HOME": str(tmp_path)})}
    )
    assert app.test_client().get("/api/v1/openapi.json").get_json() == doc


def test_refs_resolve() -> None:
    doc = openapi_document()
    text = repr(doc)
    for ref in set(re.findall(r"#/components/(\w+)/(\w+)", text)):
        assert ref[1] in doc["components"][ref[0]], ref
