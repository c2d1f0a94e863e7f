"""Alert rules (configuration, not code) and the per-call tracker that applies them.

The tracker is part of a conversation's stored state: it is advanced in the
same compare-and-set as the model state, so a replay after a crash raises
exactly the alerts of the first run, with the same event ids.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Severity = Literal["low", "medium", "high"]
# Who spoke: the input's `role`, or "unknown" when the producer did not say.
Role = Literal["agent", "customer", "other", "unknown"]
ROLES: tuple[str, ...] = ("agent", "customer", "other", "unknown")
MAX_WINDOW = 20  # the longest window in utterances; also the most evidence an alert carries
EVIDENCE_SECONDS = 10  # evidence kept for a window in seconds (its last utterances)


class AlertRulesError(ValueError):
    """The alert rules file is unreadable or invalid."""


class _Rule(BaseModel):
    """What every rule has: who it watches, how sure, how often, how loud."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    severity: Severity = "medium"
    rearm_after: int = Field(default=2, ge=0, description="calm utterances before the rule re-arms")
    # whose utterances the rule watches; "unknown": the producer sent no role
    roles: frozenset[Role] = frozenset({"customer", "unknown"})
    # the utterance that triggers must be predicted with at least this probability
    min_confidence: float = Field(default=0.0, ge=0.0, le=1.0)
    # after firing, the rule stays silent in this call for this many utterances / seconds
    cooldown_utterances: int | None = Field(default=None, ge=1)
    cooldown_s: float | None = Field(default=None, gt=0.0, le=86_400.0)

    @model_validator(mode="after")
    def _some_role(self) -> _Rule:
        if not self.roles:
            raise ValueError("roles is empty: the rule would never fire (use enabled = false)")
        return self


class _Windowed(_Rule):
    """A rule over a window: ``utterances`` in a row, or ``seconds`` (from ``ts``)."""

    utterances: int | None = Field(default=None, ge=1, le=MAX_WINDOW)
    seconds: float | None = Field(default=None, gt=0.0, le=3_600.0)

    @model_validator(mode="before")
    @classmethod
    def _default_window(cls, data: Any) -> Any:
        if (
            isinstance(data, dict)
            and data.get("utterances") is None
            and data.get("seconds") is None
        ):
            data = {**data, "utterances": 3}
        return data

    @model_validator(mode="after")
    def _one_window(self) -> _Windowed:
        if self.utterances is not None and self.seconds is not None:
            raise ValueError("give one window: utterances or seconds, not both")
        return self

    def evidence_size(self) -> int:
        return self.utterances if self.utterances is not None else EVIDENCE_SECONDS


class ShiftRule(_Rule):
    min_p_shift: float = Field(default=0.5, ge=0.0, le=1.0)
    min_confidence: float = Field(default=0.35, ge=0.0, le=1.0)
    severity: Severity = "high"


class SustainedRule(_Windowed):
    """Negative predicted emotions from one speaker for a window."""


class SentimentRule(_Windowed):
    """A speaker's sentiment below ``below`` for a window."""

    enabled: bool = False
    below: float = Field(default=-0.5, ge=-1.0, le=1.0)


Score = Literal["auto", "p_negative", "alert_head"]


class OnsetRule(_Rule):
    """A speaker's negative score reaches ``min_score`` while the rule is armed.

    The score is ``p_negative`` (the probability mass of the negative emotions),
    ``alert_head`` (a small learned model of "this speaker is in a negative
    episode", shipped in the checkpoint as alert_head.json) or ``auto`` (the
    head when the checkpoint ships one, else ``p_negative``). The threshold is
    given directly (``min_score``) or as an operating point that the head's
    table, measured on held-out training calls, turns into one:
    ``alerts_per_100`` (an alert budget) or ``min_precision`` (percent); none
    given: the threshold with the best F1 on those calls (0.5 without a table).
    After firing, the rule re-arms for that speaker once ``rearm_after`` of
    their utterances in a row score below ``rearm_below`` (default: the
    threshold).
    """

    score: Score = "p_negative"
    min_score: float | None = Field(default=None, ge=0.0, le=1.0)
    alerts_per_100: float | None = Field(default=None, gt=0.0, le=100.0)
    min_precision: float | None = Field(default=None, gt=0.0, le=100.0)
    rearm_below: float | None = Field(default=None, ge=0.0, le=1.0)
    # None: learned with the score (alert_head.json), else 1
    rearm_after: int | None = Field(default=None, ge=1)  # type: ignore[assignment]
    severity: Severity = "high"

    @model_validator(mode="after")
    def _one_threshold(self) -> OnsetRule:
        given = [
            n
            for n in ("min_score", "alerts_per_100", "min_precision")
            if getattr(self, n) is not None
        ]
        if len(given) > 1:
            raise ValueError(f"give one of min_score, alerts_per_100, min_precision; got {given}")
        return self

    @property
    def threshold(self) -> float:
        """The resolved threshold (``AlertRules.resolve`` turns operating points into one)."""
        if self.min_score is None:
            raise AlertRulesError(
                "negative_onset states an operating point: resolve the rules with the "
                "checkpoint's alert head first"
            )
        return self.min_score


class LabelSet(BaseModel):
    """A model's emotion labels and which of them are positive and negative.

    Sentiment is the probability mass of ``positive`` minus that of ``negative``;
    the other labels (neutral, surprise...) count for neither.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    labels: tuple[str, ...] = Field(min_length=2)
    positive: frozenset[str]
    negative: frozenset[str] = Field(min_length=1)

    @model_validator(mode="after")
    def _within(self) -> LabelSet:
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels repeat")
        stray = (self.positive | self.negative) - set(self.labels)
        if stray:
            raise ValueError(f"{sorted(stray)} not in labels {list(self.labels)}")
        if self.positive & self.negative:
            raise ValueError(f"{sorted(self.positive & self.negative)} both positive and negative")
        return self


MELD_SET = LabelSet(
    labels=("neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"),
    positive=frozenset({"joy"}),
    negative=frozenset({"anger", "disgust", "fear", "sadness"}),
)
IEMOCAP_SET = LabelSet(
    labels=("happy", "sad", "neutral", "angry", "excited", "frustrated"),
    positive=frozenset({"happy", "excited"}),
    negative=frozenset({"angry", "frustrated", "sad"}),
)


class OperatingPoint(BaseModel):
    """One threshold of a score, measured on held-out calls (percentages)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    threshold: float
    alerts_per_100: float
    precision: float
    recall: float


class AlertHead(BaseModel):
    """A learned alert score: logistic regression on what the tracker knows.

    ``score = sigmoid(bias + sum(w * (x - mean) / scale))`` over the named
    features (``CallTracker.features``). Pure arithmetic, no model code: the
    worker and eval-alerts compute it identically.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    features: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    weights: tuple[float, ...]
    bias: float
    operating_points: dict[str, tuple[OperatingPoint, ...]] = {}
    # what `cfnesa fit-alerts` chose on validation: {"score": ..., "rearm_after": ...}
    recommended: dict[str, Any] = {}
    trained_on: dict[str, Any] = {}

    @model_validator(mode="after")
    def _shapes(self) -> AlertHead:
        n = len(self.features)
        if not n or not len(self.mean) == len(self.scale) == len(self.weights) == n:
            raise ValueError("features, mean, scale and weights must have the same length")
        unknown = set(self.features) - set(FEATURES)
        if unknown:
            raise ValueError(f"unknown alert-head features {sorted(unknown)}; known: {FEATURES}")
        return self

    def score(self, x: Mapping[str, float]) -> float:
        z = self.bias + sum(
            w * (x[f] - m) / s
            for f, m, s, w in zip(self.features, self.mean, self.scale, self.weights, strict=True)
        )
        return 1.0 / (1.0 + math.exp(-max(min(z, 60.0), -60.0)))

    @classmethod
    def load(cls, path: str | Path) -> AlertHead:
        try:
            return cls.model_validate_json(Path(path).read_bytes())
        except OSError as exc:
            raise AlertRulesError(f"cannot read the alert head {path}: {exc}") from exc
        except ValidationError as exc:
            raise AlertRulesError(f"the alert head {path} is invalid:\n{exc}") from exc


RULE_NAMES: tuple[str, ...] = (
    "negative_onset",
    "emotion_shift",
    "sustained_negative",
    "sentiment_below",
)


class AlertRules(BaseModel):
    """The rules; ``AlertRules.load(path)`` reads a TOML file (None: the default).

    ``label_sets`` says, per label set a model may have, which emotions are
    positive and negative (sentiment, and what the rules call negative);
    ``for_labels`` picks the one that matches a model's labels.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    label_sets: dict[str, LabelSet] = Field(
        default_factory=lambda: {"meld": MELD_SET, "iemocap": IEMOCAP_SET}, min_length=1
    )
    speakers: frozenset[str] = frozenset()
    negative_onset: OnsetRule = OnsetRule(enabled=False)
    emotion_shift: ShiftRule = ShiftRule()
    sustained_negative: SustainedRule = SustainedRule()
    sentiment_below: SentimentRule = SentimentRule()
    head: AlertHead | None = Field(default=None, exclude=True)
    label_set: str | None = Field(default=None, exclude=True)  # chosen by for_labels

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and "negative_emotions" in data:
            raise ValueError(
                "negative_emotions: moved into the label sets; write "
                "[label_sets.<name>] labels = [...], positive = [...], negative = [...] "
                "(the default file, streaming/alert_rules.toml, has MELD's and IEMOCAP's)"
            )
        return data

    @property
    def negative_emotions(self) -> frozenset[str]:
        """The negative emotions of the chosen label set (before `for_labels`: of all)."""
        if self.label_set is not None:
            return self.label_sets[self.label_set].negative
        return frozenset().union(*(s.negative for s in self.label_sets.values()))

    @property
    def positive_emotions(self) -> frozenset[str]:
        """The positive emotions of the chosen label set (before `for_labels`: of all)."""
        if self.label_set is not None:
            return self.label_sets[self.label_set].positive
        return frozenset().union(*(s.positive for s in self.label_sets.values()))

    def for_labels(self, labels: Sequence[str]) -> AlertRules:
        """These rules for a model with these labels (the label set that has them).

        Raises:
            AlertRulesError: no label set has exactly these labels.
        """
        wanted = set(labels)
        for name, label_set in self.label_sets.items():
            if set(label_set.labels) == wanted:
                return self.model_copy(update={"label_set": name})
        known = ", ".join(f"[label_sets.{n}]" for n in self.label_sets)
        raise AlertRulesError(
            f"the model's labels {list(labels)} match none of the rules' label sets ({known}); "
            f"add a [label_sets.<name>] table with these labels and their positive and "
            f"negative emotions"
        )

    def sentiment(self, probabilities: Mapping[str, float]) -> float:
        """Positive minus negative probability mass, in [-1, 1] (6 decimals)."""
        pos, neg = self.positive_emotions, self.negative_emotions
        value = sum(p for label, p in probabilities.items() if label in pos) - sum(
            p for label, p in probabilities.items() if label in neg
        )
        return round(min(1.0, max(-1.0, value)), 6)

    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        head: AlertHead | None = None,
        labels: Sequence[str] | None = None,
    ) -> AlertRules:
        """Read and validate a rules file, then resolve it against ``head`` and, when
        given, the model's ``labels`` (`for_labels`)."""
        where = "the default alert rules" if path is None else str(path)
        try:
            if path is None:
                source = resources.files("streaming").joinpath("alert_rules.toml")
                text = source.read_text(encoding="utf-8")
            else:
                text = Path(path).read_text(encoding="utf-8")
            rules = cls.model_validate(tomllib.loads(text))
        except OSError as exc:
            raise AlertRulesError(f"cannot read alert rules {path}: {exc}") from exc
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise AlertRulesError(f"{where} is not valid TOML: {exc}") from exc
        except ValidationError as exc:
            raise AlertRulesError(f"{where} is invalid:\n{exc}") from exc
        try:
            rules = rules.resolve(head)
            return rules if labels is None else rules.for_labels(labels)
        except AlertRulesError as exc:
            raise AlertRulesError(f"{where}: {exc}") from exc

    def resolve(self, head: AlertHead | None) -> AlertRules:
        """Attach the learned head and turn an operating point into a threshold.

        Raises:
            AlertRulesError: the rules need a head (``score = "alert_head"`` or
                an operating point) and none is given, or no measured point
                meets the asked precision.
        """
        onset = self.negative_onset
        if not onset.enabled:
            return self.model_copy(update={"head": head})
        if onset.score == "auto":
            # what fit-alerts chose on validation for this checkpoint, else the head
            chosen = head.recommended.get("score") if head is not None else None
            score = chosen or ("alert_head" if head is not None else "p_negative")
            onset = onset.model_copy(update={"score": score})
        if onset.rearm_after is None:
            learned = head.trained_on.get("rearm_after", {}) if head is not None else {}
            onset = onset.model_copy(update={"rearm_after": int(learned.get(onset.score, 1))})
        if onset.score == "alert_head" and head is None:
            raise AlertRulesError(
                'negative_onset uses score = "alert_head" but the checkpoint has no alert head '
                '(alert_head.json); use score = "p_negative" or a checkpoint that ships one'
            )
        points = head.operating_points.get(onset.score, ()) if head is not None else ()
        if onset.min_score is None and onset.alerts_per_100 is None and onset.min_precision is None:
            # no threshold given: the best F1 on held-out training calls, else 0.5
            best = max(points, key=lambda p: (_f1(p), -p.threshold), default=None)
            onset = onset.model_copy(update={"min_score": best.threshold if best else 0.5})
        elif onset.min_score is None:
            if not points:
                raise AlertRulesError(
                    f"negative_onset states an operating point but the checkpoint has no "
                    f"measured operating points for score {onset.score!r}"
                )
            if onset.alerts_per_100 is not None:
                budget = onset.alerts_per_100
                point = min(points, key=lambda p: (abs(p.alerts_per_100 - budget), p.threshold))
            else:
                ok = [p for p in points if p.precision >= (onset.min_precision or 0.0)]
                if not ok:
                    top = max(p.precision for p in points)
                    raise AlertRulesError(
                        f"no threshold of {onset.score} reached {onset.min_precision}% precision "
                        f"on held-out calls (the best was {top:.1f}%)"
                    )
                point = max(ok, key=lambda p: (p.recall, -p.threshold))
            onset = onset.model_copy(update={"min_score": point.threshold})
        return self.model_copy(update={"negative_onset": onset, "head": head})

    def with_threshold(self, value: float) -> AlertRules:
        """These rules with the main threshold set to ``value`` (for curves)."""
        if self.negative_onset.enabled:
            return self.model_copy(
                update={
                    "negative_onset": self.negative_onset.model_copy(update={"min_score": value})
                }
            )
        return self.model_copy(
            update={"emotion_shift": self.emotion_shift.model_copy(update={"min_p_shift": value})}
        )

    def rule_names(self) -> list[str]:
        """The enabled rules, in the order the tracker applies them."""
        return [name for name in RULE_NAMES if getattr(self, name).enabled]

    def rule(self, name: str) -> _Rule:
        """The rule called ``name``."""
        if name not in RULE_NAMES:
            raise KeyError(name)
        rule: _Rule = getattr(self, name)
        return rule

    def evidence_size(self) -> int:
        """How many recent utterances per speaker the tracker keeps for evidence."""
        sizes = [2]
        sizes += [
            r.evidence_size() for r in (self.sustained_negative, self.sentiment_below) if r.enabled
        ]
        return max(sizes)

    def watches(self, speaker: str) -> bool:
        return not self.speakers or speaker in self.speakers


@dataclass(frozen=True)
class Evidence:
    """One utterance behind an alert: what the model said about it."""

    seq: int
    emotion: str
    probability: float  # of that emotion
    sentiment: float


@dataclass(frozen=True)
class Alert:
    rule: str
    speaker: str
    severity: Severity
    from_emotion: str | None
    to_emotion: str
    p_shift: float | None
    detail: str
    score: float = 0.0  # how strongly it fired (the rule's own score; ranks alerts)
    role: str = "unknown"
    evidence: tuple[Evidence, ...] = ()


# What the learned alert head may read (CallTracker.features computes them).
FEATURES: tuple[str, ...] = (
    "p_negative",  # probability mass of the negative emotions, this utterance
    "p_negative_speaker_before",  # the same, the speaker's previous utterance (0: none)
    "first_of_speaker",  # 1 for the speaker's first utterance in the call
    "p_negative_call_before",  # the same, the call's previous utterance (0: none)
    "p_shift_speaker",  # P(emotion differs from the speaker's previous one) (0: none)
    "confidence",  # probability of the predicted emotion
    "speaker_negative_run",  # predicted-negative utterances in a row before this one, max 5
    "position",  # log(1 + utterances so far in the call)
)

BUCKETS = 16  # sentiment buckets kept per speaker and role (the summary's thirds)


class SentimentTrack:
    """Sentiment figures of one speaker or role over a call, in bounded memory.

    Mean, minimum and the negative share are exact. The series behind the
    first-third / last-third trend is kept in at most ``BUCKETS`` buckets of
    equal width, as sums in thousandths: exact (to 0.001) up to 16 utterances,
    then each bucket holds 2, 4... consecutive utterances (pairs merge when the
    buckets are full), so a third's boundary moves by less than one bucket.
    Bounded, because the tracker is rewritten to Redis with every utterance.
    """

    __slots__ = ("buckets", "low", "n", "negatives", "total", "width")

    def __init__(self, d: Mapping[str, Any] | None = None) -> None:
        d = d or {}
        self.n: int = d.get("n", 0)
        self.total: float = d.get("t", 0.0)
        self.low: float | None = d.get("m")
        self.negatives: int = d.get("g", 0)
        self.width: int = d.get("w", 1)
        # stored as the sums and the last bucket's count: the others hold `width` each
        sums: list[int] = list(d.get("b", ()))
        counts = [self.width] * (len(sums) - 1) + [d.get("c", self.width)] if sums else []
        self.buckets: list[list[int]] = [[v, n] for v, n in zip(sums, counts, strict=True)]

    def copy(self) -> SentimentTrack:
        new = SentimentTrack.__new__(SentimentTrack)
        new.n, new.total, new.low = self.n, self.total, self.low
        new.negatives, new.width = self.negatives, self.width
        new.buckets = [list(b) for b in self.buckets]
        return new

    def add(self, sentiment: float, negative: bool) -> None:
        self.n += 1
        self.total = round(self.total + sentiment, 6)
        self.low = sentiment if self.low is None else min(self.low, sentiment)
        self.negatives += int(negative)
        milli = round(sentiment * 1000)
        if self.buckets and self.buckets[-1][1] < self.width:
            self.buckets[-1][0] += milli
            self.buckets[-1][1] += 1
        else:
            self.buckets.append([milli, 1])
        if len(self.buckets) > BUCKETS:
            b = self.buckets
            self.buckets = [
                [sum(x[0] for x in b[i : i + 2]), sum(x[1] for x in b[i : i + 2])]
                for i in range(0, len(b), 2)
            ]
            self.width *= 2

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "t": self.total,
            "m": self.low,
            "g": self.negatives,
            "w": self.width,
            "b": [b[0] for b in self.buckets],
            "c": self.buckets[-1][1] if self.buckets else 0,
        }

    def thirds(self) -> tuple[float, float] | None:
        """Mean sentiment of the first and of the last third of the utterances."""
        if not self.n:
            return None
        want = max(1, round(self.n / 3))
        return _mean_until(self.buckets, want), _mean_until(self.buckets[::-1], want)

    def figures(self) -> dict[str, Any]:
        """The summary's figures (without shifts and alerts)."""
        thirds = self.thirds()
        first, last = thirds if thirds is not None else (None, None)
        return {
            "utterances": self.n,
            "sentiment_mean": round(self.total / self.n, 6) if self.n else None,
            "sentiment_first_third": None if first is None else round(first, 6),
            "sentiment_last_third": None if last is None else round(last, 6),
            "sentiment_trend": None if first is None or last is None else round(last - first, 6),
            "sentiment_min": self.low,
            "negative_share": round(self.negatives / self.n, 6) if self.n else None,
        }


def _mean_until(buckets: Sequence[Sequence[int]], want: int) -> float:
    total, count = 0, 0
    for milli, n in buckets:
        total, count = total + milli, count + n
        if count >= want:
            break
    return total / count / 1000


@dataclass
class _Speaker:
    role: str = "unknown"
    last: str | None = None
    negative_run: int = 0
    negative_since: float | None = None  # ts (Unix s) of the run's first utterance
    calm_run: int = 0
    low_run: int = 0  # sentiment below sentiment_below.below, in a row
    low_since: float | None = None
    fine_run: int = 0  # sentiment at or above it, in a row
    disarmed: tuple[str, ...] = ()
    counts: dict[str, int] | None = None
    p_negative: float | None = None
    quiet_run: int = 0
    shifts: int = 0
    alerts: int = 0
    recent: list[list[Any]] | None = None  # [seq, emotion, probability, sentiment], newest last
    sentiment: SentimentTrack | None = None

    @classmethod
    def from_dict(cls, s: Mapping[str, Any]) -> _Speaker:
        return cls(
            role=s.get("role", "unknown"),
            last=s.get("last"),
            negative_run=s.get("negative_run", 0),
            negative_since=s.get("negative_since"),
            calm_run=s.get("calm_run", 0),
            low_run=s.get("low_run", 0),
            low_since=s.get("low_since"),
            fine_run=s.get("fine_run", 0),
            disarmed=tuple(s.get("disarmed", ())),
            counts=dict(s.get("counts", {})),
            p_negative=s.get("p_negative"),
            quiet_run=s.get("quiet_run", 0),
            shifts=s.get("shifts", 0),
            alerts=s.get("alerts", 0),
            recent=[list(r) for r in s.get("recent", ())],
            sentiment=SentimentTrack(s.get("sentiment")),
        )

    def copy(self) -> _Speaker:
        return dataclasses.replace(
            self,
            counts=dict(self.counts or {}),
            recent=[list(r) for r in self.recent or ()],
            sentiment=self.sentiment.copy() if self.sentiment is not None else None,
        )

    def to_dict(self) -> dict[str, Any]:
        """The fields that differ from a new speaker's (stored with every utterance)."""
        full = {
            "role": self.role,
            "last": self.last,
            "negative_run": self.negative_run,
            "negative_since": self.negative_since,
            "calm_run": self.calm_run,
            "low_run": self.low_run,
            "low_since": self.low_since,
            "fine_run": self.fine_run,
            "disarmed": list(self.disarmed),
            "counts": self.counts or {},
            "p_negative": self.p_negative,
            "quiet_run": self.quiet_run,
            "shifts": self.shifts,
            "alerts": self.alerts,
            "recent": self.recent or [],
            "sentiment": self.sentiment.to_dict() if self.sentiment and self.sentiment.n else {},
        }
        return {k: v for k, v in full.items() if v != _NEW_SPEAKER.get(k)}


_NEW_SPEAKER: dict[str, Any] = {
    "role": "unknown",
    "last": None,
    "negative_run": 0,
    "negative_since": None,
    "calm_run": 0,
    "low_run": 0,
    "low_since": None,
    "fine_run": 0,
    "disarmed": [],
    "counts": {},
    "p_negative": None,
    "quiet_run": 0,
    "shifts": 0,
    "alerts": 0,
    "recent": [],
    "sentiment": {},
}


class CallTracker:
    """What the rules and the end-of-call summary need to remember of one call.

    Only analysed utterances are observed (`observe`); an utterance of a role the
    deployment does not analyse is only counted (`skip`), so nothing about its
    emotion is kept.
    """

    def __init__(self, data: dict[str, Any] | None = None) -> None:
        d = data or {}
        self.utterances: int = d.get("utterances", 0)
        self.shifts: int = d.get("shifts", 0)
        self.alerts: int = d.get("alerts", 0)
        self.gaps: int = d.get("gaps", 0)
        self.not_analyzed: int = d.get("not_analyzed", 0)
        self.previous_analyzed: bool = d.get("previous_analyzed", True)
        self.first_ts: str | None = d.get("first_ts")
        self.last_ts: str | None = d.get("last_ts")
        self.last_emotion: str | None = d.get("last_emotion")
        self.last_p_negative: float | None = d.get("last_p_negative")
        self.last_features: dict[str, float] = {}  # the last observe's head inputs (not stored)
        self.last_sentiment: float = 0.0  # the last observe's sentiment (not stored)
        # per rule: [call utterances, ts (Unix s) or None] when it last fired (cooldowns)
        self.fired: dict[str, list[Any]] = {k: list(v) for k, v in d.get("fired", {}).items()}
        self.speakers: dict[str, _Speaker] = {
            name: _Speaker.from_dict(s) for name, s in d.get("speakers", {}).items()
        }
        self.roles: dict[str, SentimentTrack] = {
            r: SentimentTrack(t) for r, t in d.get("roles", {}).items()
        }
        # role -> the one speaker whose own track is the role's (see _role_track)
        self.role_owner: dict[str, str] = dict(d.get("role_owner", {}))

    def to_json(self) -> bytes:
        data = {
            "utterances": self.utterances,
            "shifts": self.shifts,
            "alerts": self.alerts,
            "gaps": self.gaps,
            "not_analyzed": self.not_analyzed,
            "previous_analyzed": self.previous_analyzed,
            "first_ts": self.first_ts,
            "last_ts": self.last_ts,
            "last_emotion": self.last_emotion,
            "last_p_negative": self.last_p_negative,
            "fired": self.fired,
            "speakers": {name: s.to_dict() for name, s in self.speakers.items()},
            "roles": {r: t.to_dict() for r, t in self.roles.items()},
            "role_owner": self.role_owner,
        }
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes | None) -> CallTracker:
        return cls(json.loads(raw) if raw else None)

    def copy(self) -> CallTracker:
        """An independent copy (what `from_json(to_json())` gives, without the JSON)."""
        new = CallTracker.__new__(CallTracker)
        new.__dict__.update(self.__dict__)
        new.last_features = {}
        new.fired = {k: list(v) for k, v in self.fired.items()}
        new.speakers = {n: s.copy() for n, s in self.speakers.items()}
        new.roles = {r: t.copy() for r, t in self.roles.items()}
        new.role_owner = dict(self.role_owner)
        return new

    def role_of(self, speaker: str, given: str | None = None) -> str:
        """The speaker's role: ``given`` (the input's ``role``), else the one they were
        given earlier in the call, else "unknown". A given role is remembered."""
        s = self.speakers.get(speaker)
        if given is not None:
            if s is None:
                s = self.speakers[speaker] = _Speaker(counts={})
            s.role = given
            return given
        return s.role if s is not None else "unknown"

    def skip(self, speaker: str, role: str | None = None) -> None:
        """An utterance of a role that is not analysed: counted, nothing else kept."""
        self.role_of(speaker, role)
        self.not_analyzed += 1
        self.previous_analyzed = False

    def observe(
        self,
        rules: AlertRules,
        *,
        speaker: str,
        emotion: str,
        confidence: float,
        p_shift_speaker: float | None,
        ts: str | None,
        gap: bool,
        probabilities: Mapping[str, float] | None = None,
        seq: int | None = None,
        role: str | None = None,
    ) -> list[Alert]:
        """Record one utterance's prediction; return the alerts it raises.

        ``probabilities`` (label -> probability) feeds ``negative_onset`` and the
        sentiment; without it the predicted emotion alone stands for the
        distribution. ``seq`` names the utterance in evidence (default: its
        position among the observed ones); ``role`` as in `role_of`.
        """
        probs = probabilities if probabilities is not None else {emotion: confidence}
        negative_mass = sum(p for label, p in probs.items() if label in rules.negative_emotions)
        p_negative = round(negative_mass, 6)  # as many decimals as the probabilities
        sentiment = self.last_sentiment = rules.sentiment(probs)
        seq = self.utterances if seq is None else seq
        role = self.role_of(speaker, role)
        when = _unix(ts)
        before = self.speakers.get(speaker)  # p_negative None: not observed yet
        x = self.features(
            p_negative=p_negative,
            confidence=confidence,
            p_shift_speaker=p_shift_speaker,
            speaker=before,
        )
        self.last_features = x
        self.last_p_negative = p_negative
        self.utterances += 1
        self.gaps += int(gap)
        self.previous_analyzed = True
        if ts is not None:
            self.first_ts = self.first_ts or ts
            self.last_ts = ts
        if self.last_emotion is not None and emotion != self.last_emotion:
            self.shifts += 1
        self.last_emotion = emotion
        s = self.speakers.setdefault(speaker, _Speaker(counts={}))
        counts = s.counts if s.counts is not None else {}
        counts[emotion] = counts.get(emotion, 0) + 1
        s.counts = counts
        negative = emotion in rules.negative_emotions
        previous = s.last
        if previous is not None and previous != emotion:
            s.shifts += 1
        s.last = emotion
        if negative:
            s.negative_since = s.negative_since if s.negative_run else when
            s.negative_run += 1
            s.calm_run = 0
        else:
            s.negative_run, s.negative_since = 0, None
            s.calm_run += 1
        low = rules.sentiment_below
        if sentiment < low.below:
            s.low_since = s.low_since if s.low_run else when
            s.low_run += 1
            s.fine_run = 0
        else:
            s.low_run, s.low_since = 0, None
            s.fine_run += 1
        s.p_negative = p_negative
        keep = rules.evidence_size() - 1  # >= 1: the previous utterance and this one at least
        s.recent = [*(s.recent or [])[-keep:], [seq, emotion, confidence, sentiment]]
        track = s.sentiment = s.sentiment or SentimentTrack()
        self._role_track(speaker, track, role, sentiment, negative)
        track.add(sentiment, negative)

        onset = rules.negative_onset
        score = 0.0
        if onset.enabled:
            score = p_negative if onset.score == "p_negative" else self._head(rules).score(x)
            below = onset.rearm_below if onset.rearm_below is not None else onset.threshold
            s.quiet_run = s.quiet_run + 1 if score < below else 0
        s.disarmed = tuple(n for n in s.disarmed if not self._rearmed(rules, n, s))
        if not rules.watches(speaker):
            return []

        fires: list[
            tuple[str, float, str, str, tuple[Evidence, ...]]
        ] = []  # rule, score, to, detail, ev
        if onset.enabled and score >= onset.threshold:
            worst = max(
                (kv for kv in probs.items() if kv[0] in rules.negative_emotions),
                key=lambda kv: (kv[1], kv[0]),
                default=(emotion, confidence),
            )[0]
            detail = f"{speaker}: P(negative) {p_negative:.2f}" + (
                f", alert score {score:.2f}" if onset.score == "alert_head" else ""
            )
            fires.append(("negative_onset", score, worst, detail, _evidence(s, 1)))
        shift = rules.emotion_shift
        if (
            shift.enabled
            and negative
            and previous is not None
            and previous not in rules.negative_emotions
            and p_shift_speaker is not None
            and p_shift_speaker >= shift.min_p_shift
        ):
            detail = f"{speaker} turned from {previous} to {emotion}"
            fires.append(("emotion_shift", p_shift_speaker, emotion, detail, _evidence(s, 2)))
        sustained = rules.sustained_negative
        if (
            sustained.enabled
            and negative
            and _window(sustained, s.negative_run, s.negative_since, when)
        ):
            detail = f"{speaker}: {_span(s.negative_run, s.negative_since, when)} negative"
            fires.append(
                ("sustained_negative", confidence, emotion, detail, _evidence(s, s.negative_run))
            )
        if low.enabled and s.low_run and _window(low, s.low_run, s.low_since, when):
            detail = (
                f"{speaker}: sentiment below {low.below:+.2f} for "
                f"{_span(s.low_run, s.low_since, when)}"
            )
            fires.append(("sentiment_below", -sentiment, emotion, detail, _evidence(s, s.low_run)))

        alerts = []
        for name, value, to_emotion, detail, evidence in fires:
            rule = rules.rule(name)
            if (
                name in s.disarmed
                or role not in rule.roles
                or confidence < rule.min_confidence
                or self._cooling(name, rule, when)
            ):
                continue
            alerts.append(
                Alert(
                    rule=name,
                    speaker=speaker,
                    severity=rule.severity,
                    from_emotion=previous,
                    to_emotion=to_emotion,
                    p_shift=p_shift_speaker,
                    detail=detail,
                    score=value,
                    role=role,
                    evidence=evidence,
                )
            )
            self.fired[name] = [self.utterances, when]
        s.disarmed = tuple(sorted({*s.disarmed, *(a.rule for a in alerts)}))
        s.alerts += len(alerts)
        self.alerts += len(alerts)
        return alerts

    def _role_track(
        self, speaker: str, mine: SentimentTrack, role: str, sentiment: float, negative: bool
    ) -> None:
        """Count an utterance in its role's figures, before the speaker's own ``mine``.

        A role spoken by one speaker only, all of whose utterances were in that role
        (the usual call: one agent, one customer), has no track of its own: its
        owner's track is the role's (``role_owner``), so the tracker stored with every
        utterance does not hold the same figures twice. The role gets its own track,
        a copy of the owner's, when a second speaker speaks in it or the owner
        changes role.
        """
        for held, owner in list(self.role_owner.items()):
            if owner == speaker and held != role:  # the owner changes role
                self.roles[held] = mine.copy()
                del self.role_owner[held]
        if role in self.roles:
            self.roles[role].add(sentiment, negative)
        elif self.role_owner.get(role) == speaker:
            pass  # the speaker's own track, added to by the caller
        elif role not in self.role_owner and mine.n == 0:
            self.role_owner[role] = speaker
        else:
            owner = self.role_owner.pop(role, "")
            found = self.speakers[owner].sentiment if owner else None
            shared = found.copy() if found is not None else SentimentTrack()
            shared.add(sentiment, negative)
            self.roles[role] = shared

    def _role_tracks(self) -> dict[str, SentimentTrack]:
        """Every role's track (an owned role's is its owner's)."""
        out = dict(self.roles)
        for role, owner in self.role_owner.items():
            track = self.speakers[owner].sentiment
            if track is not None:
                out[role] = track
        return out

    @staticmethod
    def _rearmed(rules: AlertRules, name: str, s: _Speaker) -> bool:
        """True when a disarmed rule has seen enough calm utterances of the speaker."""
        if name == "negative_onset":
            return s.quiet_run >= (rules.negative_onset.rearm_after or 1)
        if name == "sentiment_below":
            return s.fine_run >= rules.sentiment_below.rearm_after
        if name in ("emotion_shift", "sustained_negative"):
            return s.calm_run >= rules.rule(name).rearm_after
        return True  # a rule these rules no longer have

    def _cooling(self, name: str, rule: _Rule, when: float | None) -> bool:
        """True while the rule's cooldown since it last fired in this call runs."""
        last = self.fired.get(name)
        if last is None:
            return False
        at, ts = last
        if (
            rule.cooldown_utterances is not None
            and self.utterances - at <= rule.cooldown_utterances
        ):
            return True
        return (
            rule.cooldown_s is not None
            and ts is not None
            and when is not None
            and when - ts < rule.cooldown_s
        )

    def features(
        self,
        *,
        p_negative: float,
        confidence: float,
        p_shift_speaker: float | None,
        speaker: _Speaker | None,
    ) -> dict[str, float]:
        """The alert head's inputs for a new utterance, from the state before it."""
        before = speaker.p_negative if speaker is not None else None
        first = before is None
        return {
            "p_negative": p_negative,
            "p_negative_speaker_before": before or 0.0,
            "first_of_speaker": 1.0 if first else 0.0,
            "p_negative_call_before": self.last_p_negative or 0.0,
            "p_shift_speaker": p_shift_speaker or 0.0,
            "confidence": confidence,
            "speaker_negative_run": float(min(speaker.negative_run, 5)) if speaker else 0.0,
            "position": math.log1p(self.utterances),
        }

    @staticmethod
    def _head(rules: AlertRules) -> AlertHead:
        if rules.head is None:
            raise AlertRulesError('score = "alert_head" needs the rules resolved with a head')
        return rules.head

    def summary(self) -> dict[str, Any]:
        """The end-of-call figures (the summary event's body)."""
        duration = None
        if self.first_ts and self.last_ts:
            try:
                duration = (_parse_ts(self.last_ts) - _parse_ts(self.first_ts)).total_seconds()
            except ValueError:
                duration = None
        observed = {n: s for n, s in self.speakers.items() if s.counts}
        speakers = {name: dict(s.counts or {}) for name, s in observed.items()}
        by_speaker = {
            name: {
                "role": s.role,
                **(s.sentiment or SentimentTrack()).figures(),
                "shifts": s.shifts,
                "alerts": s.alerts,
            }
            for name, s in observed.items()
        }
        roles = {
            role: {
                **track.figures(),
                "shifts": sum(s.shifts for s in observed.values() if s.role == role),
                "alerts": sum(s.alerts for s in observed.values() if s.role == role),
            }
            for role, track in sorted(self._role_tracks().items())
            if track.n
        }
        return {
            "utterances": self.utterances,
            "speakers": speakers,
            "dominant": {
                name: max(c.items(), key=lambda kv: (kv[1], kv[0]))[0]
                for name, c in speakers.items()
                if c
            },
            "shifts": self.shifts,
            "alerts": self.alerts,
            "gaps": self.gaps,
            "first_ts": self.first_ts,
            "last_ts": self.last_ts,
            "duration_s": duration,
            "roles": roles,
            "by_speaker": by_speaker,
            "not_analyzed": self.not_analyzed,
        }


def _evidence(s: _Speaker, n: int) -> tuple[Evidence, ...]:
    """The speaker's last ``n`` utterances (at most what is kept), oldest first."""
    rows = (s.recent or [])[-max(1, min(n, MAX_WINDOW)) :]
    return tuple(Evidence(int(q), str(e), float(p), float(v)) for q, e, p, v in rows)


def _window(rule: _Windowed, run: int, since: float | None, now: float | None) -> bool:
    """True when a run (``run`` utterances, the first at ``since``) fills the rule's window."""
    if rule.utterances is not None:
        return run >= rule.utterances
    return (
        since is not None
        and now is not None
        and rule.seconds is not None
        and now - since >= rule.seconds
    )


def _span(run: int, since: float | None, now: float | None) -> str:
    if since is not None and now is not None and now > since:
        return f"{run} utterances over {now - since:.0f} s"
    return f"{run} utterances"


def _unix(ts: str | None) -> float | None:
    if ts is None:
        return None
    try:
        return _parse_ts(ts).timestamp()
    except ValueError:
        return None


def _f1(p: OperatingPoint) -> float:
    return 2 * p.precision * p.recall / (p.precision + p.recall) if p.precision + p.recall else 0.0


def _parse_ts(ts: str) -> datetime:
    return datetime.fromisoformat(ts.replace("Z", "+00:00"))
