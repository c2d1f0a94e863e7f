"""Which calls a batch touched, for the per-tenant index of calls in progress.

`activity` reads a batch's persisted steps (no I/O): a call whose commit went
through, or whose inputs were duplicates of what Redis holds (a replay, which may
be the one that writes what a crash left out), is active, or ended when its state
is the ended one. The worker hands the result to `streaming.call_index.CallIndex.record`
right after the commits.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from streaming.call_index import CallActivity
from streaming.events import ParsedUtterance
from workers.planner import Intake, Step
from workers.results import Outcome


def activity(
    batch: Intake, steps: Sequence[Step], outcomes: Sequence[Outcome], refused: Collection[str]
) -> list[CallActivity]:
    """The calls of ``steps`` whose state Redis now holds (not ``refused``), with their
    tenant (from the step's input events) and whether they ended."""
    out = []
    for step, outcome in zip(steps, outcomes, strict=True):
        if step.cid in refused:
            continue
        if outcome.commit is not None:
            ended = outcome.conv.ended
        elif step.duplicates:
            ended = step.conv.ended
        else:
            continue  # dead letters only: nothing about the call changed
        out.append(CallActivity(step.cid, _tenant(batch, step.cid), ended))
    return out


def _tenant(batch: Intake, cid: str) -> str | None:
    for _rec, parsed in batch.inputs.get(cid, ()):
        tenant = parsed.event.tenant if isinstance(parsed, ParsedUtterance) else parsed.tenant
        if tenant is not None:
            return tenant
    return None
