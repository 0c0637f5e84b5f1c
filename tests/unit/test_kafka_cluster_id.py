"""The local broker's KRaft cluster id never starts with '-': the storage tool would take such
an id for an option and refuse to format (one fresh stack in 64 failed so)."""

from __future__ import annotations

import base64
import uuid

import pytest

from freshet.cdc import kafka


def test_a_cluster_id_is_22_base64url_characters_and_never_starts_with_a_dash(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dash = uuid.UUID(bytes=base64.urlsafe_b64decode("-" + "A" * 21 + "=="))
    fine = uuid.UUID(int=1)
    drawn = iter([dash, dash, fine])
    monkeypatch.setattr(kafka.uuid, "uuid4", lambda: next(drawn))
    cluster_id = kafka.new_cluster_id()
    assert not cluster_id.startswith("-") and len(cluster_id) == 22
    assert base64.urlsafe_b64decode(cluster_id + "==") == fine.bytes
