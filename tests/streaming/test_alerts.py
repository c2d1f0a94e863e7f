"""Alert rules (TOML configuration) and the per-call tracker that applies them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streaming.alerts import Alert, AlertRules, AlertRulesError, CallTracker, Evidence

LABELS = ["neutral", "joy", "surprise", "anger", "sadness"]
# Thresholds chosen so that the default p_shift / confidence of `feed` pass them.
RULES = AlertRules.model_validate(
    {
        "label_sets": {
            "test": {"labels": LABELS, "positive": ["joy"], "negative": ["anger", "sadness"]}
        },
        "emotion_shift": {"min_p_shift": 0.5, "min_confidence": 0.4, "rearm_after": 2},
        "sustained_negative": {"utterances": 3, "rearm_after": 2},
    }
).for_labels(LABELS)


def feed(
    tracker: CallTracker,
    rules: AlertRules,
    speaker: str,
    emotion: str,
    *,
    confidence: float = 0.9,
    p_shift: float | None = 0.9,
    ts: str | None = None,
    gap: bool = False,
) -> list[str]:
    """Observe one utterance; the names of the rules that fired."""
    alerts = tracker.observe(
        rules,
        speaker=speaker,
        emotion=emotion,
        confidence=confidence,
        p_shift_speaker=p_shift,
        ts=ts,
        gap=gap,
    )
    return [a.rule for a in alerts]


def run(rules: AlertRules, speaker: str, emotions: list[str]) -> list[list[str]]:
    """A fresh call of one speaker; the rules fired at each utterance."""
    tracker = CallTracker()
    return [feed(tracker, rules, speaker, e) for e in emotions]


def with_rules(**changes: Any) -> AlertRules:
    return RULES.model_copy(update=changes)


# ---------------------------------------------------------------- loading rules


def test_default_rules_load():
    rules = AlertRules.load(None)
    assert {"anger", "sadness"} <= rules.negative_emotions
    assert "neutral" not in rules.negative_emotions
    assert rules.speakers == frozenset()
    # the measured default (docs/alerts.md): the onset rule; the older two are off
    assert rules.negative_onset.enabled and rules.negative_onset.score == "p_negative"
    assert rules.negative_onset.min_score == 0.5  # no head given: no table to read
    assert not rules.emotion_shift.enabled and not rules.sustained_negative.enabled
    assert rules.rule_names() == ["negative_onset"]
    assert rules.emotion_shift.severity == "high"
    assert 0.0 <= rules.emotion_shift.min_p_shift <= 1.0
    assert rules.sustained_negative.utterances >= 1
    assert AlertRules.load() == rules


def test_custom_file_loads(tmp_path: Path):
    path = tmp_path / "rules.toml"
    path.write_text(
        'speakers = ["customer"]\n'
        "[label_sets.calls]\n"
        'labels = ["calm", "frustrated"]\n'
        "positive = []\n"
        'negative = ["frustrated"]\n'
        "[emotion_shift]\n"
        "min_p_shift = 0.8\n"
        'severity = "low"\n'
        "[sustained_negative]\n"
        "enabled = false\n"
        "utterances = 5\n"
        "rearm_after = 0\n"
    )
    for where in (path, str(path)):
        rules = AlertRules.load(where)
        assert rules.negative_emotions == {"frustrated"}
        assert rules.speakers == {"customer"}
        assert rules.emotion_shift.min_p_shift == 0.8
        assert rules.emotion_shift.severity == "low"
        assert rules.emotion_shift.min_confidence == 0.35  # the default
        assert not rules.sustained_negative.enabled
        assert rules.sustained_negative.utterances == 5
        assert rules.sustained_negative.rearm_after == 0


def test_empty_file_gives_the_defaults(tmp_path: Path):
    path = tmp_path / "empty.toml"
    path.write_text("")
    assert AlertRules.load(path) == AlertRules()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("negative_emotions = [anger\n", "not valid TOML"),
        ("[emotion_shift\n", "not valid TOML"),
        ("nagative_emotions = []\n", "nagative_emotions"),
        ("[emotion_shift]\nmin_pshift = 0.5\n", "min_pshift"),
        ("[sustained]\nutterances = 2\n", "sustained"),
        ("[emotion_shift]\nmin_p_shift = 1.5\n", "min_p_shift"),
        ("[emotion_shift]\nmin_confidence = -0.1\n", "min_confidence"),
        ('[emotion_shift]\nseverity = "critical"\n', "severity"),
        ('[sustained_negative]\nseverity = "HIGH"\n', "severity"),
        ("[sustained_negative]\nutterances = 0\n", "utterances"),
        ("[sustained_negative]\nrearm_after = -1\n", "rearm_after"),
        ('negative_emotions = "anger"\n', "negative_emotions"),
    ],
)
def test_invalid_files_raise_a_useful_error(tmp_path: Path, text: str, expected: str):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(AlertRulesError) as info:
        AlertRules.load(path)
    message = str(info.value)
    assert str(path) in message
    assert expected in message
    assert info.value.__cause__ is not None


def test_missing_file_raises_alert_rules_error(tmp_path: Path):
    path = tmp_path / "absent.toml"
    with pytest.raises(AlertRulesError, match=r"absent\.toml"):
        AlertRules.load(path)


def test_non_utf8_file_raises_alert_rules_error(tmp_path: Path):
    path = tmp_path / "latin1.toml"
    path.write_bytes('speakers = ["agent", "kunde-\xe4"]\n'.encode("latin-1"))
    with pytest.raises(AlertRulesError, match=r"latin1\.toml"):
        AlertRules.load(path)


# ---------------------------------------------------------------- emotion_shift


def test_shift_fires_on_a_turn_from_calm_to_negative():
    tracker = CallTracker()
    assert feed(tracker, RULES, "customer", "neutral") == []
    alerts = tracker.observe(
        RULES,
        speaker="customer",
        emotion="anger",
        confidence=0.8,
        p_shift_speaker=0.7,
        ts=None,
        gap=False,
    )
    assert alerts == [
        Alert(
            rule="emotion_shift",
            speaker="customer",
            severity="high",
            from_emotion="neutral",
            to_emotion="anger",
            p_shift=0.7,
            detail=alerts[0].detail,
            score=0.7,  # the shift probability ranks shift alerts
            role="unknown",
            # the speaker's previous utterance and this one; without probabilities
            # the predicted emotion stands for the distribution (sentiment -0.8)
            evidence=(Evidence(0, "neutral", 0.9, 0.0), Evidence(1, "anger", 0.8, -0.8)),
        )
    ]
    assert tracker.alerts == 1


def test_shift_never_fires_on_the_speakers_first_utterance():
    assert run(RULES, "customer", ["anger"]) == [[]]
    tracker = CallTracker()
    feed(tracker, RULES, "agent", "joy")
    assert feed(tracker, RULES, "customer", "anger") == []


def test_shift_needs_a_non_negative_previous_utterance():
    # sadness -> anger is negative -> negative: no shift (the sustained rule is not due yet)
    assert run(RULES, "customer", ["sadness", "anger"]) == [[], []]


@pytest.mark.parametrize(
    ("p_shift", "confidence", "fires"),
    [
        (0.5, 0.4, True),  # both thresholds are inclusive
        (0.49, 0.9, False),
        (None, 0.9, False),
        (0.9, 0.39, False),
        (1.0, 1.0, True),
    ],
)
def test_shift_thresholds(p_shift: float | None, confidence: float, fires: bool):
    tracker = CallTracker()
    feed(tracker, RULES, "customer", "neutral")
    got = feed(tracker, RULES, "customer", "anger", p_shift=p_shift, confidence=confidence)
    assert got == (["emotion_shift"] if fires else [])


def test_shift_into_a_non_negative_emotion_is_no_alert():
    assert run(RULES, "customer", ["neutral", "joy", "surprise"]) == [[], [], []]


def test_shift_is_per_speaker():
    tracker = CallTracker()
    # the agent was calm, but the customer's own previous utterance was already negative
    feed(tracker, RULES, "customer", "sadness")
    feed(tracker, RULES, "agent", "neutral")
    assert feed(tracker, RULES, "customer", "anger") == []
    # the customer was calm; the agent's anger in between does not matter
    tracker = CallTracker()
    feed(tracker, RULES, "customer", "neutral")
    feed(tracker, RULES, "agent", "anger")
    assert feed(tracker, RULES, "customer", "anger") == ["emotion_shift"]


def test_speakers_filter_excludes_other_speakers():
    rules = with_rules(speakers=frozenset({"customer"}))
    assert run(rules, "agent", ["neutral", "anger", "anger", "anger"]) == [[], [], [], []]
    assert run(rules, "customer", ["neutral", "anger"]) == [[], ["emotion_shift"]]


def test_disabled_rules_stay_quiet():
    off = RULES.emotion_shift.model_copy(update={"enabled": False})
    rules = with_rules(emotion_shift=off)
    assert run(rules, "c", ["neutral", "anger", "anger", "anger"]) == [
        [],
        [],
        [],
        ["sustained_negative"],
    ]


# ---------------------------------------------------------------- sustained_negative


def test_sustained_fires_at_the_nth_negative_utterance_in_a_row():
    got = run(RULES, "customer", ["anger", "sadness", "anger"])
    assert got == [[], [], ["sustained_negative"]]
    # a calm utterance restarts the count
    tracker = CallTracker()
    seq = ["anger", "anger", "neutral", "anger", "anger", "anger"]
    got = [feed(tracker, RULES, "customer", e, p_shift=0.0) for e in seq]
    assert got == [[], [], [], [], [], ["sustained_negative"]]


def test_sustained_counts_only_the_speakers_own_utterances():
    tracker = CallTracker()
    fired = []
    for speaker in ["customer", "agent", "customer", "agent", "customer"]:
        emotion = "anger" if speaker == "customer" else "neutral"
        fired.append(feed(tracker, RULES, speaker, emotion, p_shift=0.0))
    assert fired == [[], [], [], [], ["sustained_negative"]]


def test_sustained_of_one_utterance():
    rules = with_rules(
        sustained_negative=RULES.sustained_negative.model_copy(update={"utterances": 1})
    )
    assert run(rules, "c", ["anger"]) == [["sustained_negative"]]


# ---------------------------------------------------------------- hysteresis


def test_sustained_hysteresis_rearms_after_calm_utterances():
    seq = ["anger"] * 5 + ["neutral"] + ["anger"] * 3 + ["neutral", "joy"] + ["anger"] * 3
    got = run(
        with_rules(emotion_shift=RULES.emotion_shift.model_copy(update={"enabled": False})),
        "c",
        seq,
    )
    fired_at = [i for i, rules in enumerate(got) if rules]
    # fires at the 3rd anger; one calm utterance (< rearm_after=2) does not re-arm it;
    # two calm utterances do, and the next run of three fires again
    assert fired_at == [2, 13]
    assert got[13] == ["sustained_negative"]


def test_shift_hysteresis_rearms_after_calm_utterances():
    rules = with_rules(
        sustained_negative=RULES.sustained_negative.model_copy(update={"enabled": False})
    )
    seq = ["neutral", "anger", "neutral", "anger", "neutral", "joy", "anger"]
    got = run(rules, "c", seq)
    assert got == [[], ["emotion_shift"], [], [], [], [], ["emotion_shift"]]


def test_rearm_after_zero_means_no_hysteresis():
    shift = RULES.emotion_shift.model_copy(update={"rearm_after": 0})
    sustained = RULES.sustained_negative.model_copy(update={"rearm_after": 0})
    rules = with_rules(emotion_shift=shift, sustained_negative=sustained)
    got = run(rules, "c", ["neutral", "anger", "neutral", "anger", "anger", "anger", "anger"])
    assert got == [
        [],
        ["emotion_shift"],
        [],
        ["emotion_shift"],
        [],
        ["sustained_negative"],
        ["sustained_negative"],
    ]


def test_hysteresis_is_per_speaker():
    tracker = CallTracker()
    assert feed(tracker, RULES, "customer", "neutral") == []
    assert feed(tracker, RULES, "customer", "anger") == ["emotion_shift"]
    # the customer's rule is disarmed; the agent's is not
    assert feed(tracker, RULES, "agent", "neutral") == []
    assert feed(tracker, RULES, "agent", "anger") == ["emotion_shift"]
    assert feed(tracker, RULES, "customer", "neutral") == []
    assert feed(tracker, RULES, "customer", "anger") == []  # one calm utterance: still quiet
    # the agent's calm utterances do not re-arm the customer
    assert feed(tracker, RULES, "agent", "neutral") == []
    assert feed(tracker, RULES, "agent", "neutral") == []
    assert feed(tracker, RULES, "customer", "neutral") == []
    assert feed(tracker, RULES, "customer", "anger") == []
    assert tracker.alerts == 2


# ---------------------------------------------------------------- persistence


# Few values, mostly ones that let rules fire, so that random calls often reach the
# interesting states (a rule disarmed, part of the way to re-arming) at the split.
utterances = st.lists(
    st.tuples(
        st.sampled_from(["agent", "customer"]),
        st.sampled_from(["neutral", "joy", "anger", "sadness"]),
        st.sampled_from([0.2, 0.9, 0.9]),  # confidence
        st.sampled_from([None, 0.1, 0.5, 0.95, 0.95]),  # p_shift
        st.booleans(),  # gap
    ),
    max_size=30,
)

rule_sets = st.builds(
    lambda shift_rearm, sustained_rearm, n, speakers, window, cooldown: with_rules(
        emotion_shift=RULES.emotion_shift.model_copy(
            update={"rearm_after": shift_rearm, "cooldown_utterances": cooldown}
        ),
        sustained_negative=RULES.sustained_negative.model_copy(
            update={"rearm_after": sustained_rearm, "utterances": n}
        ),
        # windows in seconds and cooldowns keep timestamps in the stored state too
        sentiment_below=RULES.sentiment_below.model_copy(
            update={"enabled": True, "below": -0.3, "utterances": None, "seconds": window}
        ),
        speakers=speakers,
    ),
    st.integers(0, 3),
    st.integers(0, 3),
    st.integers(1, 4),
    st.sampled_from([frozenset(), frozenset({"customer"})]),
    st.sampled_from([1.0, 2.5]),
    st.sampled_from([None, 2]),
)


def _observe_all(tracker: CallTracker, rules: AlertRules, items: list[Any], start: int) -> list:
    out = []
    for i, (speaker, emotion, confidence, p_shift, gap) in enumerate(items, start):
        ts = f"2026-11-24T10:00:{i:02d}.000Z"
        alerts = tracker.observe(
            rules,
            speaker=speaker,
            emotion=emotion,
            confidence=confidence,
            p_shift_speaker=p_shift,
            ts=ts,
            gap=gap,
        )
        out.append(alerts)
    return out


@settings(max_examples=200)
@given(items=utterances, rules=rule_sets, data=st.data())
def test_round_trip_mid_call_gives_the_same_alerts(items, rules, data):
    """A tracker restored from its JSON (a replay after a crash) raises the same alerts."""
    split = data.draw(st.integers(0, len(items)), label="split")
    whole = CallTracker()
    expected = _observe_all(whole, rules, items, 0)

    first = CallTracker()
    got = _observe_all(first, rules, items[:split], 0)
    raw = first.to_json()
    assert CallTracker.from_json(raw).to_json() == raw
    # a copy is independent: the worker works on one and keeps the cached one as stored
    twin = first.copy()
    assert twin.to_json() == raw
    assert _observe_all(twin, rules, items[split:], split) == expected[split:]
    assert first.to_json() == raw
    resumed = CallTracker.from_json(raw)
    got += _observe_all(resumed, rules, items[split:], split)

    assert got == expected
    assert resumed.to_json() == whole.to_json()
    assert resumed.summary() == whole.summary()

    # the worker may reload the tracker before any utterance: restore it every time
    raw = CallTracker().to_json()
    every: list[Any] = []
    for i, item in enumerate(items):
        tracker = CallTracker.from_json(raw)
        every += _observe_all(tracker, rules, [item], i)
        raw = tracker.to_json()
    assert every == expected
    assert raw == whole.to_json()


def test_from_json_of_nothing_is_a_fresh_tracker():
    for raw in (None, b""):
        assert CallTracker.from_json(raw).to_json() == CallTracker().to_json()


def test_to_json_is_compact_bytes_and_does_not_alias():
    tracker = CallTracker()
    feed(tracker, RULES, "customer", "anger")
    raw = tracker.to_json()
    assert isinstance(raw, bytes)
    copy = CallTracker.from_json(raw)
    feed(copy, RULES, "customer", "anger")
    assert tracker.to_json() == raw  # the copy's updates do not leak back


# ---------------------------------------------------------------- summary


def test_summary_counts():
    tracker = CallTracker()
    calls = [
        ("agent", "neutral", "2026-11-24T10:00:00.000Z", False),
        ("customer", "neutral", "2026-11-24T10:00:02.500Z", False),
        ("customer", "anger", "2026-11-24T10:00:05.000Z", True),  # shift alert
        ("agent", "neutral", None, False),
        ("customer", "anger", "2026-11-24T10:00:09.000Z", False),
        ("customer", "anger", "2026-11-24T10:01:10.250Z", True),  # sustained alert
    ]
    for speaker, emotion, ts, gap in calls:
        feed(tracker, RULES, speaker, emotion, ts=ts, gap=gap)
    summary = tracker.summary()
    assert summary == {
        "utterances": 6,
        "speakers": {"agent": {"neutral": 2}, "customer": {"neutral": 1, "anger": 3}},
        "dominant": {"agent": "neutral", "customer": "anger"},
        # neutral neutral anger neutral anger anger: three changes from the previous utterance
        "shifts": 3,
        "alerts": 2,
        "gaps": 2,
        "first_ts": "2026-11-24T10:00:00.000Z",
        "last_ts": "2026-11-24T10:01:10.250Z",
        "duration_s": 70.25,
        # every utterance was predicted at 0.9: neutral 0, anger -0.9; no roles given
        "roles": {
            "unknown": {
                "utterances": 6,
                "sentiment_mean": -0.45,
                "sentiment_first_third": 0.0,  # the first two utterances
                "sentiment_last_third": -0.9,  # the last two
                "sentiment_trend": -0.9,
                "sentiment_min": -0.9,
                "negative_share": 0.5,
                "shifts": 1,  # per speaker: the customer's neutral -> anger
                "alerts": 2,
            }
        },
        "by_speaker": {
            "agent": {
                "role": "unknown",
                "utterances": 2,
                "sentiment_mean": 0.0,
                "sentiment_first_third": 0.0,
                "sentiment_last_third": 0.0,
                "sentiment_trend": 0.0,
                "sentiment_min": 0.0,
                "negative_share": 0.0,
                "shifts": 0,
                "alerts": 0,
            },
            "customer": {
                "role": "unknown",
                "utterances": 4,
                "sentiment_mean": -0.675,
                "sentiment_first_third": 0.0,  # round(4 / 3) = 1 utterance
                "sentiment_last_third": -0.9,
                "sentiment_trend": -0.9,
                "sentiment_min": -0.9,
                "negative_share": 0.75,
                "shifts": 1,
                "alerts": 2,
            },
        },
        "not_analyzed": 0,
    }


def test_summary_of_an_empty_call():
    summary = CallTracker().summary()
    assert summary["utterances"] == 0
    assert summary["speakers"] == {} and summary["dominant"] == {}
    assert summary["shifts"] == summary["alerts"] == summary["gaps"] == 0
    assert summary["duration_s"] is None


def test_summary_without_timestamps_or_with_bad_ones():
    tracker = CallTracker()
    feed(tracker, RULES, "a", "joy")
    assert tracker.summary()["duration_s"] is None
    feed(tracker, RULES, "a", "joy", ts="not a time")
    feed(tracker, RULES, "a", "joy", ts="2026-11-24T10:00:00Z")
    assert tracker.summary()["duration_s"] is None


def test_summary_single_timestamp_has_zero_duration():
    tracker = CallTracker()
    feed(tracker, RULES, "a", "joy", ts="2026-11-24T10:00:00Z")
    assert tracker.summary()["duration_s"] == 0.0


def test_summary_dominant_is_deterministic_on_ties():
    one, two = CallTracker(), CallTracker()
    for e in ["joy", "anger"]:
        feed(one, RULES, "a", e)
    for e in ["anger", "joy"]:
        feed(two, RULES, "a", e)
    assert one.summary()["dominant"] == two.summary()["dominant"]
