"""The worker against the real embedded broker and redis-server: exact outputs,
duplicates, gaps, ends, dead letters, a stale cache caught by the compare-and-set."""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.request

import numpy as np
import pytest
import redis.asyncio as aioredis
from support import (
    FEATURE_SPEC,
    Collector,
    Pipeline,
    check_outputs,
    interleave,
    make_calls,
    produce,
    running,
)

from streaming.events import end_event, utterance_event

pytestmark = pytest.mark.slow


async def test_streamed_events_equal_the_whole_dialogue_forward(pipeline: Pipeline, engine):
    s = pipeline.settings
    calls = make_calls(6, (3, 30), seed=1)
    async with Collector(s.kafka_bootstrap, s.output_topic) as out, running(s, engine):
        await produce(s.kafka_bootstrap, s.input_topic, interleave(calls))
        await out.wait(lambda c: len(c.of(s.output_topic, "summary")) == len(calls))
    emotions = out.of(s.output_topic, "emotion")
    assert len(emotions) == sum(len(c.vectors) for c in calls)  # nothing twice here
    check_outputs(engine, calls, emotions)
    for e in emotions:
        assert e["model"] == f"{engine.config.name}@{engine.fingerprint}"
        assert e["gap"] is False
        assert (e["shift"]["vs_previous"] is None) == (e["seq"] == 0)
    summaries = {e["conversation_id"]: e for e in out.of(s.output_topic, "summary")}
    for call in calls:
        summary = summaries[call.cid]
        assert summary["utterances"] == len(call.vectors)
        counts = summary["speakers"]
        assert sum(sum(c.values()) for c in counts.values()) == len(call.vectors)
        assert set(counts) == set(call.speakers)
    # after `end` the model state is gone; only a small tombstone with the summary stays
    client = aioredis.from_url(s.redis_url)
    fields = await client.hkeys(f"{s.key_prefix}:{{{calls[0].cid}}}:state")
    await client.aclose()
    assert set(fields) == {b"seq", b"app", b"ended", b"summary"}


async def test_duplicates_re_emit_the_same_events_and_gaps_are_marked(pipeline, engine):
    s = pipeline.settings
    (call,) = make_calls(1, 8, seed=2)
    async with Collector(s.kafka_bootstrap, s.output_topic) as out, running(s, engine):
        first = [(call.cid, call.message(i)) for i in range(4)]
        await produce(s.kafka_bootstrap, s.input_topic, first)
        await out.wait(lambda c: len(c.of(s.output_topic, "emotion")) == 4)
        before = out.of(s.output_topic)
        # a redelivery of seq 1-3 (a crashed producer resending), then a gap: 4 is lost
        await produce(s.kafka_bootstrap, s.input_topic, first[1:])
        await produce(s.kafka_bootstrap, s.input_topic, [(call.cid, call.message(5))])
        await out.wait(lambda c: any(e["seq"] == 5 for e in c.of(s.output_topic, "emotion")))
    emotions = out.of(s.output_topic, "emotion")
    by_seq: dict[int, list[dict]] = {}
    for e in emotions:
        by_seq.setdefault(e["seq"], []).append(e)
    for seq in (1, 2, 3):
        assert len(by_seq[seq]) == 2 and by_seq[seq][0] == by_seq[seq][1]  # exact repeats
    assert 4 not in by_seq
    assert by_seq[5][0]["gap"] is True
    assert all(e["gap"] is False for e in before if e["type"] == "emotion")


BAD_CASES: dict[str, bytes] = {
    "not_json": b"{not json",
    "not_object": b"[1, 2, 3]",
    "unknown_type": json.dumps({"type": "hello", "schema_version": 1}).encode(),
    "unsupported_schema_version": json.dumps(
        {"type": "end", "schema_version": 2, "conversation_id": "bad-v", "seq": 1}
    ).encode(),
    "missing_conversation_id": json.dumps(
        {"type": "end", "schema_version": 1, "conversation_id": "", "seq": 1}
    ).encode(),
    "bad_seq": json.dumps(
        {"type": "end", "schema_version": 1, "conversation_id": "bad-s", "seq": -1}
    ).encode(),
    "wrong_dimension": utterance_event("bad-d", 0, "agent", {"text": np.ones(100)}, FEATURE_SPEC),
    "non_finite": utterance_event(
        "bad-n", 0, "agent", {"text": np.r_[np.ones(383), np.nan]}, FEATURE_SPEC, b64=False
    ),
    "bad_base64": json.dumps(
        {
            "type": "utterance",
            "schema_version": 1,
            "conversation_id": "bad-b",
            "seq": 0,
            "speaker": "agent",
            "feature_spec": FEATURE_SPEC,
            "features": {"text": {"dtype": "float32", "shape": [384], "b64": "@@not-b64@@"}},
        }
    ).encode(),
    "oversize": b'{"pad": "' + b"x" * 1_100_000 + b'"}',
    # plain MiniLM features sent to the model trained on the adapter's (issue 6): the mix
    # a feature spec exists to stop
    "feature_spec_mismatch": utterance_event(
        "bad-f",
        0,
        "agent",
        {"text": np.ones(384)},
        "minilm-l6-v2" if FEATURE_SPEC != "minilm-l6-v2" else "another-encoder",
    ),
    "no_modality": utterance_event("bad-m", 0, "agent", {"text": None}, FEATURE_SPEC),
    "bad_role": utterance_event(
        "bad-r", 0, "spk-1", {"text": np.ones(384)}, FEATURE_SPEC, role="supervisor"
    ),
}


@pytest.fixture(scope="module")
def dead_letter_run(kafka, redis_server, engine):
    """One run: every bad message between good ones, in the same batches."""
    from support import new_pipeline

    async def run():
        pipe = new_pipeline(kafka.bootstrap, redis_server.url)
        await pipe.create_topics(partitions=1)  # one partition: bad and good share batches
        s = pipe.settings
        calls = make_calls(3, 6, seed=3)
        mixed = _merge(interleave(calls), list(BAD_CASES.values()))
        async with (
            Collector(s.kafka_bootstrap, s.output_topic, s.dlq_topic) as out,
            running(s, engine),
        ):
            await produce(s.kafka_bootstrap, s.input_topic, mixed)
            await out.wait(
                lambda c: (
                    len(c.of(s.dlq_topic)) >= len(BAD_CASES)
                    and len(c.of(s.output_topic, "summary")) == len(calls)
                )
            )
        return s, calls, out

    return asyncio.run(run())


def _merge(good: list[tuple[str, bytes]], bad: list[bytes]) -> list[tuple[str | None, bytes]]:
    out: list[tuple[str | None, bytes]] = []
    for i, g in enumerate(good):
        out.append(g)
        if i < len(bad):
            out.append(("bad", bad[i]))
    return out


@pytest.mark.parametrize("reason", list(BAD_CASES))
def test_bad_input_becomes_a_dead_letter(dead_letter_run, reason):
    s, _, out = dead_letter_run
    letters = [d for d in out.of(s.dlq_topic) if d["reason"] == reason]
    assert len(letters) == 1, [d["reason"] for d in out.of(s.dlq_topic)]
    letter = letters[0]
    assert letter["source"]["topic"] == s.input_topic
    assert letter["detail"]
    raw = base64.b64decode(letter["payload_b64"])
    assert raw == BAD_CASES[reason][: len(raw)]
    assert letter["truncated"] == (len(BAD_CASES[reason]) > len(raw))


def test_bad_neighbours_lose_nothing(dead_letter_run, engine):
    s, calls, out = dead_letter_run
    check_outputs(engine, calls, out.of(s.output_topic, "emotion"))
    assert len(out.of(s.dlq_topic)) == len(BAD_CASES)


async def test_stale_cache_is_caught_by_the_compare_and_set(pipeline, kafka, engine):
    """Worker A caches a call's state; another worker advances the call in Redis
    (as after a rebalance); A's next write is refused, A reloads and goes on exactly."""
    s = pipeline.settings
    other = s.model_copy(
        update={"input_topic": f"{s.input_topic}-b", "group_id": f"{s.group_id}-b"}
    )
    await pipeline.create_topics()
    from streaming.topics import ensure_topics

    await ensure_topics(kafka.bootstrap, {other.input_topic: 1})
    (call,) = make_calls(1, 8, seed=4)
    msgs = [(call.cid, call.message(i)) for i in range(8)]
    async with Collector(s.kafka_bootstrap, s.output_topic) as out, running(s, engine) as a:
        await produce(s.kafka_bootstrap, s.input_topic, msgs[:3])
        await out.wait(lambda c: len(c.of(s.output_topic, "emotion")) == 3)
        assert call.cid in a.cache
        async with running(other, engine):
            await produce(s.kafka_bootstrap, other.input_topic, msgs[3:5])
            await out.wait(lambda c: len(c.of(s.output_topic, "emotion")) == 5)
        conflicts = a.metrics.conflicts._value.get()
        await produce(s.kafka_bootstrap, s.input_topic, msgs[3:])
        await out.wait(lambda c: any(e["seq"] == 7 for e in c.of(s.output_topic, "emotion")))
        assert a.metrics.conflicts._value.get() == conflicts + 1
    check_outputs(engine, [call], out.of(s.output_topic, "emotion"))


async def test_metrics_and_health_endpoints(pipeline, engine):
    from streaming.embedded import free_port

    port = free_port()
    s = pipeline.settings.model_copy(update={"metrics_port": port})
    (call,) = make_calls(1, 3, seed=5)
    async with Collector(s.kafka_bootstrap, s.output_topic) as out, running(s, engine):
        await produce(s.kafka_bootstrap, s.input_topic, [(call.cid, m) for m in call.messages()])
        await produce(s.kafka_bootstrap, s.input_topic, [("x", b"junk")])
        await out.wait(lambda c: len(c.of(s.output_topic, "summary")) == 1)

        def get(path: str) -> tuple[int, str]:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                return r.status, r.read().decode()

        await asyncio.sleep(0.3)
        status, body = await asyncio.to_thread(get, "/metrics")
        assert status == 200
        assert 'cfnesa_events_in_total{type="utterance"} 3.0' in body
        assert 'cfnesa_events_out_total{type="emotion"} 3.0' in body
        # the emotions by label add up to the events, each label as predicted
        predicted: dict[str, int] = {}
        for e in out.of(s.output_topic, "emotion"):
            predicted[e["emotion"]] = predicted.get(e["emotion"], 0) + 1
        for label, n in predicted.items():
            assert f'cfnesa_emotions_total{{emotion="{label}"}} {float(n)}' in body
        assert "cfnesa_step_seconds_bucket" in body
        assert "cfnesa_consumer_lag" in body
        status, body = await asyncio.to_thread(get, "/healthz")
        assert status == 200 and json.loads(body)["ok"] is True


async def test_end_of_an_unknown_call_and_utterances_after_end(pipeline, engine):
    s = pipeline.settings
    (call,) = make_calls(1, 3, seed=6)
    async with Collector(s.kafka_bootstrap, s.output_topic, s.dlq_topic) as out, running(s, engine):
        await produce(s.kafka_bootstrap, s.input_topic, [("ghost", end_event("ghost", 0))])
        await produce(s.kafka_bootstrap, s.input_topic, [(call.cid, m) for m in call.messages()])
        await out.wait(lambda c: len(c.of(s.output_topic, "summary")) == 2)
        late = utterance_event(call.cid, 9, "agent", {"text": call.vectors[0]}, FEATURE_SPEC)
        await produce(s.kafka_bootstrap, s.input_topic, [(call.cid, late)])
        await produce(s.kafka_bootstrap, s.input_topic, [(call.cid, end_event(call.cid, 3))])
        await out.wait(lambda c: len(c.of(s.dlq_topic)) == 1)
        await out.wait(lambda c: len(c.of(s.output_topic, "summary")) == 3)
    ghost = [e for e in out.of(s.output_topic, "summary") if e["conversation_id"] == "ghost"]
    assert ghost[0]["utterances"] == 0
    assert out.of(s.dlq_topic)[0]["reason"] == "conversation_ended"
    ends = [e for e in out.of(s.output_topic, "summary") if e["conversation_id"] == call.cid]
    assert ends[0] == ends[1]  # the repeated end re-emits the same summary


async def test_tenant_flows_from_input_to_every_output(pipeline, engine):
    s = pipeline.settings
    (call,) = make_calls(1, 4, seed=7)
    msgs = [
        (
            call.cid,
            utterance_event(
                call.cid,
                i,
                call.speakers[i],
                {"text": call.vectors[i]},
                FEATURE_SPEC,
                tenant="acme",
            ),
        )
        for i in range(4)
    ]
    msgs.append((call.cid, end_event(call.cid, 4, tenant="acme")))
    async with Collector(s.kafka_bootstrap, s.output_topic) as out, running(s, engine):
        await produce(s.kafka_bootstrap, s.input_topic, msgs)
        await out.wait(lambda c: len(c.of(s.output_topic, "summary")) == 1)
    assert {e["tenant"] for e in out.of(s.output_topic)} == {"acme"}


async def test_a_state_of_another_model_is_reset_loudly(pipeline, engine, caplog):
    """A stored state written by another model fingerprint is never fed to the
    model: the call goes on from an empty state, with a warning and a metric."""
    import dataclasses

    from model.engine import Utterance
    from streaming.state_store import Commit, StateStore

    s = pipeline.settings
    (call,) = make_calls(1, 4, seed=8)
    foreign = dataclasses.replace(engine.new_state(), fingerprint="0000000000000000")
    store = StateStore.connect(s.redis_url, prefix=s.key_prefix)
    (ok,) = await store.commit(
        [Commit(call.cid, expected_seq=None, new_seq=2, fields=foreign.to_parts())]
    )
    await store.close()
    assert ok.ok
    async with Collector(s.kafka_bootstrap, s.output_topic) as out, running(s, engine) as w:
        await produce(s.kafka_bootstrap, s.input_topic, [(call.cid, call.message(3))])
        await out.wait(lambda c: len(c.of(s.output_topic, "emotion")) == 1)
        resets = w.metrics.state_resets.labels("fingerprint")._value.get()
    assert resets == 1
    assert "stored state refused" in caplog.text
    (event,) = out.of(s.output_topic, "emotion")
    assert event["seq"] == 3 and event["shift"]["vs_previous"] is None  # a fresh start
    (fresh,) = engine.run_dialogue([Utterance(call.speakers[3], text=call.vectors[3])])
    got = [event["probabilities"][n] for n in engine.label_names]
    assert np.allclose(got, fresh.probabilities, atol=1e-4)


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        ("READONLY You can't write against a read only replica.", True),
        ("CLUSTERDOWN The cluster is down", True),
        ("TRYAGAIN Multiple keys request during rehashing of slot", True),
        ("LOADING Redis is loading the dataset in memory", True),
        ("Error running script (call to f_1): @user_script:12: -OOM command not allowed", True),
        ("WRONGTYPE Operation against a key holding the wrong kind of value", False),
        ("NOSCRIPT No matching script.", False),
        ("ERR unknown command 'FOO'", False),
    ],
)
def test_which_redis_errors_pause_the_worker(error: str, transient: bool):
    """Outages pause the worker with backoff; a programming error still stops it."""
    from redis.exceptions import ResponseError

    from streaming.faults import redis_transient

    assert redis_transient(ResponseError(error)) is transient
