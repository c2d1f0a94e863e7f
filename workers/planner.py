"""The worker's planner: records and stored conversations in, what to do out. No I/O.

`intake` validates a batch's records and groups them by conversation, in order;
`plan` sorts one conversation's inputs against what Redis holds for it:

- seq > last processed: a step of the model (``gap`` when seq skipped ahead);
- seq <= last processed: a duplicate; its stored events are produced again;
- a repeat inside the batch: its first copy is the one processed;
- ``end``: the call's summary; anything after it: a dead letter (conversation_ended);
- invalid input: a dead letter with its reason.

Tests feed it plain records (tests/workers/test_planner.py): no Kafka, no Redis.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from streaming.events import (
    DeadLetterReason,
    EndEvent,
    Expectations,
    InvalidInput,
    ParsedUtterance,
    parse_input,
)
from workers.conversations import Conv


class Record(Protocol):
    """What the planner reads of a Kafka record (aiokafka's ConsumerRecord has it)."""

    @property
    def value(self) -> bytes | None: ...
    @property
    def partition(self) -> int: ...


@dataclass
class Intake:
    """A batch's valid inputs per conversation (in arrival order) and its bad ones."""

    inputs: dict[str, list[tuple[Any, ParsedUtterance | EndEvent]]] = field(default_factory=dict)
    partitions: dict[str, int] = field(default_factory=dict)
    dead: list[tuple[Any, InvalidInput]] = field(default_factory=list)
    types: list[str] = field(default_factory=list)  # "utterance" / "end" of each valid input


def intake(records: Sequence[Record], expect: Expectations) -> Intake:
    """Validate ``records`` and group the valid ones by conversation."""
    out = Intake()
    for rec in records:
        try:
            parsed = parse_input(rec.value or b"", expect)
        except InvalidInput as bad:
            out.dead.append((rec, bad))
            continue
        event = parsed.event if isinstance(parsed, ParsedUtterance) else parsed
        out.types.append(event.type)
        out.inputs.setdefault(event.conversation_id, []).append((rec, parsed))
        out.partitions[event.conversation_id] = rec.partition
    return out


@dataclass
class Step:
    """What one batch does to one conversation."""

    cid: str
    conv: Conv
    partition: int
    chunk: list[tuple[Any, ParsedUtterance, bool]] = field(default_factory=list)  # (rec, in, gap)
    end: EndEvent | None = None
    duplicates: list[tuple[int, str]] = field(default_factory=list)  # (seq, "utterance"|"summary")
    dead: list[tuple[Any, InvalidInput]] = field(default_factory=list)


def plan(
    cid: str, conv: Conv, partition: int, items: Sequence[tuple[Any, ParsedUtterance | EndEvent]]
) -> Step:
    """Sort one conversation's inputs into steps, an end, duplicates and dead letters."""
    step = Step(cid, conv, partition)
    stepped: list[tuple[Any, ParsedUtterance, bool]] = []
    for rec, parsed in items:
        is_end = isinstance(parsed, EndEvent)
        seq = parsed.seq
        if conv.ended or step.end is not None:
            if conv.ended and is_end:
                step.duplicates.append((conv.seq or 0, "summary"))
            elif conv.ended and conv.seq is not None and seq <= conv.seq:
                step.duplicates.append((seq, "utterance"))
            else:
                ended = InvalidInput(
                    DeadLetterReason.CONVERSATION_ENDED, "the conversation has ended", cid, seq
                )
                step.dead.append((rec, ended))
            continue
        if isinstance(parsed, EndEvent):
            step.end = parsed
            continue
        last = stepped[-1][1].event.seq if stepped else conv.seq
        if last is not None and seq <= last:
            if conv.seq is not None and seq <= conv.seq:
                step.duplicates.append((seq, "utterance"))  # processed before: re-emit
            continue  # else a repeat inside this batch: its first copy is processed
        gap = seq != (last if last is not None else -1) + 1
        stepped.append((rec, parsed, gap))
    step.chunk = stepped
    return step
