"""Alert rules (configuration, not code) and the per-call tracker that applies them.

The tracker is part of a conversation's stored state: it is advanced in the
same compare-and-set as the model state, so a replay after a crash raises
exactly the alerts of the first run, with the same event ids.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

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


class AlertRules(BaseModel):
    """The rules; ``AlertRules.load(path)`` reads a TOML file (None: the default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    negative_emotions: frozenset[str] = frozenset({"anger", "disgust", "fear", "sadness"})
    speakers: frozenset[str] = frozenset()
    emotion_shift: ShiftRule = ShiftRule()
    sustained_negative: SustainedRule = SustainedRule()

    @classmethod
    def load(cls, path: str | Path | None = None) -> AlertRules:
        where = "the default alert rules" if path is None else str(path)
        try:
            if path is None:
                source = resources.files("streaming").joinpath("alert_rules.toml")
                text = source.read_text(encoding="utf-8")
            else:
                text = Path(path).read_text(encoding="utf-8")
            return cls.model_validate(tomllib.loads(text))
        except OSError as exc:
            raise AlertRulesError(f"cannot read alert rules {path}: {exc}") from exc
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise AlertRulesError(f"{where} is not valid TOML: {exc}") from exc
        except ValidationError as exc:
            raise AlertRulesError(f"{where} is invalid:\n{exc}") from exc

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


@dataclass
class _Speaker:
    last: str | None = None
    negative_run: int = 0
    calm_run: int = 0
    disarmed: tuple[str, ...] = ()
    counts: dict[str, int] | None = None


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
        self.speakers: dict[str, _Speaker] = {
            name: _Speaker(
                last=s.get("last"),
                negative_run=s.get("negative_run", 0),
                calm_run=s.get("calm_run", 0),
                disarmed=tuple(s.get("disarmed", ())),
                counts=dict(s.get("counts", {})),
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
            "speakers": {
                name: {
                    "last": s.last,
                    "negative_run": s.negative_run,
                    "calm_run": s.calm_run,
                    "disarmed": list(s.disarmed),
                    "counts": s.counts or {},
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
    ) -> list[Alert]:
        """Record one utterance's prediction; return the alerts it raises."""
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
        # re-arm after enough calm utterances
        still = []
        for name in s.disarmed:
            rule = rules.emotion_shift if name == "emotion_shift" else rules.sustained_negative
            if s.calm_run < rule.rearm_after:
                still.append(name)
        s.disarmed = tuple(still)
        if not rules.watches(speaker) or not negative:
            return []

        alerts = []
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
                )
            )
        s.disarmed = tuple(sorted({*s.disarmed, *(a.rule for a in alerts)}))
        self.alerts += len(alerts)
        return alerts

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


def _parse_ts(ts: str) -> datetime:
    return datetime.fromisoformat(ts.replace("Z", "+00:00"))
