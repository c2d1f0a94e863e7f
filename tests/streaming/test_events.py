"""The event contract: round trips, every dead-letter reason, the vector codec."""

from __future__ import annotations

import base64
import json
import re
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pydantic import ValidationError

from streaming.codec import VectorError, decode_vector, encode_vector
from streaming.events import (
    DEAD_LETTER_PAYLOAD_BYTES,
    AlertEvent,
    DeadLetter,
    DeadLetterReason,
    EmotionEvent,
    EndEvent,
    Evidence,
    Expectations,
    Figures,
    InvalidInput,
    ParsedUtterance,
    Shift,
    SpeakerFigures,
    SummaryEvent,
    TextUtterance,
    dump_event,
    end_event,
    load_output,
    parse_input,
    parse_text,
    text_message,
    utc_now_iso,
    utterance_event,
)

SPEC = "minilm-l6-v2"
DIM = 8
EXPECT = Expectations(feature_spec=SPEC, dims={"text": DIM, "audio": 0, "visual": 0})
R = DeadLetterReason


def _vector(seed: int = 0, n: int = DIM) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32)


def _message(**changes: Any) -> dict[str, Any]:
    """A valid utterance as a dict; a value of ... removes the key."""
    message = json.loads(utterance_event("call-1", 3, "customer", {"text": _vector()}, SPEC))
    message.update(changes)
    return {k: v for k, v in message.items() if v is not ...}


def _raw(**changes: Any) -> bytes:
    return json.dumps(_message(**changes)).encode()


def _b64(values: list[float]) -> dict[str, Any]:
    return encode_vector(np.array(values, dtype=np.float32))


def _reason(raw: bytes, expect: Expectations | None = EXPECT) -> InvalidInput:
    with pytest.raises(InvalidInput) as caught:
        parse_input(raw, expect)
    return caught.value


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("b64", [True, False])
def test_utterance_round_trip(b64: bool) -> None:
    text = _vector(1)
    raw = utterance_event(
        "call-1",
        0,
        "agent",
        {"text": text},
        SPEC,
        text="hello",
        ts="2026-11-24T10:00:03.12Z",
        b64=b64,
    )
    parsed = parse_input(raw, EXPECT)
    assert isinstance(parsed, ParsedUtterance)
    assert (parsed.conversation_id, parsed.seq, parsed.event.speaker) == ("call-1", 0, "agent")
    assert parsed.event.text == "hello"
    assert (
        parsed.event.ts is not None
        and parsed.event.ts.isoformat() == "2026-11-24T10:00:03.120000+00:00"
    )
    assert list(parsed.vectors) == ["text"]
    assert parsed.vectors["text"].dtype == np.float32
    assert parsed.vectors["text"].tobytes() == text.tobytes()


def test_end_round_trip() -> None:
    parsed = parse_input(end_event("call-1", 40, ts="2026-11-24T10:05:00Z"), EXPECT)
    assert isinstance(parsed, EndEvent)
    assert (parsed.conversation_id, parsed.seq) == ("call-1", 40)


def test_list_and_b64_decode_equal() -> None:
    vector = _vector(2)
    as_list = parse_input(utterance_event("c", 0, "a", {"text": vector}, SPEC, b64=False), EXPECT)
    as_b64 = parse_input(utterance_event("c", 0, "a", {"text": vector}, SPEC, b64=True), EXPECT)
    assert isinstance(as_list, ParsedUtterance) and isinstance(as_b64, ParsedUtterance)
    assert np.array_equal(as_list.vectors["text"], as_b64.vectors["text"])


@pytest.mark.parametrize("role", ["agent", "customer", "other", None])
def test_roles_are_optional_and_kept(role: str | None) -> None:
    raw = utterance_event("c", 0, "spk-1", {"text": _vector(1)}, SPEC, role=role)
    assert (b'"role"' in raw) == (role is not None)  # old producers send none
    parsed = parse_input(raw, EXPECT)
    assert isinstance(parsed, ParsedUtterance) and parsed.event.role == role
    text = parse_text(text_message("c", 0, "spk-1", "hello", role=role))
    assert isinstance(text, TextUtterance) and text.role == role


def test_a_bad_role_on_the_text_topic_is_a_dead_letter() -> None:
    raw = text_message("c", 4, "spk-1", "hello", role="boss")
    with pytest.raises(InvalidInput) as info:
        parse_text(raw)
    assert info.value.reason is R.BAD_ROLE
    assert "role" in info.value.detail and (info.value.conversation_id, info.value.seq) == ("c", 4)


def test_unknown_top_level_fields_are_ignored() -> None:
    """Forward compatibility: an upstream may add fields without breaking us."""
    parsed = parse_input(_raw(language="en"), EXPECT)
    assert isinstance(parsed, ParsedUtterance)


OUTPUTS: list[EmotionEvent | AlertEvent | SummaryEvent] = [
    EmotionEvent(
        conversation_id="call-1",
        seq=12,
        speaker="customer",
        role="customer",
        emotion="anger",
        confidence=0.71,
        probabilities={"neutral": 0.29, "anger": 0.71},
        sentiment=-0.71,
        shift=Shift(vs_previous=0.83, vs_speaker_previous=None),
        model="cfnesa-meld-minilm@abc",
        ts="2026-11-24T10:00:03.120Z",
        gap=True,
    ),
    AlertEvent(
        conversation_id="call-1",
        seq=12,
        speaker="customer",
        rule="emotion_shift",
        severity="high",
        from_emotion="neutral",
        to_emotion="anger",
        p_shift=0.77,
        evidence=[Evidence(seq=12, emotion="anger", probability=0.71, sentiment=-0.71)],
        model="cfnesa-meld-minilm@abc",
    ),
    SummaryEvent(
        conversation_id="call-1",
        seq=40,
        utterances=39,
        speakers={"agent": {"neutral": 20}, "customer": {"anger": 12, "neutral": 7}},
        shifts=5,
        alerts=1,
        gaps=0,
        first_ts="2026-11-24T10:00:00.000Z",
        last_ts="2026-11-24T10:05:00.000Z",
        duration_s=300.0,
        dominant={"agent": "neutral", "customer": "anger"},
        roles={"customer": Figures(utterances=19, sentiment_mean=-0.4, sentiment_trend=-0.8)},
        by_speaker={"customer": SpeakerFigures(utterances=19, role="customer")},
        model="cfnesa-meld-minilm@abc",
    ),
]


@pytest.mark.parametrize(
    "change",
    [
        {"sentiment": 1.2},
        {"sentiment": -1.01},
        {"role": "agnet"},
        {"role": "unknown"},  # unknown is written as null
    ],
)
def test_emotion_events_keep_role_and_sentiment_in_range(change: dict[str, object]) -> None:
    good = json.loads(dump_event(OUTPUTS[0]))
    with pytest.raises(ValueError):
        load_output(json.dumps({**good, **change}).encode())


def test_older_emotion_events_without_role_or_sentiment_still_load() -> None:
    good = json.loads(dump_event(OUTPUTS[0]))
    del good["role"], good["sentiment"]
    event = load_output(json.dumps(good).encode())
    assert isinstance(event, EmotionEvent) and event.role is None and event.sentiment is None


@pytest.mark.parametrize("event", OUTPUTS, ids=lambda e: e.type)
def test_output_round_trip(event: EmotionEvent | AlertEvent | SummaryEvent) -> None:
    raw = dump_event(event)
    assert load_output(raw) == event
    assert dump_event(load_output(raw)) == raw
    wire = json.loads(raw)
    assert list(wire)[:4] == ["type", "event_id", "conversation_id", "seq"]
    assert wire["event_id"].startswith(f"{event.conversation_id}:{event.seq}:{event.type}")


def test_output_event_ids_are_deterministic() -> None:
    assert [e.event_id for e in OUTPUTS] == [
        "call-1:12:emotion",
        "call-1:12:alert:emotion_shift",
        "call-1:40:summary",
    ]
    with pytest.raises(ValidationError, match="event_id"):
        load_output(dump_event(OUTPUTS[0]).replace(b"call-1:12:emotion", b"call-1:13:emotion"))


def test_alert_uses_from_and_to_on_the_wire() -> None:
    wire = json.loads(dump_event(OUTPUTS[1]))
    assert (wire["from"], wire["to"]) == ("neutral", "anger")
    assert "from_emotion" not in wire


def test_output_rejects_unknown_fields() -> None:
    wire = json.loads(dump_event(OUTPUTS[0]))
    with pytest.raises(ValidationError):
        load_output(json.dumps({**wire, "extra": 1}).encode())


def test_dead_letter_round_trip_and_truncation() -> None:
    raw = b"x" * (DEAD_LETTER_PAYLOAD_BYTES + 10)
    error = _reason(raw, Expectations(SPEC, {"text": DIM}, max_bytes=1000))
    letter = DeadLetter.from_error(error, raw, topic="utterance-features", partition=2, offset=7)
    assert letter.reason is R.OVERSIZE and letter.truncated
    assert base64.b64decode(letter.payload_b64) == raw[:DEAD_LETTER_PAYLOAD_BYTES]
    assert DeadLetter.model_validate_json(dump_event(letter)) == letter
    assert json.loads(dump_event(letter))["reason"] == "oversize"


def test_utc_now_iso_format() -> None:
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", utc_now_iso())


# ---------------------------------------------------------------- dead-letter reasons

NAN_B64 = _b64([float("nan")] + [0.0] * (DIM - 1))
REASONS: dict[str, tuple[bytes, DeadLetterReason]] = {
    "not json": (b'{"type": "utterance", ', R.NOT_JSON),
    "not utf-8": (b'{"type": "\xff"}', R.NOT_JSON),
    "json array": (b"[1, 2, 3]", R.NOT_OBJECT),
    "unknown type": (_raw(type="chat"), R.UNKNOWN_TYPE),
    "missing type": (_raw(type=...), R.UNKNOWN_TYPE),
    "schema_version 2": (_raw(schema_version=2), R.UNSUPPORTED_SCHEMA_VERSION),
    "schema_version true": (_raw(schema_version=True), R.UNSUPPORTED_SCHEMA_VERSION),
    "missing conversation_id": (_raw(conversation_id=...), R.MISSING_CONVERSATION_ID),
    "empty conversation_id": (_raw(conversation_id=""), R.MISSING_CONVERSATION_ID),
    "seq -1": (_raw(seq=-1), R.BAD_SEQ),
    "seq 1.5": (_raw(seq=1.5), R.BAD_SEQ),
    "seq '3'": (_raw(seq="3"), R.BAD_SEQ),
    "seq true": (_raw(seq=True), R.BAD_SEQ),
    "wrong dimension": (_raw(features={"text": [0.5] * (DIM + 1)}), R.WRONG_DIMENSION),
    "NaN via list": (_raw(features={"text": [float("nan")] * DIM}), R.NON_FINITE),
    "NaN via b64": (_raw(features={"text": NAN_B64}), R.NON_FINITE),
    "Inf": (_raw(features={"text": [float("inf")] * DIM}), R.NON_FINITE),
    "beyond float32": (_raw(features={"text": [1e39] * DIM}), R.NON_FINITE),
    "bad base64": (
        _raw(features={"text": {"dtype": "float32", "shape": [DIM], "b64": "not*base64"}}),
        R.BAD_BASE64,
    ),
    "b64 shorter than shape": (
        _raw(features={"text": {**_b64([0.0] * (DIM - 1)), "shape": [DIM]}}),
        R.BAD_BASE64,
    ),
    "oversize": (_raw(text="x" * 1_000_001), R.OVERSIZE),
    "feature_spec mismatch": (_raw(feature_spec="mpnet-base"), R.FEATURE_SPEC_MISMATCH),
    "no modality, all null": (_raw(features={"text": None, "audio": None}), R.NO_MODALITY),
    "only a modality the model lacks": (
        _raw(features={"audio": [0.1] * 300}),
        R.NO_MODALITY,
    ),
    "dtype float64": (
        _raw(features={"text": {**_b64([0.0] * DIM), "dtype": "float64"}}),
        R.INVALID,
    ),
    "unknown modality": (_raw(features={"text": [0.0] * DIM, "smell": [1.0]}), R.INVALID),
    "bool in a vector": (_raw(features={"text": [True] * DIM}), R.INVALID),
    "empty speaker": (_raw(speaker=""), R.INVALID),
    "numeric ts": (_raw(ts=1_700_000_000), R.INVALID),
    "unknown role": (_raw(role="supervisor"), R.BAD_ROLE),
    "role in capitals": (_raw(role="Customer"), R.BAD_ROLE),
    "null-like role": (_raw(role=""), R.BAD_ROLE),
    "numeric role": (_raw(role=1), R.BAD_ROLE),
}


@pytest.mark.parametrize("case", list(REASONS))
def test_each_reason(case: str) -> None:
    raw, reason = REASONS[case]
    error = _reason(raw)
    assert error.reason is reason, error
    assert error.detail and len(error.detail) <= 200


def test_order_of_checks() -> None:
    """Several faults at once: the earliest check in the documented order names it."""
    raw = _raw(schema_version=2, seq=-1, conversation_id="", features={"text": [1.0]})
    assert _reason(raw).reason is R.UNSUPPORTED_SCHEMA_VERSION
    assert _reason(_raw(seq=-1, conversation_id="")).reason is R.MISSING_CONVERSATION_ID
    assert _reason(_raw(seq=-1, speaker="")).reason is R.BAD_SEQ
    raw = _raw(feature_spec="other", features={"text": [float("nan")]})
    assert _reason(raw).reason is R.FEATURE_SPEC_MISMATCH


@pytest.mark.parametrize(
    ("raw", "cid", "seq"),
    [
        (_raw(features={"text": [1.0]}), "call-1", 3),
        (_raw(seq="3"), "call-1", None),
        (_raw(conversation_id=""), None, 3),
        (_raw(schema_version=7), "call-1", 3),
        (b"[]", None, None),
    ],
)
def test_ids_are_recovered_where_readable(raw: bytes, cid: str | None, seq: int | None) -> None:
    error = _reason(raw)
    assert (error.conversation_id, error.seq) == (cid, seq)


def test_a_modality_the_model_lacks_is_dropped() -> None:
    """Audio of any shape, even NaN, is ignored by a text-only model."""
    raw = _raw(features={"text": [0.25] * DIM, "audio": [float("nan")] * 3})
    parsed = parse_input(raw, EXPECT)
    assert isinstance(parsed, ParsedUtterance)
    assert list(parsed.vectors) == ["text"]


def test_without_expectations_every_present_modality_is_kept() -> None:
    parsed = parse_input(_raw(features={"text": [1.0, 2.0], "visual": [3.0]}))
    assert isinstance(parsed, ParsedUtterance)
    assert {k: v.tolist() for k, v in parsed.vectors.items()} == {"text": [1, 2], "visual": [3]}


def test_expectations_are_validated() -> None:
    with pytest.raises(ValueError, match="unknown modalities"):
        Expectations(SPEC, {"smell": 3})
    with pytest.raises(ValueError, match="at least one"):
        Expectations(SPEC, {"text": 0})


# ---------------------------------------------------------------- codec


@given(
    arrays(
        np.float32,
        st.integers(0, 512),
        elements=st.floats(width=32, allow_nan=False, allow_infinity=False),
    )
)
def test_codec_round_trips_exactly(vector: np.ndarray) -> None:
    encoded = encode_vector(vector)
    assert encoded["shape"] == [vector.shape[0]]
    for wire in (json.loads(json.dumps(encoded)), vector.astype(float).tolist()):
        decoded = decode_vector(wire)
        assert decoded.dtype == np.float32
        assert decoded.tobytes() == vector.tobytes()  # bit for bit, -0.0 included


@pytest.mark.parametrize(
    ("wire", "reason"),
    [
        ({"dtype": "float32", "shape": [1], "b64": "AAAA"}, "bad_base64"),  # 3 bytes
        ({"dtype": "float32", "shape": [1], "b64": "AAAAAAA="}, "bad_base64"),  # 5 bytes
        ({"dtype": "float32", "shape": [1], "b64": "AACAfw=="}, "non_finite"),  # +Inf
        ({"dtype": "float32", "shape": [True], "b64": "AAAAAA=="}, "invalid"),
        ({"dtype": "float32", "shape": [1], "b64": "AAAAAA==", "scale": 2}, "invalid"),
        ([1.0, "2"], "invalid"),
        ([10**400], "non_finite"),
        ("1,2,3", "invalid"),
    ],
)
def test_codec_errors(wire: object, reason: str) -> None:
    with pytest.raises(VectorError) as caught:
        decode_vector(wire)
    assert caught.value.reason == reason


def test_encode_rejects_matrices() -> None:
    with pytest.raises(ValueError, match="1-D"):
        encode_vector(np.zeros((2, 2)))
