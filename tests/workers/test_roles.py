"""Roles and the analysis policy on the real broker and redis-server: roles flow to
every output, and with CFNESA_ANALYZE_ROLES=customer nothing about the agent's
emotions is emitted, stored or summarised, while the agent's turns still give the
customer's emotions their context (exactness against the whole-dialogue forward)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import redis.asyncio as aioredis
from support import FEATURE_SPEC, Call, Collector, Pipeline, produce, reference, running

from streaming.alerts import AlertRules
from streaming.events import end_event, utterance_event
from streaming.state_store import unpack_event

pytestmark = pytest.mark.slow

MELD = ["neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"]


def role_calls(n: int, length: int, seed: int) -> list[Call]:
    """Calls of an agent "A" and a customer "C" taking turns, the agent first."""
    rng = np.random.default_rng(seed)
    calls = []
    for i in range(n):
        vecs = rng.standard_normal((length, 384)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        speakers = ["A" if t % 2 == 0 or rng.random() < 0.2 else "C" for t in range(length)]
        calls.append(Call(f"roles-{seed}-{i}", speakers, list(vecs)))
    return calls


def messages(calls: list[Call], ended: int) -> list[tuple[str, bytes]]:
    """Each call's utterances (the agent's role given on their first utterance only,
    the customer's on every one), then an end for the first ``ended`` calls."""
    out = []
    for k, call in enumerate(calls):
        for seq, (speaker, vec) in enumerate(zip(call.speakers, call.vectors, strict=True)):
            first = call.speakers.index(speaker) == seq
            role = "customer" if speaker == "C" else ("agent" if first else None)
            out.append(
                (
                    call.cid,
                    utterance_event(call.cid, seq, speaker, {"text": vec}, FEATURE_SPEC, role=role),
                )
            )
        if k < ended:
            out.append((call.cid, end_event(call.cid, len(call.vectors))))
    return out


async def run(pipeline: Pipeline, engine, calls: list[Call], ended: int, **settings: str):
    s = pipeline.settings.model_copy(update=settings)
    want = sum(c.speakers.count("C") for c in calls[ended:])  # emotions of the open calls
    async with Collector(s.kafka_bootstrap, s.output_topic) as out, running(s, engine):
        await produce(s.kafka_bootstrap, s.input_topic, messages(calls, ended))
        await out.wait(
            lambda c: (
                len(c.of(s.output_topic, "summary")) == ended
                and sum(
                    e["conversation_id"] in {x.cid for x in calls[ended:]} and e["speaker"] == "C"
                    for e in c.of(s.output_topic, "emotion")
                )
                >= want
            )
        )
    return s, out


async def test_customer_only_policy_keeps_nothing_about_the_agent(pipeline: Pipeline, engine):
    calls = role_calls(3, 12, seed=11)
    s, out = await run(pipeline, engine, calls, ended=2, analyze_roles="customer")
    events = out.of(s.output_topic)
    assert events, "no output at all"
    # no output of any kind carries an agent's emotion
    for e in events:
        if e["type"] in ("emotion", "alert"):
            assert (e["speaker"], e["role"]) == ("C", "customer"), e
            for ev in e.get("evidence", []):
                assert calls_by_id(calls)[e["conversation_id"]].speakers[ev["seq"]] == "C"
    by_call: dict[str, list[dict]] = {}
    for e in out.of(s.output_topic, "emotion"):
        by_call.setdefault(e["conversation_id"], []).append(e)
    for call in calls:
        got = {e["seq"]: e for e in by_call[call.cid]}
        customer = [t for t, spk in enumerate(call.speakers) if spk == "C"]
        assert sorted(got) == customer
        # the agent's turns are still the customer's context: exact against the whole call
        ref = reference(engine, call)
        for t in customer:
            probs = got[t]["probabilities"]
            assert max(abs(probs[n] - float(p)) for n, p in zip(MELD, ref[t], strict=True)) < 1e-4
            # the shift against the previous utterance compares with the agent's emotion
            if t > 0 and call.speakers[t - 1] == "A":
                assert got[t]["shift"]["vs_previous"] is None
            assert -1.0 <= got[t]["sentiment"] <= 1.0
    for summary in out.of(s.output_topic, "summary"):
        call = calls_by_id(calls)[summary["conversation_id"]]
        agent_turns = call.speakers.count("A")
        assert set(summary["speakers"]) == {"C"} and set(summary["dominant"]) == {"C"}
        assert set(summary["by_speaker"]) == {"C"} and set(summary["roles"]) == {"customer"}
        assert summary["not_analyzed"] == agent_turns
        assert summary["utterances"] == len(call.vectors) - agent_turns
    # nor is any stored in Redis: the recent events and the call's figures
    client = aioredis.from_url(s.redis_url)
    try:
        for call in calls:
            key = f"{s.key_prefix}:{{{call.cid}}}"
            for raw in await client.lrange(f"{key}:events", 0, -1):
                event = json.loads(unpack_event(raw))
                assert "A" not in json.dumps(event.get("speakers", {})), event
                if event["type"] != "summary":
                    assert event["speaker"] == "C"
            app = json.loads(await client.hget(f"{key}:state", "app"))
            # the agent: the role, and nothing about an emotion
            assert app["speakers"]["A"] == {"role": "agent"}
            assert app["speakers"]["C"]["counts"] and app["speakers"]["C"]["sentiment"]["n"]
            # no sentiment figures of the agent's role either (the customer's role shares
            # the customer's own track: one speaker in it)
            assert app["roles"] == {} and app["role_owner"] == {"customer": "C"}
    finally:
        await client.aclose()


def calls_by_id(calls: list[Call]) -> dict[str, Call]:
    return {c.cid: c for c in calls}


async def test_roles_reach_every_output_and_every_role_is_analysed_by_default(
    pipeline: Pipeline, engine
):
    calls = role_calls(2, 10, seed=12)
    s, out = await run(pipeline, engine, calls, ended=2)
    rules = AlertRules.load().for_labels(MELD)
    emotions = out.of(s.output_topic, "emotion")
    assert len(emotions) == sum(len(c.vectors) for c in calls)
    for e in emotions:
        # the agent's role was sent on their first utterance only: remembered after
        assert e["role"] == {"A": "agent", "C": "customer"}[e["speaker"]]
        assert e["sentiment"] == pytest.approx(rules.sentiment(e["probabilities"]), abs=2e-6)
    for alert in out.of(s.output_topic, "alert"):
        assert alert["role"] == "customer"  # the default rules do not watch agents
        assert alert["evidence"] and alert["evidence"][-1]["seq"] == alert["seq"]
    for summary in out.of(s.output_topic, "summary"):
        assert set(summary["roles"]) == {"agent", "customer"}
        assert summary["by_speaker"]["A"]["role"] == "agent"
        assert summary["not_analyzed"] == 0
        call = calls_by_id(calls)[summary["conversation_id"]]
        mine = [e for e in emotions if e["conversation_id"] == call.cid and e["speaker"] == "C"]
        figures = summary["by_speaker"]["C"]
        assert figures["utterances"] == len(mine)
        assert figures["sentiment_mean"] == pytest.approx(
            sum(e["sentiment"] for e in mine) / len(mine), abs=1e-5
        )
        assert figures["sentiment_min"] == min(e["sentiment"] for e in mine)


def test_replay_gives_the_first_speaker_the_agent_role():
    from workers.replay import assign_roles

    assert assign_roles(["B", "A", "B", "C"]) == ["agent", "customer", "agent", "customer"]
    assert assign_roles(["B", "A"], "none") == [None, None]
    assert assign_roles([]) == []
    with pytest.raises(ValueError, match="first-agent"):
        assign_roles(["A"], "random")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ('[negative_onset]\nroles = ["caller"]\n', "roles"),
        ("[sentiment_below]\nenabled = true\nbelow = -0.5\nwindow = 3\n", "window"),
        (
            '[label_sets.mine]\nlabels = ["calm", "tense"]\npositive = []\nnegative = ["tense"]\n',
            "match none",
        ),
    ],
)
def test_a_bad_rules_file_stops_the_worker_at_start_naming_what_is_wrong(
    tmp_path, text: str, named: str
):
    import os
    import subprocess

    from support import CFNESA

    rules = tmp_path / "rules.toml"
    rules.write_text(text)
    env = {
        **os.environ,
        "CFNESA_ALERT_RULES": str(rules),
        "CFNESA_KAFKA_BOOTSTRAP": "127.0.0.1:9",  # never reached: the rules fail first
        "CFNESA_METRICS_PORT": "0",
    }
    done = subprocess.run(
        [str(CFNESA), "worker"], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert str(rules) in done.stderr and named in done.stderr
    assert "Traceback" not in done.stderr
