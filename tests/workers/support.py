"""Helpers of the pipeline tests: synthetic calls, the reference outputs, Kafka I/O,
worker processes. Everything runs against the real embedded broker and redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from fixtures_services import FAST_GROUP  # quick joins and rebalances on Tansu

from model.checkpoint import DEFAULT_CHECKPOINT
from model.engine import StreamingEngine, Utterance
from streaming.events import end_event, utterance_event
from streaming.settings import Settings
from streaming.topics import ensure_topics
from workers.worker import Worker

# what the shipped model expects (plain MiniLM or the shipped adapter's features)
FEATURE_SPEC = json.loads((DEFAULT_CHECKPOINT / "config.json").read_text())["feature_spec"]
CFNESA = Path(sys.executable).parent / "cfnesa"


@dataclass
class Call:
    cid: str
    speakers: list[str]
    vectors: list[np.ndarray]

    def message(self, seq: int) -> bytes:
        return utterance_event(
            self.cid, seq, self.speakers[seq], {"text": self.vectors[seq]}, FEATURE_SPEC
        )

    def messages(self, end: bool = True) -> list[bytes]:
        out = [self.message(i) for i in range(len(self.vectors))]
        return [*out, end_event(self.cid, len(self.vectors))] if end else out


def make_calls(
    n: int, length: int | tuple[int, int], seed: int = 0, prefix: str = "call"
) -> list[Call]:
    rng = np.random.default_rng(seed)
    calls = []
    for i in range(n):
        size = length if isinstance(length, int) else int(rng.integers(*length))
        vecs = rng.standard_normal((size, 384)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        speakers = [("agent", "customer")[int(rng.random() < 0.5)] for _ in range(size)]
        calls.append(Call(f"{prefix}-{i:04d}", speakers, list(vecs)))
    return calls


def reference(engine: StreamingEngine, call: Call) -> list[np.ndarray]:
    """The whole-dialogue forward's probabilities: what streaming must reproduce."""
    res = engine.run_dialogue(
        [Utterance(s, text=v) for s, v in zip(call.speakers, call.vectors, strict=True)]
    )
    return [r.probabilities for r in res]


def interleave(calls: Iterable[Call], end: bool = True) -> list[tuple[str, bytes]]:
    """Round-robin over the calls, each in seq order (how live calls arrive)."""
    queues = [[(c.cid, m) for m in c.messages(end)] for c in calls]
    out = []
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop(0))
    return out


@dataclass
class Pipeline:
    """One test's topics, group and key prefix on the shared broker and Redis."""

    bootstrap: str
    redis_url: str
    tag: str
    redis_cluster: bool = False

    @property
    def settings(self) -> Settings:
        return Settings(
            kafka_bootstrap=self.bootstrap,
            redis_url=self.redis_url,
            redis_cluster=self.redis_cluster,
            input_topic=f"{self.tag}-features",
            output_topic=f"{self.tag}-events",
            dlq_topic=f"{self.tag}-features.dlq",
            group_id=f"{self.tag}-workers",
            key_prefix=self.tag,
            metrics_port=0,
            session_timeout_ms=FAST_GROUP["session_timeout_ms"],
            heartbeat_interval_ms=FAST_GROUP["heartbeat_interval_ms"],
            rebalance_timeout_ms=FAST_GROUP["rebalance_timeout_ms"],
            max_wait_ms=5,
            max_batch_events=64,
        )

    def env(self, **extra: str) -> dict[str, str]:
        s = self.settings
        env = {
            **os.environ,
            "CFNESA_KAFKA_BOOTSTRAP": s.kafka_bootstrap,
            "CFNESA_REDIS_URL": s.redis_url,
            "CFNESA_REDIS_CLUSTER": str(s.redis_cluster).lower(),
            "CFNESA_INPUT_TOPIC": s.input_topic,
            "CFNESA_OUTPUT_TOPIC": s.output_topic,
            "CFNESA_DLQ_TOPIC": s.dlq_topic,
            "CFNESA_GROUP_ID": s.group_id,
            "CFNESA_KEY_PREFIX": s.key_prefix,
            "CFNESA_METRICS_PORT": "0",
            "CFNESA_SESSION_TIMEOUT_MS": str(FAST_GROUP["session_timeout_ms"]),
            "CFNESA_HEARTBEAT_INTERVAL_MS": str(FAST_GROUP["heartbeat_interval_ms"]),
            "CFNESA_REBALANCE_TIMEOUT_MS": str(FAST_GROUP["rebalance_timeout_ms"]),
            "CFNESA_MAX_BATCH_EVENTS": "16",
            "CFNESA_TORCH_THREADS": "1",
            "CFNESA_LOG_LEVEL": "WARNING",
        }
        env.update(extra)
        return env

    async def create_topics(self, partitions: int = 4) -> None:
        s = self.settings
        await ensure_topics(
            self.bootstrap, {s.input_topic: partitions, s.output_topic: partitions, s.dlq_topic: 1}
        )


def new_pipeline(bootstrap: str, redis_url: str, *, redis_cluster: bool = False) -> Pipeline:
    return Pipeline(bootstrap, redis_url, f"t{uuid.uuid4().hex[:8]}", redis_cluster)


@contextlib.asynccontextmanager
async def running(settings: Settings, engine: StreamingEngine) -> AsyncIterator[Worker]:
    """An in-process worker on these settings until the block ends."""
    worker = Worker(settings, engine=engine)
    stop = asyncio.Event()
    await worker.start()
    task = asyncio.create_task(worker.run(stop))
    try:
        yield worker
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await worker.close()


async def produce(bootstrap: str, topic: str, messages: Iterable[tuple[str | None, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_request_size=4_000_000)
    await producer.start()
    try:
        for key, value in messages:
            await producer.send(topic, value=value, key=key.encode() if key else None)
        await producer.flush()
    finally:
        await producer.stop()


class Collector:
    """Reads topics from the beginning into ``records`` in the background."""

    def __init__(self, bootstrap: str, *topics: str) -> None:
        self.consumer = AIOKafkaConsumer(
            *topics,
            bootstrap_servers=bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            group_id=None,
        )
        self.records: list[tuple[str, dict]] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Collector:
        await self.consumer.start()
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self.consumer.stop()

    async def _run(self) -> None:
        while True:
            batch = await self.consumer.getmany(timeout_ms=200)
            for recs in batch.values():
                self.records.extend((r.topic, json.loads(r.value)) for r in recs)

    def of(self, topic: str, kind: str | None = None) -> list[dict]:
        return [e for t, e in self.records if t == topic and (kind is None or e["type"] == kind)]

    async def wait(self, done: Callable[[Collector], bool], timeout: float = 60) -> None:  # noqa: ASYNC109
        deadline = time.monotonic() + timeout
        while not done(self):
            if time.monotonic() > deadline:
                kinds: dict[str, int] = {}
                for t, e in self.records:
                    kinds[f"{t}/{e.get('type')}"] = kinds.get(f"{t}/{e.get('type')}", 0) + 1
                raise TimeoutError(f"not done after {timeout}s; have {kinds}")
            await asyncio.sleep(0.1)


def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    """The process's exit code, or None if it is still running after ``timeout`` s."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def emotion_ids(events: list[dict]) -> set[str]:
    return {e["event_id"] for e in events if e["type"] == "emotion"}


def start_worker_process(pipe: Pipeline, log: Path, **env: str) -> subprocess.Popen[bytes]:
    with log.open("ab") as fh:
        return subprocess.Popen(
            [str(CFNESA), "worker"], env=pipe.env(**env), stdout=fh, stderr=subprocess.STDOUT
        )


def check_outputs(
    engine: StreamingEngine, calls: list[Call], emotions: list[dict], tol: float = 1e-4
) -> None:
    """Every utterance has its event, duplicates are exact repeats, order holds per
    call, and the probabilities equal the whole-dialogue forward."""
    labels = engine.label_names
    by_id: dict[str, dict] = {}
    for e in emotions:
        first = by_id.setdefault(e["event_id"], e)
        assert first == e, f"two different events with id {e['event_id']}"
    for call in calls:
        ref = reference(engine, call)
        seen = [e["seq"] for e in emotions if e["conversation_id"] == call.cid]
        firsts = list(dict.fromkeys(seen))
        assert firsts == list(range(len(call.vectors))), f"{call.cid}: order {firsts}"
        for seq, probs in enumerate(ref):
            got = by_id[f"{call.cid}:{seq}:emotion"]["probabilities"]
            worst = max(abs(got[n] - float(p)) for n, p in zip(labels, probs, strict=True))
            assert worst <= tol, f"{call.cid}:{seq} differs from the reference by {worst}"
