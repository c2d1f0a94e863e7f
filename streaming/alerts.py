"""Alert rules (configuration, not code) and the per-call tracker that applies them.

The tracker is part of a conversation's stored state: it is advanced in the
same compare-and-set as the model state, so a replay after a crash raises
exactly the alerts of the first run, with the same event ids.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Severity = Literal["low", "medium", "high"]


class AlertRulesError(ValueError):
    """The alert rules file is unreadable or invalid."""


class _Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    severity: Severity = "medium"
    rearm_after: int = Field(default=2, ge=0, description="calm utterances before the rule re-arms")


class ShiftRule(_Rule):
    min_p_shift: float = Field(default=0.5, ge=0.0, le=1.0)
    min_confidence: float = Field(default=0.35, ge=0.0, le=1.0)
    severity: Severity = "high"


class SustainedRule(_Rule):
    utterances: int = Field(default=3, ge=1)


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


class AlertRules(BaseModel):
    """The rules; ``AlertRules.load(path)`` reads a TOML file (None: the default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    negative_emotions: frozenset[str] = frozenset({"anger", "disgust", "fear", "sadness"})
    speakers: frozenset[str] = frozenset()
    negative_onset: OnsetRule = OnsetRule(enabled=False)
    emotion_shift: ShiftRule = ShiftRule()
    sustained_negative: SustainedRule = SustainedRule()
    head: AlertHead | None = Field(default=None, exclude=True)

    @classmethod
    def load(cls, path: str | Path | None = None, head: AlertHead | None = None) -> AlertRules:
        """Read and validate a rules file, then resolve it against ``head``."""
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
            return rules.resolve(head)
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
        return [
            name
            for name in ("negative_onset", "emotion_shift", "sustained_negative")
            if getattr(self, name).enabled
        ]

    def watches(self, speaker: str) -> bool:
        return not self.speakers or speaker in self.speakers


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


@dataclass
class _Speaker:
    last: str | None = None
    negative_run: int = 0
    calm_run: int = 0
    disarmed: tuple[str, ...] = ()
    counts: dict[str, int] | None = None
    p_negative: float | None = None
    quiet_run: int = 0


class CallTracker:
    """What the rules and the end-of-call summary need to remember of one call."""

    def __init__(self, data: dict[str, Any] | None = None) -> None:
        d = data or {}
        self.utterances: int = d.get("utterances", 0)
        self.shifts: int = d.get("shifts", 0)
        self.alerts: int = d.get("alerts", 0)
        self.gaps: int = d.get("gaps", 0)
        self.first_ts: str | None = d.get("first_ts")
        self.last_ts: str | None = d.get("last_ts")
        self.last_emotion: str | None = d.get("last_emotion")
        self.last_p_negative: float | None = d.get("last_p_negative")
        self.last_features: dict[str, float] = {}  # the last observe's head inputs (not stored)
        self.speakers: dict[str, _Speaker] = {
            name: _Speaker(
                last=s.get("last"),
                negative_run=s.get("negative_run", 0),
                calm_run=s.get("calm_run", 0),
                disarmed=tuple(s.get("disarmed", ())),
                counts=dict(s.get("counts", {})),
                p_negative=s.get("p_negative"),
                quiet_run=s.get("quiet_run", 0),
            )
            for name, s in d.get("speakers", {}).items()
        }

    def to_json(self) -> bytes:
        data = {
            "utterances": self.utterances,
            "shifts": self.shifts,
            "alerts": self.alerts,
            "gaps": self.gaps,
            "first_ts": self.first_ts,
            "last_ts": self.last_ts,
            "last_emotion": self.last_emotion,
            "last_p_negative": self.last_p_negative,
            "speakers": {
                name: {
                    "last": s.last,
                    "negative_run": s.negative_run,
                    "calm_run": s.calm_run,
                    "disarmed": list(s.disarmed),
                    "counts": s.counts or {},
                    "p_negative": s.p_negative,
                    "quiet_run": s.quiet_run,
                }
                for name, s in self.speakers.items()
            },
        }
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes | None) -> CallTracker:
        return cls(json.loads(raw) if raw else None)

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
    ) -> list[Alert]:
        """Record one utterance's prediction; return the alerts it raises.

        ``probabilities`` (label -> probability) feeds ``negative_onset``;
        without it the predicted emotion alone stands for the distribution.
        """
        probs = probabilities if probabilities is not None else {emotion: confidence}
        p_negative = sum(p for label, p in probs.items() if label in rules.negative_emotions)
        before = self.speakers.get(speaker)
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
        s.last = emotion
        if negative:
            s.negative_run += 1
            s.calm_run = 0
        else:
            s.negative_run = 0
            s.calm_run += 1
        s.p_negative = p_negative
        onset = rules.negative_onset
        score = 0.0
        if onset.enabled:
            score = p_negative if onset.score == "p_negative" else self._head(rules).score(x)
            below = onset.rearm_below if onset.rearm_below is not None else onset.threshold
            s.quiet_run = s.quiet_run + 1 if score < below else 0
        # re-arm after enough calm utterances
        still = []
        for name in s.disarmed:
            if name == "negative_onset":
                if s.quiet_run < (onset.rearm_after or 1):
                    still.append(name)
                continue
            rule = rules.emotion_shift if name == "emotion_shift" else rules.sustained_negative
            if s.calm_run < rule.rearm_after:
                still.append(name)
        s.disarmed = tuple(still)
        if not rules.watches(speaker):
            return []

        alerts = []
        if onset.enabled and "negative_onset" not in s.disarmed and score >= onset.threshold:
            worst = max(
                (kv for kv in probs.items() if kv[0] in rules.negative_emotions),
                key=lambda kv: (kv[1], kv[0]),
                default=(emotion, confidence),
            )[0]
            alerts.append(
                Alert(
                    rule="negative_onset",
                    speaker=speaker,
                    severity=onset.severity,
                    from_emotion=previous,
                    to_emotion=worst,
                    p_shift=p_shift_speaker,
                    detail=f"{speaker}: P(negative) {p_negative:.2f}"
                    + (f", alert score {score:.2f}" if onset.score == "alert_head" else ""),
                    score=score,
                )
            )
        if not negative:
            s.disarmed = tuple(sorted({*s.disarmed, *(a.rule for a in alerts)}))
            self.alerts += len(alerts)
            return alerts
        shift = rules.emotion_shift
        if (
            shift.enabled
            and "emotion_shift" not in s.disarmed
            and previous is not None
            and previous not in rules.negative_emotions
            and p_shift_speaker is not None
            and p_shift_speaker >= shift.min_p_shift
            and confidence >= shift.min_confidence
        ):
            alerts.append(
                Alert(
                    rule="emotion_shift",
                    speaker=speaker,
                    severity=shift.severity,
                    from_emotion=previous,
                    to_emotion=emotion,
                    p_shift=p_shift_speaker,
                    detail=f"{speaker} turned from {previous} to {emotion}",
                    score=p_shift_speaker,
                )
            )
        sustained = rules.sustained_negative
        if (
            sustained.enabled
            and "sustained_negative" not in s.disarmed
            and s.negative_run >= sustained.utterances
        ):
            alerts.append(
                Alert(
                    rule="sustained_negative",
                    speaker=speaker,
                    severity=sustained.severity,
                    from_emotion=previous,
                    to_emotion=emotion,
                    p_shift=p_shift_speaker,
                    detail=f"{speaker}: {s.negative_run} negative utterances in a row",
                    score=confidence,
                )
            )
        s.disarmed = tuple(sorted({*s.disarmed, *(a.rule for a in alerts)}))
        self.alerts += len(alerts)
        return alerts

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
        speakers = {name: dict(s.counts or {}) for name, s in self.speakers.items()}
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
        }


def _f1(p: OperatingPoint) -> float:
    return 2 * p.precision * p.recall / (p.precision + p.recall) if p.precision + p.recall else 0.0


def _parse_ts(ts: str) -> datetime:
    return datetime.fromisoformat(ts.replace("Z", "+00:00"))
