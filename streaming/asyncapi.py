"""The published contract as one AsyncAPI 3.0.0 document, docs/asyncapi.yaml.

Generated, never edited by hand: the Kafka events' schemas are the ones
`streaming.schemas` writes to docs/schemas/ (that is, the pydantic models in
`streaming.events`), the WebSocket API comes from `streaming.gateway` (ops, error
codes, close codes, the path), and the defaults from `streaming.settings`::

    python -m streaming.asyncapi            # write docs/asyncapi.yaml
    python -m streaming.asyncapi --check    # exit 1 if the file differs from the code

The document sees the deployment from outside, as one application: it *receives*
``utterance-features`` (or ``utterance-text``) and the clients' requests, and it
*sends* ``emotion-events``, dead letters and the gateway's messages. Which process
does what inside (featurizer, worker, gateway) is docs/pipeline.md's business.

Dead letters carry the error in Kafka headers too (`streaming.events.dead_letter_headers`),
as Kafka Connect's dead-letter queues do; the channels' descriptions name them.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter

from streaming.events import (
    DEAD_LETTER_HEADER_PREFIX,
    DEAD_LETTER_PAYLOAD_BYTES,
    AlertEvent,
    ConversationId,
    DeadLetter,
    EmotionEvent,
    Expectations,
    Figures,
    InvalidInput,
    Shift,
    SpeakerFigures,
    SummaryEvent,
    TextEnd,
    TextUtterance,
    dump_event,
    end_event,
    parse_input,
    utterance_event,
)
from streaming.gateway.auth import DEFAULT_TENANT
from streaming.gateway.errors import AuthReason, ErrorCode, ProtocolError
from streaming.gateway.protocol import (
    MAX_CONVERSATIONS_PER_OP,
    Op,
    acknowledgement,
    error_message,
    read_event,
    snapshot_message,
)
from streaming.gateway.server import (
    CLOSE_MESSAGE_TOO_BIG,
    CLOSE_TOKEN_EXPIRED,
    CLOSE_TOO_SLOW,
    WS_PATH,
)
from streaming.schemas import render_schemas
from streaming.settings import Settings

__all__ = ["ASYNCAPI_VERSION", "DEFAULT_PATH", "build_document", "check_document", "render"]

ASYNCAPI_VERSION = "3.0.0"
CONTRACT_VERSION = "1.0.0"  # the events' schema_version is 1; bump on any contract change
DEFAULT_PATH = Path("docs/asyncapi.yaml")
KAFKA_BINDING = "0.5.0"
WS_BINDING = "0.1.0"
_SCHEMAS = "#/components/schemas/"
_DEFAULTS = Settings.model_construct()  # the defaults only: no CFNESA_* from the environment
_FEATURIZER_GROUP = "cfnesa-featurizers"  # workers.featurize.GROUP_ID (checked by a test)

# The schema files of streaming.schemas this document takes its event schemas from.
_INPUT_FILE = "utterance-features.v1.schema.json"
_OUTPUT_FILE = "emotion-events.schema.json"
_DLQ_FILE = "utterance-features.dlq.schema.json"
_DLQ_ROOT = DeadLetter.__name__  # the one file whose root is a model, not a union
_DEAD_LETTER_HEADERS = (
    "Key: the refused message's key. Headers: the refused message's, then the error's "
    f"(as Kafka Connect's dead-letter queues): {DEAD_LETTER_HEADER_PREFIX}reason, "
    f"{DEAD_LETTER_HEADER_PREFIX}detail, {DEAD_LETTER_HEADER_PREFIX}topic, "
    f"{DEAD_LETTER_HEADER_PREFIX}partition and {DEAD_LETTER_HEADER_PREFIX}offset (UTF-8)."
)

# RFC 6455 codes the gateway uses, and its own (streaming.gateway.server).
CLOSE_CODES: dict[int, str] = {
    1000: "normal closure",
    1001: "the gateway is shutting down: reconnect, to any instance, and resubscribe",
    CLOSE_MESSAGE_TOO_BIG: "a frame over max_frame_bytes (after a frame_too_large error)",
    1011: "keepalive timeout or an internal error: reconnect with backoff",
    CLOSE_TOKEN_EXPIRED: "the token expired: get a new one, then reconnect",
    CLOSE_TOO_SLOW: "too slow: the client's queue overflowed; reconnect and resubscribe "
    "(the snapshot fills the hole)",
}

# The client's ops (streaming.gateway.protocol; a test checks this list against it).
CLIENT_OPS: dict[str, str] = {
    "subscribe": "Start receiving the named conversations (a snapshot each, then live "
    "events) or, with all: true, every call of the token's tenant (a snapshot of each "
    "call in progress, up to a bound, and of the recently ended ones, then live events).",
    "unsubscribe": "Stop receiving the named conversations, or the all subscription.",
}


# ---------------------------------------------------------------- schemas


def _rewrite_refs(node: Any) -> Any:
    """A copy of a JSON Schema with its ``#/$defs/X`` refs pointing at components."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and value.startswith("#/$defs/"):
                out[key] = _SCHEMAS + value.removeprefix("#/$defs/")
            else:
                out[key] = _rewrite_refs(value)
        return out
    if isinstance(node, list):
        return [_rewrite_refs(item) for item in node]
    return node


def _event_schemas() -> tuple[dict[str, Any], dict[str, list[str]]]:
    """The schemas of docs/schemas/ as components, and each file's message schemas.

    Returns:
        (schemas by name, file name -> the names of the schemas its messages use).

    Raises:
        ValueError: two files define one name differently.
    """
    schemas: dict[str, Any] = {}
    members: dict[str, list[str]] = {}
    for file, text in render_schemas().items():
        root = json.loads(text)
        defs = {name: _rewrite_refs(body) for name, body in root.pop("$defs", {}).items()}
        root.pop("$schema", None)
        if "oneOf" in root:  # a union: its members are the messages
            members[file] = [ref["$ref"].removeprefix("#/$defs/") for ref in root["oneOf"]]
        else:  # one model at the root: the file's title replaced the model's
            defs[_DLQ_ROOT] = _rewrite_refs({**root, "title": _DLQ_ROOT})
            members[file] = [_DLQ_ROOT]
        for name, body in defs.items():
            if name in schemas and schemas[name] != body:
                raise ValueError(f"schema {name!r} differs between the schema files")
            schemas[name] = body
    return schemas, members


def _text_schemas() -> dict[str, Any]:
    """``utterance-text``'s messages (`streaming.events.TextUtterance` / `TextEnd`)."""
    return {model.__name__: model.model_json_schema() for model in (TextUtterance, TextEnd)}


def _gateway_schemas() -> dict[str, Any]:
    """The WebSocket frames of streaming.gateway.protocol, as JSON Schemas."""
    ids = {
        "type": "array",
        "items": {"$ref": _SCHEMAS + "ConversationId"},
        "minItems": 1,
        "maxItems": MAX_CONVERSATIONS_PER_OP,
        "description": "exact conversation ids (patterns belong in tokens), repeats ignored",
    }
    request_id = {
        "description": "any id of the client's, echoed in the reply to this request",
        "oneOf": [
            {"type": "string", "maxLength": 64},
            {"type": "integer", "minimum": -(2**53 - 1), "maximum": 2**53 - 1},
        ],
    }
    either = [  # ids, or all: true, never both
        {"required": ["conversations"], "properties": {"all": {"const": False}}},
        {
            "required": ["all"],
            "properties": {"all": {"const": True}},
            "not": {"required": ["conversations"]},
        },
    ]

    def request(op: str) -> dict[str, Any]:
        return {
            "title": f"{op} request",
            "description": CLIENT_OPS[op],
            "type": "object",
            "required": ["op"],
            "properties": {
                "op": {"const": op},
                "conversations": ids,
                "all": {"type": "boolean", "default": False},
                "id": {"$ref": _SCHEMAS + "RequestId"},
            },
            "oneOf": either,
        }

    def acknowledged(op: str) -> dict[str, Any]:
        properties: dict[str, Any] = {
            "type": {"const": f"{op}d"},
            "conversations": {"type": "array", "items": {"$ref": _SCHEMAS + "ConversationId"}},
            "all": {"const": True},
            "id": {"$ref": _SCHEMAS + "RequestId"},
        }
        description = f"The {op} request was applied; names what it applied to."
        if op == "subscribe":
            count = {"type": "integer", "minimum": 0}
            properties |= {
                "active": {**count, "description": "all: calls in progress in the tenant"},
                "snapshots": {
                    **count,
                    "description": "all: snapshots of calls in progress that follow "
                    "(the most recently active; at most gateway_snapshot_calls)",
                },
                "truncated": {
                    "type": "boolean",
                    "description": "all: active > snapshots; the calls left out appear "
                    "when they next speak",
                },
                "ended": {
                    **count,
                    "description": "all: snapshots of recently ended calls that follow "
                    "those (latest first)",
                },
            }
            description += (
                " With all: true, it also says how many snapshots follow it before the live events."
            )
        return {
            "title": f"{op}d reply",
            "description": description,
            "type": "object",
            "required": ["type"],
            "properties": properties,
            "oneOf": [{"required": ["conversations"]}, {"required": ["all"]}],
        }

    events = [{"$ref": _SCHEMAS + m.__name__} for m in (EmotionEvent, AlertEvent, SummaryEvent)]
    return {
        "ConversationId": TypeAdapter(ConversationId).json_schema(),
        "RequestId": request_id,
        "SubscribeRequest": request("subscribe"),
        "UnsubscribeRequest": request("unsubscribe"),
        "SubscribedReply": acknowledged("subscribe"),
        "UnsubscribedReply": acknowledged("unsubscribe"),
        "Snapshot": {
            "title": "snapshot",
            "description": "A subscribed conversation's recent events from Redis, oldest "
            "first (at most snapshot_events), sent after the subscribed reply and before "
            "the conversation's live events. Only the events the token may see.",
            "type": "object",
            "required": ["type", "conversation_id", "events"],
            "properties": {
                "type": {"const": "snapshot"},
                "conversation_id": {"$ref": _SCHEMAS + "ConversationId"},
                "ended": {
                    "const": True,
                    "description": "a recently ended call's snapshot (subscribe all); its "
                    "last event is the summary",
                },
                "events": {"type": "array", "items": {"oneOf": events}},
            },
        },
        "GatewayError": {
            "title": "error",
            "description": "A refused request. Nothing of it was applied; the connection stays "
            "open, except after frame_too_large (closed with 1009). unavailable (Redis did "
            "not answer the snapshot read) may simply be repeated.",
            "type": "object",
            "required": ["type", "code", "detail"],
            "properties": {
                "type": {"const": "error"},
                "code": {"enum": [code.value for code in ErrorCode]},
                "detail": {"type": "string", "description": "for people, not for programs"},
                "conversations": {
                    "type": "array",
                    "items": {"type": "string"},
                    "description": "the ids concerned (forbidden: those outside the token)",
                },
                "id": {"$ref": _SCHEMAS + "RequestId"},
            },
        },
    }


# ---------------------------------------------------------------- examples


_MODEL_ID = "cfnesa-meld-minilm@9b9c1ccc166d5104"
_SPEC = "minilm-l6-v2"


_FIGURES: dict[str, Any] = {
    "utterances": 20,
    "sentiment_mean": -0.31,
    "sentiment_first_third": 0.05,
    "sentiment_last_third": -0.58,
    "sentiment_trend": -0.63,
    "sentiment_min": -0.9,
    "negative_share": 0.55,
    "shifts": 5,
    "alerts": 2,
}


def _examples() -> dict[str, dict[str, Any]]:
    """One example payload per message, made by the code that makes the real ones."""
    at = "2026-11-24T10:00:03.161Z"
    labels = ("anger", "disgust", "fear", "joy", "neutral", "sadness", "surprise")
    probabilities = dict(zip(labels, (0.71, 0.04, 0.02, 0.01, 0.12, 0.06, 0.04), strict=True))
    emotion = EmotionEvent(
        conversation_id="call-0001",
        seq=12,
        speaker="spk-2",
        role="customer",
        emotion="anger",
        confidence=0.71,
        probabilities=probabilities,
        sentiment=-0.82,  # joy 0.01 - (anger 0.71 + disgust 0.04 + fear 0.02 + sadness 0.06)
        shift=Shift(vs_previous=0.83, vs_speaker_previous=0.77),
        model=_MODEL_ID,
        ts="2026-11-24T10:00:03.120Z",
        emitted_at=at,
    )
    alert = AlertEvent.model_validate(
        {
            "conversation_id": "call-0001",
            "seq": 12,
            "speaker": "spk-2",
            "role": "customer",
            "rule": "emotion_shift",
            "severity": "high",
            "from": "neutral",
            "to": "anger",
            "p_shift": 0.77,
            "detail": "spk-2 turned from neutral to anger",
            "evidence": [
                {"seq": 10, "emotion": "neutral", "probability": 0.64, "sentiment": 0.02},
                {"seq": 12, "emotion": "anger", "probability": 0.71, "sentiment": -0.82},
            ],
            "model": _MODEL_ID,
            "ts": "2026-11-24T10:00:03.120Z",
            "emitted_at": at,
        }
    )
    summary = SummaryEvent(
        conversation_id="call-0001",
        seq=40,
        utterances=40,
        speakers={"spk-2": {"neutral": 9, "anger": 11}},
        shifts=7,
        alerts=2,
        gaps=0,
        first_ts="2026-11-24T09:58:10.400Z",
        last_ts="2026-11-24T10:01:55.020Z",
        duration_s=224.62,
        dominant={"spk-2": "anger"},
        # a deployment that analyses customers only (CFNESA_ANALYZE_ROLES=customer)
        roles={"customer": Figures(**_FIGURES)},
        by_speaker={"spk-2": SpeakerFigures(role="customer", **_FIGURES)},
        not_analyzed=20,
        model=_MODEL_ID,
        emitted_at="2026-11-24T10:01:55.070Z",
    )
    vector = [0.12, -0.03, 0.5, 0.0]  # 4 values to keep it short; the shipped model takes 384
    utterance = utterance_event(
        "call-0001",
        12,
        "spk-2",
        {"text": vector},
        _SPEC,
        text="I have been waiting for an hour",
        ts="2026-11-24T10:00:03.120Z",
        role="customer",
    )
    # the dead letter the shipped model's worker makes of that short vector
    refused = _refusal(utterance, Expectations(feature_spec=_SPEC, dims={"text": 384}))
    letter = DeadLetter.from_error(
        refused, utterance, topic=_DEFAULTS.input_topic, partition=3, offset=18231
    ).model_copy(update={"at": at})
    subscribe = {"op": "subscribe", "conversations": ["call-0001"], "id": 1}
    forbidden = ProtocolError(ErrorCode.FORBIDDEN, "outside this token's conversations", ("vip-9",))
    snapshot = snapshot_message("call-0001", [read_event(dump_event(e)) for e in (emotion, alert)])
    return {
        "utterance": json.loads(utterance),
        "end": json.loads(end_event("call-0001", 40, ts="2026-11-24T10:01:55.020Z")),
        "emotion": json.loads(dump_event(emotion)),
        "alert": json.loads(dump_event(alert)),
        "summary": json.loads(dump_event(summary)),
        "deadLetter": json.loads(dump_event(letter)),
        "textUtterance": {
            "type": "utterance",
            "conversation_id": "call-0001",
            "seq": 12,
            "speaker": "spk-2",
            "role": "customer",
            "text": "I have been waiting for an hour",
            "ts": "2026-11-24T10:00:03.120Z",
        },
        "textEnd": {"type": "end", "conversation_id": "call-0001", "seq": 40},
        "subscribe": subscribe,
        "unsubscribe": {"op": "unsubscribe", "all": True},
        "subscribed": json.loads(acknowledgement(Op("subscribe", ("call-0001",), request_id=1))),
        "unsubscribed": json.loads(acknowledgement(Op("unsubscribe", all_conversations=True))),
        "snapshot": json.loads(snapshot),
        "error": json.loads(error_message(forbidden, 2)),
    }


def _refusal(raw: bytes, expect: Expectations) -> InvalidInput:
    try:
        parse_input(raw, expect)
    except InvalidInput as bad:
        return bad
    raise ValueError("the example was meant to be refused")


# ---------------------------------------------------------------- messages


def _kafka_key(required: bool) -> dict[str, Any]:
    key: dict[str, Any] = {
        "type": "string",
        "description": "the conversation_id, UTF-8: one call's messages share a partition, "
        "which is what keeps them in order",
    }
    if not required:
        key = {
            "description": "the conversation_id where it could be read from the bad message, "
            "else no key",
            "anyOf": [key, {"type": "null"}],
        }
    return {"kafka": {"key": key, "bindingVersion": KAFKA_BINDING}}


def _message(
    message_id: str, schema_name: str, schema: dict[str, Any], example: dict[str, Any]
) -> dict[str, Any]:
    summary = str(schema.get("description", schema.get("title", ""))).split("\n")[0]
    return {
        "name": message_id,
        "title": schema.get("title", schema_name),
        "summary": summary,
        "contentType": "application/json",
        "payload": {"$ref": _SCHEMAS + schema_name},
        "examples": [
            {"name": message_id, "payload": example}
            | ({"summary": _EXAMPLE_NOTES[message_id]} if message_id in _EXAMPLE_NOTES else {})
        ],
    }


_EXAMPLE_NOTES = {
    "utterance": "The vector is cut to 4 values to keep the example short; the shipped "
    "model takes 384, so this very message becomes the deadLetter example.",
    "deadLetter": "What the worker makes of the utterance example (4 values, 384 expected).",
}


def _message_id(type_name: str, prefix: str = "") -> str:
    """``dead_letter`` -> ``deadLetter``; prefix ``text``, ``utterance`` -> ``textUtterance``."""
    words = [w for w in [prefix, *type_name.split("_")] if w]
    return words[0] + "".join(w.capitalize() for w in words[1:])


# ---------------------------------------------------------------- the document


def _ref(*path: str) -> dict[str, str]:
    return {"$ref": "#/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in path)}


def build_document() -> dict[str, Any]:
    """The AsyncAPI document as a dict (deterministic: no times, no environment)."""
    schemas, members = _event_schemas()
    text_schemas = _text_schemas()
    schemas.update(text_schemas)
    schemas.update(_gateway_schemas())
    examples = _examples()

    messages: dict[str, dict[str, Any]] = {}
    by_file: dict[str, list[str]] = {}

    def add(message_id: str, schema_name: str, key: bool | None) -> str:
        body = _message(message_id, schema_name, schemas[schema_name], examples[message_id])
        if key is not None:
            body["bindings"] = _kafka_key(key)
        messages[message_id] = body
        return message_id

    for file, names in members.items():
        by_file[file] = [
            add(
                _message_id(schemas[n]["properties"]["type"]["const"]),
                n,
                key=file != _DLQ_FILE,
            )
            for n in names
        ]
    text = [
        add(_message_id(schemas[n]["properties"]["type"]["const"], "text"), n, key=True)
        for n in text_schemas
    ]
    client = [add(op, f"{op.capitalize()}Request", key=None) for op in CLIENT_OPS]
    replies = [add(f"{op}d", f"{op.capitalize()}dReply", key=None) for op in CLIENT_OPS]
    replies += [add("snapshot", "Snapshot", None), add("error", "GatewayError", None)]
    output = by_file[_OUTPUT_FILE]

    s = _DEFAULTS
    channels = {
        "utteranceFeatures": _kafka_channel(
            s.input_topic,
            "CFNESA_INPUT_TOPIC",
            "The workers' input: one message per utterance of a call, then its end. Key: "
            "the conversation_id. seq starts at 0 and grows by one per utterance; a seq at "
            "or below the last processed one is a duplicate (no effect), a seq past the next "
            "one is processed and marked gap: true. Invalid messages become dead letters.",
            by_file[_INPUT_FILE],
        ),
        "utteranceText": _kafka_channel(
            s.text_topic,
            "CFNESA_TEXT_TOPIC",
            "For an upstream with transcripts but no feature extractor: cfnesa featurize "
            "encodes each utterance's text and forwards it to utterance-features (ends are "
            "forwarded as they are). Key: the conversation_id.",
            text,
        ),
        "emotionEvents": _kafka_channel(
            s.output_topic,
            "CFNESA_OUTPUT_TOPIC",
            "The results: an emotion per utterance, alerts when a rule fires, a summary per "
            "ended call. Key: the conversation_id; in seq order per call. Delivery is at "
            "least once, and a repeat is always an exact repeat: deduplicate by event_id.",
            output,
        ),
        "deadLetters": _kafka_channel(
            s.dlq_topic,
            "CFNESA_DLQ_TOPIC",
            "Input the workers refused, with a machine-readable reason and the original "
            f"bytes (base64, the first {DEAD_LETTER_PAYLOAD_BYTES // 1024} KiB). "
            + _DEAD_LETTER_HEADERS,
            by_file[_DLQ_FILE],
        ),
        "textDeadLetters": _kafka_channel(
            f"{s.text_topic}.dlq",
            "CFNESA_TEXT_TOPIC, plus .dlq",
            "Messages on utterance-text that cfnesa featurize refused, as dead letters "
            "like the workers'. " + _DEAD_LETTER_HEADERS,
            by_file[_DLQ_FILE],
        ),
        "gateway": _gateway_channel([*client, *replies, *output]),
    }

    def op(action: str, channel: str, ids: list[str], summary: str, **extra: Any) -> dict[str, Any]:
        return {
            "action": action,
            "channel": _ref("channels", channel),
            "summary": summary,
            "messages": [_ref("channels", channel, "messages", m) for m in ids],
            **extra,
        }

    def group(name: str) -> dict[str, Any]:
        return {
            "kafka": {
                "groupId": {"type": "string", "enum": [name]},
                "bindingVersion": KAFKA_BINDING,
            }
        }

    operations = {
        "receiveUtteranceFeatures": op(
            "receive",
            "utteranceFeatures",
            by_file[_INPUT_FILE],
            "The workers consume utterances and ends (consumer group CFNESA_GROUP_ID).",
            bindings=group(s.group_id),
        ),
        "receiveUtteranceText": op(
            "receive",
            "utteranceText",
            text,
            "cfnesa featurize consumes transcripts.",
            bindings=group(_FEATURIZER_GROUP),
        ),
        "sendEmotionEvents": op(
            "send", "emotionEvents", output, "The workers produce emotions, alerts, summaries."
        ),
        "sendDeadLetters": op(
            "send", "deadLetters", by_file[_DLQ_FILE], "The workers dead-letter bad input."
        ),
        "sendTextDeadLetters": op(
            "send",
            "textDeadLetters",
            by_file[_DLQ_FILE],
            "cfnesa featurize dead-letters bad transcripts.",
        ),
        "receiveGatewayRequests": op(
            "receive",
            "gateway",
            client,
            "A client subscribes to, or unsubscribes from, conversations.",
            reply={
                "channel": _ref("channels", "gateway"),
                "messages": [_ref("channels", "gateway", "messages", m) for m in replies],
            },
        ),
        "sendGatewayEvents": op(
            "send",
            "gateway",
            output,
            "Live events of the subscribed conversations, each as the worker produced it, "
            "in seq order per conversation, with no event_id twice on one connection.",
        ),
    }

    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "cfnesa: conversation emotion analysis for call centres",
            "version": CONTRACT_VERSION,
            "description": _INFO,
        },
        "defaultContentType": "application/json",
        "servers": _servers(),
        "channels": channels,
        "operations": operations,
        "components": {
            "schemas": dict(sorted(schemas.items())),
            "messages": dict(sorted(messages.items())),
            "securitySchemes": _security_schemes(),
        },
    }


_INFO = """\
Utterances of live calls (feature vectors, or transcripts) go in on Kafka; an emotion
per utterance, alerts and end-of-call summaries come out on Kafka and, per tenant,
on the WebSocket gateway.

Generated from the code by `python -m streaming.asyncapi`; do not edit. The same
event schemas, as plain JSON Schema files, are in docs/schemas/. Guides:
docs/clients.md (producing, consuming, the WebSocket API, an example subscriber),
docs/operations.md (settings, sizing, failure modes), docs/gateway.md (tokens and
the gateway's behaviour in detail). Topic names are the defaults; each is a setting.
"""


def _kafka_channel(
    topic: str, setting: str, description: str, message_ids: list[str]
) -> dict[str, Any]:
    return {
        "address": topic,
        "title": topic,
        "description": textwrap.fill(description, 88)
        + f"\n\nTopic name: {setting} (default {topic}).\n",
        "servers": [_ref("servers", "kafka")],
        "messages": {m: _ref("components", "messages", m) for m in message_ids},
        "bindings": {"kafka": {"topic": topic, "bindingVersion": KAFKA_BINDING}},
    }


def _gateway_channel(message_ids: list[str]) -> dict[str, Any]:
    rows = "\n".join(f"| {code} | {meaning} |" for code, meaning in sorted(CLOSE_CODES.items()))
    reasons = ", ".join(r.value for r in AuthReason)
    description = f"""\
The gateway's event stream: JSON text frames both ways. The client sends subscribe and
unsubscribe requests; each gets a subscribed / unsubscribed reply or an error. Subscribing
to conversation ids sends one snapshot per conversation (its recent events), then its live
events; subscribing with all: true (a token with all) sends the tenant's live events
without snapshots. Events are the emotion-events messages, byte for byte; per connection
and conversation they come in seq order with no event_id twice. After a reconnect the new
snapshot repeats events the client already has: keep the newest seq and its event ids per
conversation and skip what is not newer.

Tenants: a token sees one tenant's events only; events without a tenant belong to the
tenant "{DEFAULT_TENANT}".

A refused upgrade is HTTP 401 with a JSON body {{"error": "unauthorized", "reason": ...}},
reason one of {reasons}.

Close codes:

| code | meaning |
|---|---|
{rows}
"""
    return {
        "address": WS_PATH,
        "title": "WebSocket gateway",
        "description": description,
        "servers": [_ref("servers", "gateway")],
        "messages": {m: _ref("components", "messages", m) for m in message_ids},
        "bindings": {
            "ws": {
                "method": "GET",
                "query": {
                    "type": "object",
                    "properties": {
                        "token": {
                            "type": "string",
                            "description": "the token, for browsers (which cannot set "
                            "headers); the Authorization header wins when both are present",
                        }
                    },
                },
                "headers": {
                    "type": "object",
                    "properties": {"Authorization": {"type": "string", "pattern": "^[Bb]earer .+"}},
                },
                "bindingVersion": WS_BINDING,
            }
        },
        "x-close-codes": [
            {"code": code, "meaning": meaning} for code, meaning in sorted(CLOSE_CODES.items())
        ],
        "x-unauthorized-reasons": [r.value for r in AuthReason],
    }


def _servers() -> dict[str, Any]:
    s = _DEFAULTS
    return {
        "kafka": {
            "host": s.kafka_bootstrap,
            "protocol": "kafka",
            "title": "Kafka",
            "description": "Apache Kafka in production; `cfnesa services` starts an embedded "
            "Kafka-compatible broker (Tansu) for development. Set CFNESA_KAFKA_BOOTSTRAP "
            "(comma-separated host:port list); the host here is the default.",
        },
        "gateway": {
            "host": f"{s.gateway_host}:{s.gateway_port}",
            "protocol": "ws",
            "title": "WebSocket gateway",
            "description": "`cfnesa gateway` (CFNESA_GATEWAY_HOST, CFNESA_GATEWAY_PORT; the "
            "host here is the default). In production: wss:// through a load balancer that "
            "terminates TLS and passes WebSocket upgrades; any instance serves any client. "
            "The same port serves the dashboard (/), /healthz and /metrics over HTTP.",
            "security": [
                _ref("components", "securitySchemes", "bearer"),
                _ref("components", "securitySchemes", "tokenQuery"),
            ],
        },
    }


def _security_schemes() -> dict[str, Any]:
    about = (
        "A token minted with `cfnesa token` (HMAC-SHA256 with CFNESA_GATEWAY_SECRET); it "
        "names a tenant and the conversation ids or patterns, or all calls, its holder may "
        "see, and an expiry. docs/gateway.md describes its format."
    )
    return {
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "cfnesa token: base64url(payload).base64url(HMAC-SHA256)",
            "description": f"{about} Sent as `Authorization: Bearer <token>`; preferred.",
        },
        "tokenQuery": {
            "type": "httpApiKey",
            "name": "token",
            "in": "query",
            "description": f"{about} Sent as `?token=<token>`, for browsers; query strings "
            "end up in proxy logs, so keep such tokens short-lived.",
        },
    }


# ---------------------------------------------------------------- YAML


class _Dumper(yaml.SafeDumper):
    """Block scalars for multi-line text, and no anchors (repeated dicts written out)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render() -> str:
    """The text of docs/asyncapi.yaml."""
    head = "# Generated by `python -m streaming.asyncapi` from the code: do not edit.\n"
    body = yaml.dump(
        copy.deepcopy(build_document()),
        Dumper=_Dumper,
        sort_keys=False,
        allow_unicode=True,
        width=100,
        default_flow_style=False,
    )
    return head + body


def check_document(path: Path) -> bool:
    """True when ``path`` holds exactly what the code generates."""
    return path.is_file() and path.read_text(encoding="utf-8") == render()


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: write the document, or with --check report whether it is stale."""
    parser = argparse.ArgumentParser(prog="python -m streaming.asyncapi", description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    parser.add_argument("path", nargs="?", type=Path, default=DEFAULT_PATH)
    args = parser.parse_args(argv)
    if args.check:
        if check_document(args.path):
            return 0
        print(f"stale: {args.path} (run python -m streaming.asyncapi)", file=sys.stderr)
        return 1
    args.path.parent.mkdir(parents=True, exist_ok=True)
    args.path.write_text(render(), encoding="utf-8")
    print(args.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
