"""`cfnesa featurize`: transcripts in, MiniLM feature events out.

An upstream that has speech-to-text but no feature extractor writes plain text
to ``utterance-text``; this process turns it into the ``utterance-features``
contract the workers read. One batch, in `streaming.processor.StreamCore`'s order::

    poll (up to 64 messages or 20 ms) -> process: validate, read the calls' context
        (Redis), encode (executor thread) -> produce features / ends / dead letters
        -> after produce: store the calls' texts (Redis) -> commit offsets

Messages on ``utterance-text`` (JSON, key = conversation_id)::

    {"type": "utterance", "conversation_id": "call-0001", "seq": 12,
     "speaker": "spk-2", "role": "customer", "text": "...", "ts": "2026-11-24T10:00:03.120Z"}
    {"type": "end", "conversation_id": "call-0001", "seq": 40}

"type" may be left out of an utterance; "ts" and "role" (agent, customer or other;
passed on with the features) are optional; "schema_version",
when present, must be 1 (the contract is `streaming.events.TextUtterance` /
`TextEnd`). Anything else goes to ``utterance-text.dlq`` as a
`streaming.events.DeadLetter` with its reason, the original key and headers.

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
retries (nothing is produced without its context, nothing is lost); a Redis error
that waiting does not fix (WRONGTYPE: a key prefix shared by mistake) stops it. A
context-free encoder needs no Redis.

Operations: ``/metrics`` and ``/healthz`` on ``featurizer_metrics_port`` (like the
worker's: 503 with the outage's service, cause and since when; or not started yet).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import ConsumerRecord

from streaming.events import (
    DeadLetter,
    InvalidInput,
    TextEnd,
    TextUtterance,
    dead_letter_headers,
    dump_event,
    end_event,
    format_ts,
    parse_text,
    utterance_event,
)
from streaming.faults import Health
from streaming.processor import Message, StreamCore
from streaming.security import kafka_client_options, redact_url
from streaming.settings import FeaturizerSettings
from streaming.state_store import StateStore
from workers.metrics import FeaturizerMetrics, serve_ops

if TYPE_CHECKING:
    from model.encoder import SentenceEncoder

log = logging.getLogger(__name__)

GROUP_ID = "cfnesa-featurizers"
MAX_BATCH_MESSAGES = 64
MAX_WAIT_MS = 20


def text_dlq_topic(settings: FeaturizerSettings) -> str:
    """The dead-letter topic of ``utterance-text``: ``<text_topic>.dlq``."""
    return f"{settings.text_topic}.dlq"


@dataclass
class FeaturizeStats:
    """What one featurizer process did."""

    utterances: int = 0  # feature events produced
    ends: int = 0  # end events forwarded
    dead_letters: int = 0
    batches: int = 0


class Featurizer:
    """utterance-text in, utterance-features out: one member of the featurizers' group.

    Args:
        settings: topics (text_topic in, input_topic out, ``<text_topic>.dlq``),
            bootstrap servers, Redis, max_message_bytes, consumer timeouts, the
            metrics port.
        encoder: the sentence encoder (the MiniLM `TextEncoder` is loaded when None).
        group_id: the consumer group; featurizers scale out by sharing it.
        max_batch_messages: most messages encoded in one batch.
        max_wait_ms: longest wait for a batch to fill once its first message is in.
        store: where calls' recent texts live for an encoder that reads context
            (default: a store on ``settings.redis_url``; unused without context).
    """

    def __init__(
        self,
        settings: FeaturizerSettings,
        encoder: SentenceEncoder | None = None,
        *,
        group_id: str = GROUP_ID,
        max_batch_messages: int = MAX_BATCH_MESSAGES,
        max_wait_ms: int = MAX_WAIT_MS,
        store: StateStore | None = None,
    ) -> None:
        self.settings = settings
        self.encoder = encoder
        self.group_id = group_id
        self.max_batch_messages = max_batch_messages
        self.max_wait_ms = max_wait_ms
        self.store = store
        self._own_store: StateStore | None = None
        self.context = 0
        self.stats = FeaturizeStats()
        self.metrics = FeaturizerMetrics()
        self.status = Health()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="cfnesa-featurize")
        security = kafka_client_options(settings)
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
        self.core = StreamCore(
            consumer,
            producer,
            servers=servers,
            security=security,
            redis_address=redact_url(settings.redis_url),
            health=self.status,
            on_outage=lambda service: self.metrics.outages.labels(service).inc(),
            on_commit_refused=self.metrics.commit_failures.inc,
        )
        self._ops: asyncio.Server | None = None

    def health(self) -> tuple[bool, dict[str, Any]]:
        """What /healthz reports: (ok, the JSON body)."""
        spec = self.encoder.feature_spec if self.encoder is not None else None
        return self.status.report(feature_spec=spec, context=self.context)

    async def start(self, stop: asyncio.Event) -> bool:
        """Serve /metrics and /healthz, connect to Kafka (the producer first: a wrong
        password or CA fails before the encoder loads), load the encoder, check the
        topics, then Redis for an encoder that reads context; False if stopped."""
        s = self.settings
        if s.featurizer_metrics_port:
            self._ops = await serve_ops(
                s.metrics_host, s.featurizer_metrics_port, self.metrics, self.health
            )
        if not await self.core.start_clients(stop):
            return False
        if self.encoder is None:
            loop = asyncio.get_running_loop()
            self.encoder = await loop.run_in_executor(
                self._executor,
                _load_encoder,
                s.torch_threads,
                s.encoder_backend,
                s.encoder_adapter,
                s.checkpoint,
            )
        self.context = int(getattr(self.encoder, "context", 0))
        if self.context:
            if self.store is None:
                self.store = self._own_store = StateStore.from_settings(s)
            store = self.store
            if not (await self.core.retry(store.ping, stop, service="redis", what="start"))[0]:
                return False
        topics = [s.text_topic, s.input_topic, text_dlq_topic(s)]
        if not await self.core.check_topics(topics, stop):
            return False
        self.core.subscribe([s.text_topic])
        log.info(
            "featurizer up: %s -> %s (group %s, %s%s)",
            s.text_topic,
            s.input_topic,
            self.group_id,
            self.encoder.feature_spec,
            f", {self.context} previous texts per call from Redis" if self.context else "",
        )
        return True

    async def run(self, stop: asyncio.Event) -> FeaturizeStats:
        """Batches until ``stop`` is set (the batch in flight is finished)."""
        if not self.status.started and not await self.start(stop):
            return self.stats
        while not stop.is_set():
            records = await self.core.poll(self.max_batch_messages, self.max_wait_ms)
            if not records:
                continue
            parsed = [_validate(r, self.settings.max_message_bytes) for r in records]
            remember = functools.partial(self._remember, parsed) if self.context else None
            process = functools.partial(self.process, parsed=parsed)
            if not await self.core.run_batch(records, process, stop, after_produce=remember):
                break  # stopped during an outage: nothing committed, re-read later
            self._count(parsed)
        return self.stats

    async def close(self) -> None:
        await self.core.close()
        if self._own_store is not None:
            with contextlib.suppress(Exception):
                await self._own_store.close()
        if self._ops is not None:
            self._ops.close()
        self._executor.shutdown(wait=False)

    async def process(
        self,
        records: Sequence[ConsumerRecord],
        parsed: list[TextUtterance | TextEnd | InvalidInput],
    ) -> list[Message]:
        """The batch's output messages, in input order (contexts read from Redis)."""
        contexts = await self._contexts(parsed) if self.context else None
        texts = [p.text for p in parsed if isinstance(p, TextUtterance)]
        encoder = self.encoder
        assert encoder is not None
        loop = asyncio.get_running_loop()
        if contexts is None:
            vectors = await loop.run_in_executor(self._executor, encoder.encode, texts)  # (N, 384)
        else:
            vectors = await loop.run_in_executor(
                self._executor, lambda: encoder.encode(texts, contexts=contexts)
            )  # (N, 384)
        s = self.settings
        dlq = text_dlq_topic(s)
        out: list[Message] = []
        row = 0
        for record, item in zip(records, parsed, strict=True):
            key = record.key
            if isinstance(item, InvalidInput):
                letter = DeadLetter.from_error(
                    item,
                    record.value or b"",
                    topic=record.topic,
                    partition=record.partition,
                    offset=record.offset,
                )
                headers = dead_letter_headers(letter, record.headers)
                out.append(Message(dlq, key, dump_event(letter), headers))
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
                    role=item.role,
                )
                row += 1
            out.append(Message(s.input_topic, item.conversation_id.encode(), value))
        return out

    async def _contexts(
        self, parsed: list[TextUtterance | TextEnd | InvalidInput]
    ) -> list[list[str]]:
        """Each utterance's previous ``context`` texts of its call (stored ones, then the
        batch's own earlier ones), oldest first."""
        assert self.store is not None
        k = self.context
        utterances = [p for p in parsed if isinstance(p, TextUtterance)]
        stored = await self.store.recent_texts([u.conversation_id for u in utterances], k)
        history: dict[str, dict[int, str]] = {cid: dict(items) for cid, items in stored.items()}
        out = []
        for u in utterances:
            seen = history.setdefault(u.conversation_id, {})
            out.append([seen[seq] for seq in sorted(seen) if seq < u.seq][-k:])
            seen[u.seq] = u.text
        return out

    async def _remember(self, parsed: list[TextUtterance | TextEnd | InvalidInput]) -> None:
        """Store the batch's texts as their calls' context; ended calls' texts expire
        soon."""
        assert self.store is not None
        s = self.settings
        texts = [(p.conversation_id, p.seq, p.text) for p in parsed if isinstance(p, TextUtterance)]
        ended = [p.conversation_id for p in parsed if isinstance(p, TextEnd)]
        await self.store.remember_texts(texts, self.context, s.state_ttl_s)
        await self.store.forget_texts(ended, s.ended_ttl_s)

    def _count(self, parsed: list[TextUtterance | TextEnd | InvalidInput]) -> None:
        st, m = self.stats, self.metrics
        utterances = sum(isinstance(p, TextUtterance) for p in parsed)
        ends = sum(isinstance(p, TextEnd) for p in parsed)
        st.batches += 1
        st.utterances += utterances
        st.ends += ends
        m.batches.inc()
        m.utterances.inc(utterances)
        m.ends.inc(ends)
        for p in parsed:
            if isinstance(p, InvalidInput):
                st.dead_letters += 1
                m.dead_letters.labels(p.reason.value).inc()


async def featurize(
    settings: FeaturizerSettings,
    stop: asyncio.Event,
    encoder: SentenceEncoder | None = None,
    *,
    group_id: str = GROUP_ID,
    max_batch_messages: int = MAX_BATCH_MESSAGES,
    max_wait_ms: int = MAX_WAIT_MS,
    store: StateStore | None = None,
) -> FeaturizeStats:
    """Turn ``utterance-text`` into ``utterance-features`` until ``stop`` is set.

    Args: as `Featurizer`'s; ``stop``: set it to finish the batch in flight, commit
    and return.

    Returns:
        Counts of what was produced.

    Raises:
        streaming.errors.FatalError: what waiting does not fix: authentication or TLS
            failed (Kafka, or Redis for an encoder that reads context), a topic does
            not exist, Redis refused a command (WRONGTYPE). An unreachable broker or
            Redis is waited for.
    """
    featurizer = Featurizer(
        settings,
        encoder,
        group_id=group_id,
        max_batch_messages=max_batch_messages,
        max_wait_ms=max_wait_ms,
        store=store,
    )
    try:
        return await featurizer.run(stop)
    finally:
        await featurizer.close()
        st = featurizer.stats
        log.info(
            "featurizer stopped: %d utterances, %d ends, %d dead letters",
            st.utterances,
            st.ends,
            st.dead_letters,
        )


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


def _validate(record: ConsumerRecord, max_bytes: int) -> TextUtterance | TextEnd | InvalidInput:
    try:
        return parse_text(record.value or b"", max_bytes)
    except InvalidInput as bad:
        return bad
