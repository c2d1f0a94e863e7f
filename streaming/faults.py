"""Which failures pause a stream loop and which stop it; the one backoff; the health.

`classify` turns anything a batch raised into a `streaming.errors.StreamError`:

- Redis: unreachable, slow, a replica promoted (READONLY), a cluster failing over or
  resharding (CLUSTERDOWN, TRYAGAIN, MOVED/ASK storms, a slot with no owner, which
  redis-py reports as ``SlotNotCoveredError`` or a bare ``RedisClusterException``,
  neither of them a ``RedisError``), out of memory, loading: transient. Any other
  Redis error (WRONGTYPE, NOSCRIPT, a syntax error) is a bug or a shared key prefix:
  fatal. Inside a Lua script or a pipeline redis-py reports the server's error as a
  plain ``ResponseError`` carrying its code, hence the codes.
- Kafka: a broker's refusal that aiokafka marks not retriable (not authorized, an
  invalid topic, a record the broker will never take): fatal; connection loss,
  timeouts, leader moves, a coordinator changing: transient.
- A security failure (wrong password, untrusted certificate): fatal
  (`streaming.security.security_failure`).
- Anything else is a bug: fatal.

`Backoff` is the only retry schedule of the pipeline; `Health` is what ``/healthz``
reports (the outage's service, its cause and since when).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiokafka.errors import BrokerResponseError, KafkaError
from redis.exceptions import BusyLoadingError as RedisBusyLoadingError
from redis.exceptions import (
    ClusterError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from streaming.errors import (
    FatalError,
    ServiceRefusedError,
    ServiceUnavailableError,
    StreamError,
)
from streaming.security import security_failure

__all__ = ["Backoff", "Health", "classify", "redis_transient"]

_REDIS_DOWN = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    ReadOnlyError,
    ClusterError,  # ClusterDownError, MasterDownError
    TryAgainError,
    OutOfMemoryError,
    RedisBusyLoadingError,
    RedisClusterException,  # SlotNotCoveredError, a slot map that does not cover all slots
)
_REDIS_TRANSIENT_CODES = ("OOM", "READONLY", "CLUSTERDOWN", "TRYAGAIN", "MASTERDOWN", "LOADING")


def redis_transient(exc: BaseException) -> bool:
    """Whether a Redis error passes by itself (an outage, a failover, a reshard)."""
    if isinstance(exc, _REDIS_DOWN):
        return True
    if isinstance(exc, ResponseError):
        text = str(exc)
        return any(
            text.startswith(f"{code} ") or f"-{code} " in text for code in _REDIS_TRANSIENT_CODES
        )
    return False


def classify(
    exc: BaseException, *, service: str = "", addresses: Mapping[str, str] | None = None
) -> StreamError:
    """What ``exc`` means to a stream loop: a transient or a fatal `StreamError`.

    Args:
        exc: what the batch (or a start-up step) raised.
        service: "kafka" or "redis" when the caller knows which it was talking to.
        addresses: where each service is ("kafka", "redis"), for the messages
            (credentials redacted).

    Returns:
        ``exc`` itself when it is a `StreamError` already, else a new one whose
        ``__cause__`` is ``exc``.
    """
    if isinstance(exc, StreamError):
        return exc
    is_kafka = isinstance(exc, KafkaError)
    is_redis = isinstance(exc, RedisError | RedisClusterException)
    if is_kafka or is_redis or isinstance(exc, OSError):
        name = "kafka" if is_kafka else "redis" if is_redis else service or "network"
        failure = security_failure(exc, service=name, address=(addresses or {}).get(name, ""))
        if failure is not None:
            failure.__cause__ = exc
            return failure
    out: StreamError
    if is_kafka:
        if isinstance(exc, BrokerResponseError) and not exc.retriable:
            out = ServiceRefusedError(f"kafka refused: {exc!r}", service="kafka")
        else:
            out = ServiceUnavailableError(f"kafka: {exc}", service="kafka")
    elif is_redis or isinstance(exc, OSError):
        name = "redis" if is_redis else service or "network"
        if redis_transient(exc):
            out = ServiceUnavailableError(f"{name}: {exc}", service=name)
        else:
            out = ServiceRefusedError(f"{name} refused: {exc}", service=name)
    else:
        out = FatalError(f"unexpected {type(exc).__name__}: {exc}", service=service)
    out.__cause__ = exc
    return out


@dataclass
class Backoff:
    """Exponential backoff: ``initial_s``, doubled per failure up to ``max_s``.

    ``await backoff.wait(stop)`` sleeps the next delay unless ``stop`` is set first
    (then it returns False at once); `reset` after a success.
    """

    initial_s: float = 0.1
    max_s: float = 5.0
    factor: float = 2.0
    _next_s: float = field(default=0.0, init=False)

    def next_delay(self) -> float:
        """The delay before the next attempt (and advance the schedule)."""
        delay = self._next_s or self.initial_s
        self._next_s = min(delay * self.factor, self.max_s)
        return delay

    def reset(self) -> None:
        self._next_s = 0.0

    async def wait(self, stop: asyncio.Event, delay_s: float | None = None) -> bool:
        """Sleep ``delay_s`` (default: the next delay); False (at once) if ``stop`` is
        or gets set."""
        if stop.is_set():
            return False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), self.next_delay() if delay_s is None else delay_s)
        return not stop.is_set()


@dataclass
class _Outage:
    service: str
    cause: str
    since: str  # ISO 8601, UTC
    since_monotonic: float


class Health:
    """A loop's health as ``/healthz`` reports it: up, alive, and no outage.

    The loop calls `beat` on every pass, `degrade` when a batch failed transiently and
    `recover` when it went through; ``/healthz`` calls `report`.
    """

    def __init__(self, *, stuck_after_s: float = 60.0) -> None:
        self.started = False
        self.stuck_after_s = stuck_after_s
        self._beat = time.monotonic()
        self._outage: _Outage | None = None
        self.fatal: str | None = None

    def beat(self) -> None:
        self._beat = time.monotonic()

    def degrade(self, error: StreamError) -> None:
        """Record a transient failure (the first one's time is the outage's start)."""
        cause = str(error)[:300]
        if self._outage is None or self._outage.service != error.service:
            now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
            self._outage = _Outage(error.service, cause, now, time.monotonic())
        else:
            self._outage.cause = cause

    def recover(self) -> None:
        self._outage = None

    @property
    def outage(self) -> str | None:
        """The service of the outage in progress, else None."""
        return None if self._outage is None else self._outage.service

    def report(self, **extra: Any) -> tuple[bool, dict[str, Any]]:
        """(ok, the JSON body of ``/healthz``)."""
        idle = time.monotonic() - self._beat
        out = self._outage
        ok = self.started and out is None and self.fatal is None and idle < self.stuck_after_s
        body: dict[str, Any] = {
            "ok": ok,
            "outage": None if out is None else out.service,
            "cause": self.fatal if out is None else out.cause,
            "since": None if out is None else out.since,
            "outage_seconds": None
            if out is None
            else round(time.monotonic() - out.since_monotonic, 3),
            "seconds_since_loop": round(idle, 3),
        }
        body.update(extra)
        return ok, body
