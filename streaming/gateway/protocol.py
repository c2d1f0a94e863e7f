"""The gateway's wire protocol, with no I/O: client frames in, server messages out.

Client -> server (JSON text frames; an optional ``"id"``, a string or an integer,
is echoed in the reply so a client can match replies to requests)::

    {"op": "subscribe",   "conversations": ["call-0001", ...]}
    {"op": "subscribe",   "all": true}
    {"op": "unsubscribe", "conversations": ["call-0001", ...]}
    {"op": "unsubscribe", "all": true}

Server -> client::

    {"type": "subscribed",   "conversations": [...]}
    {"type": "subscribed",   "all": true, "active": 212, "snapshots": 200,
     "truncated": true, "ended": 20}
    {"type": "unsubscribed", "conversations": [...]}  or  {"type": "unsubscribed", "all": true}
    {"type": "snapshot", "conversation_id": "...", "events": [<event>, ...]}
    {"type": "snapshot", "conversation_id": "...", "ended": true, "events": [..., <summary>]}
    <event>                                   each output event's JSON as the worker produced it
    {"type": "error", "code": "...", "detail": "...", ["conversations": [...]]}

A ``subscribe all`` reply is followed by ``snapshots`` snapshots of calls in
progress (the most recently active first; ``active`` is how many there are, and
``truncated`` says that some were left out: those appear when they next speak),
then ``ended`` snapshots of the tenant's most recently ended calls (latest first,
``"ended": true``, the summary last), then the live events.

Events are forwarded byte for byte; the gateway reads only the few fields it
routes on (`Envelope`), so a newer worker's extra fields pass through.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from streaming.gateway.errors import ErrorCode, ProtocolError

__all__ = [
    "MAX_CONVERSATIONS_PER_OP",
    "AllCallsCounts",
    "Envelope",
    "Op",
    "acknowledgement",
    "error_message",
    "parse_op",
    "read_event",
    "snapshot_message",
]

MAX_CONVERSATIONS_PER_OP = 1000
_CONVERSATION_ID = re.compile(r"^[^\x00-\x1f\x7f-\x9f]{1,256}$")  # as streaming.events
_OPS = ("subscribe", "unsubscribe")


@dataclass(frozen=True)
class Op:
    """One client request.

    Attributes:
        op: "subscribe" or "unsubscribe".
        conversations: the conversation ids named, in the order given, without repeats.
        all_conversations: the request is about all of the tenant's calls.
        request_id: the client's ``id``, echoed in the reply; None when absent.
    """

    op: str
    conversations: tuple[str, ...] = ()
    all_conversations: bool = False
    request_id: str | int | None = None


class AllCallsCounts(NamedTuple):
    """What the snapshot of a ``subscribe all`` holds (its ``subscribed`` reply).

    Attributes:
        active: calls in progress in the tenant's index.
        snapshots: snapshots of calls in progress that follow (the most recently active).
        truncated: active > snapshots: the others appear when they next speak.
        ended: snapshots of recently ended calls that follow them (latest first).
    """

    active: int
    snapshots: int
    truncated: bool
    ended: int


@dataclass(frozen=True, slots=True)
class Envelope:
    """The routing fields of one output event, and the event as received.

    Attributes:
        conversation_id: the call.
        seq: the utterance (or end) the event belongs to.
        event_id: the deterministic id consumers deduplicate by.
        tenant: the event's tenant; None means the deployment's default tenant.
        emitted_at: when the worker made it, Unix seconds; None when absent or unreadable.
        text: the event's JSON, as produced.
    """

    conversation_id: str
    seq: int
    event_id: str
    tenant: str | None
    emitted_at: float | None
    text: str


def read_event(raw: bytes) -> Envelope:
    """The envelope of one message from ``emotion-events``.

    Raises:
        ValueError: not UTF-8 JSON, or the routing fields are missing or mistyped.
    """
    text = raw.decode("utf-8")
    obj = json.loads(text)
    if not isinstance(obj, dict):
        raise ValueError("an event must be a JSON object")
    cid, seq, event_id = obj.get("conversation_id"), obj.get("seq"), obj.get("event_id")
    tenant = obj.get("tenant")
    if not isinstance(cid, str) or not _CONVERSATION_ID.match(cid):
        raise ValueError("bad conversation_id")
    if type(seq) is not int or seq < 0:
        raise ValueError("bad seq")
    if not isinstance(event_id, str) or not event_id:
        raise ValueError("bad event_id")
    if tenant is not None and not isinstance(tenant, str):
        raise ValueError("bad tenant")
    return Envelope(cid, seq, event_id, tenant, _unix_time(obj.get("emitted_at")), text)


def _unix_time(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


def frame_size(frame: str | bytes) -> int:
    """Bytes of a frame's payload."""
    return len(frame) if isinstance(frame, bytes) else len(frame.encode("utf-8"))


def parse_op(frame: str | bytes, max_frame_bytes: int) -> Op:
    """Validate one client frame.

    Args:
        frame: the frame's payload (binary frames are read as UTF-8 JSON too).
        max_frame_bytes: larger frames are refused with ``frame_too_large``.

    Raises:
        ProtocolError: with the code to send back.
    """
    size = frame_size(frame)
    if size > max_frame_bytes:
        raise ProtocolError(ErrorCode.FRAME_TOO_LARGE, f"{size} bytes > limit {max_frame_bytes}")
    try:
        obj = json.loads(frame)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(ErrorCode.NOT_JSON, "frames must be UTF-8 JSON") from exc
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "a request must be a JSON object")
    request_id = obj.get("id")
    if not _request_id_ok(request_id):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "id must be a short string or an integer")
    op = obj.get("op")
    if op not in _OPS:
        raise ProtocolError(ErrorCode.UNKNOWN_OP, f"op must be one of {list(_OPS)}, got {op!r}")
    grant_all = obj.get("all", False)
    conversations = obj.get("conversations")
    if not isinstance(grant_all, bool):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "all must be true or false")
    if grant_all:
        if conversations is not None:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "give either conversations or all")
        return Op(op, (), True, request_id)
    if not isinstance(conversations, list) or not conversations:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, "conversations must be a non-empty list, or all: true"
        )
    if len(conversations) > MAX_CONVERSATIONS_PER_OP:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"at most {MAX_CONVERSATIONS_PER_OP} conversations per request"
        )
    if not all(isinstance(c, str) and _CONVERSATION_ID.match(c) for c in conversations):
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, "conversation ids are strings of 1-256 printable characters"
        )
    return Op(op, tuple(dict.fromkeys(conversations)), False, request_id)


def _request_id_ok(value: Any) -> bool:
    if value is None or (type(value) is int and abs(value) < 2**53):
        return True
    return isinstance(value, str) and len(value) <= 64


def _dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def acknowledgement(
    op: Op,
    conversations: tuple[str, ...] | None = None,
    *,
    calls: AllCallsCounts | None = None,
) -> str:
    """The ``subscribed`` / ``unsubscribed`` reply to ``op`` (for ``conversations``;
    ``calls``: what a ``subscribe all`` snapshot holds)."""
    body: dict[str, Any] = {"type": f"{op.op}d"}
    if op.all_conversations:
        body["all"] = True
        if calls is not None:
            body.update(calls._asdict())
    else:
        body["conversations"] = list(op.conversations if conversations is None else conversations)
    if op.request_id is not None:
        body["id"] = op.request_id
    return _dumps(body)


def error_message(error: ProtocolError, request_id: str | int | None = None) -> str:
    """The ``error`` message for a refused frame."""
    body: dict[str, Any] = {"type": "error", "code": str(error.code), "detail": error.detail}
    if error.conversations:
        body["conversations"] = list(error.conversations)
    if request_id is not None:
        body["id"] = request_id
    return _dumps(body)


def snapshot_message(conversation_id: str, events: list[Envelope], *, ended: bool = False) -> str:
    """A ``snapshot``: the events' JSON is spliced in as produced, not re-encoded;
    ``ended`` marks an ended call's (an all-calls snapshot's recently ended calls)."""
    head_fields: dict[str, Any] = {"type": "snapshot", "conversation_id": conversation_id}
    if ended:
        head_fields["ended"] = True
    head = _dumps(head_fields)[:-1]
    return f'{head},"events":[{",".join(e.text for e in events)}]}}'
