"""The app's answer store and answer rules, from the answering core's factory.

Asking itself (retrieve -> prompt -> answer -> judge -> keep) is ``freshet.answering.answers``;
this module only finds the store and the rules of one app.
"""

from __future__ import annotations

from flask import Flask, current_app

from freshet.answering.answers import AnswerStore
from freshet.answering.rules import RuleSet


def _app(app: Flask | None) -> Flask:
    return app or current_app._get_current_object()  # type: ignore[attr-defined]


def get_store(app: Flask | None = None) -> AnswerStore:
    store = _app(app).extensions["freshet.answer_store"]
    assert isinstance(store, AnswerStore)
    return store


def get_rules(app: Flask | None = None) -> RuleSet:
    """The answer rules in force now: FRESHET_ANSWER_RULES, looked at again every
    FRESHET_ANSWER_RULES_RELOAD_S seconds (freshet/answering/live_rules.py)."""
    from freshet.web.services import answering

    return answering(_app(app)).rules()


def init_app(app: Flask) -> None:
    from freshet.web.services import answering

    chosen = answering(app).settings.ask_workflow.strip()
    if chosen:  # a wrong FRESHET_ASK_WORKFLOW stops the app at start, naming the file
        from freshet.workflow.definition import load_workflow

        load_workflow(chosen)
    if "freshet.answer_store" in app.extensions:
        return
    app.extensions["freshet.answer_store"] = answering(app).store()
