"""Declared workflows without Kafka: the file format and its errors, each step kind, and
whole workflows run in process with the same handlers the step workers run."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from freshet.answering.answers import InMemoryAnswerStore
from freshet.answering.llm.extractive import ExtractiveAnswerer, LexicalScorer
from freshet.answering.messages import APPROVED, AnswerRequest
from freshet.answering.retrieval import Filters
from freshet.answering.rules import NO_RULES, RuleSet
from freshet.answering.users import User
from freshet.settings import PROJECT_ROOT, Settings
from freshet.workflow.definition import WorkflowError, load_workflow, parse_workflow
from freshet.workflow.kinds import batch_of, build
from freshet.workflow.kinds.decompose import split_question
from freshet.workflow.kinds.rewrite import standalone
from freshet.workflow.kinds.synthesize import combine
from freshet.workflow.runner import Message, handlers_of, run_in_process
from tests.unit.web_fakes import FakeRetriever, passage

PASSAGES = [
    passage(1, "The lighthouse keeper feeds the grey cat at dawn, before the lamp goes out."),
    passage(2, "The farmer feeds the ferret at noon, behind the red barn."),
    passage(3, "The harbour tide turns at the stroke of noon, as the almanac records."),
]
MULTI = PROJECT_ROOT / "workflows" / "multi-part.toml"


@dataclass
class FakeAnswering:
    """What the step kinds use of the answering core, without a database or a model."""

    rules_now: RuleSet = NO_RULES
    settings: Settings = field(
        default_factory=lambda: Settings.from_env({"FRESHET_ANSWER_STORE_BACKEND": "memory"})
    )
    answers: InMemoryAnswerStore = field(default_factory=InMemoryAnswerStore)
    searched: list[str] = field(default_factory=list)

    def retriever(self) -> Any:
        answering = self

        class Recording(FakeRetriever):
            def search(self, query: str, *args: Any, **kwargs: Any) -> Any:
                answering.searched.append(query)
                return super().search(query, *args, **kwargs)

        return Recording(PASSAGES)

    def answerer(self) -> ExtractiveAnswerer:
        return ExtractiveAnswerer(LexicalScorer())

    def rules(self) -> RuleSet:
        return self.rules_now

    def store(self) -> InMemoryAnswerStore:
        return self.answers


def ask(workflow: Any, answering: FakeAnswering, question: str, rid: str = "r1") -> dict:
    request = AnswerRequest(rid, question, 3, User("ann"), Filters())
    [out] = run_in_process(
        workflow, handlers_of(workflow, answering), rid.encode(), request.encode()
    )
    assert out.topic == APPROVED and out.key == rid.encode()
    body: dict[str, Any] = json.loads(out.value)
    return body


def test_the_shipped_workflows_load() -> None:
    default = load_workflow()
    assert [(s.name, s.kind, s.input, s.output, s.group) for s in default.steps] == [
        ("answer", "answer", "rag.requests", "rag.answers.raw", "rag-inference"),
        ("validate", "validate", "rag.answers.raw", None, "rag-validate"),
    ]
    multi = load_workflow(MULTI)
    assert [s.kind for s in multi.steps] == [
        "rewrite",
        "decompose",
        "answer",
        "synthesize",
        "validate",
    ]
    assert multi.step("decompose").params == {"max_parts": 4}
    with pytest.raises(WorkflowError, match="no step named 'rerank'"):
        multi.step("rerank")


STEP = (
    '[[step]]\nname = "{name}"\nkind = "{kind}"\ninput = "{input}"\noutput = "{output}"\n'
    'group = "{group}"\n'
)


def steps(*rows: tuple[str, str, str, str, str]) -> str:
    return "".join(
        STEP.format(name=n, kind=k, input=i, output=o, group=g) for n, k, i, o, g in rows
    )


VALIDATE = ("validate", "validate", "raw", "", "g-validate")
ANSWER = ("a", "answer", "rag.requests", "raw", "g1")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("step = 1", "at least one"),
        (steps(("a", "summarize", "rag.requests", "raw", "g1"), VALIDATE), "kind must be"),
        (
            steps(
                ("a", "answer", "rag.requests", "raw", "g1"),
                ("b", "noop", "nowhere", "x", "g2"),
                VALIDATE,
            ),
            "earlier step",
        ),
        (
            steps(
                ("a", "answer", "rag.requests", "raw", "g1"),
                ("a", "noop", "raw", "x", "g2"),
                VALIDATE,
            ),
            "used twice",
        ),
        (
            steps(
                ("a", "answer", "rag.requests", "raw", "g1"),
                ("b", "noop", "raw", "x", "g1"),
                VALIDATE,
            ),
            "another step's",
        ),
        (steps(("a", "answer", "rag.requests", "raw", "g1")), "last step must be"),
        (
            steps(("a", "answer", "rag.requests", "rag.requests", "g1"), VALIDATE),
            "other than its input",
        ),
        ("[[step]\n", "not valid TOML"),
    ],
)
def test_a_bad_workflow_file_says_what_and_where(text: str, expected: str) -> None:
    with pytest.raises(WorkflowError, match=expected):
        parse_workflow(text, "team.toml")


def test_a_missing_workflow_file_says_which(tmp_path: Path) -> None:
    with pytest.raises(WorkflowError, match="missing.toml"):
        load_workflow(tmp_path / "missing.toml")


@pytest.mark.parametrize(
    ("question", "parts"),
    [
        ("When does the keeper feed the cat?", ["When does the keeper feed the cat?"]),
        (
            "When does the keeper feed the cat? Where does the farmer feed the ferret?",
            ["When does the keeper feed the cat?", "Where does the farmer feed the ferret?"],
        ),
        (
            "When does the keeper feed the cat, and where does the farmer feed the ferret?",
            ["When does the keeper feed the cat?", "where does the farmer feed the ferret?"],
        ),
        ("Do cats and dogs get along?", ["Do cats and dogs get along?"]),
        ("What is a? What is b? What is c? What is d? What is e?", None),
    ],
)
def test_split_question(question: str, parts: list[str] | None) -> None:
    found = split_question(question, max_parts=4)
    if parts is None:
        assert len(found) == 4 and found[-1] == "What is d? What is e?"
    else:
        assert found == parts


def test_standalone_drops_lead_ins_and_politeness() -> None:
    assert standalone("Could you tell me when the keeper feeds the cat, please?") == (
        "when the keeper feeds the cat"
    )
    assert standalone("Hi, I'd like to know how HNSW works") == "how HNSW works"
    assert standalone("Why?") == "Why"
    assert standalone("?") == "?"


def test_combine_renumbers_citations_in_part_order() -> None:
    def raw(part: int, text: str, n: int, cited: list[int]) -> dict[str, Any]:
        return {
            "part": part,
            "question": f"q{part}",
            "passages": n,
            "answer": {
                "answer": text,
                "citations": [{"n": c, "chunk_id": 10 * part + c} for c in cited],
                "markers": cited,
                "declined": False,
                "as_of": f"2026-0{part}-01T00:00:00+00:00",
                "backend": "extractive",
            },
            "sources": {str(c): f"passage {part}.{c}" for c in cited},
        }

    whole = combine(
        "p",
        "q",
        {"user": "ann"},
        [raw(1, "Cats at dawn. [2]", 3, [2]), raw(2, "Noon. [1]", 2, [1])],
    )
    assert whole["answer"]["answer"] == "Cats at dawn. [2]\n\nNoon. [4]"
    assert [c["n"] for c in whole["answer"]["citations"]] == [2, 4]
    assert whole["answer"]["markers"] == [2, 4] and whole["passages"] == 5
    assert whole["sources"] == {"2": "passage 1.2", "4": "passage 2.1"}
    assert whole["answer"]["as_of"] == "2026-02-01T00:00:00+00:00"
    failed = combine("p", "q", {"user": "ann"}, [{"part": 1, "error": "down"}])
    assert failed["error"] == "part 1: down"


def test_a_multi_part_question_is_answered_once_with_every_parts_citations() -> None:
    answering = FakeAnswering()
    body = ask(
        load_workflow(MULTI),
        answering,
        "Could you tell me when the keeper feeds the cat, and when does the farmer feed the "
        "ferret, please?",
    )
    assert body["status"] == "approved" and body["id"] == "r1"
    assert "dawn" in body["answer"] and "noon" in body["answer"]
    assert {c["chunk_id"] for c in body["citations"]} >= {1, 2}
    assert answering.searched == [
        "when the keeper feeds the cat?",
        "when does the farmer feed the ferret?",
    ]
    stored = answering.answers.get("r1")
    assert stored is not None and stored.status == "approved"
    assert answering.answers.get("r1~1") is None  # parts are not answers of their own


def test_adding_a_noop_step_to_the_default_workflow_changes_no_answer() -> None:
    default = load_workflow()
    text = (PROJECT_ROOT / "workflows" / "default.toml").read_text()
    with_noop = parse_workflow(
        text.replace('output = "rag.answers.raw"', 'output = "rag.answers.pre"').replace(
            '[[step]]\nname = "validate"',
            '[[step]]\nname = "pass"\nkind = "noop"\ninput = "rag.answers.pre"\n'
            'output = "rag.answers.raw"\ngroup = "rag-pass"\n\n[[step]]\nname = "validate"',
        ),
        "with-noop.toml",
    )
    assert [s.kind for s in with_noop.steps] == ["answer", "noop", "validate"]
    for i, question in enumerate(
        ("When does the keeper feed the cat?", "Where is the ferret fed?", "tide at noon")
    ):
        plain = ask(default, FakeAnswering(), question, f"a{i}")
        noop = ask(with_noop, FakeAnswering(), question, f"a{i}")
        plain.pop("created_at"), noop.pop("created_at")
        assert noop == plain


def test_steps_that_call_a_model_poll_few_records_at_once() -> None:
    multi = load_workflow(MULTI)
    assert batch_of(multi.step("answer")) == 2
    assert batch_of(multi.step("validate")) == 50
    custom = parse_workflow(
        steps(("a", "answer", "rag.requests", "raw", "g1"), VALIDATE).replace(
            'group = "g1"\n', 'group = "g1"\nparams = { batch = 8 }\n'
        ),
        "custom.toml",
    )
    assert batch_of(custom.step("a")) == 8
    bad = parse_workflow(
        steps(("a", "answer", "rag.requests", "raw", "g1"), VALIDATE).replace(
            'group = "g1"\n', 'group = "g1"\nparams = { batch = 0 }\n'
        ),
        "bad.toml",
    )
    with pytest.raises(ValueError, match="batch must be"):
        batch_of(bad.step("a"))


def test_a_step_builds_what_it_uses_before_its_first_record() -> None:
    """A step worker builds its handler before it joins its group: the retriever and the
    answerer (and with them the model) are built then, not by the first request."""

    @dataclass
    class Counting(FakeAnswering):
        built: list[str] = field(default_factory=list)

        def retriever(self) -> Any:
            self.built.append("retriever")
            return super().retriever()

        def answerer(self) -> ExtractiveAnswerer:
            self.built.append("answerer")
            return super().answerer()

    multi = load_workflow(MULTI)
    retrieve = parse_workflow(steps(("r", "retrieve", "rag.requests", "raw", "g1"), VALIDATE), "r")
    specs = {
        "rewrite": (multi.step("rewrite"), ["answerer"]),
        "decompose": (multi.step("decompose"), ["answerer"]),
        "answer": (multi.step("answer"), ["retriever", "answerer"]),
        "retrieve": (retrieve.step("r"), ["retriever"]),
    }
    for kind, (spec, expected) in specs.items():
        answering = Counting()
        handler = build(spec, answering, tracked=False)  # type: ignore[arg-type]
        assert answering.built == expected, kind
        if kind == "rewrite":
            request = AnswerRequest("r1", "what does the cat eat?", 3, User("ann"), Filters())
            handler(Message("rag.requests", b"r1", request.encode()))
            assert answering.built == expected  # a record builds nothing more
