"""The worker's conversations: what Redis holds for each, decoded, and a cache of them.

A cached conversation is only a shortcut: every write names the seq it was computed
from, and the compare-and-set refuses it when Redis disagrees (another worker took
the call over after a rebalance, or the cache is stale), so the worker then forgets
the entry and loads it again. On revoke the conversations of the revoked partitions
are forgotten at once.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from model.errors import FingerprintMismatchError, StateFormatError
from model.state import ConversationState
from streaming.alerts import CallTracker
from streaming.state_store import StateStore, Stored

log = logging.getLogger(__name__)

APP = "app"  # the call tracker (alerts, summary figures), JSON
ENDED = "ended"  # present once the call ended: the end event's seq
SUMMARY = "summary"  # the summary event of an ended call, JSON


@dataclass
class Conv:
    """A conversation as the worker knows it (what Redis holds, decoded)."""

    seq: int | None  # last processed seq; None: nothing stored
    state: ConversationState | None
    tracker: CallTracker
    ended: bool = False
    partition: int = -1
    reset: bool = False  # the stored model state was refused: replace it


def decode(
    cid: str,
    stored: Stored,
    partition: int,
    fingerprint: str,
    on_reset: Callable[[str], None] = lambda _reason: None,
) -> Conv:
    """The conversation ``stored`` describes. A model state of another model or format
    is refused loudly (a log line, ``on_reset(reason)``) and replaced on the next write."""
    fields = stored.fields
    tracker = CallTracker.from_json(fields.get(APP))
    if ENDED in fields:
        return Conv(stored.seq, None, tracker, ended=True, partition=partition)
    state = None
    reset = False
    if "core" in fields:
        try:
            state = ConversationState.from_parts(fields, expected_fingerprint=fingerprint)
        except (FingerprintMismatchError, StateFormatError) as exc:
            on_reset("fingerprint" if isinstance(exc, FingerprintMismatchError) else "format")
            log.warning(
                "conversation %s: stored state refused (%s); the model restarts from an "
                "empty state at seq %s",
                cid,
                exc,
                stored.seq,
            )
            reset = True
    return Conv(stored.seq, state, tracker, partition=partition, reset=reset)


class Conversations:
    """Loads conversations from the store, through a bounded cache.

    Args:
        store: the Redis state store.
        fingerprint: the model's; a stored state of another model is reset.
        enabled: keep owned conversations in memory (``state_cache``).
        max_cached: most conversations kept (least recently used go first).
        on_reset: called with the reason of each refused stored state (a metric).
    """

    def __init__(
        self,
        store: StateStore,
        fingerprint: str,
        *,
        enabled: bool = True,
        max_cached: int = 50_000,
        on_reset: Callable[[str], None] = lambda _reason: None,
    ) -> None:
        self.store = store
        self.fingerprint = fingerprint
        self.enabled = enabled
        self.max_cached = max_cached
        self.on_reset = on_reset
        self.cache: OrderedDict[str, Conv] = OrderedDict()

    def __len__(self) -> int:
        return len(self.cache)

    def __contains__(self, cid: object) -> bool:
        return cid in self.cache

    async def load(self, partitions: Mapping[str, int]) -> dict[str, Conv]:
        """These conversations (id -> partition), from the cache or else from Redis."""
        out: dict[str, Conv] = {}
        missing = []
        for cid in partitions:
            conv = self.cache.get(cid) if self.enabled else None
            if conv is not None:
                out[cid] = conv
            else:
                missing.append(cid)
        stored = await self.store.load(missing)
        for cid in missing:
            out[cid] = decode(cid, stored[cid], partitions[cid], self.fingerprint, self.on_reset)
        return out

    def remember(self, cid: str, conv: Conv) -> None:
        """Keep ``conv`` (written to Redis just now) for the next batch."""
        if not self.enabled or conv.ended:
            self.cache.pop(cid, None)
            return
        self.cache[cid] = conv
        self.cache.move_to_end(cid)
        while len(self.cache) > self.max_cached:
            self.cache.popitem(last=False)

    def forget(self, cids: Iterable[str]) -> None:
        """Drop these conversations (a conflict showed the cache is stale)."""
        for cid in cids:
            self.cache.pop(cid, None)

    def forget_partitions(self, partitions: set[int]) -> None:
        """Drop the conversations of partitions this worker no longer owns."""
        self.forget([c for c, conv in self.cache.items() if conv.partition in partitions])
