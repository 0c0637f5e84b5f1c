"""What the step kinds share: reading a step message and passing its fields on."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from freshet.answering.messages import AnswerRequest, MessageError, loads
from freshet.answering.retrieval import Passage

# Fields an answer carries on from its request, for synthesize and the validator.
CARRIED = ("parent", "part", "parts", "parent_question", "deadline")


def request_of(record: Any, max_k: int) -> tuple[AnswerRequest, dict[str, Any]]:
    """The request in a step message, and the message's whole JSON."""
    body = loads(record.value)
    return AnswerRequest.decode(record.value, max_k=max_k), body


def carried(body: Mapping[str, Any]) -> dict[str, Any]:
    return {k: body[k] for k in CARRIED if k in body}


def passage_from_dict(data: Mapping[str, Any]) -> Passage:
    try:
        stamp = data.get("source_ts")
        return Passage(
            chunk_id=int(data["chunk_id"]),
            document_id=int(data["document_id"]),
            source_table=str(data["source_table"]),
            doc_key=str(data["doc_key"]),
            chunk_index=int(data["chunk_index"]),
            text=str(data["text"]),
            metadata=dict(data.get("metadata") or {}),
            access_groups=tuple(data.get("access_groups") or ()),
            source_lsn=int(data.get("source_lsn") or 0),
            source_ts=datetime.fromisoformat(stamp) if stamp else None,
            title=data.get("title"),
            score=float(data.get("score") or 0.0),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise MessageError(f"a passage cannot be read: {exc!r}") from None
