"""Contact-centre rules: roles, windows in utterances and seconds, sentiment, cooldowns,
minimum confidence, evidence; sentiment figures; strict rules files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streaming.alerts import (
    BUCKETS,
    AlertRules,
    AlertRulesError,
    CallTracker,
    Evidence,
    SentimentTrack,
)

LABELS = ["neutral", "joy", "anger", "sadness"]
BASE: dict[str, Any] = {
    "label_sets": {
        "test": {"labels": LABELS, "positive": ["joy"], "negative": ["anger", "sadness"]}
    },
    "emotion_shift": {"enabled": False},
    "sustained_negative": {"enabled": False},
}


def rules(**tables: Any) -> AlertRules:
    return AlertRules.model_validate({**BASE, **tables}).for_labels(LABELS)


def probs(emotion: str, p: float = 0.9) -> dict[str, float]:
    """``p`` on ``emotion``, the rest spread over the others."""
    rest = (1.0 - p) / (len(LABELS) - 1)
    return {label: p if label == emotion else rest for label in LABELS}


def say(
    tracker: CallTracker,
    r: AlertRules,
    speaker: str,
    emotion: str,
    *,
    p: float = 0.9,
    second: float | None = None,
    role: str | None = None,
    seq: int | None = None,
) -> list[str]:
    ts = None if second is None else f"2026-12-02T10:{int(second) // 60:02d}:{second % 60:06.3f}Z"
    alerts = tracker.observe(
        r,
        speaker=speaker,
        emotion=emotion,
        confidence=p,
        p_shift_speaker=0.9,
        ts=ts,
        gap=False,
        probabilities=probs(emotion, p),
        seq=seq,
        role=role,
    )
    return [a.rule for a in alerts]


# ---------------------------------------------------------------- sentiment


def test_sentiment_is_positive_minus_negative_mass():
    r = rules()
    assert r.sentiment({"neutral": 0.1, "joy": 0.6, "anger": 0.2, "sadness": 0.1}) == 0.3
    assert r.sentiment({"neutral": 1.0}) == 0.0
    assert r.sentiment({"joy": 1.0}) == 1.0
    assert r.sentiment({"anger": 0.5, "sadness": 0.5}) == -1.0


@given(st.lists(st.floats(0, 1), min_size=4, max_size=4))
def test_sentiment_stays_within_minus_one_and_one(values: list[float]):
    total = sum(values) or 1.0
    value = rules().sentiment({k: v / total for k, v in zip(LABELS, values, strict=True)})
    assert -1.0 <= value <= 1.0


def test_shipped_label_sets_match_the_shipped_models():
    meld = ["neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"]
    iemocap = ["happy", "sad", "neutral", "angry", "excited", "frustrated"]
    default = AlertRules.load()
    assert default.for_labels(meld).label_set == "meld"
    assert default.for_labels(list(reversed(iemocap))).label_set == "iemocap"
    assert default.for_labels(meld).positive_emotions == {"joy"}
    assert default.for_labels(iemocap).negative_emotions == {"angry", "frustrated", "sad"}
    with pytest.raises(AlertRulesError, match=r"\['calm', 'tense'\].*label_sets\.meld"):
        default.for_labels(["calm", "tense"])


# ---------------------------------------------------------------- roles


def test_rules_watch_customers_and_unknown_roles_by_default():
    r = rules(negative_onset={"enabled": True, "min_score": 0.5})
    t = CallTracker()
    assert say(t, r, "A", "anger", role="agent") == []
    assert say(t, r, "C", "anger", role="customer") == ["negative_onset"]
    assert say(t, r, "X", "anger") == ["negative_onset"]  # no role: unknown
    assert say(t, r, "O", "anger", role="other") == []


def test_a_role_filter_names_the_roles_it_watches():
    r = rules(negative_onset={"enabled": True, "min_score": 0.5, "roles": ["agent"]})
    t = CallTracker()
    assert say(t, r, "C", "anger", role="customer") == []
    assert say(t, r, "A", "anger", role="agent") == ["negative_onset"]


def test_a_speakers_role_is_remembered_for_the_rest_of_the_call():
    r = rules(negative_onset={"enabled": True, "min_score": 0.5, "rearm_after": 1})
    t = CallTracker()
    assert say(t, r, "A", "neutral", role="agent") == []
    assert t.role_of("A") == "agent"
    assert say(t, r, "A", "anger") == []  # still the agent without a role on this one
    restored = CallTracker.from_json(t.to_json())
    assert restored.role_of("A") == "agent"
    assert restored.role_of("nobody") == "unknown"


def test_skipped_utterances_keep_no_emotion():
    r = rules(negative_onset={"enabled": True, "min_score": 0.5})
    t = CallTracker()
    t.skip("A", "agent")
    t.skip("A")
    assert say(t, r, "C", "joy", role="customer") == []
    summary = t.summary()
    assert summary["not_analyzed"] == 2
    assert summary["utterances"] == 1
    assert set(summary["by_speaker"]) == {"C"} and set(summary["roles"]) == {"customer"}
    assert set(summary["speakers"]) == {"C"}
    stored = json.loads(t.to_json())
    assert stored["speakers"]["A"] == {"role": "agent"}  # the role only, no emotion
    assert t.role_of("A") == "agent"


# ---------------------------------------------------------------- windows


def test_sustained_negative_over_seconds():
    r = rules(sustained_negative={"enabled": True, "seconds": 10, "rearm_after": 1})
    t = CallTracker()
    got = [say(t, r, "C", "anger", second=s) for s in (0, 4, 9.5, 10, 12)]
    assert got == [[], [], [], ["sustained_negative"], []]  # 10 s after the run's start
    assert say(t, r, "C", "neutral", second=13) == []
    assert say(t, r, "C", "anger", second=14) == []  # a new run starts at 14 s
    assert say(t, r, "C", "anger", second=24) == ["sustained_negative"]


def test_windows_in_seconds_need_timestamps():
    r = rules(sustained_negative={"enabled": True, "seconds": 1})
    t = CallTracker()
    assert [say(t, r, "C", "anger") for _ in range(5)] == [[]] * 5


def test_sentiment_below_for_utterances():
    r = rules(sentiment_below={"enabled": True, "below": -0.5, "utterances": 2, "rearm_after": 1})
    t = CallTracker()
    assert say(t, r, "C", "anger", p=0.9) == []  # sentiment -0.9: one below
    # anger 0.4, sadness 0.2, joy 0.2, neutral 0.2: sentiment -0.4, not below -0.5
    assert say(t, r, "C", "anger", p=0.4) == []
    assert t.last_sentiment == pytest.approx(-0.4)
    assert say(t, r, "C", "sadness", p=0.9) == []  # one below again
    assert say(t, r, "C", "anger", p=0.9) == ["sentiment_below"]  # two in a row
    assert t.last_sentiment == pytest.approx(-0.9)


def test_sentiment_below_for_seconds_with_evidence():
    r = rules(sentiment_below={"enabled": True, "below": -0.5, "seconds": 20})
    t = CallTracker()
    seqs = [10, 11, 12, 13]
    fired = []
    for seq, second in zip(seqs, (0, 8, 15, 21), strict=True):
        alerts = t.observe(
            r,
            speaker="C",
            emotion="anger",
            confidence=0.9,
            p_shift_speaker=None,
            ts=f"2026-12-02T10:00:{second:02d}Z",
            gap=False,
            probabilities=probs("anger"),
            seq=seq,
            role="customer",
        )
        fired += alerts
    assert [a.rule for a in fired] == ["sentiment_below"]
    alert = fired[0]
    assert alert.role == "customer" and alert.severity == "medium"
    assert [e.seq for e in alert.evidence] == seqs  # the run, oldest first
    assert alert.evidence[-1] == Evidence(13, "anger", 0.9, -0.9)
    assert "over 21 s" in alert.detail


# ---------------------------------------------------------------- cooldown and confidence


def test_cooldown_in_utterances_is_per_call():
    r = rules(
        negative_onset={
            "enabled": True,
            "min_score": 0.5,
            "rearm_after": 1,
            "cooldown_utterances": 3,
        }
    )
    t = CallTracker()
    got = [
        say(t, r, spk, e)
        for spk, e in [
            ("C1", "anger"),  # fires
            ("C2", "anger"),  # another speaker, same call: cooling down (1)
            ("C1", "neutral"),  # (2)
            ("C1", "anger"),  # (3): still cooling
            ("C2", "anger"),  # 4 utterances later: C2 is armed and fires
        ]
    ]
    assert got == [["negative_onset"], [], [], [], ["negative_onset"]]


def test_cooldown_in_seconds():
    r = rules(
        negative_onset={"enabled": True, "min_score": 0.5, "rearm_after": 1, "cooldown_s": 30}
    )
    t = CallTracker()
    assert say(t, r, "C", "anger", second=0) == ["negative_onset"]
    assert say(t, r, "C", "neutral", second=5) == []
    assert say(t, r, "C", "anger", second=29) == []  # re-armed, but cooling down
    assert say(t, r, "C", "neutral", second=31) == []
    assert say(t, r, "C", "anger", second=31.5) == ["negative_onset"]


def test_minimum_confidence():
    r = rules(negative_onset={"enabled": True, "min_score": 0.5, "min_confidence": 0.7})
    t = CallTracker()
    # P(negative) = 0.6 + 0.4/3 passes the score, but the prediction is only 0.6 sure
    assert say(t, r, "C", "anger", p=0.6) == []
    assert say(t, r, "D", "anger", p=0.8) == ["negative_onset"]


def test_onset_evidence_is_the_triggering_utterance():
    r = rules(negative_onset={"enabled": True, "min_score": 0.5})
    t = CallTracker()
    say(t, r, "C", "neutral", seq=3)
    (alert,) = t.observe(
        r,
        speaker="C",
        emotion="anger",
        confidence=0.9,
        p_shift_speaker=0.8,
        ts=None,
        gap=False,
        probabilities=probs("anger"),
        seq=7,
    )
    assert alert.evidence == (Evidence(7, "anger", 0.9, -0.9),)
    assert alert.severity == "high"


# ---------------------------------------------------------------- figures


def test_sentiment_track_is_exact_up_to_the_bucket_count():
    values = [round(0.1 * (i % 7) - 0.3, 6) for i in range(BUCKETS)]
    track = SentimentTrack()
    for v in values:
        track.add(v, v < 0)
    third = round(len(values) / 3)
    first, last = track.thirds() or (None, None)
    assert first == pytest.approx(sum(values[:third]) / third)
    assert last == pytest.approx(sum(values[-third:]) / third)
    figures = track.figures()
    assert figures["sentiment_min"] == min(values)
    assert figures["negative_share"] == round(sum(v < 0 for v in values) / len(values), 6)


@settings(max_examples=60)
@given(st.lists(st.floats(-1, 1).map(lambda v: round(v, 3)), min_size=1, max_size=400))
def test_sentiment_track_stays_bounded_and_close(values: list[float]):
    track = SentimentTrack()
    for v in values:
        track.add(v, v < 0)
    assert len(track.buckets) <= BUCKETS
    assert sum(int(b[1]) for b in track.buckets) == len(values)
    assert track.figures()["sentiment_mean"] == pytest.approx(sum(values) / len(values), abs=1e-6)
    first, last = track.thirds() or (0.0, 0.0)
    # each third is averaged over whole buckets: at most one bucket's width more
    want = max(1, round(len(values) / 3))
    spill = track.width
    lo = min(sum(values[:n]) / n for n in range(want, min(want + spill, len(values)) + 1))
    hi = max(sum(values[:n]) / n for n in range(want, min(want + spill, len(values)) + 1))
    assert lo - 1e-6 <= first <= hi + 1e-6
    assert -1.0 <= last <= 1.0
    restored = SentimentTrack(track.to_dict())
    assert restored.to_dict() == track.to_dict()


def test_summary_per_role_and_speaker():
    r = rules()
    t = CallTracker()
    for spk, role, emotion in [
        ("A", "agent", "joy"),
        ("C", "customer", "joy"),
        ("A", None, "neutral"),
        ("C", None, "anger"),
        ("C", None, "sadness"),
    ]:
        say(t, r, spk, emotion, role=role)
    s = t.summary()
    assert s["roles"]["agent"]["utterances"] == 2
    customer = s["roles"]["customer"]
    joy, bad = 0.9 - 2 * 0.1 / 3, -0.9  # sentiment of probs("joy"), of anger and sadness
    assert customer["utterances"] == 3
    assert customer["sentiment_mean"] == pytest.approx((joy + 2 * bad) / 3)
    # the thirds are kept in thousandths
    assert customer["sentiment_first_third"] == pytest.approx(joy, abs=1e-3)
    assert customer["sentiment_last_third"] == pytest.approx(bad, abs=1e-3)
    assert customer["sentiment_trend"] == pytest.approx(bad - joy, abs=2e-3)
    assert customer["sentiment_min"] == pytest.approx(bad)
    assert customer["negative_share"] == pytest.approx(2 / 3)
    assert customer["shifts"] == 2  # joy -> anger -> sadness
    assert s["by_speaker"]["C"]["role"] == "customer"
    assert s["by_speaker"]["A"]["role"] == "agent"


# ---------------------------------------------------------------- strict files


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[negative_onset]\nroles = ["caller"]\n', "roles"),
        ("[negative_onset]\nroles = []\n", "roles is empty"),
        ("[sustained_negative]\nutterances = 3\nseconds = 10\n", "one window"),
        ("[sustained_negative]\nseconds = -1\n", "seconds"),
        ("[sustained_negative]\nutterances = 21\n", "utterances"),
        ("[sentiment_below]\nbelow = -1.5\n", "below"),
        ("[sentiment_below]\nthreshold = -0.5\n", "threshold"),
        ("[emotion_shift]\ncooldown_utterances = 0\n", "cooldown_utterances"),
        ("[emotion_shift]\ncooldown_s = 0\n", "cooldown_s"),
        ("[emotion_shift]\ncooldown = 5\n", "cooldown"),
        ("[negative_onset]\nmin_confidence = 2\n", "min_confidence"),
        ('[negative_onset]\nseverity = "urgent"\n', "severity"),
        ('[label_sets.x]\nlabels = ["a", "b"]\npositive = ["c"]\nnegative = ["a"]\n', "['c']"),
        ('[label_sets.x]\nlabels = ["a", "b"]\npositive = ["a"]\nnegative = ["a"]\n', "both"),
        ('[label_sets.x]\nlabels = ["a", "b"]\npositive = []\nnegative = []\n', "negative"),
        ('[label_sets.x]\nlabels = ["a", "a"]\npositive = []\nnegative = ["a"]\n', "repeat"),
        ("[label_sets]\n", "label_sets"),
        ('negative_emotions = ["anger"]\n', "moved into the label sets"),
        ("[sentiment]\nbelow = 0\n", "sentiment"),
    ],
)
def test_invalid_rules_files_name_what_is_wrong(tmp_path: Path, text: str, expected: str):
    path = tmp_path / "rules.toml"
    path.write_text(text)
    with pytest.raises(AlertRulesError) as info:
        AlertRules.load(path)
    assert str(path) in str(info.value)
    assert expected in str(info.value)


ROOT = Path(__file__).resolve().parents[2]


def test_the_shipped_examples_load():
    examples = sorted((ROOT / "examples/alert-rules").glob("*.toml"))
    assert len(examples) >= 3
    meld = ["neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"]
    for path in examples:
        if "budget" in path.name:
            continue  # states an operating point: needs the checkpoint's head (test_alerts)
        loaded = AlertRules.load(path, labels=meld)
        assert loaded.rule_names()
    full = AlertRules.load(ROOT / "examples/alert-rules/contact-centre.toml", labels=meld)
    assert full.rule_names() == [
        "negative_onset",
        "emotion_shift",
        "sustained_negative",
        "sentiment_below",
    ]
    assert all(full.rule(n).roles == {"customer"} for n in full.rule_names())
    assert full.sentiment_below.seconds == 20


@settings(max_examples=150)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["A", "B", "C"]),
            st.sampled_from([None, "agent", "customer", "other"]),
            st.sampled_from(["neutral", "joy", "anger", "sadness"]),
            st.sampled_from([0.4, 0.9]),
        ),
        max_size=60,
    ),
    st.integers(0, 60),
)
def test_role_figures_equal_a_track_per_role(items, split):
    """Roles share their owner's track until a second speaker or a role change: the
    figures are those of an explicit track per role, also across a restore."""
    r = rules()
    t = CallTracker()
    reference: dict[str, SentimentTrack] = {}
    for k, (spk, role, emotion, p) in enumerate(items):
        if k == split:
            t = CallTracker.from_json(t.to_json())
        say(t, r, spk, emotion, p=p, role=role)
        reference.setdefault(t.role_of(spk), SentimentTrack()).add(
            t.last_sentiment, emotion in ("anger", "sadness")
        )
    got = {
        role: {k: v for k, v in f.items() if k.startswith(("sent", "utt", "neg"))}
        for role, f in t.summary()["roles"].items()
    }
    assert got == {role: tr.figures() for role, tr in reference.items()}
    # the stored tracker holds a role's own track only where one is needed
    stored = json.loads(t.to_json())
    assert not set(stored["roles"]) & set(stored["role_owner"])
