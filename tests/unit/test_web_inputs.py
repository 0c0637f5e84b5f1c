"""Deeply nested and oversized JSON in any parameter is a 400 naming the field, never a 500:
the query string's metadata, the JSON body and each of its fields, arrays and objects."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from flask.testing import FlaskClient

from freshet.web.inputs import MAX_JSON_DEPTH, BadInput, depth, loads, storable
from tests.unit.test_web_api import STAFF, error_of, make_app


@pytest.fixture
def client(tmp_path: Path) -> FlaskClient:
    return make_app(tmp_path, RATE_LIMIT_BACKEND="off").test_client()


def nested(levels: int, kind: str = "array") -> str:
    """JSON nested ``levels`` deep: [[[...]]] or {"a": {"a": ...}}."""
    if kind == "array":
        return "[" * levels + "]" * levels
    return '{"a":' * (levels - 1) + "{}" + "}" * (levels - 1)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1, 0), ("x", 0), ([], 1), ({}, 1), ([1, [2, [3]]], 3), ({"a": [{"b": {}}]}, 4)],
)
def test_depth(value: Any, expected: int) -> None:
    assert depth(value) == expected


@pytest.mark.parametrize("kind", ["array", "object"])
@pytest.mark.parametrize("levels", [MAX_JSON_DEPTH + 1, 900, 5000, 100_000])
def test_deep_json_is_refused_without_recursion(kind: str, levels: int) -> None:
    with pytest.raises(BadInput, match="nested deeper than 32 levels") as refused:
        loads(nested(levels, kind), "metadata")
    assert refused.value.field == "metadata"


def test_json_at_the_limit_is_read() -> None:
    assert depth(loads(nested(MAX_JSON_DEPTH, "object"), "metadata")) == MAX_JSON_DEPTH


def test_storable_walks_without_recursion() -> None:
    deep: Any = "x"
    for _ in range(100_000):
        deep = [deep]
    assert storable(deep)
    deep[0] = {"k": float("nan")}
    assert not storable(deep)


@pytest.mark.parametrize("kind", ["array", "object"])
@pytest.mark.parametrize("levels", [33, 5000])
def test_deep_metadata_in_the_query_string_is_a_400(
    client: FlaskClient, kind: str, levels: int
) -> None:
    text = nested(levels, kind)
    if len(text) > 4096:
        text = text[:4000]  # still refused, as too long (below) before it is parsed
    url = "/api/v1/search?q=kafka&metadata=" + quote(text)
    error = error_of(client.get(url), 400)
    assert error["field"] == "metadata"


def test_the_issues_5000_brackets_are_a_400(client: FlaskClient) -> None:
    error = error_of(client.get("/api/v1/search?q=x&metadata=" + "[" * 5000), 400)
    assert error["field"] == "metadata"


@pytest.mark.parametrize("field", ["question", "metadata", "table", "k", "async", "stream", "x"])
@pytest.mark.parametrize("kind", ["array", "object"])
def test_deep_json_in_any_body_field_is_a_400_naming_it(
    client: FlaskClient, field: str, kind: str
) -> None:
    deep = nested(5000, kind)
    body = '{"question": "What are connector tasks?", "' + field + '": ' + deep + "}"
    response = client.post("/api/v1/ask", data=body, content_type="application/json")
    error = error_of(response, 400)
    assert error["field"] == field and "nested deeper" in error["message"]


@pytest.mark.parametrize("kind", ["array", "object"])
def test_a_deep_body_is_a_400(client: FlaskClient, kind: str) -> None:
    for levels in (40, 10_000):  # 10,000 objects deep is 50 kB, under the body limit
        response = client.post(
            "/api/v1/ask", data=nested(levels, kind), content_type="application/json"
        )
        assert "nested deeper" in error_of(response, 400)["message"]


def test_a_body_at_the_size_limit_of_brackets_is_a_413_or_400_never_500(
    client: FlaskClient,
) -> None:
    for size in (64 * 1024 - 20, 64 * 1024 + 20):
        body = '{"metadata":' + "[" * size
        response = client.post("/api/v1/ask", data=body, content_type="application/json")
        assert response.status_code in (400, 413), response.get_data(as_text=True)


def test_moderately_nested_metadata_still_filters(client: FlaskClient) -> None:
    metadata = {"kind": {"a": {"b": {"c": [1, 2]}}}}
    url = "/api/v1/search?q=kafka&metadata=" + quote(json.dumps(metadata))
    assert client.get(url, headers=STAFF).status_code == 200
    body = {"question": "What are connector tasks?", "metadata": metadata}
    assert client.post("/api/v1/ask", json=body, headers=STAFF).status_code == 200


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("metadata=" + quote(json.dumps({f"k{i}": i for i in range(2000)})), "metadata"),
        ("metadata=" + quote(json.dumps({"k": "x" * 5000})), "metadata"),
        ("&".join(["table=app.articles"] * 51), "table"),
        ("table=" + "t" * 201, "table"),
        ("k=" + "9" * 5000, "k"),
    ],
)
def test_big_but_shallow_query_inputs_are_a_400(
    client: FlaskClient, query: str, field: str
) -> None:
    assert error_of(client.get(f"/api/v1/search?q=kafka&{query}"), 400)["field"] == field
    error_of(client.get("/api/v1/search?q=" + "[" * 5000), 400)  # q is text, too long


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"question": "q", "metadata": {f"k{i}": i for i in range(2000)}}, "metadata"),
        ({"question": "q", "table": ["app.articles"] * 1000}, "table"),
        ({"question": "q", "table": [["app.articles"]]}, "table"),
        ({"question": ["q"] * 1000}, "question"),
    ],
)
def test_big_but_shallow_bodies_are_a_400(
    client: FlaskClient, body: dict[str, Any], field: str
) -> None:
    assert error_of(client.post("/api/v1/ask", json=body), 400)["field"] == field


def test_a_huge_integer_in_the_body_is_a_400(client: FlaskClient) -> None:
    body = '{"question": "q", "k": ' + "9" * 5000 + "}"
    response = client.post("/api/v1/ask", data=body, content_type="application/json")
    error_of(response, 400)


@pytest.mark.parametrize("value", ["", "maybe", "2"])
def test_a_boolean_query_parameter_that_is_not_one_is_a_400(
    client: FlaskClient, value: str
) -> None:
    """`dedupe=` (empty) is not a boolean: the OpenAPI document says so, and so does the API."""
    response = client.get("/api/v1/search", query_string={"q": "ferry", "dedupe": value})
    assert response.status_code == 400
    assert response.get_json()["error"]["field"] == "dedupe"
