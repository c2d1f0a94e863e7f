"""The whole pipeline over secure connections, from settings alone: text in on
``utterance-text`` -> the featurizer -> ``utterance-features`` -> the worker (state
in Redis) -> ``emotion-events`` -> the WebSocket gateway -> a subscribed client.

Kafka is the embedded Tansu behind the TLS-terminating proxy (Tansu advertises the
proxy, so the clients never learn the broker's plaintext port); Redis is the Debian
redis-server with TLS, reached at rediss:// as an ACL user (tests/fixtures_tls.py).
Everything runs in-process, as in the other pipeline tests, and is stopped here.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError
from fixtures_services import FAST_GROUP
from support import running
from websockets.asyncio.client import ClientConnection, connect

from streaming.events import text_end_message, text_message
from streaming.gateway import TokenSigner, serve_gateway
from streaming.security import kafka_client_options, start_kafka_client
from streaming.settings import Settings
from streaming.state_store import StateStore
from streaming.topics import ensure_topics
from workers.featurize import Featurizer, text_dlq_topic

pytestmark = pytest.mark.slow

SECRET = "a-test-secret-of-enough-length"

CALLS = [
    ["Hi, I was charged twice this month.", "I'm sorry, let me check.", "This is ridiculous!"],
    ["Good morning!", "Great news: the refund went through.", "Thank you so much!", "Bye."],
    ["Is anyone there?", "Yes, hello."],  # not subscribed by the call-scoped client
]


async def _acl_user(url: str, user: str, password: str) -> None:
    admin = aioredis.from_url(url)  # the default user, on the plaintext set-up port
    try:
        await admin.execute_command("ACL", "SETUSER", user, "on", f">{password}", "~*", "+@all")
    finally:
        await admin.aclose()


async def _clients_of(url: str, user: str) -> list[dict[str, str]]:
    """CLIENT LIST's entries of ``user`` (read on the plaintext set-up port)."""
    admin = aioredis.from_url(url)
    try:
        listed = await admin.execute_command("CLIENT", "LIST")
    finally:
        await admin.aclose()
    text = listed.decode() if isinstance(listed, bytes) else str(listed)
    entries = [
        dict(f.split("=", 1) for f in line.split() if "=" in f) for line in text.splitlines()
    ]
    return [e for e in entries if e.get("user") == user]


async def _produce(settings: Settings, messages: list[tuple[str, bytes]]) -> None:
    security = kafka_client_options(settings)
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers(), **security)
    await start_kafka_client(producer, settings.bootstrap_servers(), security)
    try:
        for key, value in messages:
            await producer.send(settings.text_topic, value=value, key=key.encode())
        await producer.flush()
    finally:
        await producer.stop()


@contextlib.asynccontextmanager
async def _featurizer(settings: Settings, group_id: str) -> AsyncIterator[Featurizer]:
    """An in-process featurizer that has connected (over TLS) and subscribed."""
    featurizer = Featurizer(settings, group_id=group_id)  # its encoder: the workers' model's
    stop = asyncio.Event()
    try:
        assert await featurizer.start(stop)
        task = asyncio.create_task(featurizer.run(stop))
        try:
            yield featurizer
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
    finally:
        await featurizer.close()


@contextlib.asynccontextmanager
async def _gateway(settings: Settings, timeout_s: float) -> AsyncIterator[int]:
    """An in-process gateway on a free port; yields the port once clients can connect."""
    stop = asyncio.Event()
    bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve_gateway(settings, stop, ready=bound.set_result))
    done, _ = await asyncio.wait({task, bound}, timeout=timeout_s, return_when="FIRST_COMPLETED")
    if bound not in done:
        stop.set()
        await task  # raises what prevented the start
        raise AssertionError("the gateway did not start")
    try:
        yield bound.result()
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout_s)


async def _recv(ws: ClientConnection, timeout_s: float) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout_s))


async def _subscribe(ws: ClientConnection, timeout_s: float, **body: Any) -> None:
    await ws.send(json.dumps({"op": "subscribe", **body}))
    reply = await _recv(ws, timeout_s)
    assert reply["type"] == "subscribed", reply
    for _ in body.get("conversations", ()):
        snapshot = await _recv(ws, timeout_s)  # nothing yet: the calls start later
        assert snapshot["type"] == "snapshot" and snapshot["events"] == [], snapshot


async def _until_emotions(
    ws: ClientConnection, wanted: dict[str, int], timeout_s: float
) -> list[dict[str, Any]]:
    """Messages until every call of ``wanted`` has that many emotion events."""
    got: list[dict[str, Any]] = []

    def missing() -> bool:
        counts = {cid: 0 for cid in wanted}
        for e in got:
            if e.get("type") == "emotion" and e["conversation_id"] in counts:
                counts[e["conversation_id"]] += 1
        return counts != wanted

    async with asyncio.timeout(timeout_s):
        while missing():
            got.append(json.loads(await ws.recv()))
    return got


async def test_text_to_gateway_client_over_tls_kafka_and_tls_redis_with_settings_alone(
    tls_kafka, tls_redis, pki, engine, unique, scaled
):
    """Featurizer, worker and gateway, configured by settings alone (SSL to the Kafka
    proxy with the test CA, rediss:// with the CA and an ACL user), turn text calls
    into emotion events that a subscribed WebSocket client receives in seq order."""
    await _acl_user(tls_redis.url, unique, "pipeline-pw")
    settings = Settings(
        kafka_bootstrap=tls_kafka.bootstrap,  # the proxy: the only address anyone knows
        kafka_security_protocol="SSL",
        kafka_ssl_cafile=pki.ca,
        redis_url=tls_redis.tls_url,
        redis_ssl_cafile=pki.ca,
        redis_username=unique,
        redis_password="pipeline-pw",
        text_topic=f"{unique}-text",
        input_topic=f"{unique}-features",
        output_topic=f"{unique}-events",
        dlq_topic=f"{unique}-features.dlq",
        group_id=f"{unique}-workers",
        key_prefix=unique,
        include_text=True,  # the transcript rides along: text in, the same text out
        metrics_port=0,
        featurizer_metrics_port=0,
        gateway_port=0,
        gateway_secret=SECRET,
        max_wait_ms=5,
        torch_threads=1,
        **FAST_GROUP,
    )
    assert settings.bootstrap_servers() == [tls_kafka.bootstrap]  # not the broker's port
    security = kafka_client_options(settings)
    assert security["security_protocol"] == "SSL"
    topics = {settings.text_topic: 2, settings.input_topic: 2, settings.output_topic: 2}
    topics |= {settings.dlq_topic: 1, text_dlq_topic(settings): 1}
    await ensure_topics(settings.kafka_bootstrap, topics, scaled(30), security=security)

    # the proxy's port speaks TLS only: a plaintext client cannot even bootstrap
    plain = AIOKafkaProducer(bootstrap_servers=tls_kafka.bootstrap, request_timeout_ms=5_000)
    with pytest.raises(KafkaConnectionError):
        await asyncio.wait_for(plain.start(), scaled(30))
    await plain.stop()

    cids = [f"{unique}-call-{i}" for i in range(len(CALLS))]
    subscribed = {cids[0]: len(CALLS[0]), cids[1]: len(CALLS[1])}
    everything = {cid: len(texts) for cid, texts in zip(cids, CALLS, strict=True)}
    messages: list[tuple[str, bytes]] = []
    for seq in range(max(map(len, CALLS)) + 1):  # interleaved, as live calls arrive
        for cid, texts in zip(cids, CALLS, strict=True):
            if seq < len(texts):
                messages.append(
                    (cid, text_message(cid, seq, ("customer", "agent")[seq % 2], texts[seq]))
                )
            elif seq == len(texts):
                messages.append((cid, text_end_message(cid, seq)))

    signer = TokenSigner(SECRET)
    wait_s = scaled(15)
    handshakes = [tls_kafka.proxy.handshakes]
    async with running(settings, engine):
        handshakes.append(tls_kafka.proxy.handshakes)  # the worker connected
        async with _featurizer(settings, f"{unique}-featurizers"):
            handshakes.append(tls_kafka.proxy.handshakes)  # the featurizer connected
            async with _gateway(settings, scaled(30)) as port:
                handshakes.append(tls_kafka.proxy.handshakes)  # the gateway connected
                url = f"ws://127.0.0.1:{port}/ws?token="
                by_call_token = signer.mint("default", (f"{unique}-call-*",))
                all_token = signer.mint("default", (), all_conversations=True)
                async with (
                    connect(url + by_call_token) as by_call,
                    connect(url + all_token) as all_,
                ):
                    await _subscribe(by_call, wait_s, conversations=list(subscribed))
                    await _subscribe(all_, wait_s, all=True)
                    await _produce(settings, messages)
                    handshakes.append(tls_kafka.proxy.handshakes)
                    seen_all = await _until_emotions(all_, everything, scaled(120))
                    got = await _until_emotions(by_call, subscribed, scaled(30))
                    # the unsubscribed call's events went through the gateway (the other
                    # client has them all); everything routed to this client is queued
                    # before the reply to a later request
                    await by_call.send(json.dumps({"op": "unsubscribe", "all": True}))
                    while (message := await _recv(by_call, wait_s)).get("type") != "unsubscribed":
                        got.append(message)
                redis_clients = await _clients_of(tls_redis.url, unique)

    # every component opened its Kafka connections through the TLS proxy
    assert all(b > a for a, b in itertools.pairwise(handshakes)), handshakes

    # every utterance of a subscribed call: one emotion event, in seq order, its text
    assert {e["conversation_id"] for e in got} <= set(subscribed), "another call's event"
    for cid, texts in zip(cids, CALLS, strict=True):
        for events in ([got] if cid in subscribed else []) + [seen_all]:
            emotions = [e for e in events if e["type"] == "emotion" and e["conversation_id"] == cid]
            assert [e["seq"] for e in emotions] == list(range(len(texts))), cid
            assert [e["text"] for e in emotions] == texts, cid
            assert all(e["emotion"] in engine.label_names for e in emotions)
            assert all(e.get("tenant") is None for e in emotions)

    # the worker's and the gateway's Redis connections: the ACL user, on the TLS port
    assert redis_clients, "no Redis connection of the pipeline's user"
    ports = {e["laddr"].rsplit(":", 1)[1] for e in redis_clients}
    assert ports == {str(tls_redis.tls_port)}, (ports, tls_redis.tls_port, tls_redis.port)

    # the state lives in the TLS Redis
    store = StateStore.from_settings(settings)
    try:
        stored = await store.events(cids)
    finally:
        await store.close()
    for cid, texts in zip(cids, CALLS, strict=True):
        kinds = [json.loads(raw) for raw in stored[cid]]
        assert len([e for e in kinds if e["type"] == "emotion"]) == len(texts), cid
