"""The WebSocket gateway: ``emotion-events`` from Kafka to dashboards, per tenant.

One process serves, on one port::

    ws://HOST:PORT/ws     the event stream (bearer token required, see auth.py)
    GET /healthz          200 while the Kafka consumer and Redis answer, else 503 (JSON)
    GET /metrics          Prometheus text
    GET /, /<file>        the dashboard's static files (static/)

Inside: one Kafka consumer (no group: every gateway instance reads every event,
from the latest offset at start-up) feeds `Hub.publish`, which queues each event
for the clients that want it without awaiting any of them; one sender task per
client drains its queue. A client's subscribe reads the snapshot from Redis
(`StateStore.events`) while its live events of those calls are buffered
(hub.py explains why that leaves no gap and no duplicate); ``subscribe all`` reads
the tenant's calls in progress first (`streaming.call_index.CallIndex`), with all
of the tenant's live events buffered meanwhile. docs/gateway.md has
the protocol, the close codes and the operations side.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from aiokafka import AIOKafkaConsumer
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from streaming.call_index import CallIndex, IndexView
from streaming.faults import Backoff
from streaming.gateway.auth import Claims, TokenSigner
from streaming.gateway.errors import AuthError, ConfigError, ErrorCode, ProtocolError
from streaming.gateway.hub import Hub, Session
from streaming.gateway.metrics import GatewayMetrics
from streaming.gateway.protocol import (
    AllCallsCounts,
    Op,
    acknowledgement,
    error_message,
    parse_op,
    read_event,
)
from streaming.gateway.routes import StaticFiles, json_response, response
from streaming.security import (
    kafka_client_options,
    redact_url,
    security_failure,
    start_kafka_client,
)
from streaming.settings import GatewaySettings
from streaming.state_store import StateStore

__all__ = ["CLOSE_TOKEN_EXPIRED", "CLOSE_TOO_SLOW", "WS_PATH", "Gateway", "serve_gateway"]

log = logging.getLogger(__name__)

WS_PATH = "/ws"
CLOSE_TOO_SLOW = 4008  # the client's queue overflowed: it reads slower than events arrive
CLOSE_TOKEN_EXPIRED = 4001  # the token's exp passed while connected
CLOSE_MESSAGE_TOO_BIG = 1009  # RFC 6455: a frame over max_frame_bytes
# Frames up to this multiple of max_frame_bytes get a frame_too_large error before
# the 1009 close; larger ones are cut off by websockets itself (same close code).
_HARD_FRAME_FACTOR = 4
_HEALTH_TIMEOUT_S = 2.0
_SNAPSHOT_TIMEOUT_S = 5.0
_CONSUMER_RETRY_S = (0.1, 5.0)  # backoff after an unexpected consumer error


class Gateway:
    """One gateway: a WebSocket server, a Kafka consumer and a Redis client.

    Args:
        settings: bootstrap servers, Redis, topic, key prefix and the gateway_* fields.
        static_dir: the folder served over plain HTTP (default: the shipped dashboard).

    Raises:
        ConfigError: no gateway_secret (or one too short to be one).
    """

    def __init__(self, settings: GatewaySettings, *, static_dir: Path | None = None) -> None:
        if not settings.gateway_secret:
            raise ConfigError("gateway_secret (CFNESA_GATEWAY_SECRET) is required")
        try:
            self.signer = TokenSigner(settings.gateway_secret)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        self.settings = settings
        self.hub = Hub()
        self.metrics = GatewayMetrics(lambda: len(self.hub.sessions), self.hub.counts)
        self.static = StaticFiles() if static_dir is None else StaticFiles(static_dir)
        self.snapshot_events = settings.snapshot_events or settings.recent_events
        # Every snapshot of a `subscribe all` is queued at once: keep room in the queue
        # for the live events that follow them.
        room = max(settings.client_queue // 2, 1)
        self.ended_calls = min(settings.recent_ended_calls, room // 4)
        self.snapshot_calls = min(settings.gateway_snapshot_calls, room - self.ended_calls)
        self.port: int | None = None
        self._claims: weakref.WeakKeyDictionary[ServerConnection, Claims] = (
            weakref.WeakKeyDictionary()
        )
        self._connections: dict[Session, ServerConnection] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._store: StateStore | None = None
        self._calls: CallIndex | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._consumer_task: asyncio.Task[None] | None = None

    # -- lifecycle -----------------------------------------------------------------
    async def run(self, stop: asyncio.Event, ready: Callable[[int], None] | None = None) -> None:
        """Serve until ``stop`` is set; ``ready(port)`` once clients can connect."""
        s = self.settings
        security = kafka_client_options(s)
        self._store = StateStore.from_settings(s)
        self._calls = CallIndex(
            self._store,
            state_ttl_s=s.state_ttl_s,
            ended_ttl_s=s.ended_ttl_s,
            keep_ended=s.recent_ended_calls,
        )
        consumer = self._consumer = AIOKafkaConsumer(
            s.output_topic,
            bootstrap_servers=s.bootstrap_servers(),
            group_id=None,  # every instance sees every event; nothing to commit
            enable_auto_commit=False,
            auto_offset_reset="latest",
            fetch_max_wait_ms=s.fetch_max_wait_ms,  # live delivery: do not idle at the broker
            **security,
        )
        try:
            await start_kafka_client(consumer, s.bootstrap_servers(), security)
            await self._check_redis()
            await self._pin_start_offsets(consumer)
            ping = s.ping_interval_s or None
            async with serve(
                self._handle,
                s.gateway_host,
                s.gateway_port,
                process_request=self._process_request,
                compression=None,  # per-client deflate of every event costs more than it saves
                max_size=s.max_frame_bytes * _HARD_FRAME_FACTOR,
                ping_interval=ping,
                ping_timeout=ping,
            ) as server:
                self.port = int(next(iter(server.sockets)).getsockname()[1])
                self._consumer_task = asyncio.create_task(self._consume(consumer))
                log.info("gateway on ws://%s:%d%s", s.gateway_host, self.port, WS_PATH)
                if ready is not None:
                    ready(self.port)
                await stop.wait()
                server.close()  # going away (1001) to every client
                await server.wait_closed()
        finally:
            if self._consumer_task is not None:
                self._consumer_task.cancel()
                await asyncio.gather(self._consumer_task, return_exceptions=True)
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await consumer.stop()
            with contextlib.suppress(Exception):
                await self._store.close()

    async def _check_redis(self) -> None:
        """Raise a Redis security failure (wrong password, untrusted certificate) now;
        an unreachable Redis only costs snapshots until it is back."""
        assert self._store is not None
        try:
            await asyncio.wait_for(self._store.ping(), _SNAPSHOT_TIMEOUT_S)
        except Exception as exc:
            address = redact_url(self.settings.redis_url)
            failure = security_failure(exc, service="redis", address=address)
            if failure is not None:
                raise failure from exc
            log.warning("redis at %s unavailable at start-up (%s); snapshots wait", address, exc)

    async def _pin_start_offsets(self, consumer: AIOKafkaConsumer) -> None:
        # "latest" is resolved lazily, at the first fetch; resolve it now, so that an
        # event produced after ready() is never skipped by a late offset reset. Without
        # a group, start() has waited for the topic's metadata and assigned every
        # partition already.
        for tp in consumer.assignment():
            await consumer.position(tp)

    # -- Kafka -> hub --------------------------------------------------------------
    async def _consume(self, consumer: AIOKafkaConsumer) -> None:
        backoff = Backoff(*_CONSUMER_RETRY_S)  # the pipeline's one backoff
        never = asyncio.Event()
        while True:
            try:
                batches = await consumer.getmany(timeout_ms=500, max_records=1000)
            except asyncio.CancelledError:
                raise
            except Exception:
                delay = backoff.next_delay()
                log.exception("the events consumer failed; retrying in %.1f s", delay)
                await backoff.wait(never, delay)
                continue
            backoff.reset()
            for records in batches.values():
                for record in records:
                    self._publish(record.value or b"")
                    # Let the sender tasks run between events: a client that keeps up
                    # drains its queue at once, so a burst of records (one fetch holds
                    # up to 1000) fills only the queues of clients that do not.
                    await asyncio.sleep(0)

    def _publish(self, raw: bytes) -> None:
        self.metrics.events_in.inc()
        try:
            event = read_event(raw)
        except ValueError:
            self.metrics.events_invalid.inc()
            return
        self.hub.publish(event)

    # -- HTTP ----------------------------------------------------------------------
    async def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        url = urlsplit(request.path)
        head = request.method == "HEAD"
        if url.path == WS_PATH:
            try:
                self._claims[connection] = self.signer.verify(_token(request, url.query))
            except AuthError as exc:
                self.metrics.auth_failures.labels(exc.reason.value).inc()
                return json_response(
                    401,
                    {"error": "unauthorized", "reason": exc.reason.value},
                    [("WWW-Authenticate", 'Bearer realm="cfnesa", error="invalid_token"')],
                )
            return None  # the handshake goes on (a plain GET gets websockets' 426)
        if "websocket" in request.headers.get("Upgrade", "").lower():
            return json_response(404, {"error": "not_found", "detail": f"use {WS_PATH}"})
        if request.method not in ("GET", "HEAD"):
            return json_response(405, {"error": "method_not_allowed"}, [("Allow", "GET, HEAD")])
        if url.path == "/healthz":
            healthy, body = await self.health()
            return json_response(200 if healthy else 503, body, head=head)
        if url.path == "/metrics":
            return response(
                200, self.metrics.render(), "text/plain; version=0.0.4; charset=utf-8", head=head
            )
        return await self.static.serve(url.path, head)

    async def health(self) -> tuple[bool, dict[str, Any]]:
        """(healthy, details): the consumer runs and answers, Redis answers."""
        kafka_ok = await self._kafka_ok()
        redis_ok = False
        if self._store is not None:
            try:
                redis_ok = await asyncio.wait_for(self._store.ping(), _HEALTH_TIMEOUT_S)
            except Exception:  # any failure is an answer: not healthy
                redis_ok = False
        conversations, alls = self.hub.counts()
        body = {
            "status": "ok" if kafka_ok and redis_ok else "unavailable",
            "kafka": kafka_ok,
            "redis": redis_ok,
            "clients": len(self.hub.sessions),
            "subscriptions": {"conversation": conversations, "all": alls},
        }
        return kafka_ok and redis_ok, body

    async def _kafka_ok(self) -> bool:
        task, consumer = self._consumer_task, self._consumer
        if task is None or task.done() or consumer is None:
            return False
        try:
            topics = await asyncio.wait_for(consumer.topics(), _HEALTH_TIMEOUT_S)
        except Exception:  # a broker that does not answer metadata in time
            return False
        return self.settings.output_topic in topics

    # -- WebSocket -----------------------------------------------------------------
    async def _handle(self, ws: ServerConnection) -> None:
        claims = self._claims.pop(ws, None)
        if claims is None:  # cannot happen: process_request verified every /ws request
            await ws.close(1011, "no claims")
            return
        _limit_send_buffer(ws, self.settings.gateway_send_buffer_bytes)
        session = Session(claims, self.settings.client_queue, self._on_overflow)
        self.hub.add(session)
        self._connections[session] = ws
        self.metrics.connections.inc()
        sender = asyncio.create_task(self._send_loop(ws, session))
        expiry = asyncio.create_task(self._expire(ws, claims.exp))
        try:
            async for frame in ws:
                if not session.closed:
                    await self._on_frame(session, frame)
        except ConnectionClosed:
            pass
        finally:
            self.hub.remove(session)
            self._connections.pop(session, None)
            sender.cancel()
            expiry.cancel()
            await asyncio.gather(sender, expiry, return_exceptions=True)

    async def _send_loop(self, ws: ServerConnection, session: Session) -> None:
        metrics = self.metrics
        with contextlib.suppress(ConnectionClosed):
            while True:
                item = await session.queue.get()
                if item.close_code:
                    await ws.close(item.close_code, item.text)
                    return
                await ws.send(item.text)
                if item.live:
                    metrics.events_delivered.inc()
                    if item.emitted_at is not None:
                        metrics.delivery_seconds.observe(max(0.0, time.time() - item.emitted_at))

    async def _expire(self, ws: ServerConnection, exp: int) -> None:
        await asyncio.sleep(max(0.0, exp - time.time()))
        await ws.close(CLOSE_TOKEN_EXPIRED, "token expired")

    def _on_overflow(self, session: Session, dropped: int) -> None:
        # Called from inside Hub.publish: only bookkeeping here, the close runs apart.
        self.metrics.slow_clients.inc()
        self.metrics.events_dropped.inc(dropped)
        self.hub.remove(session)
        ws = self._connections.get(session)
        if ws is not None:
            log.info("closing a slow client (%s, %d messages dropped)", ws.remote_address, dropped)
            task = asyncio.create_task(ws.close(CLOSE_TOO_SLOW, "too slow"))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _on_frame(self, session: Session, frame: str | bytes) -> None:
        op: Op | None = None
        try:
            op = parse_op(frame, self.settings.max_frame_bytes)
            if op.op == "subscribe":
                await self._subscribe(session, op)
            else:
                self._unsubscribe(session, op)
        except ProtocolError as exc:
            self.metrics.errors.labels(exc.code.value).inc()
            session.send(error_message(exc, op.request_id if op else None))
            if exc.code is ErrorCode.FRAME_TOO_LARGE:
                session.close_after_queued(CLOSE_MESSAGE_TOO_BIG, "frame_too_large")

    async def _subscribe(self, session: Session, op: Op) -> None:
        claims = session.claims
        if op.all_conversations:
            if not claims.all_conversations:
                raise ProtocolError(ErrorCode.FORBIDDEN, "this token does not grant all")
            await self._subscribe_all(session, op)
            return
        outside = tuple(c for c in op.conversations if not claims.covers(c))
        if outside:
            raise ProtocolError(
                ErrorCode.FORBIDDEN, "outside this token's conversations", outside[:20]
            )
        already = session.conversations.intersection(op.conversations)
        for cid in op.conversations:
            session.begin_snapshot(cid)
        self.hub.subscribe(session, op.conversations)
        assert self._store is not None
        try:
            stored = await asyncio.wait_for(
                self._store.events(op.conversations), _SNAPSHOT_TIMEOUT_S
            )
        except Exception as exc:  # Redis down or slow: nothing is subscribed
            self.metrics.redis_failures.inc()
            log.warning("snapshot read failed: %r", exc)
            for cid in op.conversations:
                session.abort_snapshot(cid)
            self.hub.unsubscribe(session, [c for c in op.conversations if c not in already])
            raise ProtocolError(
                ErrorCode.UNAVAILABLE, "recent events could not be read; try again"
            ) from exc
        if session.closed:
            return
        session.send(acknowledgement(op))  # before the snapshots, all in one go
        for cid in op.conversations:
            session.finish_snapshot(cid, stored.get(cid, []), self.snapshot_events)
            self.metrics.snapshots.inc()

    async def _subscribe_all(self, session: Session, op: Op) -> None:
        """Snapshots of the tenant's calls in progress and recently ended, then live events."""
        already = session.all_conversations
        session.begin_all_snapshot()
        self.hub.subscribe_all(session)
        try:
            view, stored = await asyncio.wait_for(
                self._read_calls(session.claims.tenant), _SNAPSHOT_TIMEOUT_S
            )
        except Exception as exc:  # Redis down or slow: nothing is subscribed
            self.metrics.redis_failures.inc()
            log.warning("all-calls snapshot read failed: %r", exc)
            if not already:
                self.hub.unsubscribe_all(session)
            session.abort_all_snapshot()
            raise ProtocolError(
                ErrorCode.UNAVAILABLE, "the calls in progress could not be read; try again"
            ) from exc
        if session.closed:
            return
        counts = AllCallsCounts(
            active=max(view.active_total, len(view.active)),
            snapshots=len(view.active),
            truncated=view.truncated,
            ended=len(view.ended),
        )
        snapshots = [(cid, stored.get(cid, []), False) for cid in view.active]
        snapshots += [(cid, stored.get(cid, []), True) for cid in view.ended]
        sent = session.finish_all_snapshot(
            acknowledgement(op, calls=counts), snapshots, self.snapshot_events
        )
        self.metrics.snapshots.inc(sent)

    async def _read_calls(self, tenant: str) -> tuple[IndexView, dict[str, list[bytes]]]:
        """The tenant's index (bounded), then those calls' recent events: two round trips."""
        assert self._calls is not None and self._store is not None
        view = await self._calls.read(
            tenant, max_active=self.snapshot_calls, max_ended=self.ended_calls
        )
        ids = [*view.active, *view.ended]
        stored = await self._store.events(ids, last=self.snapshot_events) if ids else {}
        return view, stored

    def _unsubscribe(self, session: Session, op: Op) -> None:
        if op.all_conversations:
            self.hub.unsubscribe_all(session)
        else:
            self.hub.unsubscribe(session, op.conversations)
        session.send(acknowledgement(op))


def _token(request: Request, query: str) -> str | None:
    """The bearer token from the Authorization header, else from ``?token=``."""
    header = request.headers.get("Authorization")
    if header:
        scheme, _, value = header.strip().partition(" ")
        return value.strip() if scheme.lower() == "bearer" else None
    values = parse_qs(query).get("token")
    return values[0] if values else None


async def serve_gateway(
    settings: GatewaySettings,
    stop: asyncio.Event,
    *,
    ready: Callable[[int], None] | None = None,
    static_dir: Path | None = None,
) -> None:
    """Run a gateway until ``stop`` is set.

    Args:
        settings: the pipeline's settings; gateway_secret is required, gateway_port 0
            binds any free port.
        stop: set it to close every client (1001) and return.
        ready: called with the bound port once clients can connect.
        static_dir: the folder served over plain HTTP (default: the shipped dashboard).

    Raises:
        ConfigError: no usable gateway_secret.
        aiokafka.errors.KafkaError: the broker cannot be reached at start-up.
        streaming.security.ConnectionSecurityError: Kafka or Redis refused the
            credentials, or TLS failed (an untrusted certificate, a missing file).
    """
    await Gateway(settings, static_dir=static_dir).run(stop, ready)


def _limit_send_buffer(ws: ServerConnection, size: int) -> None:
    """Cap the kernel's send buffer of one client socket. Linux grows it up to
    several MB on loopback, and a client that stopped reading is only noticed once
    it is full: at 250 KB/s of events, 4 MB hide a stall for ~16 s."""
    if size <= 0:
        return
    sock = ws.transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
