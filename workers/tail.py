"""`cfnesa tail`: print the emotion-events topic as it flows, one line per event.

    call-0001-3fa9c2 #12  spk1      customer  anger     0.71  sentiment -0.82  shift 0.77
    call-0001-3fa9c2 #12  spk1      customer  [ALERT emotion_shift neutral->anger] ...

An emotion line shows the speaker and their role (blank when the producer sent
none), the predicted emotion, its confidence, the sentiment (-1 to +1) and the
shift probability against the speaker's previous utterance (against the previous
utterance when the speaker has none yet; "-" at a call's start). Alerts are
their own events, so they get their own line, right after the emotion line of
the same utterance. Summaries are drawn as a small box.

On a terminal, emotions are coloured by valence (negative red, positive green,
surprise yellow, neutral plain), alerts are bold red. The consumer joins no
group: every tail sees every event, and starts at the end of the topic unless
asked to read from the beginning.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
import sys
from typing import TextIO

from aiokafka import AIOKafkaConsumer
from pydantic import ValidationError

from streaming.events import AlertEvent, EmotionEvent, SummaryEvent, load_output
from streaming.security import kafka_client_options, start_kafka_client
from streaming.settings import Settings

log = logging.getLogger(__name__)

RESET = "\x1b[0m"
BOLD = "\x1b[1m"
DIM = "\x1b[2m"
RED = "\x1b[31m"
GREEN = "\x1b[32m"
YELLOW = "\x1b[33m"
CYAN = "\x1b[36m"

# MELD and IEMOCAP label names by valence; an unknown label is drawn plain.
NEGATIVE = frozenset({"anger", "angry", "disgust", "fear", "sadness", "sad", "frustrated"})
POSITIVE = frozenset({"joy", "happy", "excited"})
AMBIGUOUS = frozenset({"surprise"})


def valence_color(emotion: str) -> str:
    """The ANSI colour of an emotion by its valence ("" for neutral or unknown)."""
    if emotion in NEGATIVE:
        return RED
    if emotion in POSITIVE:
        return GREEN
    if emotion in AMBIGUOUS:
        return YELLOW
    return ""


def _paint(text: str, style: str, color: bool) -> str:
    return f"{style}{text}{RESET}" if color and style else text


def _p(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_event(event: EmotionEvent | AlertEvent | SummaryEvent, color: bool = False) -> str:
    """One event as text: one line for emotions and alerts, a box for summaries.

    Args:
        event: an output event.
        color: add ANSI colours.

    Returns:
        The text, without a trailing newline.
    """
    head = f"{event.conversation_id} #{event.seq:<3}"
    if isinstance(event, EmotionEvent):
        shift = event.shift.vs_speaker_previous
        if shift is None:
            shift = event.shift.vs_previous
        emotion = _paint(f"{event.emotion:<9}", valence_color(event.emotion), color)
        gap = "  " + _paint("(gap)", DIM, color) if event.gap else ""
        said = ""
        if event.text:  # transcripts travel only where the deployment enables them
            words = event.text if len(event.text) <= 70 else event.text[:69] + "…"
            said = "  " + _paint(f'"{words}"', DIM, color)
        sentiment = "" if event.sentiment is None else f"  sentiment {event.sentiment:+.2f}"
        line = (
            f"{head} {event.speaker:<9} {_role(event.role)}{emotion} {event.confidence:.2f}"
            f"{sentiment}  shift {_p(shift)}"
        )
        return line + gap + said
    if isinstance(event, AlertEvent):
        change = ""
        if event.from_emotion or event.to_emotion:
            change = f" {event.from_emotion or '?'}->{event.to_emotion or '?'}"
        alert = _paint(f"[ALERT {event.rule}{change}]", BOLD + RED, color)
        p_shift = "" if event.p_shift is None else f" p_shift {event.p_shift:.2f}"
        detail = f"  {event.detail}" if event.detail else ""
        seqs = ",".join(f"#{e.seq}" for e in event.evidence)
        evidence = f"  (evidence {seqs})" if seqs else ""
        return (
            f"{head} {event.speaker:<9} {_role(event.role)}{alert}{p_shift} "
            f"{event.severity}{detail}{evidence}"
        )
    return _summary_box(event, color)


def _role(role: str | None) -> str:
    return "" if role is None else f"{role:<8} "


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _summary_box(event: SummaryEvent, color: bool) -> str:
    duration = "" if event.duration_s is None else f", {event.duration_s:.1f} s"
    header = [
        f"summary of {event.conversation_id} (end #{event.seq})",
        f"{_n(event.utterances, 'utterance')}, {_n(event.shifts, 'shift')}, "
        f"{_n(event.alerts, 'alert')}, {_n(event.gaps, 'gap')}{duration}",
    ]
    rows = [(line, line) for line in header]  # (as printed, without colour codes)
    for speaker, counts in sorted(event.speakers.items()):
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        detail = ", ".join(f"{name} {n}" for name, n in ranked)
        dominant = event.dominant.get(speaker, "-")
        painted = _paint(dominant, valence_color(dominant), color)
        rows.append((f"{speaker}: {painted} ({detail})", f"{speaker}: {dominant} ({detail})"))
    for role, f in sorted(event.roles.items()):
        if f.sentiment_mean is None:
            continue
        trend = ""
        if f.sentiment_first_third is not None and f.sentiment_last_third is not None:
            trend = (
                f", {f.sentiment_first_third:+.2f} -> {f.sentiment_last_third:+.2f} "
                f"(trend {f.sentiment_trend:+.2f})"
            )
        share = "" if f.negative_share is None else f", {f.negative_share:.0%} negative"
        line = f"{role} sentiment {f.sentiment_mean:+.2f}{trend}{share}"
        rows.append((line, line))
    if event.not_analyzed:
        line = f"{_n(event.not_analyzed, 'utterance')} of roles not analysed"
        rows.append((line, line))
    width = max(len(plain) for _, plain in rows)
    side = _paint("│", CYAN, color)
    return "\n".join(
        [
            _paint("┌" + "─" * (width + 2) + "┐", CYAN, color),
            *(f"{side} {text}{' ' * (width - len(plain))} {side}" for text, plain in rows),
            _paint("└" + "─" * (width + 2) + "┘", CYAN, color),
        ]
    )


async def tail(
    settings: Settings,
    stop: asyncio.Event,
    out: TextIO = sys.stdout,
    from_beginning: bool = False,
    conversation: str | None = None,
    color: bool | None = None,
    max_events: int | None = None,
    raw: bool = False,
) -> int:
    """Print events from ``settings.output_topic`` until ``stop`` is set.

    Args:
        settings: bootstrap servers, their TLS / SASL settings, and the output topic.
        stop: set it to return.
        out: where to print.
        from_beginning: read the topic from its first offset instead of its end.
        conversation: only this conversation; shell-style patterns work
            (``call-0001-*``).
        color: ANSI colours; None: when ``out`` is a terminal.
        max_events: return after printing this many events.
        raw: print each event's JSON as received instead of formatting it.

    Returns:
        The number of events printed.

    Raises:
        aiokafka.errors.KafkaError: the broker cannot be reached.
        streaming.security.ConnectionSecurityError: authentication or TLS failed.
    """
    if color is None:
        color = out.isatty()
    security = kafka_client_options(settings)
    consumer = AIOKafkaConsumer(
        settings.output_topic,
        bootstrap_servers=settings.bootstrap_servers(),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest" if from_beginning else "latest",
        fetch_max_wait_ms=settings.fetch_max_wait_ms,
        **security,
    )
    printed = 0
    await start_kafka_client(consumer, settings.bootstrap_servers(), security)
    try:
        while not stop.is_set() and (max_events is None or printed < max_events):
            batches = await consumer.getmany(timeout_ms=200)
            for record in (r for part in batches.values() for r in part):
                line = _render(record.value or b"", conversation, color, raw)
                if line is None:
                    continue
                print(line, file=out, flush=True)
                printed += 1
                if max_events is not None and printed >= max_events:
                    break
    finally:
        with contextlib.suppress(Exception):
            await consumer.stop()
    return printed


def _render(value: bytes, conversation: str | None, color: bool, raw: bool) -> str | None:
    """The text to print for one message, or None to skip it."""
    try:
        event = load_output(value)
    except ValidationError as exc:
        log.warning("skipped a message that is not an output event: %s", exc.errors()[0]["msg"])
        return None
    if conversation is not None and not fnmatch.fnmatchcase(event.conversation_id, conversation):
        return None
    if raw:
        return value.decode("utf-8", errors="replace")
    return format_event(event, color)
