"""The broker's floor: a do-nothing stage with the worker's Kafka clients and loop.

``python benchmarks/echo.py`` reads the worker's settings (``CFNESA_*``: bootstrap,
input and output topics, group, consumer timeouts, ``fetch_max_wait_ms``,
``max_batch_events``, ``max_wait_ms``) and runs the worker's loop shape
(`streaming.processor.StreamCore`: poll -> process -> produce -> commit) with no
model and no Redis: each input utterance becomes one small output event naming
its conversation and seq (so the benchmark's receiver matches it as it matches an
emotion event). What it costs is what the broker and the Kafka clients cost on
this machine: the floor the pipeline benchmark divides by (`benchmarks/pipeline.py`).

The producer and consumer options are the worker's (`workers.worker.Worker.start`,
copied here: that code is not to be reshaped for a benchmark); keep them in step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from aiokafka.structs import ConsumerRecord

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streaming.processor import Message, StreamCore, worker_kafka_clients
from streaming.security import kafka_client_options
from streaming.settings import WorkerSettings

log = logging.getLogger("echo")


def echo_value(value: bytes | None) -> bytes | None:
    """The echo of one input: ``{"type": "emotion", "conversation_id", "seq", "echo"}``,
    or None for anything that is not an utterance with an id and a seq."""
    try:
        event = json.loads(value or b"")
    except ValueError:
        return None
    if not isinstance(event, dict) or event.get("type") != "utterance":
        return None
    cid, seq = event.get("conversation_id"), event.get("seq")
    if not isinstance(cid, str) or not isinstance(seq, int):
        return None
    out = {"type": "emotion", "conversation_id": cid, "seq": seq, "echo": True}
    return json.dumps(out, separators=(",", ":")).encode()


async def run(settings: WorkerSettings, stop: asyncio.Event) -> None:
    s = settings
    security = kafka_client_options(s)
    servers = s.bootstrap_servers()
    producer, consumer = worker_kafka_clients(s, security)  # the worker's very clients
    core = StreamCore(consumer, producer, servers=servers, security=security)

    async def process(records: Sequence[ConsumerRecord]) -> list[Message]:
        out = []
        for rec in records:
            value = echo_value(rec.value)
            if value is not None:
                out.append(Message(s.output_topic, rec.key, value))
        return out

    try:
        if not await core.start_clients(stop):
            return
        core.subscribe([s.input_topic])
        print("echo up", flush=True)
        while not stop.is_set():
            records = await core.poll(s.max_batch_events, s.max_wait_ms)
            if records and not await core.run_batch(records, process, stop):
                break
    finally:
        await core.close()


def main() -> int:
    logging.basicConfig(level=logging.WARNING)
    settings = WorkerSettings()

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run(settings, stop)

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
