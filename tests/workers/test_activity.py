"""The worker keeps the per-tenant index of calls in progress (workers/activity.py,
streaming/call_index.py): a real worker, the embedded broker and redis-server."""

from __future__ import annotations

import json

import pytest
from support import FEATURE_SPEC, Collector, Pipeline, make_calls, produce, running

from streaming.call_index import CallIndex, IndexView
from streaming.events import end_event, utterance_event
from streaming.state_store import StateStore

pytestmark = pytest.mark.slow


async def test_a_call_is_indexed_on_its_first_utterance_and_moved_at_its_end(
    pipeline: Pipeline, engine
):
    s = pipeline.settings
    acme, plain = make_calls(2, 3, seed=11, prefix="idx")
    tenanted = [
        utterance_event(
            acme.cid, i, acme.speakers[i], {"text": acme.vectors[i]}, FEATURE_SPEC, tenant="acme"
        )
        for i in range(3)
    ]
    store = StateStore.from_settings(s)
    index = CallIndex(
        store, state_ttl_s=s.state_ttl_s, ended_ttl_s=s.ended_ttl_s, keep_ended=s.recent_ended_calls
    )

    async def views() -> tuple[IndexView, IndexView]:
        return (
            await index.read("acme", max_active=10, max_ended=10),
            await index.read("default", max_active=10, max_ended=10),
        )

    try:
        async with Collector(s.kafka_bootstrap, s.output_topic) as out, running(s, engine):
            await produce(s.kafka_bootstrap, s.input_topic, [(acme.cid, tenanted[0])])
            await produce(s.kafka_bootstrap, s.input_topic, [(plain.cid, plain.message(0))])
            await out.wait(lambda c: len(c.of(s.output_topic, "emotion")) == 2)
            a, d = await views()
            assert (a.active, a.ended) == ([acme.cid], [])
            assert (d.active, d.ended) == ([plain.cid], [])

            rest = [(acme.cid, m) for m in tenanted[1:]]
            rest.append((acme.cid, end_event(acme.cid, 3, tenant="acme")))
            await produce(s.kafka_bootstrap, s.input_topic, rest)
            await out.wait(lambda c: len(c.of(s.output_topic, "summary")) == 1)
            a, d = await views()
            assert (a.active, a.ended) == ([], [acme.cid])
            assert d.active == [plain.cid]
            # the summary stays where the worker stored it: the call's recent events
            stored = (await store.events([acme.cid]))[acme.cid]
            assert json.loads(stored[-1])["type"] == "summary"

            # A crash between the commit and the index write, then the replay: the index
            # is gone (as if never written); the redelivered end is a duplicate, and it
            # writes the index again.
            await store.client.delete(index.active_key("acme"), index.ended_key("acme"))
            await produce(
                s.kafka_bootstrap,
                s.input_topic,
                [(acme.cid, end_event(acme.cid, 3, tenant="acme"))],
            )
            await out.wait(lambda c: len(c.of(s.output_topic, "summary")) == 2)
            a, _ = await views()
            assert (a.active, a.ended) == ([], [acme.cid])
    finally:
        await store.close()
