"""The gateway's Prometheus metrics (``GET /metrics`` on the gateway's own port)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from streaming.gateway.errors import AuthReason, ErrorCode

# From the worker's emitted_at to the gateway's send: Kafka, the gateway's poll,
# the client's queue. Wider than the worker's buckets: a backlog shows up here.
_DELIVERY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class GatewayMetrics:
    """One registry per gateway (tests run several gateways in one process).

    Args:
        clients: returns the number of connected clients, read at scrape time.
        subscriptions: returns (conversation subscriptions, ``all`` subscriptions).
    """

    def __init__(
        self, clients: Callable[[], int], subscriptions: Callable[[], tuple[int, int]]
    ) -> None:
        r = self.registry = CollectorRegistry()
        Gauge("cfnesa_gateway_clients", "WebSocket clients connected", registry=r).set_function(
            lambda: float(clients())
        )
        subs = Gauge(
            "cfnesa_gateway_subscriptions",
            "Subscriptions held by connected clients, by kind",
            ["kind"],
            registry=r,
        )
        subs.labels("conversation").set_function(lambda: float(subscriptions()[0]))
        subs.labels("all").set_function(lambda: float(subscriptions()[1]))
        self.connections = Counter(
            "cfnesa_gateway_connections", "WebSocket connections accepted", registry=r
        )
        self.events_in = Counter(
            "cfnesa_gateway_events_in", "Events read from the events topic", registry=r
        )
        self.events_invalid = Counter(
            "cfnesa_gateway_events_invalid",
            "Messages on the events topic that are not output events (skipped)",
            registry=r,
        )
        self.events_delivered = Counter(
            "cfnesa_gateway_events_delivered",
            "Live events sent to clients (one per client)",
            registry=r,
        )
        self.snapshots = Counter(
            "cfnesa_gateway_snapshots", "Snapshots sent to clients", registry=r
        )
        self.events_dropped = Counter(
            "cfnesa_gateway_events_dropped",
            "Messages discarded because their client was too slow (its queue was full)",
            registry=r,
        )
        self.slow_clients = Counter(
            "cfnesa_gateway_slow_clients_closed",
            "Clients closed with code 4008 because their queue was full",
            registry=r,
        )
        self.auth_failures = Counter(
            "cfnesa_gateway_auth_failures",
            "WebSocket upgrades refused (HTTP 401), by reason",
            ["reason"],
            registry=r,
        )
        self.errors = Counter(
            "cfnesa_gateway_errors", "Error messages sent to clients, by code", ["code"], registry=r
        )
        self.redis_failures = Counter(
            "cfnesa_gateway_redis_failures", "Snapshot reads that failed", registry=r
        )
        self.delivery_seconds = Histogram(
            "cfnesa_gateway_delivery_seconds",
            "From an event's emitted_at to its send to a client",
            buckets=_DELIVERY_BUCKETS,
            registry=r,
        )
        for reason in AuthReason:  # every series exists from the start (rate() needs it)
            self.auth_failures.labels(reason.value)
        for code in ErrorCode:
            self.errors.labels(code.value)

    def render(self) -> bytes:
        """The metrics in the Prometheus text format."""
        return generate_latest(self.registry)
