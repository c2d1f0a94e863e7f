"""Topic names and their creation.

The pipeline creates its topics explicitly at start-up instead of relying on broker
auto-creation: Tansu auto-creates a topic on the first produce or metadata request
for it (with its own default partition count), Apache Kafka may have auto-creation
switched off, and the partition count bounds how far the consumer group scales out.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError
from aiokafka.structs import ConsumerRecord, OffsetAndMetadata, TopicPartition

from streaming.security import start_kafka_client

__all__ = [
    "EMOTION_EVENTS",
    "UTTERANCE_FEATURES",
    "UTTERANCE_FEATURES_DLQ",
    "UTTERANCE_TEXT",
    "TopicSetupError",
    "ensure_topics",
    "next_offsets",
]

log = logging.getLogger(__name__)

UTTERANCE_FEATURES = "utterance-features"
UTTERANCE_FEATURES_DLQ = "utterance-features.dlq"
EMOTION_EVENTS = "emotion-events"
UTTERANCE_TEXT = "utterance-text"

_TOPIC_ALREADY_EXISTS = 36
_RETRY_S = 0.2


class TopicSetupError(RuntimeError):
    """Topics could not be created, or did not show up in metadata in time."""


async def ensure_topics(
    bootstrap: str,
    topics: Mapping[str, int],
    timeout: float = 30,  # noqa: ASYNC109 (one deadline over connect, create and poll)
    replication_factor: int = 1,
    *,
    security: Mapping[str, Any] | None = None,
) -> dict[str, int]:
    """Create the topics that do not exist yet and wait until metadata shows them.

    A topic that exists already is left alone, whatever its partition count (a
    warning is logged when it differs from the one asked for): repartitioning a
    keyed topic moves conversations between partitions, an operator's decision.

    Args:
        bootstrap: ``host:port[,host:port...]`` of the cluster.
        topics: topic name -> number of partitions.
        timeout: seconds for the whole operation; a broker that is not up yet is
            retried until then.
        replication_factor: replicas per partition (1 for the embedded broker).
        security: the clients' TLS / SASL options
            (`streaming.security.kafka_client_options`); None: plaintext.

    Returns:
        topic name -> partition count as the cluster reports it.

    Raises:
        TopicSetupError: the broker refused a topic, or the deadline passed.
        streaming.security.ConnectionSecurityError: authentication or TLS failed (at
            once, not retried until the deadline).
    """
    if not topics:
        return {}
    bad = {name: n for name, n in topics.items() if n < 1}
    if bad:
        raise ValueError(f"partition counts must be >= 1: {bad}")
    deadline = time.monotonic() + timeout
    admin = await _connect(bootstrap, deadline, security or {})
    try:
        created = await _create(admin, topics, replication_factor, deadline)
        return await _wait_for_metadata(admin, topics, created, deadline)
    except TimeoutError as exc:
        raise TopicSetupError(
            f"topics {sorted(topics)} not ready on {bootstrap} within {timeout:g} s"
        ) from exc
    except KafkaError as exc:
        raise TopicSetupError(f"topic setup on {bootstrap} failed: {exc!r}") from exc
    finally:
        await admin.close()


async def _connect(
    bootstrap: str, deadline: float, security: Mapping[str, Any]
) -> AIOKafkaAdminClient:
    """A started admin client; retries a broker that refuses until the deadline (a
    security failure is raised at once)."""
    last: Exception | None = None
    backoff_s = _RETRY_S
    while (remaining := deadline - time.monotonic()) > 0:
        admin = AIOKafkaAdminClient(
            bootstrap_servers=bootstrap,
            request_timeout_ms=max(1000, int(remaining * 1000)),
            client_id="cfnesa-topics",
            **security,
        )
        try:
            await asyncio.wait_for(start_kafka_client(admin, bootstrap, security), remaining)
            return admin
        except (KafkaConnectionError, TimeoutError) as exc:
            last = exc
            await admin.close()
        await asyncio.sleep(min(backoff_s, max(0.0, deadline - time.monotonic())))
        backoff_s = min(2 * backoff_s, 2.0)
    raise TopicSetupError(f"no Kafka broker answered on {bootstrap}: {last!r}") from last


async def _create(
    admin: AIOKafkaAdminClient,
    topics: Mapping[str, int],
    replication_factor: int,
    deadline: float,
) -> set[str]:
    """Create every topic in ``topics``; return the names this call created."""
    new = [NewTopic(name, n, replication_factor) for name, n in topics.items()]
    response = await asyncio.wait_for(
        admin.create_topics(new), max(0.0, deadline - time.monotonic())
    )
    created: set[str] = set()
    failures = []
    for name, code, message in _topic_errors(response):
        if code == 0:
            created.add(name)
        elif code != _TOPIC_ALREADY_EXISTS:
            failures.append(f"{name}: error {code} {message or ''}".rstrip())
    if failures:
        raise TopicSetupError("could not create topics: " + "; ".join(failures))
    return created


def _topic_errors(response: object) -> list[tuple[str, int, str | None]]:
    # CreateTopicsResponse v0 has (topic, error_code); v1+ adds error_message.
    rows = []
    for entry in getattr(response, "topic_errors", []):
        name, code = entry[0], entry[1]
        rows.append((name, code, entry[2] if len(entry) > 2 else None))
    return rows


async def _wait_for_metadata(
    admin: AIOKafkaAdminClient,
    topics: Mapping[str, int],
    created: set[str],
    deadline: float,
) -> dict[str, int]:
    """Poll metadata until every topic has all its partitions with a leader."""
    names = list(topics)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        # After create_topics: this metadata request may auto-create on some brokers,
        # but the topics exist by now, so it never picks a partition count.
        described = await asyncio.wait_for(admin.describe_topics(names), remaining)
        counts = {
            t["topic"]: len(t["partitions"])
            for t in described
            if t["error_code"] == 0 and all(p["leader"] >= 0 for p in t["partitions"])
        }
        ready = all(
            counts.get(name, 0) == n if name in created else counts.get(name, 0) >= 1
            for name, n in topics.items()
        )
        if ready:
            for name, n in topics.items():
                if counts[name] != n:
                    log.warning(
                        "topic %s exists with %d partitions (asked for %d); left as it is",
                        name,
                        counts[name],
                        n,
                    )
            return {name: counts[name] for name in names}
        await asyncio.sleep(min(_RETRY_S, max(0.0, deadline - time.monotonic())))


def next_offsets(records: Iterable[ConsumerRecord]) -> dict[TopicPartition, OffsetAndMetadata]:
    """The offsets to commit once ``records`` are done: per partition, one past the
    highest offset processed."""
    offsets: dict[TopicPartition, OffsetAndMetadata] = {}
    for r in records:
        tp = TopicPartition(r.topic, r.partition)
        if tp not in offsets or offsets[tp].offset <= r.offset:
            offsets[tp] = OffsetAndMetadata(r.offset + 1, "")
    return offsets
