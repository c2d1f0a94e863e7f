"""What eval-alerts measures is what the worker ships: the same labelled calls played
through the worker on the real broker and Redis raise exactly the alerts eval-alerts
computes for them (same utterances, same rules, same seqs)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from support import Collector, Pipeline, produce

from model.data import Dialogue, default_data_dir, read_transcripts
from model.encoder import DEFAULT, TextEncoder
from streaming.alerts import AlertRules
from streaming.events import end_event, utterance_event
from workers.alert_eval import load_head, run_rules, stream
from workers.worker import Worker

pytestmark = pytest.mark.slow

CALLS = 30


def _rules(head_available: bool) -> AlertRules:
    """Every rule on, so that every code path raises something."""
    return AlertRules.model_validate(
        {
            "negative_onset": {
                "enabled": True,
                "score": "alert_head" if head_available else "p_negative",
                "min_score": 0.4,
                "rearm_after": 1,
            },
            "emotion_shift": {"enabled": True, "min_p_shift": 0.4, "min_confidence": 0.3},
            "sustained_negative": {"enabled": True, "utterances": 2},
        }
    )


async def test_worker_alerts_equal_eval_alerts(pipeline: Pipeline, engine):
    transcripts = [t for t in read_transcripts(default_data_dir() / "meld.jsonl")]
    chosen = [t for t in transcripts if t.split == "valid"][:CALLS]
    encoder = TextEncoder(adapter=DEFAULT)
    assert encoder.feature_spec == engine.config.feature_spec
    dialogues = [
        Dialogue(
            dialogue_id=f"parity-{i:03d}",
            split="valid",
            speakers=t.speakers,
            labels=np.zeros(len(t.texts), np.int64),
            text=encoder.encode(list(t.texts)),
        )
        for i, t in enumerate(chosen)
    ]
    head = load_head(engine.path)
    rules = _rules(head is not None).resolve(head)

    # eval-alerts' path: the engine stepped utterance by utterance, the shared rules code
    expected = {
        (dialogues[a.call].dialogue_id, a.position, a.rule)
        for a in run_rules(rules, dialogues, stream(engine, dialogues), engine.label_names)
    }
    assert len(expected) >= 10, "too few alerts to compare"
    assert {r for _, _, r in expected} == {"negative_onset", "emotion_shift", "sustained_negative"}

    # the worker's path: the same calls as live traffic, interleaved, on the real broker
    s = pipeline.settings
    messages = []
    longest = max(d.length for d in dialogues)
    for t in range(longest + 1):
        for d in dialogues:
            if t < d.length:
                body = {"text": d.text[t]}
                ev = utterance_event(
                    d.dialogue_id, t, d.speakers[t], body, engine.config.feature_spec
                )
                messages.append((d.dialogue_id, ev))
            elif t == d.length:
                messages.append((d.dialogue_id, end_event(d.dialogue_id, t)))
    worker = Worker(s, engine=engine, rules=rules)
    stop = asyncio.Event()
    await worker.start()
    task = asyncio.create_task(worker.run(stop))
    try:
        async with Collector(s.kafka_bootstrap, s.output_topic) as out:
            await produce(s.kafka_bootstrap, s.input_topic, messages)
            await out.wait(lambda c: len(c.of(s.output_topic, "summary")) == len(dialogues), 120)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await worker.close()
    shipped = {(e["conversation_id"], e["seq"], e["rule"]) for e in out.of(s.output_topic, "alert")}
    assert shipped == expected
