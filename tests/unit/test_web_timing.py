"""Server-Timing: where an API request's time went, per step, for clients and benchmarks."""

from __future__ import annotations

import time
from pathlib import Path

from freshet.answering import timing
from freshet.answering.retrieval import NO_FILTERS, Filters, Mode, Passage
from freshet.answering.users import User
from tests.unit.test_web_api import PASSAGES, make_app
from tests.unit.web_fakes import FakeRetriever


class SlowRetriever(FakeRetriever):
    """Spends measurable time in the spans PgRetriever records."""

    def search(
        self,
        query: str,
        user: User,
        *,
        k: int = 5,
        mode: Mode = "hybrid",
        filters: Filters = NO_FILTERS,
        dedupe: bool = False,
    ) -> list[Passage]:
        with timing.span("embed"):
            time.sleep(0.005)
        for _ in range(2):
            with timing.span("sql"):
                time.sleep(0.002)
        return super().search(query, user, k=k, mode=mode, filters=filters, dedupe=dedupe)


def test_search_reports_its_steps_in_server_timing(tmp_path: Path) -> None:
    client = make_app(tmp_path, RETRIEVER=SlowRetriever(PASSAGES)).test_client()
    response = client.get("/api/v1/search?q=kafka")
    assert response.status_code == 200
    spans = timing.parse_header(response.headers["Server-Timing"])
    assert list(spans) == ["embed", "sql", "app"]
    assert spans["embed"] >= 5 and spans["sql"] >= 4  # spans of one name add up
    assert spans["app"] >= spans["embed"] + spans["sql"]


def test_every_api_response_has_the_app_span_even_an_error(tmp_path: Path) -> None:
    client = make_app(tmp_path).test_client()
    response = client.get("/api/v1/search?q=")
    assert response.status_code == 400
    assert list(timing.parse_header(response.headers["Server-Timing"])) == ["app"]


def test_server_timing_can_be_turned_off(tmp_path: Path) -> None:
    client = make_app(tmp_path, SERVER_TIMING=False).test_client()
    assert "Server-Timing" not in client.get("/api/v1/search?q=kafka").headers


def test_spans_outside_a_request_record_nothing() -> None:
    with timing.span("embed"):
        pass
    assert timing.end() == {}


def test_header_round_trip_and_unparsable_entries() -> None:
    assert timing.header({"embed": 7.912, "app": 12.0}) == "embed;dur=7.91, app;dur=12.00"
    assert timing.parse_header("embed;dur=7.91, cache;desc=hit, sql;dur=x, app;dur=12") == {
        "embed": 7.91,
        "app": 12.0,
    }
