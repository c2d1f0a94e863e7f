"""The event contract (docs/ARCHITECTURE.md) as pydantic models, with no I/O.

Input, topic ``utterance-features`` (`parse_input`)::

    UtteranceEvent | EndEvent            discriminated by "type", schema_version 1

Output, topic ``emotion-events`` (`dump_event`, `load_output`)::

    EmotionEvent | AlertEvent | SummaryEvent     discriminated by "type"

Text input, topic ``utterance-text`` (`parse_text`)::

    TextUtterance | TextEnd              "type" defaults to utterance

Dead letters, topics ``utterance-features.dlq`` and ``utterance-text.dlq``:
`DeadLetter` as the value, the original key and headers, and the error in headers
(`dead_letter_headers`).

Compatibility: input models ignore unknown fields, so an upstream that adds a
field does not turn every message into a dead letter (the vector and ``features``
objects are the exception: an unknown key there could change what a vector
means). Output models forbid unknown fields: we write them, so a stray key is a
bug on our side or a consumer reading the wrong topic.

Errors (with `streaming.codec`)::

    ValueError
     ├── InvalidInput    a message that becomes a dead letter (reason, conversation id, seq)
     └── VectorError     (codec) an undecodable vector; parse_input re-raises it as InvalidInput
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import numpy.typing as npt
from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PlainSerializer,
    StringConstraints,
    Tag,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from streaming.codec import VectorError, decode_vector, encode_vector

MODALITIES = ("text", "audio", "visual")
DEFAULT_MAX_BYTES = 1_000_000
MAX_TEXT_CHARS = 10_000  # a transcript's limit, in utterance-text and utterance-features
DEAD_LETTER_PAYLOAD_BYTES = 64 * 1024  # the original message is kept up to this size


class DeadLetterReason(StrEnum):
    """Why a message on utterance-features became a dead letter."""

    NOT_JSON = "not_json"  # not UTF-8 JSON at all
    NOT_OBJECT = "not_object"  # JSON, but not an object
    UNKNOWN_TYPE = "unknown_type"  # "type" missing or not "utterance" / "end"
    UNSUPPORTED_SCHEMA_VERSION = "unsupported_schema_version"
    MISSING_CONVERSATION_ID = "missing_conversation_id"  # absent, empty or not a string
    BAD_SEQ = "bad_seq"  # not an integer >= 0
    WRONG_DIMENSION = "wrong_dimension"  # vector length differs from the model's
    NON_FINITE = "non_finite"  # NaN or Inf in a vector
    BAD_BASE64 = "bad_base64"  # undecodable b64, or a byte count that does not match shape
    OVERSIZE = "oversize"  # more bytes than Expectations.max_bytes
    FEATURE_SPEC_MISMATCH = "feature_spec_mismatch"  # features from another extractor
    NO_MODALITY = "no_modality"  # none of the model's modalities is present
    INVALID = "invalid"  # any other schema violation
    CONVERSATION_ENDED = "conversation_ended"  # an utterance after the conversation's end
    BAD_ROLE = "bad_role"  # "role" is not agent, customer or other


class InvalidInput(ValueError):
    """An input message that cannot be processed; the worker dead-letters it and goes on.

    Attributes:
        reason: the machine-readable reason.
        detail: a short human-readable explanation.
        conversation_id: the message's conversation id where it could be read, else None.
        seq: the message's seq where it could be read, else None.
    """

    retriable: ClassVar[bool] = False  # the same bytes fail the same way every time

    def __init__(
        self,
        reason: DeadLetterReason,
        detail: str,
        conversation_id: str | None = None,
        seq: int | None = None,
    ) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.conversation_id = conversation_id
        self.seq = seq


def format_ts(moment: datetime) -> str:
    """Format a time as UTC ISO-8601 with milliseconds and "Z"; naive means UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def utc_now_iso() -> str:
    """The current time as ``2026-11-24T10:00:03.120Z``."""
    return format_ts(datetime.now(UTC))


# ---------------------------------------------------------------- field types


def _iso_only(value: object) -> object:
    # pydantic would also read numbers as Unix times; the contract says ISO-8601.
    if isinstance(value, datetime | str):
        return value
    raise ValueError("must be an ISO-8601 string")


def _exact_int(value: object) -> object:
    # Literal[1] alone accepts True and 1.0.
    if type(value) is not int:
        raise ValueError("must be the integer 1")
    return value


def _as_utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


ConversationId = Annotated[
    str, StringConstraints(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f-\x9f]+$")
]
Seq = Annotated[int, Field(strict=True, ge=0)]
Speaker = Annotated[str, StringConstraints(min_length=1, max_length=64)]
Probability = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Count = Annotated[int, Field(ge=0)]
# Who owns a call (a contact centre, a customer of ours); the gateway never shows
# one tenant's events to another's token. None: the deployment has one tenant.
Tenant = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
]
# Input times are normalised to aware UTC datetimes (a naive time is taken as UTC).
Timestamp = Annotated[
    datetime,
    BeforeValidator(_iso_only),
    AfterValidator(_as_utc),
    PlainSerializer(format_ts, return_type=str),
]
SchemaVersion = Annotated[Literal[1], BeforeValidator(_exact_int)]
# Who spoke, on input (absent: unknown). Output events carry it too (null: unknown).
Role = Literal["agent", "customer", "other"]
ROLES: tuple[str, ...] = ("agent", "customer", "other")
Sentiment = Annotated[float, Field(ge=-1.0, le=1.0, allow_inf_nan=False)]


class EncodedVector(BaseModel):
    """A vector as {"dtype": "float32", "shape": [n], "b64": "..."}: see streaming.codec."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dtype: Literal["float32"]
    shape: Annotated[
        list[Annotated[int, Field(strict=True, ge=0)]], Field(min_length=1, max_length=1)
    ]
    b64: str


def _vector_form(value: Any) -> str | None:
    if isinstance(value, dict | EncodedVector):
        return "encoded"
    return "list" if isinstance(value, list) else None


Vector = Annotated[
    Annotated[EncodedVector, Tag("encoded")]
    | Annotated[list[Annotated[float, Field(strict=True)]], Tag("list")],
    Discriminator(
        _vector_form,
        custom_error_type="vector_type",
        custom_error_message="expected {dtype, shape, b64} or a list of numbers",
    ),
]


# ---------------------------------------------------------------- input


class Features(BaseModel):
    """One utterance's feature vectors; absent or null means the modality is missing."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    text: Vector | None = None
    audio: Vector | None = None
    visual: Vector | None = None


class _Input(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    type: str
    schema_version: SchemaVersion
    conversation_id: ConversationId
    seq: Seq
    tenant: Tenant | None = None


class UtteranceEvent(_Input):
    """One utterance's feature vectors, with who spoke and when."""

    type: Literal["utterance"]
    speaker: Speaker
    role: Role | None = None  # absent: unknown (kept per speaker of the call)
    ts: Timestamp | None = None  # when the utterance ended
    features: Features
    feature_spec: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    text: Annotated[str, StringConstraints(max_length=MAX_TEXT_CHARS)] | None = None


class EndEvent(_Input):
    """The end of a conversation: the worker emits its summary."""

    type: Literal["end"]
    ts: Timestamp | None = None


InputEvent = Annotated[UtteranceEvent | EndEvent, Field(discriminator="type")]
_INPUT: TypeAdapter[UtteranceEvent | EndEvent] = TypeAdapter(InputEvent)
_CONVERSATION_ID: TypeAdapter[str] = TypeAdapter(ConversationId)
_SEQ: TypeAdapter[int] = TypeAdapter(Seq)


@dataclass(frozen=True)
class Expectations:
    """What the deployed model accepts.

    Attributes:
        feature_spec: the feature extractor the model was trained on, e.g. "minilm-l6-v2".
        dims: vector length per modality; 0 (or absent) means the model has no branch
            for it, and such a modality is dropped from the input, not rejected.
        max_bytes: the largest message accepted.
    """

    feature_spec: str
    dims: Mapping[str, int]
    max_bytes: int = DEFAULT_MAX_BYTES

    def __post_init__(self) -> None:
        unknown = set(self.dims) - set(MODALITIES)
        if unknown:
            raise ValueError(f"unknown modalities {sorted(unknown)}; expected {MODALITIES}")
        if any(d < 0 for d in self.dims.values()) or not any(self.dims.values()):
            raise ValueError(f"dims must be >= 0 with at least one modality > 0: {self.dims}")
        if self.max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {self.max_bytes}")


@dataclass(frozen=True)
class ParsedUtterance:
    """A validated utterance with its decoded vectors.

    Attributes:
        event: the validated event.
        vectors: float32 1-D arrays, only for modalities that are present and that the
            model has a branch for.
    """

    event: UtteranceEvent
    vectors: dict[str, npt.NDArray[np.float32]]

    @property
    def conversation_id(self) -> str:
        """The event's conversation id."""
        return self.event.conversation_id

    @property
    def seq(self) -> int:
        """The event's seq."""
        return self.event.seq


def parse_input(raw: bytes, expect: Expectations | None = None) -> ParsedUtterance | EndEvent:
    """Validate one message from ``utterance-features``.

    Checks run in this order, and the first failure is the reason: size, JSON, object,
    type, schema_version, conversation_id, seq, the other fields, feature_spec, vectors
    (base64, finiteness, dimension), at least one modality.

    Args:
        raw: the message value as received.
        expect: what the model accepts; None checks the format only (any feature_spec,
            any vector length, every modality kept).

    Returns:
        A `ParsedUtterance` or an `EndEvent`.

    Raises:
        InvalidInput: with the reason, and the conversation id and seq where readable.
    """
    max_bytes = expect.max_bytes if expect else DEFAULT_MAX_BYTES
    event = _validated(raw, max_bytes, _INPUT)
    if isinstance(event, EndEvent):
        return event
    return ParsedUtterance(event, _vectors(event, expect))


def _validated(raw: bytes, max_bytes: int, adapter: TypeAdapter[Any]) -> Any:
    """The one validation of every input topic: size, UTF-8 JSON, an object, then the
    models (``adapter``), the first failure in that order giving the reason.

    Raises:
        InvalidInput: with the reason, and the conversation id and seq where readable.
    """
    if len(raw) > max_bytes:
        raise InvalidInput(DeadLetterReason.OVERSIZE, f"{len(raw)} bytes > limit {max_bytes}")
    try:
        # json (not pydantic's parser) so that NaN/Infinity tokens parse and are
        # reported as non_finite, the reason a Python producer's json.dumps would earn.
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InvalidInput(DeadLetterReason.NOT_JSON, _short(str(exc))) from exc
    if not isinstance(obj, dict):
        raise InvalidInput(DeadLetterReason.NOT_OBJECT, f"expected an object, got {_kind(obj)}")
    cid, seq = _readable_ids(obj)
    try:
        return adapter.validate_python(obj)
    except ValidationError as exc:
        reason, detail = _explain(exc)
        raise InvalidInput(reason, detail, cid, seq) from exc


def _vectors(
    event: UtteranceEvent, expect: Expectations | None
) -> dict[str, npt.NDArray[np.float32]]:
    cid, seq = event.conversation_id, event.seq
    if expect is not None and event.feature_spec != expect.feature_spec:
        detail = f"feature_spec {event.feature_spec!r}, model expects {expect.feature_spec!r}"
        raise InvalidInput(DeadLetterReason.FEATURE_SPEC_MISMATCH, _short(detail), cid, seq)
    vectors: dict[str, npt.NDArray[np.float32]] = {}
    for name in MODALITIES:
        value = getattr(event.features, name)
        wanted = None if expect is None else expect.dims.get(name, 0)
        if value is None or wanted == 0:  # absent, or the model has no branch for it
            continue
        wire = value.model_dump() if isinstance(value, EncodedVector) else value
        try:
            array = decode_vector(wire)
        except VectorError as exc:
            reason = DeadLetterReason(exc.reason)
            raise InvalidInput(reason, f"features.{name}: {exc.detail}", cid, seq) from exc
        if wanted is not None and array.shape[0] != wanted:
            detail = f"features.{name} has {array.shape[0]} values, model expects {wanted}"
            raise InvalidInput(DeadLetterReason.WRONG_DIMENSION, detail, cid, seq)
        vectors[name] = array
    if not vectors:
        usable = MODALITIES if expect is None else [m for m in MODALITIES if expect.dims.get(m)]
        detail = f"none of the model's modalities {list(usable)} is present"
        raise InvalidInput(DeadLetterReason.NO_MODALITY, detail, cid, seq)
    return vectors


def _readable_ids(obj: dict[str, Any]) -> tuple[str | None, int | None]:
    """The conversation id and seq of a message that may fail validation, where valid."""
    found: list[Any] = []
    for key, check in (("conversation_id", _CONVERSATION_ID), ("seq", _SEQ)):
        try:
            found.append(check.validate_python(obj.get(key)))
        except ValidationError:
            found.append(None)
    return found[0], found[1]


# The first check in this order that fails gives the reason (see parse_input).
_PRIORITY = (
    DeadLetterReason.UNKNOWN_TYPE,
    DeadLetterReason.UNSUPPORTED_SCHEMA_VERSION,
    DeadLetterReason.MISSING_CONVERSATION_ID,
    DeadLetterReason.BAD_SEQ,
    DeadLetterReason.BAD_ROLE,
    DeadLetterReason.INVALID,
)
# pydantic error types that mean "no usable conversation id" rather than a malformed one.
_MISSING = frozenset({"missing", "string_too_short", "string_type"})


def _explain(exc: ValidationError) -> tuple[DeadLetterReason, str]:
    """Map pydantic's errors to one reason and a one-line detail."""
    found: list[tuple[DeadLetterReason, str]] = []
    for error in exc.errors(include_url=False):
        loc = error["loc"]
        if not loc:  # the discriminator: "type" missing or unknown
            found.append((DeadLetterReason.UNKNOWN_TYPE, error["msg"]))
            continue
        path = loc[1:]  # loc[0] is the union's tag, "utterance" or "end"
        first = path[0] if path else None
        if first == "schema_version":
            reason = DeadLetterReason.UNSUPPORTED_SCHEMA_VERSION
        elif first == "conversation_id" and error["type"] in _MISSING:
            reason = DeadLetterReason.MISSING_CONVERSATION_ID
        elif first == "seq":
            reason = DeadLetterReason.BAD_SEQ
        elif first == "role":
            reason = DeadLetterReason.BAD_ROLE
        else:  # includes a conversation id that is too long or holds control characters
            reason = DeadLetterReason.INVALID
        found.append((reason, f"{'.'.join(map(str, path))}: {error['msg']}"))
    reason, detail = min(found, key=lambda item: _PRIORITY.index(item[0]))
    return reason, _short(detail)


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


# ---------------------------------------------------------------- text input


class TextUtterance(BaseModel):
    """One utterance as text (topic ``utterance-text``); "type" may be left out."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    type: Literal["utterance"] = "utterance"
    schema_version: SchemaVersion = 1
    conversation_id: ConversationId
    seq: Seq
    speaker: Speaker
    role: Role | None = None  # absent: unknown; passed on to utterance-features
    text: Annotated[str, StringConstraints(max_length=MAX_TEXT_CHARS)]
    ts: Timestamp | None = None


class TextEnd(BaseModel):
    """The end of a conversation (topic ``utterance-text``), forwarded as an end event."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    type: Literal["end"]
    schema_version: SchemaVersion = 1
    conversation_id: ConversationId
    seq: Seq
    ts: Timestamp | None = None


def _text_kind(value: Any) -> str | None:
    kind = value.get("type", "utterance") if isinstance(value, dict) else value.type
    return kind if kind in ("utterance", "end") else None


TextInput = Annotated[
    Annotated[TextUtterance, Tag("utterance")] | Annotated[TextEnd, Tag("end")],
    Discriminator(
        _text_kind,
        custom_error_type="text_type",
        custom_error_message="type is not utterance or end",
    ),
]
_TEXT_INPUT: TypeAdapter[TextUtterance | TextEnd] = TypeAdapter(TextInput)


def parse_text(raw: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> TextUtterance | TextEnd:
    """Validate one ``utterance-text`` message (the same checks, in the same order, as
    `parse_input`; "type" defaults to utterance, "schema_version" to 1).

    Raises:
        InvalidInput: with the reason, and the conversation id and seq where readable.
    """
    result: TextUtterance | TextEnd = _validated(raw, max_bytes, _TEXT_INPUT)
    return result


def text_message(
    conversation_id: str,
    seq: int,
    speaker: str,
    text: str,
    ts: str | None = None,
    role: str | None = None,
) -> bytes:
    """Build an ``utterance-text`` utterance message (replay, tests); no role: none sent."""
    message: dict[str, Any] = {
        "type": "utterance",
        "conversation_id": conversation_id,
        "seq": seq,
        "speaker": speaker,
        "text": text,
        "ts": ts,
    }
    if role is not None:
        message["role"] = role
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def text_end_message(conversation_id: str, seq: int, ts: str | None = None) -> bytes:
    """Build an ``utterance-text`` end message (replay, tests)."""
    message = {"type": "end", "conversation_id": conversation_id, "seq": seq, "ts": ts}
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


# ---------------------------------------------------------------- output


class _Output(BaseModel):
    """Fields every output event starts with; event_id is derived when not given."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        serialize_by_alias=True,
        validate_by_name=True,
        validate_by_alias=True,
        json_schema_serialization_defaults_required=True,
    )

    type: str
    event_id: str = ""  # derived from conversation_id, seq and the kind when empty
    conversation_id: ConversationId
    seq: Count  # not strict, unlike input: numpy integers from the worker are fine
    tenant: Tenant | None = None  # copied from the input event

    @classmethod
    def _derive_event_id(cls, values: Mapping[str, Any]) -> str:
        parts = [values.get("conversation_id"), values.get("seq"), cls.model_fields["type"].default]
        if "rule" in cls.model_fields:
            parts.append(values.get("rule"))
        return ":".join(map(str, parts))

    @model_validator(mode="before")
    @classmethod
    def _fill_event_id(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("event_id"):
            data = {**data, "event_id": cls._derive_event_id(data)}
        return data

    @model_validator(mode="after")
    def _check_event_id(self) -> _Output:
        # Deterministic ids are how consumers deduplicate: refuse any other id.
        expected = self._derive_event_id(self.__dict__)
        if self.event_id != expected:
            raise ValueError(f"event_id {self.event_id!r} must be {expected!r}")
        return self


class Evidence(BaseModel):
    """One utterance behind an alert."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seq: Count
    emotion: str
    probability: Probability  # of that emotion
    sentiment: Sentiment


class Shift(BaseModel):
    """Shift probabilities: vs the previous utterance, and vs the speaker's previous one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vs_previous: Probability | None = None
    vs_speaker_previous: Probability | None = None


class EmotionEvent(_Output):
    """The emotion of one utterance. event_id: "{conversation_id}:{seq}:emotion"."""

    type: Literal["emotion"] = "emotion"
    speaker: Speaker
    role: Role | None = None  # the speaker's role in the call; null: unknown
    emotion: str
    confidence: Probability
    probabilities: dict[str, Probability]
    # positive emotions' probability mass minus negative ones' (the rules' label set);
    # every worker since roles came sets it, null only in older events
    sentiment: Sentiment | None = None
    shift: Shift = Field(default_factory=Shift)
    model: str
    ts: str | None = None
    emitted_at: str = Field(default_factory=utc_now_iso)
    gap: bool = False  # utterances before this seq were never received
    text: str | None = None  # the transcript, only where the deployment enables it


class AlertEvent(_Output):
    """An alert rule that fired. event_id: "{conversation_id}:{seq}:alert:{rule}".

    The fields from_emotion and to_emotion are "from" and "to" on the wire.
    """

    type: Literal["alert"] = "alert"
    speaker: Speaker
    role: Role | None = None
    rule: Annotated[str, StringConstraints(min_length=1)]
    severity: Literal["low", "medium", "high"]
    from_emotion: str | None = Field(
        None, validation_alias=AliasChoices("from", "from_emotion"), serialization_alias="from"
    )
    to_emotion: str | None = Field(
        None, validation_alias=AliasChoices("to", "to_emotion"), serialization_alias="to"
    )
    p_shift: Probability | None = None
    detail: str = ""
    # the utterances that triggered it, oldest first (this one last)
    evidence: list[Evidence] = Field(default_factory=list)
    model: str
    ts: str | None = None
    emitted_at: str = Field(default_factory=utc_now_iso)


class Figures(BaseModel):
    """A speaker's or a role's figures over a call (null: no utterance analysed).

    The trend is the last third's mean sentiment minus the first third's.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    utterances: Count
    sentiment_mean: Sentiment | None = None
    sentiment_first_third: Sentiment | None = None
    sentiment_last_third: Sentiment | None = None
    sentiment_trend: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    sentiment_min: Sentiment | None = None
    negative_share: Probability | None = None
    shifts: Count = 0
    alerts: Count = 0


class SpeakerFigures(Figures):
    """`Figures` of one speaker, with their role."""

    role: Role | None = None


class SummaryEvent(_Output):
    """A conversation's summary, on its end event. event_id: "{conversation_id}:{seq}:summary".

    utterances counts the analysed utterances (``not_analyzed`` the others: roles
    the deployment leaves out); shifts counts utterances whose predicted emotion
    differs from the previous analysed utterance's; speakers holds per-speaker
    emotion counts, dominant each speaker's most frequent emotion, roles and
    by_speaker the sentiment figures (`Figures`).
    """

    type: Literal["summary"] = "summary"
    utterances: Count
    speakers: dict[str, dict[str, Count]]
    shifts: Count
    alerts: Count
    gaps: Count
    first_ts: str | None = None
    last_ts: str | None = None
    duration_s: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] | None = None
    dominant: dict[str, str]
    # per role ("agent", "customer", "other", "unknown") and per speaker, of the
    # analysed utterances only
    roles: dict[Literal["agent", "customer", "other", "unknown"], Figures] = Field(
        default_factory=dict
    )
    by_speaker: dict[str, SpeakerFigures] = Field(default_factory=dict)
    not_analyzed: Count = 0  # utterances of roles the deployment does not analyse
    model: str
    emitted_at: str = Field(default_factory=utc_now_iso)


OutputEvent = Annotated[EmotionEvent | AlertEvent | SummaryEvent, Field(discriminator="type")]
_OUTPUT: TypeAdapter[EmotionEvent | AlertEvent | SummaryEvent] = TypeAdapter(OutputEvent)


class DeadLetterSource(BaseModel):
    """Where the bad message was read."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    topic: str
    partition: int | None = None
    offset: int | None = None


class DeadLetter(BaseModel):
    """A message that could not be processed (topic utterance-features.dlq)."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, json_schema_serialization_defaults_required=True
    )

    type: Literal["dead_letter"] = "dead_letter"
    reason: DeadLetterReason
    detail: str
    conversation_id: str | None = None
    seq: int | None = None
    source: DeadLetterSource
    payload_b64: str  # the original bytes, the first DEAD_LETTER_PAYLOAD_BYTES of them
    truncated: bool = False
    at: str = Field(default_factory=utc_now_iso)

    @classmethod
    def from_error(
        cls,
        error: InvalidInput,
        raw: bytes,
        *,
        topic: str,
        partition: int | None = None,
        offset: int | None = None,
    ) -> DeadLetter:
        """Build the dead letter for ``raw``, which `parse_input` rejected with ``error``."""
        return cls(
            reason=error.reason,
            detail=error.detail,
            conversation_id=error.conversation_id,
            seq=error.seq,
            source=DeadLetterSource(topic=topic, partition=partition, offset=offset),
            payload_b64=base64.b64encode(raw[:DEAD_LETTER_PAYLOAD_BYTES]).decode("ascii"),
            truncated=len(raw) > DEAD_LETTER_PAYLOAD_BYTES,
        )


DEAD_LETTER_HEADER_PREFIX = "__cfnesa.errors."  # as Kafka Connect's "__connect.errors."


def dead_letter_headers(
    letter: DeadLetter, original: Iterable[tuple[str, bytes]] | None = ()
) -> tuple[tuple[str, bytes], ...]:
    """The headers of a dead letter: the original record's, then the error's.

    As Kafka Connect's dead-letter queues do, the error travels in headers (reason,
    detail, source topic, partition and offset, under ``__cfnesa.errors.``), so a
    consumer can route or count letters without parsing the body; the letter's key
    is the original record's key.
    """
    prefix = DEAD_LETTER_HEADER_PREFIX
    source = letter.source
    errors = [
        (f"{prefix}reason", letter.reason.value),
        (f"{prefix}detail", letter.detail),
        (f"{prefix}topic", source.topic),
        (f"{prefix}partition", "" if source.partition is None else str(source.partition)),
        (f"{prefix}offset", "" if source.offset is None else str(source.offset)),
    ]
    kept = [(k, v) for k, v in (original or ()) if not k.startswith(prefix)]
    return (*kept, *((k, v.encode("utf-8")) for k, v in errors))


def dump_event(event: EmotionEvent | AlertEvent | SummaryEvent | DeadLetter) -> bytes:
    """Serialise an output event or dead letter: compact JSON, keys in field order."""
    return event.model_dump_json(by_alias=True).encode("utf-8")


def load_output(raw: bytes) -> EmotionEvent | AlertEvent | SummaryEvent:
    """Parse one message from ``emotion-events`` (for consumers: tail, gateway, tests).

    Raises:
        pydantic.ValidationError: (a ValueError) if it is not a valid output event.
    """
    return _OUTPUT.validate_json(raw)


# ---------------------------------------------------------------- producers


def utterance_event(
    conversation_id: str,
    seq: int,
    speaker: str,
    vectors: Mapping[str, npt.ArrayLike | None],
    feature_spec: str,
    text: str | None = None,
    ts: str | datetime | None = None,
    b64: bool = True,
    tenant: str | None = None,
    role: str | None = None,
) -> bytes:
    """Build an utterance message for producers (replay, tests).

    Nothing is validated, so tests can build bad messages too. ``vectors`` maps
    modalities to 1-D vectors (missing or None: absent); ``b64`` picks the compact
    base64 form over plain lists of numbers.
    """
    unknown = set(vectors) - set(MODALITIES)
    if unknown:
        raise ValueError(f"unknown modalities {sorted(unknown)}; expected {MODALITIES}")
    features: dict[str, Any] = dict.fromkeys(MODALITIES)
    for name, values in vectors.items():
        if values is not None and b64:
            features[name] = encode_vector(values)
        elif values is not None:  # float32 values as Python floats: exact, NaN stays NaN
            features[name] = np.asarray(values, dtype=np.float32).astype(float).tolist()
    rest = {"speaker": speaker, "features": features, "feature_spec": feature_spec, "text": text}
    if tenant is not None:
        rest["tenant"] = tenant
    if role is not None:
        rest["role"] = role
    return _message("utterance", conversation_id, seq, ts, rest)


def end_event(
    conversation_id: str, seq: int, ts: str | datetime | None = None, tenant: str | None = None
) -> bytes:
    """Build an end-of-conversation message for producers (replay, tests)."""
    return _message("end", conversation_id, seq, ts, {} if tenant is None else {"tenant": tenant})


def _message(
    kind: str, cid: str, seq: int, ts: str | datetime | None, rest: dict[str, Any]
) -> bytes:
    when = format_ts(ts) if isinstance(ts, datetime) else ts
    message = {"type": kind, "schema_version": 1, "conversation_id": cid, "seq": seq, "ts": when}
    message.update(rest)
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
