"""`cfnesa featurize`: transcripts in, MiniLM feature events out.

An upstream that has speech-to-text but no feature extractor writes plain text
to ``utterance-text``; this process turns it into the ``utterance-features``
contract the workers read. One batch::

    poll (up to 64 messages or 20 ms) -> validate -> encode (executor thread)
        -> produce features / ends / dead letters -> commit offsets

Messages on ``utterance-text`` (JSON, key = conversation_id)::

    {"type": "utterance", "conversation_id": "call-0001", "seq": 12,
     "speaker": "customer", "text": "...", "ts": "2026-11-24T10:00:03.120Z"}
    {"type": "end", "conversation_id": "call-0001", "seq": 40}

"type" may be left out of an utterance; "ts" is optional; "schema_version",
when present, must be 1. Anything else goes to ``utterance-text.dlq`` as a
`streaming.events.DeadLetter` with its reason.

Delivery is at least once: offsets are committed after the batch's events are
acknowledged, so a crash re-encodes the uncommitted tail. The workers treat a
repeated seq as a duplicate, so that is harmless.

An encoder that reads causal context (an adapter fine-tuned with ``--context K``)
needs each call's previous K texts. They live in Redis, next to the call's model
state (``{prefix}:{<conversation_id>}:texts``, the last K by seq, with the state's
TTL), so any featurizer of the group can take a call over after a rebalance or a
crash. A batch reads them before encoding (earlier utterances of the same batch are
added in order; only seqs below an utterance's own are its context) and writes its
own texts after its events are acknowledged, before the offsets are committed: a
replay after a crash sees the same context as the first pass did for every event
the workers have not yet seen. While Redis is unreachable the featurizer waits and
retries (nothing is produced without its context, nothing is lost). A context-free
encoder needs no Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord
from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError

from streaming.events import (
    ConversationId,
    DeadLetter,
    DeadLetterReason,
    InvalidInput,
    SchemaVersion,
    Seq,
    Speaker,
    Timestamp,
    dump_event,
    end_event,
    format_ts,
    utterance_event,
)
from streaming.security import (
    kafka_client_options,
    redact_url,
    security_failure,
    start_kafka_client,
)
from streaming.settings import Settings
from streaming.state_store import StateStore
from streaming.topics import next_offsets

if TYPE_CHECKING:
    from model.encoder import SentenceEncoder

log = logging.getLogger(__name__)

GROUP_ID = "cfnesa-featurizers"
MAX_BATCH_MESSAGES = 64
MAX_WAIT_MS = 20
MAX_TEXT_CHARS = 10_000  # the features contract's limit on the transcript field


def text_dlq_topic(settings: Settings) -> str:
    """The dead-letter topic of ``utterance-text``: ``<text_topic>.dlq``."""
    return f"{settings.text_topic}.dlq"


# ---------------------------------------------------------------- the text contract


class TextUtterance(BaseModel):
    """One utterance as text (topic ``utterance-text``)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    type: Literal["utterance"] = "utterance"
    schema_version: SchemaVersion = 1
    conversation_id: ConversationId
    seq: Seq
    speaker: Speaker
    text: Annotated[str, StringConstraints(max_length=MAX_TEXT_CHARS)]
    ts: Timestamp | None = None


class TextEnd(BaseModel):
    """The end of a conversation (topic ``utterance-text``), forwarded as an end event."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    type: Literal["end"]
    schema_version: SchemaVersion = 1
    conversation_id: ConversationId
    seq: Seq
    ts: Timestamp | None = None


def text_message(
    conversation_id: str, seq: int, speaker: str, text: str, ts: str | None = None
) -> bytes:
    """Build an ``utterance-text`` utterance message (replay, tests)."""
    message = {
        "type": "utterance",
        "conversation_id": conversation_id,
        "seq": seq,
        "speaker": speaker,
        "text": text,
        "ts": ts,
    }
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def text_end_message(conversation_id: str, seq: int, ts: str | None = None) -> bytes:
    """Build an ``utterance-text`` end message (replay, tests)."""
    message = {"type": "end", "conversation_id": conversation_id, "seq": seq, "ts": ts}
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


# pydantic error types meaning "no usable conversation id" rather than a malformed one
_MISSING = frozenset({"missing", "string_too_short", "string_type"})


def parse_text(raw: bytes, max_bytes: int) -> TextUtterance | TextEnd:
    """Validate one ``utterance-text`` message.

    Raises:
        InvalidInput: with the reason, and the conversation id and seq where readable.
    """
    if len(raw) > max_bytes:
        raise InvalidInput(DeadLetterReason.OVERSIZE, f"{len(raw)} bytes > limit {max_bytes}")
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InvalidInput(DeadLetterReason.NOT_JSON, str(exc)[:200]) from exc
    if not isinstance(obj, dict):
        raise InvalidInput(DeadLetterReason.NOT_OBJECT, f"expected an object, got {obj!r:.40}")
    cid = obj.get("conversation_id") if isinstance(obj.get("conversation_id"), str) else None
    seq = obj.get("seq") if type(obj.get("seq")) is int else None
    kind = obj.get("type", "utterance")
    model: type[TextUtterance | TextEnd]
    if kind == "utterance":
        model = TextUtterance
    elif kind == "end":
        model = TextEnd
    else:
        raise InvalidInput(
            DeadLetterReason.UNKNOWN_TYPE, f"type {kind!r:.40} is not utterance or end", cid, seq
        )
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        field = str(error["loc"][0]) if error["loc"] else ""
        if field == "schema_version":
            reason = DeadLetterReason.UNSUPPORTED_SCHEMA_VERSION
        elif field == "conversation_id" and error["type"] in _MISSING:
            reason = DeadLetterReason.MISSING_CONVERSATION_ID
            cid = None
        elif field == "seq":
            reason = DeadLetterReason.BAD_SEQ
            seq = None
        else:
            reason = DeadLetterReason.INVALID
        detail = f"{'.'.join(map(str, error['loc']))}: {error['msg']}"
        raise InvalidInput(reason, detail[:200], cid, seq) from exc


# ---------------------------------------------------------------- the loop


@dataclass
class FeaturizeStats:
    """What one featurizer process did."""

    utterances: int = 0  # feature events produced
    ends: int = 0  # end events forwarded
    dead_letters: int = 0
    batches: int = 0


@dataclass
class _Batch:
    """One poll's records, validated, and what they become."""

    records: list[ConsumerRecord]
    parsed: list[TextUtterance | TextEnd | InvalidInput]


async def featurize(
    settings: Settings,
    stop: asyncio.Event,
    encoder: SentenceEncoder | None = None,
    *,
    group_id: str = GROUP_ID,
    max_batch_messages: int = MAX_BATCH_MESSAGES,
    max_wait_ms: int = MAX_WAIT_MS,
    store: StateStore | None = None,
) -> FeaturizeStats:
    """Turn ``utterance-text`` into ``utterance-features`` until ``stop`` is set.

    Args:
        settings: topics (text_topic in, input_topic out, ``<text_topic>.dlq``),
            bootstrap servers, max_message_bytes, consumer timeouts.
        stop: set it to finish the batch in flight, commit and return.
        encoder: a sentence encoder to reuse (the MiniLM `TextEncoder` is loaded
            when None).
        group_id: the consumer group; featurizers scale out by sharing it.
        max_batch_messages: most messages encoded in one batch.
        max_wait_ms: longest wait for a batch to fill once its first message is in.
        store: where calls' recent texts live for an encoder that reads context
            (default: a store on ``settings.redis_url``; unused without context).

    Returns:
        Counts of what was produced.

    Raises:
        streaming.security.ConnectionSecurityError: authentication or TLS failed at
            start (Kafka, or Redis for an encoder that reads context): fatal, where an
            unreachable broker or Redis is waited for.
    """
    security = kafka_client_options(settings)
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(1, thread_name_prefix="cfnesa-featurize")
    servers = settings.bootstrap_servers()
    producer = AIOKafkaProducer(
        bootstrap_servers=servers,
        acks="all",
        linger_ms=2,
        max_request_size=max(settings.max_message_bytes * 2, 1_048_576),
        **security,
    )
    consumer = AIOKafkaConsumer(
        bootstrap_servers=servers,
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=settings.fetch_max_wait_ms,
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=settings.heartbeat_interval_ms,
        max_poll_interval_ms=settings.max_poll_interval_ms,
        **security,
    )
    stats = FeaturizeStats()
    own_store = None
    try:
        # the producer first: a wrong password or CA fails before the encoder loads
        if not await _start(producer, stop, servers, security):
            return stats
        if encoder is None:
            encoder = await loop.run_in_executor(
                executor,
                _load_encoder,
                settings.torch_threads,
                settings.encoder_backend,
                settings.encoder_adapter,
                settings.checkpoint,
            )
        context = int(getattr(encoder, "context", 0))
        if context and store is None:
            store = own_store = StateStore.from_settings(settings)
        if not await _start(consumer, stop, servers, security):
            return stats
        if context and store is not None:
            ok, _ = await _retry_redis("start-up", store.ping, stop, settings.redis_url)
            if not ok:
                return stats
        consumer.subscribe([settings.text_topic])
        log.info(
            "featurizer up: %s -> %s (group %s, %s%s)",
            settings.text_topic,
            settings.input_topic,
            group_id,
            encoder.feature_spec,
            f", {context} previous texts per call from Redis" if context else "",
        )
        while not stop.is_set():
            records = await _poll(consumer, max_batch_messages, max_wait_ms)
            if not records:
                continue
            batch = _Batch(records, [_validate(r, settings.max_message_bytes) for r in records])
            contexts = None
            if context and store is not None:
                contexts = await _contexts(batch, store, context, stop)
                if contexts is None:
                    break  # stopped while Redis was down: nothing produced, re-read later
            events = await _encode(batch, encoder, settings, executor, contexts)
            if not await _produce(producer, events, stop):
                break  # stopped while Kafka was down: nothing committed, re-read later
            if (
                context
                and store is not None
                and not await _remember(batch, store, context, settings, stop)
            ):
                break  # produced, not committed: re-read later, duplicates dropped
            await _commit(consumer, records)
            stats.batches += 1
            stats.utterances += sum(isinstance(p, TextUtterance) for p in batch.parsed)
            stats.ends += sum(isinstance(p, TextEnd) for p in batch.parsed)
            stats.dead_letters += sum(isinstance(p, InvalidInput) for p in batch.parsed)
    finally:
        with contextlib.suppress(Exception):
            await consumer.stop()
        with contextlib.suppress(Exception):
            await producer.stop()
        if own_store is not None:
            with contextlib.suppress(Exception):
                await own_store.close()
        executor.shutdown(wait=False)
        log.info(
            "featurizer stopped: %d utterances, %d ends, %d dead letters",
            stats.utterances,
            stats.ends,
            stats.dead_letters,
        )
    return stats


def _load_encoder(
    threads: int, backend: str = "torch", adapter: str = "", checkpoint: Path | None = None
) -> SentenceEncoder:
    """The encoder ``adapter`` names; unnamed: the one that makes the features of the
    workers' ``checkpoint`` (an installed adapter), else the shipped one."""
    from model.encoder import DEFAULT, TextEncoder, adapter_for_spec

    chosen: Any = adapter or DEFAULT
    if not adapter and checkpoint is not None:
        from model.checkpoint import resolve_checkpoint
        from model.config import ModelConfig

        folder = resolve_checkpoint(checkpoint)
        config = ModelConfig.from_json((folder / "config.json").read_text())
        chosen = adapter_for_spec(config.feature_spec) or "none"
    return TextEncoder(threads=threads or None, backend=backend, adapter=chosen)


async def _start(
    client: AIOKafkaProducer | AIOKafkaConsumer,
    stop: asyncio.Event,
    servers: list[str],
    security: dict[str, Any],
) -> bool:
    """Start a Kafka client, retrying with backoff until it connects or ``stop`` is set;
    a security failure (wrong password, untrusted certificate) is raised at once."""
    delay = 0.2
    while not stop.is_set():
        try:
            await start_kafka_client(client, servers, security)
            return True
        except KafkaError as exc:
            log.warning("kafka unavailable (%s); retrying in %.1fs", exc, delay)
            await _sleep_unless(stop, delay)
            delay = min(delay * 2, 5.0)
    return False


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def _poll(consumer: AIOKafkaConsumer, max_messages: int, max_wait_ms: int) -> list[Any]:
    """Up to ``max_messages`` records: wait for the first, then at most ``max_wait_ms``."""
    found = await consumer.getmany(timeout_ms=200, max_records=max_messages)
    records = [r for part in found.values() for r in part]
    if not records:
        return records
    deadline = time.monotonic() + max_wait_ms / 1000
    while len(records) < max_messages:
        left_ms = int((deadline - time.monotonic()) * 1000)
        if left_ms <= 0:
            break
        more = await consumer.getmany(timeout_ms=left_ms, max_records=max_messages - len(records))
        records.extend(r for part in more.values() for r in part)
    return records


def _validate(record: ConsumerRecord, max_bytes: int) -> TextUtterance | TextEnd | InvalidInput:
    try:
        return parse_text(record.value or b"", max_bytes)
    except InvalidInput as bad:
        return bad


async def _retry_redis(
    what: str, call: Any, stop: asyncio.Event, url: str = ""
) -> tuple[bool, Any]:
    """(True, result) of ``await call()``, retried with backoff while Redis is
    unreachable; (False, None) when ``stop`` is set first. A security failure (wrong
    password, untrusted certificate) is raised, not retried."""
    from redis.exceptions import RedisClusterException, RedisError

    delay = 0.2
    while not stop.is_set():
        try:
            return True, await call()
        except (RedisError, RedisClusterException, OSError) as exc:
            failure = security_failure(exc, service="redis", address=redact_url(url))
            if failure is not None:
                raise failure from exc
            log.warning("redis unavailable for %s (%s); retrying in %.1fs", what, exc, delay)
            await _sleep_unless(stop, delay)
            delay = min(delay * 2, 5.0)
    return False, None


async def _contexts(
    batch: _Batch, store: StateStore, k: int, stop: asyncio.Event
) -> list[list[str]] | None:
    """Each utterance's previous ``k`` texts of its call (stored ones, then the batch's
    own earlier ones), oldest first; None when stopped while Redis was down."""
    utterances = [p for p in batch.parsed if isinstance(p, TextUtterance)]
    ids = [u.conversation_id for u in utterances]
    ok, stored = await _retry_redis("call context", lambda: store.recent_texts(ids, k), stop)
    if not ok:
        return None
    history: dict[str, dict[int, str]] = {cid: dict(items) for cid, items in stored.items()}
    out = []
    for u in utterances:
        seen = history.setdefault(u.conversation_id, {})
        out.append([seen[seq] for seq in sorted(seen) if seq < u.seq][-k:])
        seen[u.seq] = u.text
    return out


async def _remember(
    batch: _Batch, store: StateStore, k: int, settings: Settings, stop: asyncio.Event
) -> bool:
    """Store the batch's texts as their calls' context; ended calls' texts expire soon."""
    texts = [
        (p.conversation_id, p.seq, p.text) for p in batch.parsed if isinstance(p, TextUtterance)
    ]
    ended = [p.conversation_id for p in batch.parsed if isinstance(p, TextEnd)]

    async def write() -> None:
        await store.remember_texts(texts, k, settings.state_ttl_s)
        await store.forget_texts(ended, settings.ended_ttl_s)

    ok, _ = await _retry_redis("call context", write, stop, settings.redis_url)
    return ok


async def _encode(
    batch: _Batch,
    encoder: SentenceEncoder,
    settings: Settings,
    executor: ThreadPoolExecutor,
    contexts: list[list[str]] | None = None,
) -> list[tuple[str | None, bytes, str]]:
    """The batch's output messages as (key, value, topic), in input order."""
    texts = [p.text for p in batch.parsed if isinstance(p, TextUtterance)]
    loop = asyncio.get_running_loop()
    if contexts is None:
        vectors = await loop.run_in_executor(executor, encoder.encode, texts)  # (N, 384)
    else:
        vectors = await loop.run_in_executor(
            executor, lambda: encoder.encode(texts, contexts=contexts)
        )  # (N, 384)
    dlq = text_dlq_topic(settings)
    out: list[tuple[str | None, bytes, str]] = []
    row = 0
    for record, item in zip(batch.records, batch.parsed, strict=True):
        if isinstance(item, InvalidInput):
            letter = DeadLetter.from_error(
                item,
                record.value or b"",
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
            )
            out.append((item.conversation_id, dump_event(letter), dlq))
            continue
        ts = None if item.ts is None else format_ts(item.ts)
        if isinstance(item, TextEnd):
            value = end_event(item.conversation_id, item.seq, ts=ts)
        else:
            value = utterance_event(
                item.conversation_id,
                item.seq,
                item.speaker,
                {"text": vectors[row]},
                encoder.feature_spec,
                text=item.text,
                ts=ts,
            )
            row += 1
        out.append((item.conversation_id, value, settings.input_topic))
    return out


async def _produce(
    producer: AIOKafkaProducer,
    events: Sequence[tuple[str | None, bytes, str]],
    stop: asyncio.Event,
) -> bool:
    """Send the batch's events and wait for every acknowledgement, retrying while
    Kafka is down. False when ``stop`` was set before they all went out."""
    delay = 0.2
    while True:
        try:
            futures = [
                await producer.send(topic, value=value, key=key.encode() if key else None)
                for key, value, topic in events
            ]
            await asyncio.gather(*futures)
            return True
        except KafkaError as exc:
            # A partial send re-sends the whole batch: duplicates, never gaps.
            log.warning("kafka unavailable (%s); batch re-sent in %.1fs", exc, delay)
            if stop.is_set():
                return False
            await _sleep_unless(stop, delay)
            if stop.is_set():
                return False
            delay = min(delay * 2, 5.0)


async def _commit(consumer: AIOKafkaConsumer, records: Sequence[ConsumerRecord]) -> None:
    try:
        await consumer.commit(next_offsets(records))
    except KafkaError as exc:
        # A rebalance took the partitions: the next owner re-reads from the last
        # committed offset and re-encodes; the workers drop the duplicates.
        log.warning("offset commit refused (%s); the new owner re-reads", exc)
