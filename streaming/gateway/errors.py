"""The gateway's errors, in one place.

    GatewayError
     ├── AuthError        a token refused at the WebSocket upgrade (HTTP 401);
     │                    reason: missing_token | malformed_token | bad_signature | expired
     ├── ProtocolError    a client frame refused (an ``error`` message, the connection
     │                    stays open except for frame_too_large); code: not_json |
     │                    unknown_op | bad_request | forbidden | frame_too_large | unavailable
     └── ConfigError      the gateway cannot start as configured (no secret, ...)

The same token or frame fails the same way every time, except ``unavailable``
(Redis did not answer a snapshot read), which a client may simply repeat.
"""

from __future__ import annotations

from enum import StrEnum


class AuthReason(StrEnum):
    """Why a token was refused (the ``reason`` of the 401 body).

    missing_token: no ``Authorization: Bearer`` header and no ``?token=``;
    malformed_token: not payload.mac, bad base64, or a signed payload of the wrong
    shape; bad_signature: signed with another secret, or altered; expired: exp passed.
    """

    MISSING_TOKEN = "missing_token"  # noqa: S105 (reason names, not passwords)
    MALFORMED_TOKEN = "malformed_token"  # noqa: S105
    BAD_SIGNATURE = "bad_signature"
    EXPIRED = "expired"


class ErrorCode(StrEnum):
    """The ``code`` of an ``error`` message sent to a client."""

    NOT_JSON = "not_json"  # the frame is not UTF-8 JSON
    UNKNOWN_OP = "unknown_op"  # "op" missing or not subscribe / unsubscribe
    BAD_REQUEST = "bad_request"  # a known op with missing or wrongly typed fields
    FORBIDDEN = "forbidden"  # outside the token's conversations, or "all" not granted
    FRAME_TOO_LARGE = "frame_too_large"  # over max_frame_bytes; the server closes with 1009
    UNAVAILABLE = "unavailable"  # Redis did not answer: nothing was subscribed, try again


class GatewayError(Exception):
    """Base of the gateway's errors."""


class AuthError(GatewayError):
    """A token that grants nothing.

    Attributes:
        reason: the machine-readable reason.
    """

    def __init__(self, reason: AuthReason, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else str(reason))
        self.reason = reason
        self.detail = detail


class ProtocolError(GatewayError):
    """A client frame that is refused.

    Attributes:
        code: the machine-readable code.
        detail: a short human-readable explanation.
        conversations: the conversation ids concerned, where there are some.
    """

    def __init__(self, code: ErrorCode, detail: str, conversations: tuple[str, ...] = ()) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
        self.conversations = conversations


class ConfigError(GatewayError):
    """The gateway cannot start with these settings."""
