"""The gateway's fan-out without I/O (streaming/gateway/hub.py): the all-calls snapshot
joins the live stream with no gap and no duplicate, whatever the interleaving."""

from __future__ import annotations

import json
import random
from typing import Any

from streaming.gateway.auth import Claims
from streaming.gateway.hub import Hub, Session
from streaming.gateway.protocol import Envelope, read_event

REPLY = '{"type":"subscribed","all":true}'


def event(cid: str, seq: int, tenant: str | None = "acme", kind: str = "emotion") -> bytes:
    body = {"type": kind, "event_id": f"{cid}:{seq}:{kind}", "conversation_id": cid, "seq": seq}
    if tenant is not None:
        body["tenant"] = tenant
    return json.dumps(body).encode()


def envelope(raw: bytes) -> Envelope:
    return read_event(raw)


def drain(session: Session) -> list[dict[str, Any]]:
    out = []
    while not session.queue.empty():
        item = session.queue.get_nowait()
        assert not item.close_code
        out.append(json.loads(item.text))
    return out


def new_session(queue: int = 1000, **claims: Any) -> tuple[Hub, Session, list[int]]:
    overflows: list[int] = []
    hub = Hub()
    session = Session(
        Claims("acme", **{"all_conversations": True, **claims}),
        queue,
        lambda _s, n: overflows.append(n),
    )
    hub.add(session)
    return hub, session, overflows


def test_events_produced_during_the_read_are_sent_once_after_the_snapshots():
    hub, session, _ = new_session()
    session.begin_all_snapshot()
    hub.subscribe_all(session)
    stored_a = [event("a", s) for s in range(4)]  # what the read found of call a
    # produced while the index and the events were read (a's 3 is also in the read)
    for raw in (
        event("a", 3),
        event("a", 4),
        event("new", 0),  # started after the index was read
        event("a", 4, kind="alert"),  # shares seq 4 with the emotion
        event("x", 1, tenant="globex"),  # another tenant: never
        event("ended", 9, kind="summary"),  # a replay of an ended call's summary
    ):
        hub.publish(envelope(raw))
    assert session.queue.empty()  # buffered, not sent before the snapshots
    stored_ended = [event("ended", 8), event("ended", 9, kind="summary")]
    sent = session.finish_all_snapshot(
        REPLY, [("a", stored_a, False), ("ended", stored_ended, True)], 3
    )
    assert sent == 2
    got = drain(session)
    assert got[0] == json.loads(REPLY)
    assert got[1]["type"] == "snapshot" and got[1]["conversation_id"] == "a"
    assert [e["seq"] for e in got[1]["events"]] == [1, 2, 3]  # the newest `limit`
    assert "ended" not in got[1]
    assert got[2]["ended"] is True and [e["type"] for e in got[2]["events"]] == [
        "emotion",
        "summary",
    ]
    assert [(e["conversation_id"], e["seq"], e["type"]) for e in got[3:]] == [
        ("a", 4, "emotion"),
        ("new", 0, "emotion"),
        ("a", 4, "alert"),
    ]
    # later live events go straight through, replays of what was sent do not
    for raw in (event("a", 2), event("a", 4), event("a", 5), event("new", 1)):
        hub.publish(envelope(raw))
    assert [(e["conversation_id"], e["seq"]) for e in drain(session)] == [("a", 5), ("new", 1)]


def test_a_failed_read_sends_only_what_is_still_subscribed():
    hub, session, _ = new_session()
    hub.subscribe(session, ["named"])
    session.begin_all_snapshot()
    hub.subscribe_all(session)
    for raw in (event("named", 0), event("other", 0)):
        hub.publish(envelope(raw))
    hub.unsubscribe_all(session)  # the server does this when Redis did not answer
    session.abort_all_snapshot()
    assert [e["conversation_id"] for e in drain(session)] == ["named"]
    hub.publish(envelope(event("other", 1)))
    assert session.queue.empty()


def test_the_buffer_is_bounded_by_the_queue():
    hub, session, overflows = new_session(queue=5)
    session.begin_all_snapshot()
    hub.subscribe_all(session)
    for seq in range(6):
        hub.publish(envelope(event("a", seq)))
    assert session.closed and len(overflows) == 1  # closed once, the buffer dropped
    assert overflows == [6]  # the six buffered events, each counted once


def test_a_full_queue_counts_the_refused_message_and_the_queued_ones():
    hub, session, overflows = new_session(queue=3)
    hub.subscribe_all(session)
    for seq in range(4):
        hub.publish(envelope(event("a", seq)))
    assert session.closed and overflows == [4]  # three queued and the one refused


def test_random_interleavings_never_gap_or_repeat():
    """A worker persists each event, indexes its call, then produces it (and sometimes
    replays an old one); the gateway begins, reads the index, reads the events and
    finishes at random points in between. Per call, what the client gets is one run
    of consecutive seqs up to the call's last, starting no later than the first event
    produced after the subscribe began (or the first of a snapshot's tail)."""
    for seed in range(200):
        rng = random.Random(seed)
        calls = [f"c{i}" for i in range(rng.randint(1, 6))]
        length = {c: rng.randint(1, 12) for c in calls}
        limit = rng.randint(1, 6)
        bound = rng.randint(0, len(calls))
        hub, session, _ = new_session()
        stored: dict[str, list[bytes]] = {c: [] for c in calls}
        active: dict[str, int] = {}  # call -> last activity (a counter)
        # each call's seqs in order, the calls interleaved at random
        left = {c: list(range(length[c])) for c in calls}
        queue: list[tuple[str, int]] = []
        while any(left.values()):
            c = rng.choice([c for c in calls if left[c]])
            queue.append((c, left[c].pop(0)))
        n = len(queue)
        begin, read_index, read_events, finish = sorted(rng.randint(0, n) for _ in range(4))
        first_after_begin: dict[str, int] = {}
        view: list[str] = []
        snap: dict[str, list[bytes]] = {}
        for i in range(n + 1):
            if i == begin:
                session.begin_all_snapshot()
                hub.subscribe_all(session)
            if i == read_index:
                view = sorted(active, key=lambda c: -active[c])[:bound]
            if i == read_events:
                snap = {c: list(stored[c]) for c in view}
            if i == finish:
                session.finish_all_snapshot(
                    REPLY, [(c, snap.get(c, []), False) for c in view], limit
                )
            if i == n:
                break
            c, seq = queue[i]
            raw = event(c, seq)
            stored[c].append(raw)
            active[c] = i
            if i >= begin:
                first_after_begin.setdefault(c, seq)
            hub.publish(envelope(raw))
            if seq and rng.random() < 0.2:  # a replay of an older event
                hub.publish(envelope(event(c, rng.randrange(seq))))
        got: dict[str, list[int]] = {c: [] for c in calls}
        for msg in drain(session):
            if msg.get("type") == "snapshot":
                got[msg["conversation_id"]] += [e["seq"] for e in msg["events"]]
            elif "seq" in msg:
                got[msg["conversation_id"]].append(msg["seq"])
        for c in calls:
            seqs = got[c]
            context = (seed, c, seqs, begin, read_index, read_events, finish)
            if c in first_after_begin:
                assert seqs, context
                # a snapshot holds the newest `limit` events it read: its tail only
                tail_from = max(len(snap[c]) - limit, 0) if c in snap else 0
                assert seqs[0] <= max(first_after_begin[c], tail_from), context
            if seqs:
                assert seqs == list(range(seqs[0], length[c])), context
