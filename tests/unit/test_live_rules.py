"""Answer rules owned by another team: new kinds, a directory source, reloading without a
restart (the last good rule set stays when a change is broken), and the verdict the audit
keeps."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from freshet.answering.answers import cited_sources, judge
from freshet.answering.live_rules import LiveRules, read_path
from freshet.answering.llm.extractive import ExtractiveAnswerer, LexicalScorer
from freshet.answering.rules import Judged, RulesError, parse_rules, sentences
from freshet.answering.users import User
from freshet.embedder import TransformersEmbedder
from tests.unit.test_web_extractive import PASSAGES

NO_CARDS = '[[rule]]\nname = "no-cards"\nkind = "forbidden_pattern"\npattern = "card"\n'
NO_DOGS = '[[rule]]\nname = "no-dogs"\nkind = "forbidden_pattern"\npattern = "dog"\n'


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def write(path: Path, text: str, mtime: float) -> None:
    path.write_text(text)
    os.utime(path, (mtime, mtime))


def test_sentences_split_at_terminal_punctuation() -> None:
    text = 'The tide turns at noon [1]. Is it "late?" Yes! Dr. Smith agrees\n\nand so on.'
    assert sentences(text) == [
        "The tide turns at noon [1].",
        'Is it "late?"',
        "Yes!",
        "Dr.",
        "Smith agrees\n\nand so on.",
    ]
    assert sentences("  ") == []


def test_max_sentences_and_requires_disclaimer() -> None:
    rules = parse_rules(
        '[[rule]]\nname = "brief"\nkind = "max_sentences"\nlimit = 2\n'
        '[[rule]]\nname = "medical"\nkind = "requires_disclaimer"\n'
        'question_pattern = "\\\\b(dose|dosage)\\\\b"\ntext = "not medical advice"\n'
    )

    def broken(text: str, question: str) -> list[str]:
        return [v.rule for v in rules.check(Judged(text, (1,), 1, question=question))]

    assert broken("One. Two.", "what is the dose?") == ["medical"]
    assert broken("One. Two. This is Not Medical Advice.", "what is the dose?") == ["brief"]
    assert broken("One. This is not medical advice.", "Dosage of aspirin") == []
    assert broken("One. Two.", "when is the tide?") == []
    with pytest.raises(RulesError, match="brief"):
        parse_rules('[[rule]]\nname = "brief"\nkind = "max_sentences"\nlimit = 0\n')
    with pytest.raises(RulesError, match="not a regular expression"):
        parse_rules(
            '[[rule]]\nname = "m"\nkind = "requires_disclaimer"\nquestion_pattern = "("\n'
            'text = "x"\n'
        )


def test_a_changed_file_applies_after_the_reload_interval_without_a_restart(
    tmp_path: Path,
) -> None:
    path = tmp_path / "answers.toml"
    write(path, NO_CARDS, 1_700_000_000)
    clock = Clock()
    live = LiveRules(str(path), reload_s=1.0, clock=clock)
    first = live.current()
    assert [r.name for r in first.rules] == ["no-cards"]
    assert first.version == "2023-11-14T22:13:20Z"
    assert first.label == f"{first.digest}@2023-11-14T22:13:20Z"

    write(path, NO_CARDS + NO_DOGS, 1_700_000_060)
    clock.now += 0.5
    assert live.current() is first  # not looked at again before the interval
    clock.now += 0.6
    second = live.current()
    assert [r.name for r in second.rules] == ["no-cards", "no-dogs"]
    assert second.digest != first.digest and second.version == "2023-11-14T22:14:20Z"
    assert live.reloads == 1


def test_a_broken_change_keeps_the_last_good_rules_and_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "answers.toml"
    write(path, NO_CARDS, 1_700_000_000)
    clock = Clock()
    live = LiveRules(str(path), reload_s=1.0, clock=clock)
    good = live.current()
    write(path, NO_CARDS + '[[rule]]\nname = "x"\nkind = "no_such_kind"\n', 1_700_000_100)
    clock.now += 2
    assert live.current() is good
    assert "kind must be one of" in (live.last_error or "")
    assert "the last good ones stay" in caplog.text
    path.unlink()  # a missing file: the same
    clock.now += 2
    assert live.current() is good and "cannot be read" in (live.last_error or "")
    write(path, NO_DOGS, 1_700_000_200)
    clock.now += 2
    assert [r.name for r in live.current().rules] == ["no-dogs"] and live.last_error is None


def test_a_broken_source_at_start_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "answers.toml"
    path.write_text("[[rule]\n")
    with pytest.raises(RulesError, match="not valid TOML"):
        LiveRules(str(path))


def test_a_directory_is_every_toml_file_in_name_order_with_unique_names(tmp_path: Path) -> None:
    write(tmp_path / "20-safety.toml", NO_DOGS, 1_700_000_000)
    write(tmp_path / "10-compliance.toml", NO_CARDS, 1_700_000_500)
    (tmp_path / "notes.txt").write_text("not rules")
    rules = read_path(tmp_path)
    assert [r.name for r in rules.rules] == ["no-cards", "no-dogs"]
    assert rules.version == "2023-11-14T22:21:40Z"  # the newest file
    write(tmp_path / "30-again.toml", NO_CARDS, 1_700_000_000)
    with pytest.raises(RulesError, match="30-again.toml.*used twice"):
        read_path(tmp_path)


def test_reload_zero_reads_once(tmp_path: Path) -> None:
    path = tmp_path / "answers.toml"
    write(path, NO_CARDS, 1_700_000_000)
    clock = Clock()
    live = LiveRules(str(path), reload_s=0, clock=clock)
    write(path, NO_DOGS, 1_700_000_001)
    clock.now += 100
    assert [r.name for r in live.current().rules] == ["no-cards"]


def test_a_verdict_records_each_rules_outcome_and_the_rule_set_version(tmp_path: Path) -> None:
    path = tmp_path / "answers.toml"
    write(path, NO_CARDS + NO_DOGS, 1_700_000_000)
    rules = read_path(path)
    answer = {"answer": "The dog sleeps [1].", "citations": [{"n": 1}], "markers": [1]}
    stored = judge("req-1", "where does the dog sleep?", User("ann"), answer, 1, rules)
    assert stored.status == "rejected" and stored.rules_version == rules.label
    body = stored.to_dict()
    assert body["withheld"] is True and body["rules_version"] == rules.label
    assert [v["rule"] for v in body["violations"]] == ["no-dogs"]
    assert stored.verdict is not None
    assert [o.to_dict() for o in stored.verdict.outcomes] == [
        {"rule": "no-cards", "kind": "forbidden_pattern", "passed": True, "message": None},
        {
            "rule": "no-dogs",
            "kind": "forbidden_pattern",
            "passed": False,
            "message": "the text matches the forbidden pattern 'dog'",
        },
    ]
    again = judge("req-1", "where does the dog sleep?", User("ann"), dict(answer), 1, rules)
    assert again.verdict is not None
    assert again.verdict.answer_digest == stored.verdict.answer_digest


def test_markers_after_the_full_stop_belong_to_its_sentence() -> None:
    assert sentences("Kafka shares tasks. [1] Yeast ferments sugar. [3] [2]") == [
        "Kafka shares tasks. [1]",
        "Yeast ferments sugar. [3] [2]",
    ]


GROUNDED = parse_rules('[[rule]]\nname = "grounded"\nkind = "grounded"\n')


def test_grounded_approves_the_extractive_answerers_cited_sentences() -> None:
    answerer = ExtractiveAnswerer(LexicalScorer())
    for question in (
        "How does the HNSW index in pgvector trade recall?",
        "How do Kafka Connect workers share connector tasks, and when does dough rise?",
    ):
        answer = answerer.answer(question, PASSAGES)
        assert answer.citations, answer.text
        sources = cited_sources(answer, PASSAGES)
        stored = judge("r", question, User("ann"), answer, len(PASSAGES), GROUNDED, sources)
        assert stored.status == "approved", (answer.text, stored.violations)


def test_grounded_names_the_sentence_no_cited_passage_supports() -> None:
    text = (
        "The HNSW index in pgvector answers nearest-neighbour queries quickly. [2] "
        "The moon landing was filmed in a studio in Nevada. [2]"
    )
    judged = Judged(text, (2,), 3, sources={2: PASSAGES[1].text})
    [violation] = GROUNDED.check(judged)
    assert violation.rule == "grounded"
    assert "moon landing" in violation.message and "HNSW" not in violation.message
    # A sentence supported only by a passage it does not cite is not grounded either.
    wrong = Judged(
        "Bread dough rises when yeast ferments the sugars. [1]",
        (1, 3),
        3,
        sources={1: PASSAGES[0].text, 3: PASSAGES[2].text},
    )
    assert GROUNDED.check(wrong)
    # Without markers in the sentence, any cited passage may support it.
    loose = Judged(
        "Bread dough rises when yeast ferments the sugars.",
        (1, 3),
        3,
        sources={1: PASSAGES[0].text, 3: PASSAGES[2].text},
    )
    assert GROUNDED.check(loose) == []


def test_grounded_fails_closed_and_lets_declined_answers_pass() -> None:
    assert GROUNDED.check(Judged("Nothing relevant was found.", (), 3, declined=True)) == []
    assert GROUNDED.check(Judged("Some claim about things here.", (), 0)) == []
    [no_cite] = GROUNDED.check(Judged("Some claim about things here.", (), 3, sources={}))
    assert "cites no passage" in no_cite.message
    [unknown] = GROUNDED.check(Judged("Some claim about things here. [1]", (1,), 3))
    assert "not available" in unknown.message
    with pytest.raises(RulesError, match="min_overlap"):
        parse_rules('[[rule]]\nname = "g"\nkind = "grounded"\nmin_overlap = 1.5\n')


BANNED = (
    '[[rule]]\nname = "no-advice"\nkind = "banned_topics"\n'
    'topics = ["medical diagnosis, medication dosage or treatment advice",'
    ' "legal advice about lawsuits and contracts"]\n'
)


def test_banned_topics_with_the_real_model_and_fails_closed_without_one() -> None:
    embedder = TransformersEmbedder(bf16=False, fast_path="off")
    rules = parse_rules(BANNED).bind(embedder.embed)

    def verdict(text: str) -> list[str]:
        return [v.message for v in rules.check(Judged(text, (1,), 1))]

    [medical] = verdict(
        "The lighthouse is open daily. Take 400 mg of ibuprofen every six hours for the pain."
    )
    assert "medical diagnosis" in medical and "similarity" in medical
    [legal] = verdict("You should sue your landlord for breach of contract.")
    assert "legal advice" in legal
    for fine in (
        "The lighthouse keeper feeds the grey cat at dawn.",
        "Customers get a full refund within 30 days of purchase.",
        "The with statement calls the context manager's __enter__ and __exit__ methods.",
    ):
        assert verdict(fine) == [], fine
    unbound = parse_rules(BANNED)
    [closed] = unbound.check(Judged("Anything at all.", (1,), 1))
    assert "no embedding model" in closed.message
    with pytest.raises(RulesError, match="topics"):
        parse_rules('[[rule]]\nname = "b"\nkind = "banned_topics"\ntopics = []\n')


def test_live_rules_give_the_model_to_the_rules_that_need_it(tmp_path: Path) -> None:
    path = tmp_path / "answers.toml"
    path.write_text(BANNED + NO_CARDS)
    calls: list[int] = []

    def embed(texts: list[str]) -> Any:
        calls.append(len(texts))
        return np.ones((len(texts), 2)) / np.sqrt(2)  # everything alike: similarity 1

    rules = LiveRules(str(path), embed=embed).current()
    assert calls == []  # nothing embedded before an answer is judged
    assert [v.rule for v in rules.check(Judged("Some answer.", (1,), 1))] == ["no-advice"]
    assert calls == [2, 2]  # the topics once, then the answer and its one sentence
