"""The async workflow's steps without Kafka: messages, inference, validation, dead letters."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest

from freshet.answering.answers import WITHHELD, InMemoryAnswerStore
from freshet.answering.llm.base import Answerer, LLMError
from freshet.answering.llm.extractive import ExtractiveAnswerer, LexicalScorer
from freshet.answering.messages import (
    APPROVED,
    DEAD_LETTERS,
    RAW_ANSWERS,
    REJECTED,
    AnswerRequest,
    MessageError,
)
from freshet.answering.retrieval import Filters
from freshet.answering.rules import NO_RULES, parse_rules
from freshet.answering.users import User
from freshet.settings import Settings
from freshet.workflow.inference import Inference
from freshet.workflow.step import Step
from freshet.workflow.validator import Validator
from tests.unit.web_fakes import FakeRetriever, passage

PASSAGES = [
    passage(1, "Public: the Kafka Connect workers restart every night at two."),
    passage(2, "Staff only: the Kafka Connect workers restart on Sundays.", groups=("staff",)),
]
STAFF = User("ann", ("staff",))
MAX_K = Settings().max_ask_k


@dataclass
class Record:
    value: bytes | None
    topic: str = "rag.requests"
    partition: int = 0
    offset: int = 7
    key: bytes | None = None


def request(user: User = STAFF, **changes: Any) -> AnswerRequest:
    fields: dict[str, Any] = {"id": "r1", "question": "When do workers restart?", "k": 3}
    fields.update(changes)
    return AnswerRequest(user=user, filters=Filters(("app.articles",)), **fields)


def test_a_request_survives_its_round_trip() -> None:
    original = request()
    assert AnswerRequest.decode(original.encode(), max_k=MAX_K) == original


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, "no value"),
        (b"\xff", "not JSON"),
        (b"[1]", "not a JSON object"),
        (b'{"id": "r"}', "missing field"),
        (b'{"id": "r", "question": "q", "k": 0, "user": {"user": "a"}}', "k must be"),
        (b'{"id": 5, "question": "q", "k": 1, "user": {"user": "a"}}', "id must be"),
        (b'{"id": "r", "question": "q", "k": 1, "filters": "all"}', "filters must be"),
    ],
)
def test_an_unreadable_request_says_why(value: bytes | None, reason: str) -> None:
    with pytest.raises(MessageError, match=reason):
        AnswerRequest.decode(value, max_k=MAX_K)


def test_a_request_for_more_than_the_largest_ask_k_is_refused() -> None:
    """The async path takes the synchronous /ask's bound, FRESHET_MAX_ASK_K (default 20)."""
    assert AnswerRequest.decode(request(k=MAX_K).encode(), max_k=MAX_K).k == MAX_K
    with pytest.raises(MessageError, match=f"k must be an integer from 1 to {MAX_K}"):
        AnswerRequest.decode(request(k=MAX_K + 1).encode(), max_k=MAX_K)


def inference(answerer: Answerer | None = None) -> Inference:
    return Inference(
        FakeRetriever(PASSAGES), answerer or ExtractiveAnswerer(LexicalScorer()), max_k=MAX_K
    )


def test_inference_answers_as_the_asker_from_what_they_may_see() -> None:
    [out] = inference()(Record(request(User("pat")).encode()))
    body = json.loads(out.value)
    assert out.topic == RAW_ANSWERS and out.key == b"r1"
    assert body["passages"] == 1 and body["user"]["user"] == "pat"
    assert {c["chunk_id"] for c in body["answer"]["citations"]} == {1}
    [out] = inference()(Record(request().encode()))
    assert json.loads(out.value)["passages"] == 2


class DownAnswerer(Answerer):
    name = "down"

    def stream(self, question: str, passages: Any) -> Any:
        raise LLMError("endpoint down")


def test_a_backend_failure_travels_as_an_error() -> None:
    [out] = inference(DownAnswerer())(Record(request().encode()))
    assert "endpoint down" in json.loads(out.value)["error"]


def validated(raw: bytes, rules_text: str = "") -> tuple[Any, InMemoryAnswerStore]:
    store = InMemoryAnswerStore()
    rules = parse_rules(rules_text) if rules_text else NO_RULES
    [out] = Validator(rules, store)(Record(raw, topic=RAW_ANSWERS))
    return out, store


def test_the_validator_approves_records_and_publishes() -> None:
    [raw] = inference()(Record(request().encode()))
    out, store = validated(raw.value)
    stored = store.get("r1")
    assert out.topic == APPROVED and stored is not None and stored.status == "approved"
    assert json.loads(out.value)["citations"] and stored.owner.name == "ann"


def test_the_validator_rejects_what_breaks_a_rule_and_keeps_the_text_for_audit() -> None:
    [raw] = inference()(Record(request().encode()))
    rules = '[[rule]]\nname = "no-sundays"\nkind = "forbidden_pattern"\npattern = "sunday"\n'
    out, store = validated(raw.value, rules)
    stored = store.get("r1")
    assert stored is not None and stored.status == "rejected"
    assert stored.to_dict()["answer"] == WITHHELD
    body = json.loads(out.value)
    assert out.topic == REJECTED and body["violations"][0]["rule"] == "no-sundays"
    assert "Sundays" in body["withheld"]["answer"]


def test_a_failed_answer_is_recorded_as_failed() -> None:
    [raw] = inference(DownAnswerer())(Record(request().encode()))
    out, store = validated(raw.value)
    stored = store.get("r1")
    assert out.topic == REJECTED and stored is not None and stored.status == "failed"
    assert "endpoint down" in stored.to_dict()["error"]


def test_the_step_sends_an_unreadable_record_to_the_dead_letter_topic() -> None:
    step = Step("inference", "rag.requests", "g", "127.0.0.1:1", inference())
    [out] = step.handle(Record(b"not json", offset=41))
    body = json.loads(out.value)
    assert out.topic == DEAD_LETTERS and step.dead_letters == 1
    assert (body["topic"], body["offset"], body["value"]) == ("rag.requests", 41, "not json")
    assert "not JSON" in body["reason"]
    [out] = step.handle(Record(request().encode()))
    assert out.topic == RAW_ANSWERS and step.handled == 1


def test_a_raw_answer_that_cannot_be_judged_is_unreadable_not_retried() -> None:
    raw = b'{"id": "r1", "question": "q", "user": {"user": "ann"}, "passages": 1,'
    raw += b' "answer": {"answer": "a [1]", "citations": [{"no": 1}]}}'
    with pytest.raises(MessageError, match="cannot be judged"):
        Validator(NO_RULES, InMemoryAnswerStore())(Record(raw, topic=RAW_ANSWERS))


def test_the_validator_judges_the_markers_the_model_added() -> None:
    """A raw answer quoting a row's own "[7]" (markers: only the [1] the model added) passes
    citations_resolve; the same text from an older worker, without markers, does not."""
    rules = '[[rule]]\nname = "resolve"\nkind = "citations_resolve"\n'
    citations = [{"n": 1, "source_table": "app.articles", "doc_key": "1", "chunk_id": 1}]
    answer = {"answer": "Workers restart at two [7]. [1]", "citations": citations, "markers": [1]}
    body = {"id": "r1", "question": "q", "user": {"user": "ann"}, "passages": 1}
    out, store = validated(json.dumps({**body, "answer": answer}).encode(), rules)
    assert out.topic == APPROVED
    answer.pop("markers")
    out, store = validated(json.dumps({**body, "answer": answer}).encode(), rules)
    stored = store.get("r1")
    assert out.topic == REJECTED and stored is not None and stored.violations[0].rule == "resolve"


class FakeConsumer:
    def __init__(self) -> None:
        self.seeks: list[int] = []
        self.commits: list[dict[Any, Any]] = []

    def seek(self, partition: Any, offset: int) -> None:
        self.seeks.append(offset)

    def commit(self, offsets: dict[Any, Any], timeout_ms: int | None = None) -> None:
        self.commits.append(offsets)


class Sent:
    """A send the broker took."""

    def get(self, timeout: float | None = None) -> None:
        return None


class FakeProducer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    def send(self, topic: str, key: bytes | None = None, value: bytes = b"") -> Sent:
        self.sent.append((topic, value))
        return Sent()

    def flush(self, timeout: float | None = None) -> None:
        pass


def test_a_record_that_keeps_failing_becomes_a_dead_letter_and_the_partition_moves_on() -> None:
    import threading

    from freshet.retry import Backoff
    from freshet.workflow import step as step_module

    def broken(record: Any) -> list[Any]:
        raise ValueError("the handler cannot take this record")

    step = Step("inference", "rag.requests", "g", "127.0.0.1:1", broken, backoff=Backoff(0.0))
    consumer, producer = FakeConsumer(), FakeProducer()
    step.runtime.consumer, step.runtime.producer = consumer, producer
    record = Record(b'{"id": "r1"}', offset=5)
    for _ in range(step_module.MAX_ATTEMPTS):
        step.runtime.process([record], threading.Event())  # one poll that returned the record
    assert consumer.seeks == [5] * (step_module.MAX_ATTEMPTS - 1)  # retried, then given up
    [(topic, value)] = producer.sent
    assert topic == DEAD_LETTERS
    assert "failed 5 times: ValueError" in json.loads(value)["reason"]
    assert len(consumer.commits) == 1 and step.dead_letters == 1


def test_a_record_nested_too_deeply_is_unreadable() -> None:
    step = Step("inference", "rag.requests", "g", "127.0.0.1:1", inference())
    [out] = step.handle(Record(b"[" * 100_000))
    assert out.topic == DEAD_LETTERS and "nested too deeply" in json.loads(out.value)["reason"]
