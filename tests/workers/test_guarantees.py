"""The delivery guarantees, tested on real processes: worker kill -9 at every stage
of the loop (and at random times), Redis down and back, broker restarted, and a
worker of a two-member group killed mid-stream.

After each, every accepted utterance has exactly one distinct emotion event id
(repeats are exact copies), the probabilities equal the whole-dialogue forward
(so no state advanced twice), order holds per call, and the states left in
Redis equal a clean run's.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import torch
from support import (
    Collector,
    Pipeline,
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

from model.engine import StreamingEngine, Utterance
from model.state import ConversationState
from streaming.embedded import EmbeddedKafka, EmbeddedRedis
from streaming.state_store import StateStore

pytestmark = pytest.mark.slow

POINTS = ("after_poll", "after_step", "after_persist", "after_produce", "after_commit")


def _same_ids_same_content(events: list[dict]) -> None:
    seen: dict[str, dict] = {}
    for e in events:
        assert seen.setdefault(e["event_id"], e) == e, f"{e['event_id']} differs on repeat"


async def _check_states(pipe: Pipeline, engine: StreamingEngine, calls) -> None:
    """The stored state of each call still open equals a clean offline run's."""
    client = aioredis.from_url(pipe.redis_url)
    try:
        for call in calls:
            raw = await client.hgetall(StateStore(client, prefix=pipe.tag).state_key(call.cid))
            fields = {k.decode(): v for k, v in raw.items()}
            assert int(fields.pop("seq")) == len(call.vectors) - 1
            stored = ConversationState.from_parts(fields, expected_fingerprint=engine.fingerprint)
            state = None
            for s, v in zip(call.speakers, call.vectors, strict=True):
                _, (state,) = engine.step([[Utterance(s, text=v)]], [state])
            assert state is not None and stored.position == state.position
            assert torch.allclose(stored.rume_h, state.rume_h, atol=1e-5)
            assert torch.allclose(stored.win_x, state.win_x, atol=1e-5)
    finally:
        await client.aclose()


async def test_kill_9_at_every_stage_loses_nothing(pipeline: Pipeline, engine, tmp_path: Path):
    s = pipeline.settings
    calls = make_calls(10, (12, 25), seed=10)
    ended, open_ = calls[:6], calls[6:]
    messages = interleave(ended) + interleave(open_, end=False)
    total = sum(len(c.vectors) for c in calls)
    # 20 injected kills, each stage 4 times, at its 1st-3rd occurrence, then 3 at random times
    plan = [f"{POINTS[i % 5]}:{1 + (i // 5) % 3}" for i in range(20)]
    kills = 0
    log = tmp_path / "workers.log"
    # static membership: each restarted worker takes the partitions back at once,
    # without waiting for the killed member's session to expire
    member = {
        "CFNESA_MAX_BATCH_EVENTS": "4",
        "CFNESA_LOG_LEVEL": "INFO",
    }
    async with Collector(s.kafka_bootstrap, s.output_topic) as out:
        await produce(s.kafka_bootstrap, s.input_topic, messages)

        def complete(c: Collector) -> bool:
            return len({e["event_id"] for e in c.of(s.output_topic, "emotion")}) == total and len(
                {e["event_id"] for e in c.of(s.output_topic, "summary")}
            ) == len(ended)

        for spec in plan:
            if complete(out):
                break
            proc = start_worker_process(pipeline, log, CFNESA_FAULTS=spec, **member)
            code = await asyncio.to_thread(wait_exit, proc, 60)
            if code is None:  # never reached its fault point (little input left)
                proc.kill()
                proc.wait()
            else:
                assert code == -signal.SIGKILL, log.read_text()[-3000:]
                kills += 1
        for _ in range(3):
            if complete(out):
                break
            proc = start_worker_process(pipeline, log, **member)
            await asyncio.sleep(random.uniform(2.5, 4.0))
            proc.kill()
            proc.wait()
            kills += 1
        ups = log.read_text().count("worker up")
        proc = start_worker_process(pipeline, log, **member)
        try:
            await out.wait(complete, timeout=120)
            # let the last worker finish starting (a stop request before Python runs
            # our code is the default SIGTERM death, not a graceful stop)
            deadline = time.monotonic() + 60
            while log.read_text().count("worker up") == ups and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.2)
        finally:
            proc.terminate()
            assert await asyncio.to_thread(wait_exit, proc, 30) == 0
    assert kills >= 20
    events = out.of(s.output_topic)
    _same_ids_same_content(events)
    check_outputs(engine, calls, out.of(s.output_topic, "emotion"))
    await _check_states(pipeline, engine, open_)


async def test_redis_down_and_back(kafka: EmbeddedKafka, engine, tmp_path: Path):
    """Redis stops (persistence on, as in production) and comes back: the worker
    backs off, commits nothing unfinished, resumes by itself; nothing is lost."""
    with EmbeddedRedis(persistent=True) as redis_server:
        pipe = new_pipeline(kafka.bootstrap, redis_server.url)
        await pipe.create_topics()
        s = pipe.settings
        calls = make_calls(6, (10, 20), seed=11)
        first, second = interleave(calls[:3], end=False), interleave(calls[3:], end=False)
        total = sum(len(c.vectors) for c in calls)
        log = tmp_path / "worker.log"
        async with Collector(s.kafka_bootstrap, s.output_topic) as out:
            proc = start_worker_process(pipe, log)
            try:
                await produce(s.kafka_bootstrap, s.input_topic, first)
                await out.wait(lambda c: len(c.of(s.output_topic, "emotion")) > 5)
                await asyncio.to_thread(redis_server.stop)
                await produce(s.kafka_bootstrap, s.input_topic, second)
                await asyncio.sleep(3)
                assert proc.poll() is None, "the worker died while Redis was down"
                await asyncio.to_thread(redis_server.start)
                await out.wait(
                    lambda c: len(emotion_ids(c.of(s.output_topic))) == total, timeout=90
                )
            finally:
                proc.terminate()
                assert await asyncio.to_thread(wait_exit, proc, 30) == 0
        assert "redis unavailable" in log.read_text()
        _same_ids_same_content(out.of(s.output_topic))
        check_outputs(engine, calls, out.of(s.output_topic, "emotion"))
        await _check_states(pipe, engine, calls)


async def test_redis_out_of_memory_pauses_then_resumes(
    kafka: EmbeddedKafka, private_redis: EmbeddedRedis, engine
):
    """Redis refuses writes (OOM under maxmemory with noeviction, as a full production
    Redis does): the worker pauses with backoff instead of dying, resumes once memory
    is freed, and nothing is lost or applied twice."""
    pipe = new_pipeline(kafka.bootstrap, private_redis.url)
    await pipe.create_topics()
    s = pipe.settings
    calls = make_calls(4, (10, 16), seed=15)
    first, second = interleave(calls[:2], end=False), interleave(calls[2:], end=False)
    total = sum(len(c.vectors) for c in calls)
    admin = aioredis.from_url(private_redis.url)
    try:
        async with Collector(s.kafka_bootstrap, s.output_topic) as out, running(s, engine) as w:
            await produce(s.kafka_bootstrap, s.input_topic, first)
            await out.wait(lambda c: len(emotion_ids(c.of(s.output_topic))) == len(first))
            used = int((await admin.info("memory"))["used_memory"])
            await admin.config_set("maxmemory-policy", "noeviction")
            await admin.config_set("maxmemory", str(used))  # full: every write is refused
            await produce(s.kafka_bootstrap, s.input_topic, second)
            await out.wait(lambda c: w.health()[1]["outage"] == "redis", timeout=30)
            await asyncio.sleep(1)
            assert len(emotion_ids(out.of(s.output_topic))) == len(first)  # paused, not dropped
            await admin.config_set("maxmemory", "0")
            await out.wait(lambda c: len(emotion_ids(c.of(s.output_topic))) == total, timeout=60)
            assert w.health()[1]["outage"] is None
    finally:
        await admin.aclose()
    _same_ids_same_content(out.of(s.output_topic))
    check_outputs(engine, calls, out.of(s.output_topic, "emotion"))
    await _check_states(pipe, engine, calls)


async def test_broker_restart(redis_server, engine, tmp_path: Path):
    """The broker stops and starts again (Tansu keeps nothing: topics are created
    again): the worker reconnects by itself and processes new input."""
    with EmbeddedKafka() as broker:
        pipe = new_pipeline(broker.bootstrap, redis_server.url)
        await pipe.create_topics()
        s = pipe.settings
        # the topics come back with the broker, before any client can auto-create them
        broker.topics = {s.input_topic: 4, s.output_topic: 4, s.dlq_topic: 1}
        before, after = (
            make_calls(3, 6, seed=12, prefix="before"),
            make_calls(3, 6, seed=13, prefix="after"),
        )
        log = tmp_path / "worker.log"
        proc = start_worker_process(pipe, log)
        try:
            async with Collector(s.kafka_bootstrap, s.output_topic) as out:
                await produce(s.kafka_bootstrap, s.input_topic, interleave(before))
                await out.wait(lambda c: len(c.of(s.output_topic, "summary")) == 3)
            await asyncio.to_thread(broker.restart)
            async with Collector(s.kafka_bootstrap, s.output_topic) as out2:
                deadline = time.monotonic() + 90
                # the worker needs a moment to rejoin: keep offering the input
                await produce(s.kafka_bootstrap, s.input_topic, interleave(after))
                wanted = {c.cid for c in after}

                def after_done(c: Collector) -> bool:
                    ended = {e["conversation_id"] for e in c.of(s.output_topic, "summary")}
                    return wanted <= ended

                await out2.wait(after_done, timeout=90)
                assert time.monotonic() < deadline
            assert proc.poll() is None
        finally:
            proc.terminate()
            code = await asyncio.to_thread(wait_exit, proc, 30)
        assert code == 0, log.read_text()[-3000:]
        check_outputs(engine, after, out2.of(s.output_topic, "emotion"))


async def test_two_workers_one_killed(pipeline: Pipeline, engine, tmp_path: Path):
    """Two workers share the partitions; one is killed -9 mid-stream; the other
    takes its partitions over, loads their states from Redis and goes on exactly."""
    s = pipeline.settings
    calls = make_calls(12, (15, 30), seed=14)
    total = sum(len(c.vectors) for c in calls)
    log = tmp_path / "workers.log"
    a = start_worker_process(pipeline, log, CFNESA_LOG_LEVEL="INFO")
    b = start_worker_process(pipeline, log, CFNESA_LOG_LEVEL="INFO")
    try:
        async with Collector(s.kafka_bootstrap, s.output_topic) as out:
            messages = interleave(calls, end=False)
            half = len(messages) // 2
            await produce(s.kafka_bootstrap, s.input_topic, messages[:half])
            await out.wait(lambda c: len(c.of(s.output_topic, "emotion")) >= half // 2, 90)
            b.send_signal(signal.SIGKILL)
            b.wait()
            await produce(s.kafka_bootstrap, s.input_topic, messages[half:])
            await out.wait(lambda c: len(emotion_ids(c.of(s.output_topic))) == total, timeout=120)
    finally:
        a.terminate()
        code = await asyncio.to_thread(wait_exit, a, 30)
        if b.poll() is None:
            b.kill()
    assert code == 0, log.read_text()[-3000:]
    assigned = [
        line.split("partitions assigned: ")[1].strip()
        for line in log.read_text().splitlines()
        if "partitions assigned: " in line
    ]
    # the group was split between the two, then the survivor held every partition
    assert len(assigned) >= 3 and "[0, 1, 2, 3]" not in assigned[:2], assigned
    assert assigned[-1] == "[0, 1, 2, 3]", assigned
    _same_ids_same_content(out.of(s.output_topic))
    check_outputs(engine, calls, out.of(s.output_topic, "emotion"))
    await _check_states(pipeline, engine, calls)
