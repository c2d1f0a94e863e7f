"""The worker's planner on plain records: no Kafka, no Redis, no model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streaming.alerts import CallTracker
from streaming.events import DeadLetterReason, Expectations, end_event, utterance_event
from workers.conversations import Conv
from workers.planner import intake, plan

EXPECT = Expectations(feature_spec="spec", dims={"text": 4, "audio": 0, "visual": 0})


@dataclass(frozen=True)
class Rec:
    value: bytes
    partition: int = 0


def _utt(cid: str, seq: int) -> Rec:
    return Rec(utterance_event(cid, seq, "agent", {"text": np.ones(4)}, "spec"))


def _conv(seq: int | None, ended: bool = False) -> Conv:
    return Conv(seq, None, CallTracker.from_json(None), ended=ended)


def test_intake_groups_by_conversation_in_order_and_keeps_bad_input_aside():
    records = [_utt("a", 0), Rec(b"junk"), _utt("b", 0), _utt("a", 1), Rec(end_event("a", 2))]
    batch = intake(records, EXPECT)
    assert list(batch.inputs) == ["a", "b"]
    assert [p.seq for _, p in batch.inputs["a"]] == [0, 1, 2]
    assert [(r.value, e.reason) for r, e in batch.dead] == [(b"junk", DeadLetterReason.NOT_JSON)]
    assert batch.types == ["utterance", "utterance", "utterance", "end"]


def test_new_seqs_are_steps_old_ones_duplicates_and_a_skip_is_a_gap():
    items = intake([_utt("a", s) for s in (2, 3, 3, 5)], EXPECT).inputs["a"]
    step = plan("a", _conv(2), 0, items)
    assert [(p.seq, gap) for _, p, gap in step.chunk] == [(3, False), (5, True)]
    assert step.duplicates == [(2, "utterance")]  # the repeat of 3 in the batch is dropped


def test_the_end_closes_the_call_and_what_follows_is_dead():
    items = intake([_utt("a", 0), Rec(end_event("a", 1)), _utt("a", 2)], EXPECT).inputs["a"]
    step = plan("a", _conv(None), 0, items)
    assert [p.seq for _, p, _ in step.chunk] == [0]
    assert step.end is not None and step.end.seq == 1
    assert [e.reason for _, e in step.dead] == [DeadLetterReason.CONVERSATION_ENDED]


def test_an_ended_call_re_emits_its_summary_and_old_utterances():
    items = intake([Rec(end_event("a", 4)), _utt("a", 1), _utt("a", 9)], EXPECT).inputs["a"]
    step = plan("a", _conv(4, ended=True), 0, items)
    assert step.duplicates == [(4, "summary"), (1, "utterance")]
    assert [e.reason for _, e in step.dead] == [DeadLetterReason.CONVERSATION_ENDED]
    assert not step.chunk and step.end is None
