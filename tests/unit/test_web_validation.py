"""The answer rules: the shipped file, each kind, and refusal of a bad rules file."""

from __future__ import annotations

from pathlib import Path

import pytest

from freshet.answering.answers import judge
from freshet.answering.llm.base import added_markers, make_answer
from freshet.answering.rules import NO_RULES, Judged, RulesError, load_rules, parse_rules
from freshet.answering.users import User
from freshet.settings import PROJECT_ROOT
from tests.unit.test_web_api import STAFF, events, make_app
from tests.unit.web_fakes import FakeRetriever, passage


def names(rules_text: str, answer: Judged) -> list[str]:
    return [v.rule for v in parse_rules(rules_text).check(answer)]


def test_the_shipped_rules_pass_a_cited_answer_and_the_nothing_found_answer() -> None:
    rules = load_rules(PROJECT_ROOT / "rules" / "answers.toml")
    assert len(rules.rules) >= 4 and len(rules.digest) == 12
    assert rules.check(Judged("Workers restart nightly [1].", (1,), 3)) == []
    assert rules.check(Judged("Nothing relevant was found.", (), 0)) == []
    assert rules.check(Judged("Nothing relevant was found.", (), 5, declined=True)) == []


def test_the_shipped_rules_catch_card_numbers_credentials_and_dangling_citations() -> None:
    rules = load_rules(PROJECT_ROOT / "rules" / "answers.toml")
    found = {v.rule for v in rules.check(Judged("Card 4111 1111 1111 1111 [1] [4]", (1,), 3))}
    assert found == {"no-payment-card-numbers", "citations-resolve"}
    assert {v.rule for v in rules.check(Judged("the password: hunter2 [1]", (1,), 1))} == {
        "no-secrets"
    }
    assert {v.rule for v in rules.check(Judged("uncited", (), 2))} == {"cites-its-sources"}


def test_each_kind() -> None:
    text = '[[rule]]\nname = "two"\nkind = "min_citations"\nmin = 2\n'
    assert names(text, Judged("a [1]", (1,), 3)) == ["two"]
    assert names(text, Judged("a [1] [2]", (1, 2), 3)) == []
    text = '[[rule]]\nname = "short"\nkind = "max_chars"\nlimit = 5\n'
    assert names(text, Judged("123456", (), 0)) == ["short"]
    text = '[[rule]]\nname = "case"\nkind = "forbidden_pattern"\npattern = "Foo"\n'
    assert names(text, Judged("a foo", (), 0)) == ["case"]
    text += "ignore_case = false\n"
    assert names(text, Judged("a foo", (), 0)) == []
    text = '[[rule]]\nname = "off"\nkind = "max_chars"\nlimit = 1\nenabled = false\n'
    assert names(text, Judged("long", (), 0)) == []


def test_messages_name_the_rule_and_the_reason() -> None:
    rules = parse_rules('[[rule]]\nname = "short"\nkind = "max_chars"\nlimit = 3\n')
    [violation] = rules.check(Judged("12345", (), 0))
    assert violation.to_dict() == {
        "rule": "short",
        "message": "the answer is 5 characters long; the limit is 3",
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[[rule", "not valid TOML"),
        ('rule = "x"', "array of tables"),
        ('[[rule]]\nname = "a"\nkind = "nope"', "kind must be one of"),
        ('[[rule]]\nname = "a"\nkind = "max_chars"', "wrong parameters for max_chars"),
        ('[[rule]]\nname = "a"\nkind = "max_chars"\nlimit = 0', "limit must be at least 1"),
        ('[[rule]]\nname = "a"\nkind = "forbidden_pattern"\npattern = "("', "not a regular"),
        ('[[rule]]\nname = "a"\nkind = "citations_resolve"\n' * 2, "used twice"),
    ],
)
def test_a_bad_rules_file_is_refused_with_the_rule_named(text: str, expected: str) -> None:
    with pytest.raises(RulesError, match=expected) as info:
        parse_rules(text, "team-rules.toml")
    assert str(info.value).startswith("team-rules.toml")


def test_no_path_means_no_rules_and_a_missing_file_says_which(tmp_path: Path) -> None:
    assert load_rules("") is NO_RULES and load_rules(None) is NO_RULES
    with pytest.raises(RulesError, match="FRESHET_ANSWER_RULES=.*cannot be read"):
        load_rules(tmp_path / "missing.toml")


# --- a data row cannot defeat the rules: markers copied from a passage -------------------
REFERENCED = (
    "Kafka Connect workers restart every night [7], as the operations handbook says [12]. "
    "Each connector is split into tasks that the workers share [2]. Use sys.argv[0] for it."
)


def test_a_passages_own_markers_are_not_citations_and_not_violations(tmp_path: Path) -> None:
    retriever = FakeRetriever([passage(1, REFERENCED), passage(2, "Bread rises with yeast.")])
    client = make_app(tmp_path, RETRIEVER=retriever).test_client()  # the shipped rules
    question = {"question": "When do Kafka Connect workers restart every night?", "k": 2}
    for stream in (False, True):
        response = client.post("/api/v1/ask", json={**question, "stream": stream}, headers=STAFF)
        body = events(response.get_data(as_text=True))[-1][1] if stream else response.get_json()
        assert body["status"] == "approved", body.get("violations")
        # The row's "[7]" stays as written and cites nothing; the one marker added cites [1].
        assert "every night [7], as the operations handbook says [12]. [1]" in body["answer"]
        assert body["markers"] == [1] and [c["n"] for c in body["citations"]] == [1]


@pytest.mark.parametrize(
    ("text", "added"),
    [
        # copied from the passage with its reference numbers, then cited by the model
        ("They restart every night [7], as the operations handbook says [12]. [1]", [1]),
        ("Each connector is split into tasks that the workers share [2].", []),
        ("Use sys.argv[0] for it [1].", [1]),
        # the model's own words: every marker is the model's, right or wrong
        ("Workers restart nightly [1] and on Sundays [9].", [1, 9]),
        ("[2] Workers restart.", [2]),
    ],
)
def test_markers_the_model_added(text: str, added: list[int]) -> None:
    assert added_markers(text, [REFERENCED, "Bread rises with yeast."]) == added


def test_a_marker_the_model_adds_is_still_judged() -> None:
    rules = load_rules(PROJECT_ROOT / "rules" / "answers.toml")
    answer = make_answer("Workers restart nightly [1] and on Sundays [9].", [passage(1, "x")], "t")
    stored = judge("r1", "q", User("ann"), answer, 1, rules)
    assert stored.status == "rejected"
    assert [v.rule for v in stored.violations] == ["citations-resolve"]
    copied = make_answer(
        "Workers restart every night [7], as the operations handbook says [12]. [1]",
        [passage(1, REFERENCED)],
        "t",
    )
    assert judge("r2", "q", User("ann"), copied, 1, rules).status == "approved"


def test_answers_without_markers_are_judged_by_their_text() -> None:
    """A raw answer from before answers carried their markers: every [n] of the text."""
    rules = load_rules(PROJECT_ROOT / "rules" / "answers.toml")
    old = {"answer": "a [1] [7]", "citations": [{"n": 1}]}
    assert [v.rule for v in rules.check(Judged.of(old, 1))] == ["citations-resolve"]
    assert rules.check(Judged.of({**old, "markers": [1]}, 1)) == []
    with pytest.raises(TypeError):
        Judged.of({**old, "markers": "1"}, 1)
