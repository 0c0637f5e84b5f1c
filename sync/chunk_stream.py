"""The enriched stream as a data product: every document's chunks, with their embeddings, on
the compacted topic ``freshet.chunks`` (FRESHET_PUBLISH_CHUNKS=true), so that another team or
system can build its own index, cache or feature store from it without touching the source
database or re-embedding anything.

Keyed by document (``<schema.table>/<doc_key>``); a document that is deleted, truncated away
or hidden (its row cannot be served) is a tombstone (null value), so compaction keeps exactly
the live documents. The sync worker publishes the state of every document a transaction
touched, read back from the index after that transaction commits and produced before the
batch's offsets are committed (the delivery contract of freshet/consumer.py): the topic never
misses a committed change, and a redelivered batch publishes the same state again (the newest
value per key wins). The value (format 1, JSON Schema in docs/chunks.schema.json):

    {"format": 1, "source_table", "doc_key", "title", "metadata", "access_groups",
     "source_lsn", "source_ts", "model": {"name", "version", "dim"},
     "chunks": [{"chunk_index", "text", "text_hash", "embedding": [...]}]}
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from freshet.consumer import Output

logger = logging.getLogger(__name__)

TOPIC = "freshet.chunks"
FORMAT = 1
# The largest document message: a document of many chunks carries every embedding as JSON
# numbers (about 8 KB per 384-dimension chunk). The topic and the producer take this much.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
PARTITIONS = 4


@dataclass(frozen=True)
class Model:
    name: str
    version: str

    @classmethod
    def of(cls, name: str) -> Model:
        return cls(name, model_version(name))


@cache
def model_version(name: str) -> str:
    """The installed package's version, or for a model directory a digest of its config."""
    try:
        return importlib.metadata.version(name)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        pass
    config = Path(name) / "config.json"
    if config.is_file():
        return "config-sha256:" + hashlib.sha256(config.read_bytes()).hexdigest()[:16]
    return "unknown"


def ensure_topic(bootstrap_servers: str) -> bool:
    """Create the compacted topic when it does not exist; True when this call created it. An
    existing topic is left as it is (a warning when it is not compacted)."""
    from kafka import KafkaAdminClient
    from kafka.admin import ConfigResource, ConfigResourceType, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(
        bootstrap_servers=bootstrap_servers, client_id="freshet-chunks", request_timeout_ms=10000
    )
    try:
        brokers = len(admin.describe_cluster().get("brokers") or ()) or 1
        topic = NewTopic(
            TOPIC,
            num_partitions=PARTITIONS,
            replication_factor=min(3, brokers),
            topic_configs={
                "cleanup.policy": "compact",
                "max.message.bytes": str(MAX_MESSAGE_BYTES),
            },
        )
        try:
            admin.create_topics([topic])
            logger.info("created the compacted topic %s", TOPIC)
            return True
        except TopicAlreadyExistsError:
            pass
        described = admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, TOPIC, ["cleanup.policy"])]
        )
        text = str(described)
        if "compact" not in text:
            logger.warning(
                "topic %s exists and is not compacted: deleted documents' old values stay until"
                " retention removes them (set cleanup.policy=compact)",
                TOPIC,
            )
        return False
    finally:
        admin.close()


def document_key(source_table: str, doc_key: str) -> bytes:
    return f"{source_table}/{doc_key}".encode()


_READ = """
SELECT d.source_table, d.doc_key, d.title, d.metadata, d.access_groups, d.source_lsn,
       d.source_ts, d.deleted_at IS NOT NULL OR d.hidden_reason IS NOT NULL,
       c.chunk_index, c.text, c.text_hash, c.embedding
FROM unnest(%s::text[], %s::text[]) AS k(source_table, doc_key)
JOIN rag.documents d ON d.source_table = k.source_table AND d.doc_key = k.doc_key
LEFT JOIN rag.chunks c ON c.document_id = d.id
ORDER BY d.source_table, d.doc_key, c.chunk_index
"""


def read_documents(conn: Any, keys: Iterable[tuple[str, str]], model: Model) -> list[Output]:
    """One message per document of ``keys`` as the index holds it now: its chunks, or a
    tombstone when it is gone, hidden or unknown."""
    wanted = sorted(set(keys))
    if not wanted:
        return []
    rows = conn.execute(_READ, ([t for t, _ in wanted], [k for _, k in wanted])).fetchall()
    docs: dict[tuple[str, str], dict[str, Any] | None] = dict.fromkeys(wanted)
    for table, key, title, metadata, groups, lsn, ts, gone, index, text, digest, vector in rows:
        if gone:
            continue
        doc = docs.get((table, key))
        if doc is None:
            doc = docs[(table, key)] = {
                "format": FORMAT,
                "source_table": table,
                "doc_key": key,
                "title": title,
                "metadata": metadata or {},
                "access_groups": list(groups or ()),
                "source_lsn": lsn,
                "source_ts": ts.isoformat() if ts else None,
                "model": {"name": model.name, "version": model.version, "dim": None},
                "chunks": [],
            }
        if index is not None:
            embedding = _floats(vector)
            doc["model"]["dim"] = len(embedding)
            doc["chunks"].append(
                {
                    "chunk_index": index,
                    "text": text,
                    "text_hash": digest,
                    "embedding": embedding,
                }
            )
    return [Output(TOPIC, document_key(*key), _value(doc)) for key, doc in docs.items()]


def _floats(vector: Any) -> list[float]:
    """A pgvector value as floats: a pgvector Vector, a numpy array, or text ("[1,2,...]")."""
    if isinstance(vector, str):
        return [float(x) for x in json.loads(vector)]
    if hasattr(vector, "to_list"):  # pgvector.Vector
        vector = vector.to_list()
    return [float(x) for x in vector]


def _value(doc: dict[str, Any] | None) -> bytes | None:
    if doc is None or not doc["chunks"]:
        return None  # a tombstone: the document is not served
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def touched(
    changes: Sequence[Any], truncated: Iterable[tuple[str, str]] = ()
) -> set[tuple[str, str]]:
    """The documents a transaction may have changed: every change's document, and every
    document a TRUNCATE removed."""
    keys = {(c.table, c.doc_key) for c in changes if c.doc_key}
    return keys | set(truncated)


def publish_all(
    conn: Any,
    bootstrap_servers: str,
    model: Model,
    *,
    page: int = 200,
    progress: Callable[[int, int], None] | None = None,
    stop: Callable[[], bool] = lambda: False,
) -> int:
    """Publish every live document of the index (a backfill: documents indexed before
    FRESHET_PUBLISH_CHUNKS was on, or a topic to rebuild); the documents published."""
    from kafka import KafkaProducer

    ensure_topic(bootstrap_servers)
    total_row = conn.execute(
        "SELECT count(*) FROM rag.documents WHERE deleted_at IS NULL AND hidden_reason IS NULL"
    ).fetchone()
    total = int(total_row[0]) if total_row else 0
    producer = KafkaProducer(
        bootstrap_servers=bootstrap_servers,
        acks="all",
        max_request_size=MAX_MESSAGE_BYTES,
        client_id="freshet-publish-chunks",
    )
    done, last_id = 0, 0
    try:
        while not stop():
            rows = conn.execute(
                "SELECT id, source_table, doc_key FROM rag.documents WHERE id > %s"
                " AND deleted_at IS NULL AND hidden_reason IS NULL ORDER BY id LIMIT %s",
                (last_id, page),
            ).fetchall()
            if not rows:
                break
            last_id = rows[-1][0]
            futures = [
                producer.send(out.topic, key=out.key, value=out.value)
                for out in read_documents(conn, [(r[1], r[2]) for r in rows], model)
            ]
            producer.flush(timeout=60)
            for future in futures:
                future.get(timeout=0)  # a refused message fails the backfill loudly
            done += len(rows)
            if progress is not None:
                progress(done, max(total, done))
    finally:
        producer.close(timeout=10)
    return done
