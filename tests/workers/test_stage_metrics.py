"""Where a batch's time goes: the worker exports one histogram per stage
(`cfnesa_stage_seconds{stage}`) and its process CPU on /metrics."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import Collector, make_calls, produce, running

from streaming.embedded import free_port
from workers.metrics import STAGES
from workers.processes import http_get

pytestmark = pytest.mark.slow

# inside one batch, after the poll (cfnesa_batch_seconds times poll-end to commit)
_IN_BATCH = ("validate", "load", "step", "events", "persist", "outputs", "produce", "commit")


def _samples(body: str) -> dict[str, float]:
    out = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            stage = s.labels.get("stage")
            if stage is not None and "le" not in s.labels:
                out[f"{s.name}:{stage}"] = s.value
            elif not s.labels:
                out[s.name] = s.value
    return out


async def test_a_running_worker_exports_every_stage_histogram(pipeline, engine):
    port = free_port()
    s = pipeline.settings.model_copy(update={"metrics_port": port})
    (call,) = make_calls(1, 6, seed=21)
    async with Collector(s.kafka_bootstrap, s.output_topic) as out, running(s, engine):
        status, body = await asyncio.to_thread(http_get, port, "/metrics")
        assert status == 200
        before = _samples(body.decode())
        # exported from the start, before any batch
        assert all(before[f"cfnesa_stage_seconds_count:{st}"] == 0 for st in STAGES)
        await produce(s.kafka_bootstrap, s.input_topic, [(call.cid, m) for m in call.messages()])
        await out.wait(lambda c: len(c.of(s.output_topic, "summary")) == 1)
        await asyncio.sleep(0.3)  # the commit of the last batch is observed after its produce
        status, body = await asyncio.to_thread(http_get, port, "/metrics")
    got = _samples(body.decode())
    batches = got["cfnesa_batch_seconds_count"]
    assert batches >= 1
    for stage in STAGES:
        count = got[f"cfnesa_stage_seconds_count:{stage}"]
        assert count >= 1, stage
        assert got[f"cfnesa_stage_seconds_sum:{stage}"] > 0, stage
    for stage in ("validate", "outputs", "produce", "commit", "poll_wait", "batch_fill"):
        assert got[f"cfnesa_stage_seconds_count:{stage}"] == batches, stage
    # the stages of a batch are parts of it: together no longer than the batches
    inside = sum(got[f"cfnesa_stage_seconds_sum:{st}"] for st in _IN_BATCH)
    assert inside <= got["cfnesa_batch_seconds_sum"]
    assert got["process_cpu_seconds_total"] > 0
