"""Scale-out the way production does it: Redis Cluster for state, Kafka partitions and
a consumer group for work. Real processes, the real embedded broker, a real 3-master
Redis Cluster.

- The worker runs unchanged on Redis Cluster (configuration only) and its outputs
  equal a single-Redis run's.
- Three workers share 12 partitions; a fourth joins and one is killed -9 mid-stream:
  every utterance gets its event, states advance exactly once, order holds per call.
- SIGTERM drains a worker (batch finished, persisted, produced, committed, group
  left); a rolling restart of every worker loses nothing and repeats nothing.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest
import redis.asyncio as aioredis
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

from model.engine import StreamingEngine
from streaming.embedded import EmbeddedKafka, EmbeddedRedis, EmbeddedRedisCluster
from streaming.state_store import StateStore

pytestmark = pytest.mark.slow


def _assignments(log: Path) -> list[str]:
    return [
        line.split("partitions assigned: ")[1].strip()
        for line in log.read_text().splitlines()
        if "partitions assigned: " in line
    ]


def _held(*logs: Path) -> list[int]:
    """The partitions these workers hold now (their latest assignments), sorted."""
    latest = [(_assignments(log) or ["[]"])[-1] for log in logs]
    return sorted(int(p) for a in latest for p in a.strip("[]").split(",") if p.strip())


async def _stored_seqs(pipe: Pipeline, cids: list[str]) -> dict[str, int]:
    store = StateStore.connect(pipe.redis_url, cluster=pipe.redis_cluster, prefix=pipe.tag)
    try:
        loaded = await store.load(cids)
    finally:
        await store.close()
    return {cid: -1 if row.seq is None else row.seq for cid, row in loaded.items()}


async def test_the_worker_on_redis_cluster_equals_a_single_redis_run(
    kafka: EmbeddedKafka,
    redis_server: EmbeddedRedis,
    redis_cluster: EmbeddedRedisCluster,
    engine: StreamingEngine,
):
    calls = make_calls(9, (4, 20), seed=31)
    results: dict[str, list[dict]] = {}
    for name, url, cluster in (
        ("single", redis_server.url, False),
        ("cluster", redis_cluster.url, True),
    ):
        pipe = new_pipeline(kafka.bootstrap, url, redis_cluster=cluster)
        await pipe.create_topics()
        s = pipe.settings
        async with Collector(s.kafka_bootstrap, s.output_topic) as out, running(s, engine):
            await produce(s.kafka_bootstrap, s.input_topic, interleave(calls, end=False))
            total = sum(len(c.vectors) for c in calls)
            await out.wait(lambda c, s=s, n=total: len(emotion_ids(c.of(s.output_topic))) == n)
        results[name] = sorted(
            out.of(s.output_topic, "emotion"), key=lambda e: (e["conversation_id"], e["seq"])
        )
        check_outputs(engine, calls, results[name])
        seqs = await _stored_seqs(pipe, [c.cid for c in calls])
        assert seqs == {c.cid: len(c.vectors) - 1 for c in calls}
        if cluster:
            # the calls' states really are spread over the masters
            client = aioredis.RedisCluster.from_url(url)
            try:
                await client.initialize()  # loads the slot map
                owners = {
                    client.get_node_from_key(f"{pipe.tag}:{{{c.cid}}}:state").port for c in calls
                }
            finally:
                await client.aclose()
            assert len(owners) >= 2, owners

    # the same events; numbers equal up to float rounding (batches were mixed differently)
    cluster, single = results["cluster"], results["single"]
    assert [e["event_id"] for e in cluster] == [e["event_id"] for e in single]
    for a, b in zip(cluster, single, strict=True):
        assert a["emotion"] == b["emotion"], a["event_id"]
        worst = max(abs(a["probabilities"][k] - b["probabilities"][k]) for k in a["probabilities"])
        assert worst <= 1e-4, (a["event_id"], worst)


async def test_three_workers_on_twelve_partitions_then_a_fourth_joins_and_one_dies(
    kafka: EmbeddedKafka, redis_server: EmbeddedRedis, engine: StreamingEngine, tmp_path: Path
):
    pipe = new_pipeline(kafka.bootstrap, redis_server.url)
    await pipe.create_topics(partitions=12)
    s = pipe.settings
    calls = make_calls(24, (12, 24), seed=32)
    total = sum(len(c.vectors) for c in calls)
    messages = interleave(calls, end=False)
    thirds = [messages[: len(messages) // 3], messages[len(messages) // 3 : 2 * len(messages) // 3]]
    thirds.append(messages[2 * len(messages) // 3 :])
    logs = [tmp_path / f"worker-{i}.log" for i in range(4)]
    procs = [start_worker_process(pipe, logs[i], CFNESA_LOG_LEVEL="INFO") for i in range(3)]
    try:
        async with Collector(s.kafka_bootstrap, s.output_topic) as out:

            def done(n: int):
                return lambda c: len(emotion_ids(c.of(s.output_topic))) >= n

            # all three in the group first (a slow start, importing torch, would leave one
            # out of the first rebalance on a loaded machine)
            await out.wait(
                lambda c: all(
                    _assignments(log) and _assignments(log)[-1] != "[]" for log in logs[:3]
                ),
                180,
            )
            await produce(s.kafka_bootstrap, s.input_topic, thirds[0])
            await out.wait(done(len(thirds[0])), 120)
            # the three split the 12 partitions between them
            owned = [_assignments(log)[-1] for log in logs[:3]]
            assert all(o != "[]" for o in owned), owned

            procs.append(start_worker_process(pipe, logs[3], CFNESA_LOG_LEVEL="INFO"))
            await produce(s.kafka_bootstrap, s.input_topic, thirds[1][: len(thirds[1]) // 2])
            await out.wait(lambda c: bool(_assignments(logs[3])), 60)
            await produce(s.kafka_bootstrap, s.input_topic, thirds[1][len(thirds[1]) // 2 :])
            await out.wait(done(len(thirds[0]) + len(thirds[1]) // 2), 120)

            procs[1].send_signal(signal.SIGKILL)  # mid-stream, no goodbye
            procs[1].wait()
            await produce(s.kafka_bootstrap, s.input_topic, thirds[2])
            await out.wait(done(total), 180)
            # the survivors' latest assignments settle on all 12 partitions, each once
            await out.wait(lambda c: _held(logs[0], logs[2], logs[3]) == list(range(12)), 60)
    finally:
        codes = []
        for i, proc in enumerate(procs):
            if i != 1:
                proc.terminate()
        for i, proc in enumerate(procs):
            if i != 1:
                codes.append(await asyncio.to_thread(wait_exit, proc, 30))
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    text = "\n".join(log.read_text() for log in logs)
    assert codes == [0, 0, 0], text[-3000:]
    assert _assignments(logs[3]), "the fourth worker never got a partition"
    emotions = out.of(s.output_topic, "emotion")
    check_outputs(engine, calls, emotions)  # complete, exact repeats only, ordered, exact
    seqs = await _stored_seqs(pipe, [c.cid for c in calls])
    assert seqs == {c.cid: len(c.vectors) - 1 for c in calls}


async def test_sigterm_drains_and_a_rolling_restart_loses_and_repeats_nothing(
    pipeline: Pipeline, engine: StreamingEngine, tmp_path: Path
):
    s = pipeline.settings
    calls = make_calls(12, (20, 30), seed=33)
    total = sum(len(c.vectors) for c in calls)
    messages = interleave(calls, end=False)
    chunks = [messages[k * len(messages) // 5 : (k + 1) * len(messages) // 5] for k in range(5)]
    log = tmp_path / "workers.log"
    procs = [start_worker_process(pipeline, log, CFNESA_LOG_LEVEL="INFO") for _ in range(2)]
    codes: list[int | None] = []
    try:
        async with Collector(s.kafka_bootstrap, s.output_topic) as out:
            sent = 0
            await produce(s.kafka_bootstrap, s.input_topic, chunks[0])
            sent += len(chunks[0])
            await out.wait(lambda c, n=sent: len(emotion_ids(c.of(s.output_topic))) >= n, 120)
            for i in range(2):  # restart each worker in turn, input flowing meanwhile
                feed = asyncio.create_task(
                    produce(s.kafka_bootstrap, s.input_topic, chunks[1 + 2 * i])
                )
                procs[i].send_signal(signal.SIGTERM)
                codes.append(await asyncio.to_thread(wait_exit, procs[i], 30))
                await feed
                sent += len(chunks[1 + 2 * i])
                procs[i] = start_worker_process(pipeline, log, CFNESA_LOG_LEVEL="INFO")
                # the replacement is up (a pod is SIGTERMed only once it runs)
                await out.wait(lambda c, n=3 + i: log.read_text().count("worker up:") >= n, 60)
                await produce(s.kafka_bootstrap, s.input_topic, chunks[2 + 2 * i])
                sent += len(chunks[2 + 2 * i])
                await out.wait(lambda c, n=sent: len(emotion_ids(c.of(s.output_topic))) >= n, 120)
            assert sent == total
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            codes.append(await asyncio.to_thread(wait_exit, proc, 30))
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    assert codes == [0, 0, 0, 0], text[-3000:]
    assert text.count("worker stopped after") == 4, text[-3000:]
    emotions = out.of(s.output_topic, "emotion")
    check_outputs(engine, calls, emotions)
    # a drained worker committed everything it produced: nothing was processed twice
    assert len(emotions) == total, f"{len(emotions) - total} events repeated"
    seqs = await _stored_seqs(pipeline, [c.cid for c in calls])
    assert seqs == {c.cid: len(c.vectors) - 1 for c in calls}
