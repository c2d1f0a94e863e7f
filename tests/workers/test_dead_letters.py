"""Dead letters on both DLQ topics keep the refused record's key and headers and carry
the error in headers (Kafka Connect's convention); the body stays the JSON letter."""

from __future__ import annotations

import asyncio
import json

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from support import running

from streaming.embedded import EmbeddedKafka
from streaming.events import DEAD_LETTER_HEADER_PREFIX as P
from streaming.events import DeadLetter
from streaming.settings import Settings
from streaming.topics import ensure_topics


async def _send(bootstrap: str, topic: str, key: bytes, value: bytes) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=key, headers=[("trace", b"t-1")])
    finally:
        await producer.stop()


async def _first(bootstrap: str, topic: str, timeout_s: float):
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        return await asyncio.wait_for(consumer.getone(), timeout_s)
    finally:
        await consumer.stop()


def _check(record, source_topic: str, reason: str) -> None:
    assert record.key == b"k-1"  # the original key, also when the body was unreadable
    headers = dict(record.headers)
    assert headers["trace"] == b"t-1"  # the original headers come first
    assert headers[f"{P}reason"] == reason.encode()
    assert headers[f"{P}topic"] == source_topic.encode()
    assert headers[f"{P}partition"].isdigit() and headers[f"{P}offset"] == b"0"
    assert headers[f"{P}detail"]
    letter = DeadLetter.model_validate_json(record.value)
    assert letter.reason == reason and letter.source.topic == source_topic


async def test_the_workers_dead_letters_keep_key_and_headers(pipeline, engine, scaled):
    s = pipeline.settings
    await pipeline.create_topics()
    async with running(s, engine):
        await _send(s.kafka_bootstrap, s.input_topic, b"k-1", b"{not json")
        record = await _first(s.kafka_bootstrap, s.dlq_topic, scaled(30))
    _check(record, s.input_topic, "not_json")


class _Encoder:
    feature_spec = "fake"
    context = 0

    def encode(self, texts, contexts=None):
        return np.zeros((len(texts), 384), dtype=np.float32)


async def test_the_featurizers_dead_letters_keep_key_and_headers(
    kafka: EmbeddedKafka, unique: str, scaled
):
    from workers.featurize import featurize, text_dlq_topic

    s = Settings(
        kafka_bootstrap=kafka.bootstrap,
        text_topic=f"{unique}-text",
        input_topic=f"{unique}-features",
        featurizer_metrics_port=0,
    )
    await ensure_topics(kafka.bootstrap, {s.text_topic: 1, s.input_topic: 1, text_dlq_topic(s): 1})
    await _send(kafka.bootstrap, s.text_topic, b"k-1", json.dumps([1, 2]).encode())
    stop = asyncio.Event()
    task = asyncio.create_task(featurize(s, stop, _Encoder(), group_id=f"{unique}-f"))
    try:
        record = await _first(kafka.bootstrap, text_dlq_topic(s), scaled(30))
    finally:
        stop.set()
        await asyncio.wait_for(task, scaled(30))
    _check(record, s.text_topic, "not_object")
