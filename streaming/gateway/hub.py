"""Fan-out of live events to subscribed clients, with no network I/O.

One `Session` per connected client holds its token's claims, its subscriptions,
a bounded queue of outgoing messages (drained by that client's sender task) and,
per conversation, the highest seq sent with the event ids sent at that seq. The
`Hub` indexes sessions by conversation and by tenant (``all`` subscriptions) and
`Hub.publish` hands each live event to the sessions that want it. Nothing here
awaits: a full queue closes its session (the server sends close code 4008), so a
slow client never delays the others.

Snapshot, then live, with no gap and no duplicate (per client and conversation):

1. `Session.begin_snapshot`: from now on, live events of the conversation are
   buffered for this client instead of queued.
2. The server reads the conversation's recent events from Redis. Workers persist
   events to Redis before producing them to Kafka, so any event missing from
   that read is produced after it, and reaches the buffer (or the queue, later).
3. `Session.finish_snapshot` queues the snapshot, advances the client's mark to
   the newest event in it, then queues the buffered events the mark lets through.

The mark lets an event through when its seq is above the mark, or equal to it
with an event id not sent yet (an emotion and its alerts share a seq). Replays
after a worker crash (exact repeats, possibly of older seqs) are therefore never
sent twice, and each client sees each conversation in seq order.

``subscribe all`` does the same for a whole tenant at once: `Session.begin_all_snapshot`
buffers every live event the client may see (of any call: the set of calls is not
known before the read), the server reads the tenant's index of calls in progress
and their recent events (streaming/call_index.py), and `Session.finish_all_snapshot`
queues the reply, one snapshot per call read, advances each call's mark, then
queues the buffered events the marks let through. A call missing from the read
(beyond the bound, or indexed after it) has no mark yet: its buffered and later
events all go through, from the first one produced after the read began.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from streaming.gateway.auth import Claims, event_tenant
from streaming.gateway.protocol import Envelope, read_event, snapshot_message

__all__ = ["Hub", "Outgoing", "Session"]

MAX_MARKS = 4096  # conversations per client whose last seq is remembered (LRU)


class Outgoing(NamedTuple):
    """One item of a client's queue.

    Attributes:
        text: the frame to send ("" with a close_code).
        live: a live event (counted as delivered, its latency measured).
        emitted_at: the event's emitted_at, Unix seconds, where known.
        close_code: close the connection with this code instead of sending (0: send).
    """

    text: str
    live: bool = False
    emitted_at: float | None = None
    close_code: int = 0


@dataclass
class _Mark:
    seq: int
    ids: set[str] = field(default_factory=set)


class Session:
    """One client's state: claims, subscriptions, queue, pending snapshots, marks.

    Args:
        claims: what the client's token grants.
        queue_size: the most messages waiting for the client; one more closes it.
        on_overflow: called once, with the session and the number of messages
            discarded, when the queue overflows; the session is closed by then.
    """

    def __init__(
        self,
        claims: Claims,
        queue_size: int,
        on_overflow: Callable[[Session, int], None],
    ) -> None:
        self.claims = claims
        self.queue: asyncio.Queue[Outgoing] = asyncio.Queue(maxsize=queue_size)
        self.conversations: set[str] = set()
        self.all_conversations = False
        self.closed = False  # nothing more is queued (overflow, or a close was queued)
        self._on_overflow = on_overflow
        self._pending: dict[str, list[Envelope]] = {}
        self._pending_all: list[Envelope] | None = None  # an all-calls snapshot is read
        self._marks: OrderedDict[str, _Mark] = OrderedDict()

    # -- queueing --------------------------------------------------------------
    def send(self, text: str) -> None:
        """Queue a control message (an acknowledgement, an error)."""
        self._put(Outgoing(text))

    def close_after_queued(self, code: int, reason: str) -> None:
        """Close the connection once the messages already queued are sent."""
        self._put(Outgoing(reason, close_code=code))
        self.closed = True

    def _put(self, item: Outgoing) -> None:
        if self.closed:
            return
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self._overflow()

    def _overflow(self, unqueued: int = 1) -> None:
        """Close the session; ``unqueued``: messages lost that are in no queue or buffer."""
        self.closed = True
        dropped = unqueued + self.queue.qsize() + sum(len(b) for b in self._pending.values())
        dropped += len(self._pending_all or ())
        while not self.queue.empty():
            self.queue.get_nowait()
        self._pending.clear()
        self._pending_all = None
        self._on_overflow(self, dropped)

    # -- live events -----------------------------------------------------------
    def offer(self, event: Envelope) -> None:
        """Queue a live event if the client may see it and has not had it yet."""
        if self.closed or not self.claims.may_see(event.tenant, event.conversation_id):
            return
        buffer = self._pending.get(event.conversation_id)
        if buffer is None:
            buffer = self._pending_all
        if buffer is not None:
            buffer.append(event)
            if len(buffer) > self.queue.maxsize:  # Redis stalls: bound the memory
                self._overflow(unqueued=0)  # the event is in the buffer, counted there
            return
        if self._advance(event):
            self._put(Outgoing(event.text, True, event.emitted_at))

    def _advance(self, event: Envelope) -> bool:
        """Move the conversation's mark past ``event``; False if it was sent already."""
        cid = event.conversation_id
        mark = self._marks.get(cid)
        if mark is None:
            self._marks[cid] = _Mark(event.seq, {event.event_id})
            if len(self._marks) > MAX_MARKS:
                self._marks.popitem(last=False)
            return True
        self._marks.move_to_end(cid)
        if event.seq < mark.seq or (event.seq == mark.seq and event.event_id in mark.ids):
            return False
        if event.seq > mark.seq:
            mark.seq, mark.ids = event.seq, set()
        mark.ids.add(event.event_id)
        return True

    # -- snapshots -------------------------------------------------------------
    def begin_snapshot(self, conversation_id: str) -> None:
        """Buffer the conversation's live events until `finish_snapshot`."""
        self._pending.setdefault(conversation_id, [])

    def finish_snapshot(self, conversation_id: str, stored: Iterable[bytes], limit: int) -> int:
        """Queue the snapshot of the stored events, then the buffered live ones.

        Args:
            conversation_id: the conversation.
            stored: its recent events as read from Redis, oldest first.
            limit: the most events in the snapshot (the newest ones).

        Returns:
            The number of events in the snapshot.
        """
        buffered = self._pending.pop(conversation_id, [])
        events = self._visible(conversation_id, stored, limit)
        self._put(Outgoing(snapshot_message(conversation_id, events)))
        for event in events:
            self._advance(event)
        for event in buffered:
            if self._advance(event):
                self._put(Outgoing(event.text, True, event.emitted_at))
        return len(events)

    def abort_snapshot(self, conversation_id: str) -> None:
        """No snapshot after all: queue the buffered events as live ones."""
        for event in self._pending.pop(conversation_id, []):
            if self._advance(event):
                self._put(Outgoing(event.text, True, event.emitted_at))

    def begin_all_snapshot(self) -> None:
        """Buffer every live event until `finish_all_snapshot` (or `abort_all_snapshot`)."""
        if self._pending_all is None:
            self._pending_all = []

    def finish_all_snapshot(
        self, reply: str, snapshots: Iterable[tuple[str, Iterable[bytes], bool]], limit: int
    ) -> int:
        """Queue the reply, a snapshot per call, then the buffered live events.

        Args:
            reply: the ``subscribed`` message, queued first.
            snapshots: (conversation id, its stored events oldest first, ended) per call,
                in the order to send them.
            limit: the most events per snapshot (the newest ones).

        Returns:
            The number of snapshots queued.
        """
        buffered, self._pending_all = self._pending_all or [], None
        self._put(Outgoing(reply))
        sent = 0
        for conversation_id, stored, ended in snapshots:
            events = self._visible(conversation_id, stored, limit)
            self._put(Outgoing(snapshot_message(conversation_id, events, ended=ended)))
            for event in events:
                self._advance(event)
            sent += 1
        for event in buffered:
            if self._advance(event):
                self._put(Outgoing(event.text, True, event.emitted_at))
        return sent

    def abort_all_snapshot(self) -> None:
        """No all-calls snapshot after all: queue the buffered events the client is
        still subscribed to (by id, or all of them when it had ``all`` before)."""
        buffered, self._pending_all = self._pending_all or [], None
        for event in buffered:
            wanted = self.all_conversations or event.conversation_id in self.conversations
            if wanted and self._advance(event):
                self._put(Outgoing(event.text, True, event.emitted_at))

    def _visible(self, conversation_id: str, stored: Iterable[bytes], limit: int) -> list[Envelope]:
        """The stored events of one call this client may see, the newest ``limit``."""
        events: list[Envelope] = []
        for raw in list(stored)[-limit:]:
            try:
                event = read_event(raw)
            except ValueError:
                continue  # not ours to judge here; the worker wrote it
            if event.conversation_id == conversation_id and self.claims.may_see(
                event.tenant, conversation_id
            ):
                events.append(event)
        return events

    def forget(self, conversation_id: str) -> None:
        """Drop a pending snapshot's buffer (the client unsubscribed)."""
        self._pending.pop(conversation_id, None)


class Hub:
    """Which session wants which conversation; hands live events to them."""

    def __init__(self) -> None:
        self.sessions: set[Session] = set()
        self._by_conversation: dict[str, set[Session]] = {}
        self._all_by_tenant: dict[str, set[Session]] = {}

    def add(self, session: Session) -> None:
        self.sessions.add(session)

    def remove(self, session: Session) -> None:
        """Forget a session and all of its subscriptions."""
        self.sessions.discard(session)
        self.unsubscribe(session, tuple(session.conversations))
        self.unsubscribe_all(session)

    def subscribe(self, session: Session, conversation_ids: Iterable[str]) -> None:
        """Route these conversations' live events to ``session`` (scope checked by the caller)."""
        for cid in conversation_ids:
            self._by_conversation.setdefault(cid, set()).add(session)
            session.conversations.add(cid)

    def unsubscribe(self, session: Session, conversation_ids: Iterable[str]) -> None:
        for cid in conversation_ids:
            session.conversations.discard(cid)
            session.forget(cid)
            subscribers = self._by_conversation.get(cid)
            if subscribers is not None:
                subscribers.discard(session)
                if not subscribers:
                    del self._by_conversation[cid]

    def subscribe_all(self, session: Session) -> None:
        """Route all of the session's tenant's live events to it (``all`` checked by the caller)."""
        self._all_by_tenant.setdefault(session.claims.tenant, set()).add(session)
        session.all_conversations = True

    def unsubscribe_all(self, session: Session) -> None:
        session.all_conversations = False
        subscribers = self._all_by_tenant.get(session.claims.tenant)
        if subscribers is not None:
            subscribers.discard(session)
            if not subscribers:
                del self._all_by_tenant[session.claims.tenant]

    def publish(self, event: Envelope) -> int:
        """Offer a live event to every session subscribed to it; returns how many."""
        targets = set(self._by_conversation.get(event.conversation_id, ()))
        targets.update(self._all_by_tenant.get(event_tenant(event.tenant), ()))
        for session in targets:
            session.offer(event)  # each checks visibility itself
        return len(targets)

    def counts(self) -> tuple[int, int]:
        """(conversation subscriptions, ``all`` subscriptions) over all sessions."""
        per_conversation = sum(len(s) for s in self._by_conversation.values())
        return per_conversation, sum(len(s) for s in self._all_by_tenant.values())
