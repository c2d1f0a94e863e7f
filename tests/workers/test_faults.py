"""Faults the stream core must classify: what pauses (transient, /healthz degraded with
the cause) and what stops the process (fatal, exit non-zero). Real servers only: the
embedded Redis Cluster moves a slot, Redis holds a value the compare-and-set cannot
match, a topic does not exist, a key has the wrong type."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import redis
import redis.asyncio as aioredis
from support import (
    Collector,
    check_outputs,
    emotion_ids,
    interleave,
    make_calls,
    new_pipeline,
    produce,
    running,
    start_worker_process,
    wait_exit,
)

from streaming.embedded import EmbeddedKafka, EmbeddedRedisCluster, free_port
from streaming.settings import Settings
from streaming.state_store import StateStore
from streaming.topics import ensure_topics


def _slot_owner(cluster: EmbeddedRedisCluster, key: str) -> tuple[int, redis.Redis]:
    """The hash slot of ``key`` and a client on the node that owns it."""
    client = redis.RedisCluster.from_url(cluster.url)
    try:
        slot = client.keyslot(key)
        node = client.nodes_manager.get_node_from_slot(slot)
        return slot, redis.Redis(host=node.host, port=node.port)
    finally:
        client.close()


async def test_a_slot_without_owner_pauses_the_worker_until_it_is_assigned_again(
    kafka: EmbeddedKafka, redis_cluster: EmbeddedRedisCluster, engine, scaled
):
    """Defect 1: a Redis Cluster slot with no owner (CLUSTER DELSLOTS, as while a slot
    moves during a reshard or a failover) made redis-py raise RedisClusterException /
    SlotNotCoveredError, neither a RedisError: the worker died. It must pause, report
    the outage on /healthz, and resume once the slot is assigned again."""
    pipe = new_pipeline(kafka.bootstrap, redis_cluster.url, redis_cluster=True)
    await pipe.create_topics()
    s = pipe.settings
    calls = make_calls(3, 8, seed=31)
    first = interleave(calls, end=False)[:9]
    rest = interleave(calls, end=False)[9:]
    store = StateStore.connect(redis_cluster.url, cluster=True, prefix=pipe.tag)
    slot, owner = _slot_owner(redis_cluster, store.state_key(calls[0].cid))
    await store.close()
    async with Collector(s.kafka_bootstrap, s.output_topic) as out, running(s, engine) as w:
        await produce(s.kafka_bootstrap, s.input_topic, first)
        await out.wait(lambda c: len(emotion_ids(c.of(s.output_topic))) == len(first))
        # every node forgets the slot's owner (what clients see while it has none)
        for url in redis_cluster.urls:
            with redis.Redis.from_url(url) as node:
                node.execute_command("CLUSTER DELSLOTS", slot)
        try:
            await produce(s.kafka_bootstrap, s.input_topic, rest)
            # several retries: the client re-reads the slot map and finds the slot uncovered
            await out.wait(
                lambda c: w.metrics.outages.labels("redis")._value.get() >= 5, timeout=scaled(30)
            )
            ok, detail = w.health()
            assert not ok and detail["outage"] == "redis"
            assert detail["since"] and detail["cause"]
        finally:
            owner.execute_command("CLUSTER ADDSLOTS", slot)
            owner.close()
        total = sum(len(c.vectors) for c in calls)
        await out.wait(lambda c: len(emotion_ids(c.of(s.output_topic))) == total, scaled(60))
        await out.wait(lambda c: w.health()[1]["outage"] is None, timeout=scaled(10))
    check_outputs(engine, calls, out.of(s.output_topic, "emotion"))


async def test_a_conflict_that_persists_retries_the_batch_instead_of_exiting(
    pipeline, redis_server, engine, scaled
):
    """Defect 2: five compare-and-set conflicts in a row raised RuntimeError("kept
    conflicting") and ended the worker. Redis here holds the seq as "02" (another
    writer's spelling): it loads as 2 but never equals "2" in the script, so every
    write conflicts until an operator repairs it. The worker must keep retrying the
    batch with backoff (healthz: degraded, cause "conflict") and go on once repaired."""
    s = pipeline.settings
    await pipeline.create_topics()
    (call,) = make_calls(1, 6, seed=32)
    msgs = [(call.cid, call.message(i)) for i in range(6)]
    key = StateStore(aioredis.from_url(redis_server.url), prefix=s.key_prefix).state_key(call.cid)
    admin = aioredis.from_url(redis_server.url)
    try:
        settings = s.model_copy(update={"state_cache": False})
        async with (
            Collector(s.kafka_bootstrap, s.output_topic) as out,
            running(settings, engine) as w,
        ):
            await produce(s.kafka_bootstrap, s.input_topic, msgs[:3])
            await out.wait(lambda c: len(emotion_ids(c.of(s.output_topic))) == 3)
            await admin.hset(key, "seq", "02")
            await produce(s.kafka_bootstrap, s.input_topic, msgs[3:])
            await out.wait(lambda c: w.health()[1]["outage"] is not None, timeout=scaled(30))
            assert w.health()[1]["outage"] == "conflict"
            await admin.hset(key, "seq", "2")
            await out.wait(lambda c: len(emotion_ids(c.of(s.output_topic))) == 6, scaled(30))
    finally:
        await admin.aclose()
    check_outputs(engine, [call], out.of(s.output_topic, "emotion"))


async def test_a_missing_topic_is_fatal_and_the_worker_exits_non_zero(
    kafka: EmbeddedKafka, redis_server, tmp_path: Path, scaled
):
    """Defect 3: a topic that does not exist (auto-creation off, as on a production
    Kafka; Tansu would create it on the first produce) is not an outage: waiting does
    not create it. The worker names it and exits 1 instead of waiting forever. The
    check lists the cluster's topics, which creates nothing on Tansu either."""
    pipe = new_pipeline(kafka.bootstrap, redis_server.url)
    s = pipe.settings
    await ensure_topics(kafka.bootstrap, {s.input_topic: 2, s.dlq_topic: 1})  # no output
    log = tmp_path / "worker.log"
    proc = start_worker_process(pipe, log)
    try:
        code = await asyncio.to_thread(wait_exit, proc, scaled(60))
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 1, log.read_text()[-2000:]
    assert s.output_topic in log.read_text()
    from aiokafka import AIOKafkaConsumer

    admin = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap)
    await admin.start()
    try:
        assert s.output_topic not in await admin.topics()  # nothing auto-created it
    finally:
        await admin.stop()


# ------------------------------------------------------------------ the featurizer


class _Encoder:
    """A tiny sentence encoder with causal context: no model download, exact vectors."""

    feature_spec = "fake-ctx"
    context = 2

    def encode(self, texts: list[str], contexts: list[list[str]] | None = None) -> np.ndarray:
        out = np.zeros((len(texts), 384), dtype=np.float32)
        for i, text in enumerate(texts):
            out[i, len(text) % 384] = 1.0
        return out


def _featurizer_settings(kafka: EmbeddedKafka, redis_url: str, unique: str, **extra) -> Settings:
    return Settings(
        kafka_bootstrap=kafka.bootstrap,
        redis_url=redis_url,
        text_topic=f"{unique}-text",
        input_topic=f"{unique}-features",
        key_prefix=unique,
        **{"featurizer_metrics_port": 0, **extra},
    )


def _get(port: int, path: str) -> tuple[int, dict | str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            body = r.read().decode()
            return r.status, json.loads(body) if path == "/healthz" else body
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read().decode())


async def test_the_featurizer_serves_metrics_and_health_and_reports_a_redis_outage(
    kafka: EmbeddedKafka, private_redis, unique: str, scaled
):
    """Defect 4 (a): the featurizer had no /metrics and no /healthz. It serves both;
    while Redis is down /healthz says 503 with the cause and since when, and the
    featurizer resumes by itself once Redis is back."""
    from streaming.events import text_message
    from workers.featurize import featurize, text_dlq_topic

    port = free_port()
    s = _featurizer_settings(kafka, private_redis.url, unique, featurizer_metrics_port=port)
    await ensure_topics(kafka.bootstrap, {s.text_topic: 1, s.input_topic: 1, text_dlq_topic(s): 1})
    stop = asyncio.Event()
    task = asyncio.create_task(featurize(s, stop, _Encoder(), group_id=f"{unique}-f"))
    try:
        await produce(kafka.bootstrap, s.text_topic, [("c", text_message("c", 0, "a", "hi"))])
        deadline = time.monotonic() + scaled(30)
        while True:
            status, body = await asyncio.to_thread(_get, port, "/metrics")
            if "cfnesa_featurizer_utterances_total 1.0" in str(body):
                break
            assert time.monotonic() < deadline, body
            await asyncio.sleep(0.1)
        status, health = await asyncio.to_thread(_get, port, "/healthz")
        assert status == 200 and health["ok"] is True
        await asyncio.to_thread(private_redis.stop)
        await produce(kafka.bootstrap, s.text_topic, [("c", text_message("c", 1, "b", "yo"))])
        deadline = time.monotonic() + scaled(30)
        while True:
            status, health = await asyncio.to_thread(_get, port, "/healthz")
            if status == 503:
                break
            assert time.monotonic() < deadline, health
            await asyncio.sleep(0.1)
        assert health["outage"] == "redis" and health["since"] and health["cause"]
        await asyncio.to_thread(private_redis.start)
        deadline = time.monotonic() + scaled(30)
        while "cfnesa_featurizer_utterances_total 2.0" not in str(
            (await asyncio.to_thread(_get, port, "/metrics"))[1]
        ):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        assert (await asyncio.to_thread(_get, port, "/healthz"))[0] == 200
    finally:
        stop.set()
        await asyncio.wait_for(task, scaled(30))


async def test_the_featurizer_stops_on_a_redis_error_that_waiting_cannot_fix(
    kafka: EmbeddedKafka, redis_server, unique: str, scaled
):
    """Defect 4 (b): the featurizer retried every Redis error forever, also WRONGTYPE
    (a key holding something else: a bug or a key prefix shared by mistake). That is
    fatal: the featurizer stops with an error (`cfnesa featurize` exits 1)."""
    from streaming.errors import FatalError
    from streaming.events import text_message
    from workers.featurize import featurize, text_dlq_topic

    s = _featurizer_settings(kafka, redis_server.url, unique)
    await ensure_topics(kafka.bootstrap, {s.text_topic: 1, s.input_topic: 1, text_dlq_topic(s): 1})
    store = StateStore.connect(redis_server.url, prefix=unique)
    await store.client.set(store.texts_key("c"), b"not a sorted set")
    await store.close()
    await produce(kafka.bootstrap, s.text_topic, [("c", text_message("c", 0, "a", "hi"))])
    stop = asyncio.Event()
    task = asyncio.create_task(featurize(s, stop, _Encoder(), group_id=f"{unique}-f"))
    try:
        with pytest.raises(FatalError, match="WRONGTYPE"):
            await asyncio.wait_for(task, scaled(30))
    finally:
        stop.set()


async def test_a_produce_the_broker_refuses_is_fatal_and_the_worker_exits_non_zero(
    redis_server, engine, tmp_path: Path, scaled
):
    """Defect 3, at run time: the broker refuses every record produced to the output
    topic (Tansu's schema registry validates that topic and refuses with error -1,
    UNKNOWN_SERVER_ERROR, which aiokafka marks not retriable, like an authorization
    failure). The worker used to retry that batch forever; it must report unhealthy
    and exit 1, with nothing committed (the input is read again after a fix)."""
    schemas = tmp_path / "schemas"
    schemas.mkdir()
    with EmbeddedKafka(schema_registry=schemas) as broker:
        pipe = new_pipeline(broker.bootstrap, redis_server.url)
        s = pipe.settings
        (schemas / f"{s.output_topic}.json").write_text(
            json.dumps({"type": "object", "properties": {"value": {"type": "integer"}}})
        )
        await pipe.create_topics()
        (call,) = make_calls(1, 3, seed=33)
        await produce(broker.bootstrap, s.input_topic, [(call.cid, call.message(0))])
        log = tmp_path / "worker.log"
        proc = start_worker_process(pipe, log, CFNESA_LOG_LEVEL="INFO")
        try:
            code = await asyncio.to_thread(wait_exit, proc, scaled(90))
        finally:
            if proc.poll() is None:
                proc.kill()
        text = log.read_text()
        assert code == 1, text[-3000:]
        assert "kafka refused" in text, text[-3000:]
