"""The recent-events list's compact encoding: what `StateStore.events` returns is
each event's bytes exactly as written, whatever the list holds."""

from __future__ import annotations

import json
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streaming.events import EmotionEvent, Shift, dump_event
from streaming.state_store import Commit, StateStore, pack_event, unpack_event

LABELS = ("neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger")


def _emotion(cid: str, seq: int, probs: list[float]) -> bytes:
    return dump_event(
        EmotionEvent(
            event_id=f"{cid}:{seq}:emotion",
            conversation_id=cid,
            seq=seq,
            speaker=("agent", "customer")[seq % 2],
            emotion=LABELS[max(range(7), key=probs.__getitem__)],
            confidence=round(max(probs), 6),
            probabilities={n: round(p, 6) for n, p in zip(LABELS, probs, strict=True)},
            shift=Shift(vs_previous=0.4123, vs_speaker_previous=None),
            model="cfnesa-meld-minilm@eb6b09b35657cdb9",
            emitted_at="2026-12-02T09:47:13.713Z",
            gap=False,
        )
    )


@given(st.binary(max_size=2000))
def test_any_bytes_round_trip(raw: bytes):
    assert unpack_event(pack_event(raw)) == raw


@given(
    st.from_regex(r"[A-Za-z0-9._:-]{1,40}", fullmatch=True),
    st.integers(0, 10**6),
    st.lists(st.floats(0, 1), min_size=7, max_size=7),
)
def test_emotion_events_round_trip_and_shrink(cid: str, seq: int, probs: list[float]):
    raw = _emotion(cid, seq, probs)
    packed = pack_event(raw)
    assert unpack_event(packed) == raw
    assert len(packed) < len(raw) * 0.5  # the dictionary knows the shape


def test_plain_entries_from_older_code_read_as_they_are():
    raw = _emotion("call-1", 3, [0.1] * 7)
    assert unpack_event(raw) == raw
    assert json.loads(unpack_event(raw))["seq"] == 3


def test_a_corrupt_packed_entry_raises():
    packed = pack_event(_emotion("call-1", 3, [0.1] * 7))
    with pytest.raises(zlib.error):
        unpack_event(packed[:5] + b"\xff" * 8)


async def test_the_store_keeps_events_packed_and_returns_them_exactly(redis_server, unique):
    store = StateStore.connect(redis_server.url, prefix=unique, recent_events=8)
    try:
        events = [_emotion("c1", i, [0.01 * (i + k) for k in range(7)]) for i in range(3)]
        commit = Commit("c1", None, 2, {"core": b"x"}, events)
        assert commit.size == 1 + sum(len(pack_event(e)) for e in events)
        assert commit.size < 1 + sum(len(e) for e in events) / 2
        assert (await store.commit([commit]))[0].ok
        held = await store.client.lrange(store.events_key("c1"), 0, -1)
        assert held == [pack_event(e) for e in events]
        assert (await store.events(["c1"]))["c1"] == events
        # an entry pushed by older code (plain JSON) sits beside packed ones
        await store.client.rpush(store.events_key("c1"), events[0])
        assert (await store.events(["c1"]))["c1"] == [*events, events[0]]
    finally:
        await store.client.delete(store.state_key("c1"), store.events_key("c1"))
        await store.close()
