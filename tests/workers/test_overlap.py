"""``overlap_batches``: a batch's produce and commit run while the next batch is
polled and processed. The same guarantees as the plain loop, tested the same way:
kill -9 at every stage, then every utterance has its event, repeats are exact,
order holds per call, probabilities equal the whole-dialogue forward; and a
running worker counts what it produced by type."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest
from support import (
    Collector,
    Pipeline,
    check_outputs,
    interleave,
    make_calls,
    produce,
    running,
    start_worker_process,
    wait_exit,
)

pytestmark = pytest.mark.slow

POINTS = ("after_poll", "after_step", "after_persist", "after_produce", "after_commit")
OVERLAP = {"CFNESA_OVERLAP_BATCHES": "true", "CFNESA_MAX_BATCH_EVENTS": "4"}


async def test_kill_9_at_every_stage_loses_nothing_with_overlap(
    pipeline: Pipeline, engine, tmp_path: Path
):
    s = pipeline.settings
    calls = make_calls(6, (10, 20), seed=31)
    ended, open_ = calls[:3], calls[3:]
    messages = interleave(ended) + interleave(open_, end=False)
    total = sum(len(c.vectors) for c in calls)
    plan = [f"{POINTS[i % 5]}:{1 + (i // 5) % 2}" for i in range(10)]
    log = tmp_path / "workers.log"
    kills = 0
    async with Collector(s.kafka_bootstrap, s.output_topic) as out:
        await produce(s.kafka_bootstrap, s.input_topic, messages)

        def complete(c: Collector) -> bool:
            return len({e["event_id"] for e in c.of(s.output_topic, "emotion")}) == total and len(
                {e["event_id"] for e in c.of(s.output_topic, "summary")}
            ) == len(ended)

        for spec in plan:
            if complete(out):
                break
            proc = start_worker_process(pipeline, log, CFNESA_FAULTS=spec, **OVERLAP)
            code = await asyncio.to_thread(wait_exit, proc, 60)
            if code is None:  # never reached its fault point (little input left)
                proc.kill()
                proc.wait()
            else:
                assert code == -signal.SIGKILL, log.read_text()[-3000:]
                kills += 1
        ups = log.read_text().count("worker up")
        proc = start_worker_process(pipeline, log, CFNESA_LOG_LEVEL="INFO", **OVERLAP)
        try:
            await out.wait(complete, timeout=120)
            deadline = time.monotonic() + 60
            while log.read_text().count("worker up") == ups and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.2)
        finally:
            proc.terminate()
            assert await asyncio.to_thread(wait_exit, proc, 30) == 0
    assert kills >= 5
    check_outputs(engine, calls, out.of(s.output_topic, "emotion"))


async def test_overlapped_batches_count_what_they_produced(pipeline: Pipeline, engine):
    s = pipeline.settings.model_copy(update={"overlap_batches": True, "max_batch_events": 2})
    calls = make_calls(3, 7, seed=32)
    async with Collector(s.kafka_bootstrap, s.output_topic) as out, running(s, engine) as w:
        await produce(s.kafka_bootstrap, s.input_topic, interleave(calls))
        await out.wait(lambda c: len(c.of(s.output_topic, "summary")) == len(calls))
        deadline = time.monotonic() + 10
        while (  # noqa: ASYNC110 (the last batch's count follows its acknowledgement)
            w.metrics.events_out.labels("summary")._value.get() < len(calls)
            and time.monotonic() < deadline
        ):
            await asyncio.sleep(0.05)
        counted = {k: w.metrics.events_out.labels(k)._value.get() for k in ("emotion", "summary")}
    emotions = out.of(s.output_topic, "emotion")
    check_outputs(engine, calls, emotions)
    assert counted == {"emotion": float(len(emotions)), "summary": float(len(calls))}
