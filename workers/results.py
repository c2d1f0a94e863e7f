"""From model results to output events and the state write that goes with them.

`EventMapper.outcome` takes one conversation's `workers.planner.Step` and what the
model returned for it and builds, without I/O: the emotion events (and the alerts
the rules fire on them, `workers.alert_eval.observe_result`), the summary of an
ended call, and the compare-and-set `streaming.state_store.Commit` that stores the
new state together with those events. Event ids are deterministic, so a replay
produces the same ids with the same content.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, cast

from model.engine import UtteranceResult
from model.state import ConversationState
from streaming.alerts import AlertRules, CallTracker
from streaming.events import (
    AlertEvent,
    EmotionEvent,
    Evidence,
    Role,
    Shift,
    SummaryEvent,
    dump_event,
    format_ts,
    utc_now_iso,
)
from streaming.state_store import Commit
from workers.alert_eval import observe_result
from workers.conversations import APP, ENDED, SUMMARY, Conv
from workers.planner import Step


@dataclass
class Outcome:
    """A conversation's computed outcome, before it is persisted."""

    commit: Commit | None
    events: list[bytes]
    conv: Conv
    e2e_from: list[float] = field(default_factory=list)  # input timestamps (s)
    emotions: list[str] = field(default_factory=list)  # predicted, for the metrics
    alerts: list[str] = field(default_factory=list)  # rules fired, for the metrics
    gaps: int = 0


@dataclass(frozen=True)
class EventMapper:
    """What the worker's settings say about its outputs.

    Attributes:
        model_id: ``<name>@<fingerprint>``, in every event.
        labels: the model's emotion names, in output order.
        rules: the alert rules.
        include_text: copy transcripts into emotion events.
        state_ttl_s: TTL of a live call's state; ended_ttl_s: of an ended call's.
        full_writes: write every state part each time (no cache to diff against).
        analyze_roles: the roles whose emotions are inferred ("unknown": no role
            given); an utterance of another role advances the model state and
            nothing else: no event, no figure, no alert about it.
    """

    model_id: str
    labels: list[str]
    rules: AlertRules
    include_text: bool = False
    state_ttl_s: int = 3600
    ended_ttl_s: int = 600
    full_writes: bool = False
    analyze_roles: frozenset[str] = frozenset({"agent", "customer", "other", "unknown"})

    def outcome(
        self, step: Step, result: tuple[list[UtteranceResult], ConversationState] | None
    ) -> Outcome:
        """The events and the state write of one conversation's step."""
        conv = step.conv
        tracker = conv.tracker.copy()  # the cached one stays as stored until the commit
        out = Outcome(None, [], conv)
        new_seq = conv.seq
        state = conv.state
        if result is not None:
            outs, state = result
            emitted = utc_now_iso()
            for (rec, parsed, gap), res in zip(step.chunk, outs, strict=True):
                self._emotion(step.cid, parsed, gap, res, tracker, emitted, out)
                if rec.timestamp is not None and rec.timestamp > 0:
                    out.e2e_from.append(rec.timestamp / 1000.0)
                new_seq = parsed.event.seq
        if step.end is not None:
            end_seq = max(step.end.seq, new_seq if new_seq is not None else -1)
            summary = SummaryEvent(
                event_id=f"{step.cid}:{end_seq}:summary",
                conversation_id=step.cid,
                seq=end_seq,
                tenant=step.end.tenant,
                model=self.model_id,
                emitted_at=utc_now_iso(),
                **_summary_fields(tracker.summary()),
            )
            body = dump_event(summary)
            out.events.append(body)
            out.commit = Commit(
                step.cid,
                expected_seq=conv.seq,
                new_seq=end_seq,
                fields={APP: tracker.to_json(), ENDED: str(end_seq).encode(), SUMMARY: body},
                events=out.events,
                ttl_s=self.ended_ttl_s,
                replace=True,
            )
            out.conv = Conv(end_seq, None, tracker, ended=True, partition=step.partition)
            return out
        if result is None or state is None:
            return out
        assert new_seq is not None
        old_position = conv.state.position if conv.state is not None else 0
        full = conv.reset or conv.state is None or self.full_writes
        parts = state.to_parts(since=None if full else old_position)
        parts[APP] = tracker.to_json()
        out.commit = Commit(
            step.cid,
            expected_seq=conv.seq,
            new_seq=new_seq,
            fields=parts,
            events=out.events,
            ttl_s=self.state_ttl_s,
            replace=conv.reset,
        )
        out.conv = Conv(new_seq, state, tracker, partition=step.partition)
        return out

    def _emotion(
        self,
        cid: str,
        parsed: Any,
        gap: bool,
        res: UtteranceResult,
        tracker: CallTracker,
        emitted: str,
        out: Outcome,
    ) -> None:
        ev = parsed.event
        ts = _ts(ev.ts)
        out.gaps += int(gap)
        role = tracker.role_of(ev.speaker, ev.role)
        if role not in self.analyze_roles:
            tracker.skip(ev.speaker, ev.role)  # model context only: nothing is emitted
            return
        # the shift against the previous utterance says something about that
        # utterance's speaker too: only when their role is analysed
        vs_previous = res.shift_vs_previous if tracker.previous_analyzed else None
        alerts = observe_result(
            tracker, self.rules, ev.speaker, res, self.labels, ts=ts, gap=gap, seq=ev.seq, role=role
        )
        wire_role = cast("Role | None", None if role == "unknown" else role)
        emotion = EmotionEvent(
            event_id=f"{cid}:{ev.seq}:emotion",
            conversation_id=cid,
            seq=ev.seq,
            tenant=ev.tenant,
            speaker=ev.speaker,
            role=wire_role,
            emotion=res.emotion,
            confidence=round(res.confidence, 6),
            probabilities={
                n: round(float(p), 6) for n, p in zip(self.labels, res.probabilities, strict=True)
            },
            sentiment=tracker.last_sentiment,
            shift=Shift(
                vs_previous=_r(vs_previous),
                vs_speaker_previous=_r(res.shift_vs_speaker_previous),
            ),
            model=self.model_id,
            ts=ts,
            emitted_at=emitted,
            gap=gap,
            text=ev.text if self.include_text else None,
        )
        out.events.append(dump_event(emotion))
        out.emotions.append(res.emotion)
        for alert in alerts:
            out.alerts.append(alert.rule)
            event = AlertEvent(
                event_id=f"{cid}:{ev.seq}:alert:{alert.rule}",
                conversation_id=cid,
                seq=ev.seq,
                tenant=ev.tenant,
                speaker=alert.speaker,
                role=wire_role,
                rule=alert.rule,
                severity=alert.severity,
                from_emotion=alert.from_emotion,
                to_emotion=alert.to_emotion,
                p_shift=_r(alert.p_shift),
                detail=alert.detail,
                evidence=[
                    Evidence(
                        seq=e.seq,
                        emotion=e.emotion,
                        probability=e.probability,
                        sentiment=e.sentiment,
                    )
                    for e in alert.evidence
                ],
                model=self.model_id,
                ts=ts,
                emitted_at=emitted,
            )
            out.events.append(dump_event(event))


def _summary_fields(summary: dict[str, Any]) -> dict[str, Any]:
    """The tracker's summary with roles as the events write them (null: unknown)."""
    by_speaker = {
        name: {**f, "role": None if f["role"] == "unknown" else f["role"]}
        for name, f in summary["by_speaker"].items()
    }
    return {**summary, "by_speaker": by_speaker}


def stored_events(stored: list[bytes], seq: int, kind: str) -> list[bytes]:
    """The stored output events of one input (a duplicate's), by their seq and kind."""
    out = []
    for raw in stored:
        try:
            ev = json.loads(raw)
        except ValueError:
            continue
        if ev.get("seq") != seq:
            continue
        if (kind == "summary") == (ev.get("type") == "summary"):
            out.append(raw)
    return out


def event_type(value: bytes) -> str:
    """An output event's type, read off its first bytes (for the metrics)."""
    for t in ("emotion", "alert", "summary"):
        if value.startswith(b'{"type":"' + t.encode()):
            return t
    return "other"


def _r(x: float | None) -> float | None:
    return None if x is None else round(float(x), 6)


def _ts(ts: Any) -> str | None:
    if ts is None or isinstance(ts, str):
        return ts
    return format_ts(ts)
