"""The embedded Tansu broker and redis-server: real processes on free loopback ports."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
import redis.exceptions
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from streaming.embedded import (
    EmbeddedKafka,
    EmbeddedRedis,
    EmbeddedRedisCluster,
    Services,
    ServiceStartError,
    free_port,
    redis_server_binary,
    tansu_binary,
)
from streaming.topics import (
    EMOTION_EVENTS,
    UTTERANCE_FEATURES,
    UTTERANCE_FEATURES_DLQ,
    UTTERANCE_TEXT,
    TopicSetupError,
    ensure_topics,
)

pytest_plugins = ["fixtures_services"]

ROOT = Path(__file__).resolve().parents[2]
Scale = Callable[[float], float]


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still "exists"; it is dead for our purpose.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ", 1)[1].startswith("Z"))


async def _partitions(bootstrap: str, topics: list[str]) -> dict[str, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics(topics)
    finally:
        await admin.close()
    return {t["topic"]: len(t["partitions"]) for t in described if t["error_code"] == 0}


async def _consume(
    bootstrap: str, topic: str, group: str, n: int, timeout_s: float, fast_group: dict[str, int]
) -> list[tuple[bytes, bytes]]:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        **fast_group,
    )
    await consumer.start()
    got: list[tuple[bytes, bytes]] = []
    try:
        async with asyncio.timeout(timeout_s):
            while len(got) < n:
                batches = await consumer.getmany(timeout_ms=200)
                got += [(m.key, m.value) for ms in batches.values() for m in ms]
        await consumer.commit()
    finally:
        await consumer.stop()
    return got


def test_binaries_ship_in_the_wheels():
    for path in (tansu_binary(), redis_server_binary()):
        assert path.is_file() and os.access(path, os.X_OK), path


def test_free_port_is_bindable():
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_topic_names():
    names = [UTTERANCE_FEATURES, UTTERANCE_FEATURES_DLQ, EMOTION_EVENTS, UTTERANCE_TEXT]
    assert names == [
        "utterance-features",
        "utterance-features.dlq",
        "emotion-events",
        "utterance-text",
    ]


async def test_produce_and_consume_through_tansu(
    kafka: EmbeddedKafka, unique: str, scaled: Scale, fast_group: dict[str, int]
):
    topic = f"{unique}-in"
    await ensure_topics(kafka.bootstrap, {topic: 2})
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap)
    await producer.start()
    try:
        for i in range(4):
            await producer.send_and_wait(topic, f"v{i}".encode(), key=f"call-{i}".encode())
    finally:
        await producer.stop()
    got = await _consume(kafka.bootstrap, topic, f"{unique}-g", 4, scaled(15), fast_group)
    assert sorted(got) == [(f"call-{i}".encode(), f"v{i}".encode()) for i in range(4)]


async def test_ensure_topics_creates_partitions_once(kafka: EmbeddedKafka, unique: str):
    wanted = {f"{unique}-a": 4, f"{unique}-b": 1}
    assert await ensure_topics(kafka.bootstrap, wanted) == wanted
    assert await _partitions(kafka.bootstrap, list(wanted)) == wanted
    # Idempotent; an existing topic keeps its partition count (repartitioning is not ours).
    again = await ensure_topics(kafka.bootstrap, {f"{unique}-a": 8, f"{unique}-c": 2})
    assert again == {f"{unique}-a": 4, f"{unique}-c": 2}


async def test_ensure_topics_gives_up_without_a_broker(scaled: Scale):
    start = time.monotonic()
    with pytest.raises(TopicSetupError, match="no Kafka broker"):
        await ensure_topics(f"127.0.0.1:{free_port()}", {"x": 1}, timeout=1)
    assert time.monotonic() - start < scaled(5)


async def test_redis_set_get(redis_server: EmbeddedRedis, unique: str):
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        await client.set(f"{{{unique}}}:k", b"v")
        assert await client.get(f"{{{unique}}}:k") == b"v"
    finally:
        await client.aclose()


def test_a_redis_cluster_forms_and_stops(scaled: Scale):
    cluster = EmbeddedRedisCluster(masters=3).start(timeout=scaled(30))
    pids = [node.pid for node in cluster.nodes]
    try:
        client = redis.Redis.from_url(cluster.url)
        slots = client.execute_command("CLUSTER SLOTS")  # [[first, last, [host, port, id]]]
        client.close()
        owners = sorted(port for _, _, (_, port, _) in slots)
        assert owners == sorted(node.port for node in cluster.nodes)
        covered = sum(last - first + 1 for first, last, _ in slots)
        assert covered == 16384  # every slot has an owner: cluster_state:ok
    finally:
        cluster.close()
    assert not cluster.running
    for pid in pids:
        assert pid is not None
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


async def test_broker_restart_on_the_same_port(scaled: Scale, fast_group: dict[str, int]):
    with EmbeddedKafka(topics={"in": 3}) as broker:
        port = broker.port
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, request_timeout_ms=5000)
        await producer.start()
        try:
            await producer.send_and_wait("in", b"before", partition=2)
            broker.restart()
            assert broker.port == port and broker.running
            # In-memory storage: everything is gone, but the topics are created again
            # with their partition counts before restart() returns.
            assert await _partitions(broker.bootstrap, ["in"]) == {"in": 3}
            # The producer that was running reconnects by itself.
            async with asyncio.timeout(scaled(10)):
                meta = await producer.send_and_wait("in", b"after", partition=2)
            assert meta.offset == 0
        finally:
            await producer.stop()
        got = await _consume(broker.bootstrap, "in", "g", 1, scaled(15), fast_group)
        assert got == [(None, b"after")]


async def test_redis_stopped_for_a_while_then_back(private_redis: EmbeddedRedis):
    client = aioredis.Redis.from_url(private_redis.url)
    try:
        assert await client.ping()
        port = private_redis.port
        private_redis.stop()
        assert not private_redis.running
        with pytest.raises(redis.exceptions.ConnectionError):
            await client.ping()
        private_redis.start()
        assert private_redis.port == port
        assert await client.ping()  # the same client reconnects
    finally:
        await client.aclose()


def test_start_refuses_a_busy_port(redis_server: EmbeddedRedis, scaled: Scale):
    with pytest.raises(ServiceStartError, match="already in use"):
        EmbeddedRedis(port=redis_server.port).start(timeout=scaled(5))


def test_start_error_quotes_the_log(scaled: Scale):
    server = EmbeddedRedis(binary=sys.executable)  # exits at once on redis arguments
    with pytest.raises(ServiceStartError, match="exited with code") as failure:
        server.start(timeout=scaled(10))
    assert "--port" in str(failure.value)  # the command line, for the log reader
    assert not server.running
    server.close()


def test_services_stop_in_reverse_order_on_interrupt():
    with pytest.raises(KeyboardInterrupt), Services() as services:
        assert services.kafka is not None and services.redis is not None
        pids = [services.kafka.pid, services.redis.pid]
        ports = [services.kafka.port, services.redis.port]
        assert all(_answers(p) for p in ports)
        raise KeyboardInterrupt
    assert not any(_alive(pid) for pid in pids if pid is not None)
    assert not any(_answers(p) for p in ports)


_CHILD = """
import sys, tempfile, time
from streaming.embedded import EmbeddedRedis
tempfile.tempdir = sys.argv[1]  # a folder pytest cleans: the killed parent cannot
server = EmbeddedRedis().start()
print(server.port, server.pid, flush=True)
time.sleep(120)
"""


def test_server_dies_with_its_parent(scaled: Scale, tmp_path: Path):
    parent = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(tmp_path)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None
        port_text, pid_text = parent.stdout.readline().split()
        port, pid = int(port_text), int(pid_text)
        assert _answers(port)
    finally:
        parent.send_signal(signal.SIGKILL)  # no atexit, no finally: only the kernel helps
        parent.wait()
    deadline = time.monotonic() + scaled(5)
    while (_answers(port) or _alive(pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _answers(port), "redis-server outlived its parent"
    assert not _alive(pid)
