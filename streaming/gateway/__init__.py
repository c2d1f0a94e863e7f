"""The WebSocket gateway: live emotion events for dashboards, per tenant (docs/gateway.md).

auth.py      bearer tokens (HMAC-SHA256) and what they grant
protocol.py  client requests and server messages, no I/O
hub.py       per-client queues, subscriptions, snapshot-then-live, no I/O
routes.py    plain HTTP on the same port: static files
metrics.py   Prometheus metrics
server.py    the adapters: websockets server, Kafka consumer, Redis snapshots
errors.py    the error hierarchy
"""

from streaming.gateway.auth import DEFAULT_TENANT, Claims, TokenSigner
from streaming.gateway.errors import (
    AuthError,
    AuthReason,
    ConfigError,
    ErrorCode,
    GatewayError,
    ProtocolError,
)
from streaming.gateway.server import (
    CLOSE_TOKEN_EXPIRED,
    CLOSE_TOO_SLOW,
    WS_PATH,
    Gateway,
    serve_gateway,
)

__all__ = [
    "CLOSE_TOKEN_EXPIRED",
    "CLOSE_TOO_SLOW",
    "DEFAULT_TENANT",
    "WS_PATH",
    "AuthError",
    "AuthReason",
    "Claims",
    "ConfigError",
    "ErrorCode",
    "Gateway",
    "GatewayError",
    "ProtocolError",
    "TokenSigner",
    "serve_gateway",
]
