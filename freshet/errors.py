"""Freshet's errors: every failure a user can act on is a ``FreshetError``.

The ``freshet`` command catches ``FreshetError`` once and prints its message (one line that says
what went wrong and what to do) instead of a traceback; anything else is a bug and keeps its
traceback.

The tree::

    FreshetError
"""

from __future__ import annotations


class FreshetError(Exception):
    """A failure the user can act on; the message says what went wrong and what to do."""
