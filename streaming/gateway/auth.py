"""Bearer tokens for the gateway: what a client may see, signed with the server secret.

A token is two base64url segments (no padding) joined by a dot::

    base64url(payload JSON) "." base64url(HMAC-SHA256(secret, first segment))

and the payload says::

    {"v": 1, "tenant": "acme", "conversations": ["call-*", "vip-0042"],
     "all": false, "iat": 1764000000, "exp": 1764003600}

``conversations`` holds conversation ids or shell-style patterns (`fnmatch`,
case-sensitive); ``all`` lets the holder subscribe to every call of its tenant.
The payload is readable by anyone who holds the token (a dashboard may show it);
only the server can make one, and any change breaks the MAC. The MAC is checked
(in constant time) before the payload is even parsed.

Events without a tenant belong to the deployment's default tenant, ``"default"``.
Visibility (`Claims.may_see`) is what the gateway checks on every send.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import hashlib
import hmac
import json
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from streaming.call_index import DEFAULT_TENANT
from streaming.gateway.errors import AuthError, AuthReason

__all__ = ["DEFAULT_TENANT", "MIN_SECRET_CHARS", "Claims", "TokenSigner", "event_tenant"]

MIN_SECRET_CHARS = 16
TOKEN_VERSION = 1
MAX_TOKEN_CHARS = 8192  # a header line, not a document
_TENANT = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # as streaming.events.Tenant
_MAX_PATTERNS = 1000
_B64URL = re.compile(r"[A-Za-z0-9_-]+")


def event_tenant(tenant: str | None) -> str:
    """The tenant an event belongs to: its own, or the default tenant when it has none."""
    return DEFAULT_TENANT if tenant is None else tenant


@dataclass(frozen=True)
class Claims:
    """What a verified token grants.

    Attributes:
        tenant: the only tenant whose events the holder may see.
        conversations: conversation ids or fnmatch patterns the holder may subscribe to.
        all_conversations: the holder may subscribe to all of its tenant's calls
            (``"all"`` on the wire).
        exp: Unix time after which the token is refused (and its connections closed).
    """

    tenant: str
    conversations: tuple[str, ...] = ()
    all_conversations: bool = False
    exp: int = 0

    def covers(self, conversation_id: str) -> bool:
        """True when the token names this conversation (or grants all of the tenant's)."""
        if self.all_conversations:
            return True
        return any(fnmatch.fnmatchcase(conversation_id, p) for p in self.conversations)

    def may_see(self, tenant: str | None, conversation_id: str) -> bool:
        """True when an event of ``tenant`` (None: the default) and this call may be shown."""
        return event_tenant(tenant) == self.tenant and self.covers(conversation_id)


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    if not _B64URL.fullmatch(text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenSigner:
    """Mints and verifies tokens with one server secret.

    Args:
        secret: the server secret (CFNESA_GATEWAY_SECRET), at least 16 characters.

    Raises:
        ValueError: the secret is too short to be one.
    """

    def __init__(self, secret: str | bytes) -> None:
        key = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
        if len(key) < MIN_SECRET_CHARS:
            raise ValueError(f"the gateway secret must have at least {MIN_SECRET_CHARS} characters")
        self._key = key

    def _mac(self, segment: str) -> bytes:
        return hmac.new(self._key, segment.encode("ascii"), hashlib.sha256).digest()

    def mint(
        self,
        tenant: str,
        conversations: Iterable[str] = (),
        *,
        all_conversations: bool = False,
        ttl_s: float = 3600,
        now: float | None = None,
    ) -> str:
        """A token for ``tenant`` valid for ``ttl_s`` seconds from ``now``.

        Args:
            tenant: the tenant whose events the holder may see.
            conversations: ids or fnmatch patterns (``call-*``) the holder may subscribe to.
            all_conversations: grant subscribing to all of the tenant's calls.
            ttl_s: lifetime in seconds.
            now: the issue time (default: the clock); tests pass older times.

        Raises:
            ValueError: a tenant that is not ``[A-Za-z0-9_.-]{1,64}``, an empty pattern.
        """
        patterns = list(conversations)
        if not _TENANT.match(tenant):
            raise ValueError(f"tenant must match [A-Za-z0-9_.-]{{1,64}}, got {tenant!r}")
        if any(not isinstance(p, str) or not p for p in patterns):
            raise ValueError("conversation ids and patterns must be non-empty strings")
        issued = int(time.time() if now is None else now)
        payload = {
            "v": TOKEN_VERSION,
            "tenant": tenant,
            "conversations": patterns,
            "all": bool(all_conversations),
            "iat": issued,
            "exp": int(issued + ttl_s),
        }
        segment = _b64encode(json.dumps(payload, separators=(",", ":")).encode("utf-8"))
        return f"{segment}.{_b64encode(self._mac(segment))}"

    def verify(self, token: str | None, *, now: float | None = None) -> Claims:
        """The claims of a token, or why it grants nothing.

        Raises:
            AuthError: reason missing_token, malformed_token, bad_signature or expired.
        """
        if not token:
            raise AuthError(AuthReason.MISSING_TOKEN)
        if len(token) > MAX_TOKEN_CHARS or token.count(".") != 1:
            raise AuthError(AuthReason.MALFORMED_TOKEN, "expected payload.signature")
        segment, signature = token.split(".")
        try:
            mac = _b64decode(signature)
            _b64decode(segment)
        except (ValueError, binascii.Error) as exc:
            raise AuthError(AuthReason.MALFORMED_TOKEN, "not base64url") from exc
        if not hmac.compare_digest(mac, self._mac(segment)):
            raise AuthError(AuthReason.BAD_SIGNATURE)
        try:
            claims = _claims(json.loads(_b64decode(segment)))
        except (ValueError, binascii.Error, TypeError) as exc:
            raise AuthError(AuthReason.MALFORMED_TOKEN, str(exc)) from exc
        if claims.exp <= (time.time() if now is None else now):
            raise AuthError(AuthReason.EXPIRED)
        return claims


def _claims(payload: Any) -> Claims:
    """Check a signed payload's shape (ours, but possibly from an older or newer version)."""
    if not isinstance(payload, dict) or payload.get("v") != TOKEN_VERSION:
        raise ValueError(f"payload is not a version {TOKEN_VERSION} object")
    tenant = payload.get("tenant")
    patterns = payload.get("conversations", [])
    grant_all = payload.get("all", False)
    exp = payload.get("exp")
    if not isinstance(tenant, str) or not _TENANT.match(tenant):
        raise ValueError("bad tenant")
    if (
        not isinstance(patterns, list)
        or len(patterns) > _MAX_PATTERNS
        or not all(isinstance(p, str) and p for p in patterns)
    ):
        raise ValueError("conversations must be a list of non-empty strings")
    if not isinstance(grant_all, bool) or type(exp) is not int:
        raise ValueError("all must be a boolean and exp an integer")
    return Claims(tenant, tuple(patterns), grant_all, exp)
