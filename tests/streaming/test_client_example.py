"""examples/subscriber.py, run for real: a subprocess against a real gateway on the embedded
broker and redis-server. Events are persisted to Redis, then produced, as the worker does, so
snapshots hold them too."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from aiokafka import AIOKafkaProducer

from streaming.embedded import EmbeddedKafka, EmbeddedRedis
from streaming.events import AlertEvent, EmotionEvent, Shift, dump_event
from streaming.gateway import TokenSigner, serve_gateway
from streaming.settings import Settings
from streaming.state_store import Commit, StateStore
from streaming.topics import ensure_topics

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "subscriber.py"
SECRET = "a-test-secret-of-enough-length"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("subscriber_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def emotion(cid: str, seq: int, name: str) -> dict[str, Any]:
    event = EmotionEvent(
        conversation_id=cid,
        seq=seq,
        speaker="customer" if seq % 2 else "agent",
        emotion=name,
        confidence=0.8,
        probabilities={name: 0.8, "neutral" if name != "neutral" else "joy": 0.2},
        shift=Shift(vs_previous=0.5, vs_speaker_previous=0.25 if seq > 1 else None),
        model="test@0",
    )
    return json.loads(dump_event(event))


def alert(cid: str, seq: int) -> dict[str, Any]:
    body = {"conversation_id": cid, "seq": seq, "speaker": "customer", "rule": "emotion_shift"}
    body |= {"severity": "high", "from": "neutral", "to": "anger", "model": "test@0"}
    return json.loads(dump_event(AlertEvent.model_validate(body)))


class Pipeline:
    """Writes events the way the worker does: persist (compare-and-set), then produce."""

    def __init__(self, store: StateStore, producer: AIOKafkaProducer, topic: str) -> None:
        self.store, self.producer, self.topic = store, producer, topic
        self.last: dict[str, int] = {}

    async def emit(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            cid, seq = event["conversation_id"], event["seq"]
            raw = json.dumps(event, separators=(",", ":")).encode()
            previous = self.last.get(cid)
            commit = Commit(cid, previous, seq, {}, [raw])
            if previous == seq:  # a second event of the same utterance (an alert)
                commit = Commit(cid, seq, seq, {}, [raw])
            (result,) = await self.store.commit([commit])
            assert result.ok, event
            self.last[cid] = seq
            await self.producer.send_and_wait(self.topic, raw, key=cid.encode())


async def read_until(stream: asyncio.StreamReader, count: int, wait_s: float) -> list[str]:
    lines = []
    while len(lines) < count:
        raw = await asyncio.wait_for(stream.readline(), wait_s)
        assert raw, f"the example ended early; got {lines}"
        lines.append(raw.decode().rstrip("\n"))
    return lines


async def wait_for_line(stream: asyncio.StreamReader, start: str, wait_s: float) -> list[str]:
    """The stderr lines up to and including the first that starts with ``start``."""
    seen = []
    while not seen or not seen[-1].startswith(start):
        raw = await asyncio.wait_for(stream.readline(), wait_s)
        assert raw, f"the example ended early; stderr so far: {seen}"
        seen.append(raw.decode().rstrip("\n"))
    return seen


async def test_subscriber_prints_snapshot_then_live_and_resumes_after_a_restart(
    kafka: EmbeddedKafka,
    redis_server: EmbeddedRedis,
    unique: str,
    scaled: Callable[[float], float],
):
    topic = f"{unique}.emotion-events"
    await ensure_topics(kafka.bootstrap, {topic: 1}, timeout=scaled(30))
    base = Settings(
        kafka_bootstrap=kafka.bootstrap,
        redis_url=redis_server.url,
        output_topic=topic,
        key_prefix=unique,
        gateway_port=0,
        gateway_secret=SECRET,
    )

    @contextlib.asynccontextmanager
    async def gateway(port: int = 0) -> AsyncIterator[int]:
        stop = asyncio.Event()
        bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        settings = base.model_copy(update={"gateway_port": port})
        task = asyncio.create_task(serve_gateway(settings, stop, ready=bound.set_result))
        await asyncio.wait({task, bound}, timeout=scaled(30), return_when="FIRST_COMPLETED")
        if not bound.done():
            stop.set()
            await task  # raises what kept it from starting
        try:
            yield bound.result()
        finally:
            stop.set()
            await asyncio.wait_for(task, scaled(15))

    a, b = "call-x1", "call-x2"
    before = [emotion(a, 0, "neutral"), emotion(a, 1, "neutral"), emotion(a, 2, "sadness")]
    live = [emotion(a, 3, "anger"), alert(a, 3), emotion(b, 0, "joy"), emotion(a, 4, "anger")]
    after = [emotion(b, 1, "neutral"), emotion(a, 5, "neutral")]
    token = TokenSigner(SECRET).mint("default", ("call-x*",))
    env = {**os.environ, "CFNESA_TOKEN": token}
    total = len(before) + len(live) + len(after)
    wait_s = scaled(15)

    store = StateStore.connect(redis_server.url, prefix=unique)
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, linger_ms=1)
    await producer.start()
    proc = None
    try:
        pipeline = Pipeline(store, producer, topic)
        async with gateway() as port:
            await pipeline.emit(before)  # before the client: it gets them as a snapshot
            proc = await asyncio.create_subprocess_exec(
                *(sys.executable, str(EXAMPLE), "--url", f"ws://127.0.0.1:{port}/ws"),
                *("--max-events", str(total), a, b),
                env=env,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            assert proc.stdout is not None and proc.stderr is not None
            await wait_for_line(proc.stderr, "subscribed", wait_s)
            out = await read_until(proc.stdout, len(before), wait_s)
            await pipeline.emit(live)
            out += await read_until(proc.stdout, len(live), wait_s)
        # The gateway went away (1001). The client reconnects with backoff to the next
        # instance on the same address; its snapshots repeat all of the above.
        async with gateway(port):
            status = await wait_for_line(proc.stderr, "subscribed", wait_s)
            assert any("connection closed (1001)" in s for s in status), status
            await pipeline.emit(after)
            out += await read_until(proc.stdout, len(after), wait_s)
            assert await asyncio.wait_for(proc.wait(), wait_s) == 0  # --max-events reached
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        await producer.stop()
        await store.close()

    show = load_example().line
    assert out == [show(e) for e in [*before, *live, *after]]  # in order, nothing twice
    assert out[3] == "call-x1 #3 customer: anger (0.80, shift 0.25)"
    assert out[4] == "ALERT call-x1 #3 customer: emotion_shift (high) neutral -> anger"
    assert out[0] == "call-x1 #0 agent: neutral (0.80)"  # no shift against nobody


def test_line_formats_every_output_type_and_skips_unknown_ones():
    example = load_example()
    summary = {"type": "summary", "conversation_id": "c", "seq": 9, "utterances": 9, "alerts": 1}
    assert example.line(summary) == "END c #9: 9 utterances, 1 alerts"
    assert example.line({"type": "mood", "conversation_id": "c", "seq": 1}) is None
    newest: dict[str, Any] = {}
    seen = [
        example.is_new(newest, {"conversation_id": "c", "seq": s, "event_id": f"c:{s}:{k}"})
        for s, k in [(1, "emotion"), (1, "alert"), (1, "emotion"), (0, "emotion"), (2, "emotion")]
    ]
    assert seen == [True, True, False, False, True]
