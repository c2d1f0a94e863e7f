"""The WebSocket gateway, end to end: a real server on port 0, the embedded broker and
redis-server, real `websockets` clients. Each test has its own topic and key prefix."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from streaming.call_index import CallActivity, CallIndex
from streaming.embedded import EmbeddedKafka, EmbeddedRedis, EmbeddedRedisCluster
from streaming.events import AlertEvent, EmotionEvent, SummaryEvent, dump_event
from streaming.gateway import CLOSE_TOKEN_EXPIRED, CLOSE_TOO_SLOW, TokenSigner, serve_gateway
from streaming.gateway.routes import STATIC_DIR
from streaming.settings import Settings
from streaming.state_store import Commit, StateStore
from streaming.topics import ensure_topics

SECRET = "a-test-secret-of-enough-length"
WAIT_S = 15 * float(os.environ.get("CFNESA_TEST_TIMEOUT_FACTOR", "1"))


def emotion(cid: str, seq: int, tenant: str | None = None, text: str | None = None) -> bytes:
    return dump_event(
        EmotionEvent(
            conversation_id=cid,
            seq=seq,
            speaker="customer",
            emotion="neutral",
            confidence=0.9,
            probabilities={"neutral": 0.9, "anger": 0.1},
            model="test@0",
            tenant=tenant,
            text=text,
        )
    )


def alert(cid: str, seq: int, tenant: str | None = None) -> bytes:
    return dump_event(
        AlertEvent.model_validate(
            {
                "conversation_id": cid,
                "seq": seq,
                "speaker": "customer",
                "rule": "emotion_shift",
                "severity": "high",
                "model": "test@0",
                "tenant": tenant,
            }
        )
    )


@dataclass
class Gateway:
    port: int
    settings: Settings
    signer: TokenSigner
    producer: AIOKafkaProducer
    timeout: float

    def url(self, token: str | None = None) -> str:
        return f"ws://127.0.0.1:{self.port}/ws" + (f"?token={token}" if token else "")

    def token(self, tenant: str, conversations: tuple[str, ...] = (), **kw: Any) -> str:
        return self.signer.mint(tenant, conversations, **kw)

    async def produce(self, events: list[bytes]) -> None:
        for raw in events:
            cid = json.loads(raw)["conversation_id"]
            await self.producer.send(self.settings.output_topic, raw, key=cid.encode())
        await self.producer.flush()

    async def http(self, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
        """A raw HTTP/1.1 request, the path sent exactly as given (no normalising client)."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(f"{method} {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
            data = await asyncio.wait_for(reader.read(), self.timeout)  # the server closes
        finally:
            writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:])
        return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


GatewayFactory = Callable[..., contextlib.AbstractAsyncContextManager[Gateway]]


@pytest.fixture
async def gateway(
    kafka: EmbeddedKafka,
    redis_server: EmbeddedRedis,
    unique: str,
    scaled: Callable[[float], float],
) -> AsyncIterator[GatewayFactory]:
    """Start gateways on port 0 against this test's topic (1 partition) and key prefix."""
    topic = f"{unique}.emotion-events"
    await ensure_topics(kafka.bootstrap, {topic: 1}, timeout=scaled(30))
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, linger_ms=5)
    await producer.start()

    @contextlib.asynccontextmanager
    async def start(static_dir: Path | None = None, **overrides: Any) -> AsyncIterator[Gateway]:
        fields: dict[str, Any] = {
            "kafka_bootstrap": kafka.bootstrap,
            "redis_url": redis_server.url,
            "output_topic": topic,
            "key_prefix": unique,
            "gateway_port": 0,
            "gateway_secret": SECRET,
        }
        settings = Settings(**{**fields, **overrides})
        stop = asyncio.Event()
        bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(
            serve_gateway(settings, stop, ready=bound.set_result, static_dir=static_dir)
        )
        waiting: set[asyncio.Future[Any]] = {task, bound}
        done, _ = await asyncio.wait(waiting, timeout=scaled(30), return_when="FIRST_COMPLETED")
        if bound not in done:
            stop.set()
            await task  # raises what prevented the start
            raise AssertionError("the gateway did not start")
        try:
            yield Gateway(bound.result(), settings, TokenSigner(SECRET), producer, scaled(15))
        finally:
            stop.set()
            await asyncio.wait_for(task, scaled(15))

    try:
        yield start
    finally:
        await producer.stop()


async def recv(ws: ClientConnection, wait_s: float = WAIT_S) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), wait_s))


async def request(ws: ClientConnection, **body: Any) -> dict[str, Any]:
    await ws.send(json.dumps(body))
    return await recv(ws)


async def refused(url: str, **kw: Any) -> tuple[int, dict[str, Any]]:
    with pytest.raises(InvalidStatus) as info:
        async with connect(url, **kw):
            pass
    response = info.value.response
    return response.status_code, json.loads(response.body)


# ---------------------------------------------------------------- auth


async def test_auth_refuses_bad_tokens_and_takes_header_or_query(gateway: GatewayFactory):
    async with gateway() as gw:
        other = TokenSigner("another-secret-of-enough-length")
        good = gw.token("acme", ("call-*",))
        payload = good.split(".")[0]
        cases = {
            None: "missing_token",
            other.mint("acme", ["call-*"]): "bad_signature",
            gw.token("acme", ("call-*",), now=time.time() - 7200, ttl_s=3600): "expired",
            "not-a-token": "malformed_token",
            "a.b.c": "malformed_token",
            f"{payload}.!!!": "malformed_token",
            # globex's payload under acme's signature
            f"{gw.token('globex', ('*',)).split('.')[0]}.{good.split('.')[1]}": "bad_signature",
        }
        for token, reason in cases.items():
            assert await refused(gw.url(token)) == (
                401,
                {"error": "unauthorized", "reason": reason},
            )
        assert await refused(gw.url(), additional_headers={"Authorization": "Basic eDp5"}) == (
            401,
            {"error": "unauthorized", "reason": "missing_token"},
        )

        # header and query both work; the header wins over a bad query token
        async with connect(
            gw.url("junk"), additional_headers={"Authorization": f"Bearer {good}"}
        ) as ws:
            assert await request(ws, op="subscribe", conversations=["call-1"], id=7) == {
                "type": "subscribed",
                "conversations": ["call-1"],
                "id": 7,
            }
            assert await recv(ws) == {"type": "snapshot", "conversation_id": "call-1", "events": []}
        async with connect(gw.url(good)) as ws:
            reply = await request(ws, op="subscribe", conversations=["call-1", "vip-9"])
            assert reply["code"] == "forbidden" and reply["conversations"] == ["vip-9"]
            reply = await request(ws, op="subscribe", all=True)
            assert reply["code"] == "forbidden"
            # nothing of the refused requests was subscribed: the next reply is an ack
            assert (await request(ws, op="unsubscribe", all=True))["type"] == "unsubscribed"
        async with connect(gw.url(gw.token("acme", all_conversations=True))) as ws:
            assert await request(ws, op="subscribe", all=True) == {
                "type": "subscribed",
                "all": True,
                "active": 0,  # nothing in this tenant's index of calls in progress
                "snapshots": 0,
                "truncated": False,
                "ended": 0,
            }
        status, _ = await refused(f"ws://127.0.0.1:{gw.port}/other?token={good}")
        assert status == 404  # WebSocket only on /ws

        _, _, metrics = await gw.http("/metrics")
        text = metrics.decode()
        assert 'cfnesa_gateway_auth_failures_total{reason="malformed_token"} 3.0' in text
        assert 'cfnesa_gateway_errors_total{code="forbidden"} 2.0' in text


async def test_connection_closes_when_the_token_expires(gateway: GatewayFactory):
    async with gateway() as gw, connect(gw.url(gw.token("acme", ("*",), ttl_s=2))) as ws:
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), gw.timeout)
        assert info.value.rcvd is not None and info.value.rcvd.code == CLOSE_TOKEN_EXPIRED


# ---------------------------------------------------------------- tenants


async def test_tenants_are_isolated(gateway: GatewayFactory):
    acme_calls = [f"call-a{i}" for i in range(4)]
    events: list[bytes] = []
    for seq in range(25):  # 25 rounds x 12 calls = 300 events, interleaved
        for cid in acme_calls:
            events.append(emotion(cid, seq, "acme"))
        for i in range(4):
            events.append(emotion(f"call-g{i}", seq, "globex"))
        events.append(emotion("call-a9", seq, "globex"))  # another tenant, inside acme's pattern
        events.append(emotion("call-a8", seq))  # no tenant: the default tenant's
        events.append(emotion("call-a7", seq, "acme"))  # acme's, not subscribed by pattern
        events.append(alert("call-a0", seq, "acme") if seq % 5 == 0 else emotion("call-g0", 99))
    marker = emotion("call-a0", 1000, "acme")
    wanted = {
        json.loads(e)["event_id"]
        for e in [*events, marker]
        if json.loads(e).get("tenant") == "acme" and json.loads(e)["conversation_id"] != "call-a7"
    }
    wanted_all = wanted | {f"call-a7:{seq}:emotion" for seq in range(25)}

    async with (
        gateway() as gw,
        connect(gw.url(gw.token("acme", all_conversations=True))) as everything,
        connect(gw.url(gw.token("acme", ("call-a*",)))) as by_pattern,
        connect(gw.url(gw.token("default", ("call-a8",)))) as default,
    ):
        assert (await request(everything, op="subscribe", all=True))["type"] == "subscribed"
        subscribed = [*acme_calls, "call-a9", "call-a8"]
        assert (await request(by_pattern, op="subscribe", conversations=subscribed))["type"] == (
            "subscribed"
        )
        for _ in subscribed:
            assert (await recv(by_pattern))["type"] == "snapshot"
        assert (await request(default, op="subscribe", conversations=["call-a8"]))["type"] == (
            "subscribed"
        )
        assert (await recv(default))["events"] == []
        await gw.produce([*events, marker, emotion("call-a8", 1000)])

        async def until(ws: ClientConnection, last: str) -> list[dict[str, Any]]:
            got: list[dict[str, Any]] = []
            while not got or got[-1]["event_id"] != last:
                got.append(await recv(ws))
            return got

        for ws, expected in ((everything, wanted_all), (by_pattern, wanted)):
            got = await until(ws, "call-a0:1000:emotion")
            assert all(e["tenant"] == "acme" for e in got)
            assert [e["event_id"] for e in got if e["event_id"] in expected] == [
                e["event_id"] for e in got
            ]
            assert {e["event_id"] for e in got} == expected and len(got) == len(expected)
        got = await until(default, "call-a8:1000:emotion")
        assert [e["seq"] for e in got] == [*range(25), 1000]
        assert all(e.get("tenant") is None for e in got)


# ---------------------------------------------------------------- snapshot, then live


async def test_snapshot_then_live_without_gap_or_duplicate(
    gateway: GatewayFactory, redis_server: EmbeddedRedis, unique: str
):
    cid = "call-s1"
    stored = [emotion(cid, seq, "acme") for seq in range(10)]
    stored.insert(4, alert(cid, 3, "acme"))
    stored.insert(6, alert(cid, 4, "globex"))  # another tenant's, same id: never shown
    store = StateStore.connect(redis_server.url, prefix=unique)
    try:
        (result,) = await store.commit([Commit(cid, None, 9, {}, stored)])
        assert result.ok
    finally:
        await store.close()

    async with gateway() as gw, connect(gw.url(gw.token("acme", ("call-s*",)))) as ws:
        assert (await request(ws, op="subscribe", conversations=[cid]))["type"] == "subscribed"
        snapshot = await recv(ws)
        assert snapshot["type"] == "snapshot" and snapshot["conversation_id"] == cid
        seqs = [(e["seq"], e["type"]) for e in snapshot["events"]]
        assert seqs == [(0, "emotion"), (1, "emotion"), (2, "emotion"), (3, "emotion"),
                        (3, "alert"), *((s, "emotion") for s in range(4, 10))]  # fmt: skip
        assert all(e["tenant"] == "acme" for e in snapshot["events"])

        # the worker re-produces 5..9 (a replay), then goes on; an alert shares seq 12
        live = [emotion(cid, s, "acme") for s in range(5, 20)]
        live.insert(8, alert(cid, 12, "acme"))
        await gw.produce([*live, alert(cid, 3, "acme"), emotion(cid, 20, "acme")])
        got: list[dict[str, Any]] = []
        while not got or got[-1]["seq"] != 20:
            got.append(await recv(ws))
        assert [(e["seq"], e["type"]) for e in got] == [
            *((s, "emotion") for s in range(10, 13)),
            (12, "alert"),
            *((s, "emotion") for s in range(13, 21)),
        ]


async def test_snapshot_during_a_live_stream_joins_it_exactly(
    gateway: GatewayFactory, redis_server: EmbeddedRedis, unique: str
):
    """A writer persists then produces, as the worker does, while a client joins."""
    cid, total = "call-w1", 200
    store = StateStore.connect(redis_server.url, prefix=unique, recent_events=32)
    halfway, asked = asyncio.Event(), asyncio.Event()

    async with gateway(recent_events=32) as gw:

        async def writer() -> None:
            for seq in range(total):
                raw = emotion(cid, seq, "acme")
                (result,) = await store.commit(
                    [Commit(cid, None if seq == 0 else seq - 1, seq, {}, [raw])]
                )
                assert result.ok
                await gw.producer.send_and_wait(gw.settings.output_topic, raw, key=cid.encode())
                if seq == total // 3:
                    halfway.set()
                    await asked.wait()  # the rest races the snapshot read

        try:
            async with connect(gw.url(gw.token("acme", (cid,)))) as ws:
                writing = asyncio.create_task(writer())
                await asyncio.wait_for(halfway.wait(), gw.timeout)
                await ws.send(json.dumps({"op": "subscribe", "conversations": [cid]}))
                asked.set()
                assert (await recv(ws))["type"] == "subscribed"
                snapshot = await recv(ws)
                seqs = [e["seq"] for e in snapshot["events"]]
                assert 0 < len(seqs) <= 32
                while seqs[-1] != total - 1:
                    seqs.append((await recv(ws))["seq"])
                await writing
        finally:
            await store.close()
    assert seqs == list(range(seqs[0], total)), "a gap or a duplicate"
    assert seqs[0] > 0 and len(snapshot["events"]) < len(seqs)


# ---------------------------------------------------------------- subscribe all: calls in progress


def summary(cid: str, seq: int, tenant: str | None = None) -> bytes:
    return dump_event(
        SummaryEvent(
            conversation_id=cid,
            seq=seq,
            tenant=tenant,
            utterances=seq,
            speakers={"customer": {"neutral": seq}},
            shifts=0,
            alerts=0,
            gaps=0,
            dominant={"customer": "neutral"},
            model="test@0",
        )
    )


class CallWriter:
    """Writes calls the way a worker does: commit (state and events), index, produce."""

    def __init__(self, gw: Gateway, redis_url: str, prefix: str, *, cluster: bool = False) -> None:
        self.gw = gw
        s = gw.settings
        self.store = StateStore.connect(
            redis_url, cluster=cluster, prefix=prefix, recent_events=s.recent_events
        )
        self.index = CallIndex(
            self.store,
            state_ttl_s=s.state_ttl_s,
            ended_ttl_s=s.ended_ttl_s,
            keep_ended=s.recent_ended_calls,
        )
        self.seqs: dict[str, int] = {}

    async def write(self, events: list[bytes], *, produce: bool = True, now: float | None = None):
        for raw in events:
            ev = json.loads(raw)
            cid, seq = ev["conversation_id"], ev["seq"]
            before = self.seqs.get(cid)
            (result,) = await self.store.commit([Commit(cid, before, seq, {}, [raw])])
            assert result.ok, (cid, seq)
            self.seqs[cid] = seq
            ended = ev["type"] == "summary"
            await self.index.record([CallActivity(cid, ev.get("tenant"), ended)], now)
            if produce:
                await self.gw.producer.send_and_wait(
                    self.gw.settings.output_topic, raw, key=cid.encode()
                )

    async def close(self) -> None:
        await self.store.close()


async def until_seq(ws: ClientConnection, cid: str, seq: int) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    while not got or (got[-1].get("conversation_id"), got[-1].get("seq")) != (cid, seq):
        got.append(await recv(ws))
    return got


@pytest.fixture(params=["redis", "cluster"])
def any_redis(request: pytest.FixtureRequest) -> tuple[str, bool]:
    """(URL, cluster): the shared redis-server, then the shared Redis Cluster."""
    cluster = request.param == "cluster"
    return request.getfixturevalue("redis_cluster" if cluster else "redis_server").url, cluster


async def test_subscribe_all_sends_calls_in_progress_and_ended_then_live(
    gateway: GatewayFactory, any_redis: tuple[str, bool], unique: str
):
    url, cluster = any_redis
    t0 = time.time()
    async with gateway(redis_url=url, redis_cluster=cluster) as gw:
        writer = CallWriter(gw, url, unique, cluster=cluster)
        try:
            # three calls in progress (a2 the most recently active), two ended ones,
            # another tenant's call, all written before the client connects
            for i, cid in enumerate(["a1", "a3", "a2"]):
                events = [emotion(cid, s, "acme") for s in range(3 + i)]
                await writer.write(events, produce=False, now=t0 + i)
            for i, cid in enumerate(["e1", "e2"]):
                events = [emotion(cid, 0, "acme"), emotion(cid, 1, "acme"), summary(cid, 2, "acme")]
                await writer.write(events, produce=False, now=t0 + 10 + i)
            await writer.write([emotion("g1", 0, "globex")], produce=False, now=t0)
            async with connect(gw.url(gw.token("acme", all_conversations=True))) as ws:
                reply = await request(ws, op="subscribe", all=True, id="all")
                assert reply == {
                    "type": "subscribed",
                    "all": True,
                    "id": "all",
                    "active": 3,
                    "snapshots": 3,
                    "truncated": False,
                    "ended": 2,
                }
                snaps = [await recv(ws) for _ in range(5)]
                assert all(m["type"] == "snapshot" for m in snaps)
                assert [m["conversation_id"] for m in snaps] == ["a2", "a3", "a1", "e2", "e1"]
                assert [len(m["events"]) for m in snaps[:3]] == [5, 4, 3]
                assert [m.get("ended", False) for m in snaps] == [False] * 3 + [True] * 2
                for m in snaps[3:]:
                    assert [e["type"] for e in m["events"]] == ["emotion", "emotion", "summary"]
                assert all(e["tenant"] == "acme" for m in snaps for e in m["events"])
                # live: replays of what the snapshots held are not sent again, a new call
                # and the calls going on are; another tenant's never
                await writer.write([emotion("a1", 3, "acme"), emotion("g1", 1, "globex")])
                await gw.produce([emotion("a2", 4, "acme"), summary("e1", 2, "acme")])
                await writer.write([emotion("a2", 5, "acme"), emotion("n1", 0, "acme")])
                got = await until_seq(ws, "n1", 0)
                assert [(e["conversation_id"], e["seq"]) for e in got] == [
                    ("a1", 3),
                    ("a2", 5),
                    ("n1", 0),
                ]
        finally:
            await writer.close()


async def test_subscribe_all_during_live_streams_joins_each_call_exactly(
    gateway: GatewayFactory, redis_server: EmbeddedRedis, unique: str
):
    """Writers commit, index and produce several calls, as workers do, while a client
    subscribes to all: per call, snapshot + live is one run of seqs, nothing twice."""
    cids, total = [f"live-{i}" for i in range(4)], 120
    halfway, asked = asyncio.Event(), asyncio.Event()
    async with gateway(recent_events=16) as gw:
        writer = CallWriter(gw, redis_server.url, unique)

        async def write() -> None:
            for seq in range(total):
                for cid in cids:
                    if seq == 0 and cid == cids[-1]:
                        continue  # the last call starts late: after the index read, maybe
                    await writer.write([emotion(cid, seq, "acme")])
                if seq == total // 3:
                    halfway.set()
                    await asked.wait()  # the rest races the all-calls read

        try:
            async with connect(gw.url(gw.token("acme", all_conversations=True))) as ws:
                writing = asyncio.create_task(write())
                await asyncio.wait_for(halfway.wait(), gw.timeout)
                await ws.send(json.dumps({"op": "subscribe", "all": True}))
                asked.set()
                reply = await recv(ws)
                assert reply["type"] == "subscribed" and reply["snapshots"] == 4
                seqs: dict[str, list[int]] = {cid: [] for cid in cids}
                for _ in range(reply["snapshots"] + reply["ended"]):
                    snap = await recv(ws)
                    assert snap["type"] == "snapshot" and 0 < len(snap["events"]) <= 16
                    seqs[snap["conversation_id"]] = [e["seq"] for e in snap["events"]]
                done = 0
                while done < len(cids):
                    ev = await recv(ws)
                    seqs[ev["conversation_id"]].append(ev["seq"])
                    done += ev["seq"] == total - 1
                await writing
        finally:
            await writer.close()
    for cid in cids:
        got = seqs[cid]
        assert got == list(range(got[0], total)), f"{cid}: a gap or a duplicate"
        assert got[0] > 0


async def test_subscribe_all_is_bounded_and_says_so(
    gateway: GatewayFactory, redis_server: EmbeddedRedis, unique: str
):
    t0 = time.time()
    async with gateway(gateway_snapshot_calls=2, recent_ended_calls=1) as gw:
        writer = CallWriter(gw, redis_server.url, unique)
        try:
            for i in range(5):
                await writer.write([emotion(f"b{i}", 0, "acme")], produce=False, now=t0 + i)
            for i in range(2):
                await writer.write([summary(f"x{i}", 0, "acme")], produce=False, now=t0 + i)
            async with connect(gw.url(gw.token("acme", all_conversations=True))) as ws:
                reply = await request(ws, op="subscribe", all=True)
                assert (reply["active"], reply["snapshots"], reply["truncated"]) == (5, 2, True)
                assert reply["ended"] == 1
                snaps = [await recv(ws) for _ in range(3)]
                assert [m["conversation_id"] for m in snaps] == ["b4", "b3", "x1"]
                # a call left out appears with its next event
                await writer.write([emotion("b0", 1, "acme")])
                live = await recv(ws)
                assert (live["conversation_id"], live["seq"]) == ("b0", 1)
        finally:
            await writer.close()


async def test_subscribe_all_with_redis_down_subscribes_nothing(
    gateway: GatewayFactory, private_redis: EmbeddedRedis
):
    async with (
        gateway(redis_url=private_redis.url) as gw,
        connect(gw.url(gw.token("acme", all_conversations=True))) as ws,
    ):
        private_redis.kill()
        reply = await request(ws, op="subscribe", all=True, id=3)
        assert (reply["type"], reply["code"], reply["id"]) == ("error", "unavailable", 3)
        await gw.produce([emotion("c1", 0, "acme")])
        # nothing was subscribed: the next message is this request's reply, then nothing
        reply = await request(ws, op="unsubscribe", conversations=["c1"])
        assert reply["type"] == "unsubscribed"
        with pytest.raises(TimeoutError):
            await recv(ws, 0.5)


# ---------------------------------------------------------------- back-pressure


async def test_a_slow_client_is_closed_and_the_others_get_everything(gateway: GatewayFactory):
    padding = "x" * 16_000

    async with gateway(client_queue=10) as gw:
        token = gw.token("acme", all_conversations=True)
        # A reader that never reads: a small receive buffer, and websockets stops
        # reading the socket once one message waits. Kernel buffers on the way still
        # hold megabytes (send-buffer autotuning), so events flow until it is closed.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", gw.port))
        sock.setblocking(False)
        async with (
            connect(gw.url(token), sock=sock, max_queue=1) as slow,
            connect(gw.url(token)) as fast,
        ):
            for ws in (slow, fast):
                assert (await request(ws, op="subscribe", all=True))["type"] == "subscribed"

            async def read_all() -> list[str]:
                got: list[str] = []
                while not got or got[-1] != "call-end:0:emotion":
                    got.append((await recv(fast))["event_id"])
                return got

            reading = asyncio.create_task(read_all())
            produced: list[str] = []
            for burst in range(60):  # up to 48 MB; a few MB are enough
                events = [
                    emotion(f"call-{i % 7}", burst * 50 + i, "acme", padding) for i in range(50)
                ]
                await gw.produce(events)
                produced += [json.loads(e)["event_id"] for e in events]
                _, _, metrics = await gw.http("/metrics")
                if "cfnesa_gateway_slow_clients_closed_total 1.0" in metrics.decode():
                    break
            else:
                raise AssertionError("the slow client was never closed")
            await gw.produce([emotion("call-end", 0, "acme")])
            got = await asyncio.wait_for(reading, gw.timeout)
            assert got == [*produced, "call-end:0:emotion"]  # every event, in order
            _, _, metrics = await gw.http("/metrics")
            assert "cfnesa_gateway_clients 1.0" in metrics.decode()

            received = 0
            with pytest.raises(ConnectionClosed) as info:
                while True:
                    await asyncio.wait_for(slow.recv(), gw.timeout)
                    received += 1
            assert info.value.rcvd is not None and info.value.rcvd.code == CLOSE_TOO_SLOW
            assert info.value.rcvd.reason == "too slow"
            assert received < len(produced)


# ---------------------------------------------------------------- bad frames


async def test_bad_frames_get_errors_and_an_oversize_frame_closes(gateway: GatewayFactory):
    async with gateway(max_frame_bytes=1024) as gw:
        token = gw.token("acme", ("call-*",))
        async with connect(gw.url(token)) as ws:
            frames: list[tuple[str | bytes, str]] = [
                ("not json", "not_json"),
                (b"\xff\xfe", "not_json"),
                ('{"op": "dance"}', "unknown_op"),
                ('{"conversations": ["call-1"]}', "unknown_op"),
                ("[1, 2]", "bad_request"),
                ('{"op": "subscribe"}', "bad_request"),
                ('{"op": "subscribe", "conversations": "call-1"}', "bad_request"),
                ('{"op": "subscribe", "conversations": [1]}', "bad_request"),
                ('{"op": "subscribe", "all": "yes"}', "bad_request"),
                ('{"op": "subscribe", "all": true, "conversations": ["call-1"]}', "bad_request"),
            ]
            for frame, code in frames:
                await ws.send(frame)
                reply = await recv(ws)
                assert (reply["type"], reply["code"]) == ("error", code), frame
            # the connection is still good
            assert (await request(ws, op="subscribe", conversations=["call-1"]))["type"] == (
                "subscribed"
            )
            assert (await recv(ws))["type"] == "snapshot"
            await ws.send(json.dumps({"op": "subscribe", "conversations": ["c" * 2000]}))
            assert (await recv(ws))["code"] == "frame_too_large"
            with pytest.raises(ConnectionClosed) as info:
                await recv(ws)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1009
        async with connect(gw.url(token)) as ws:  # far too large: cut off at once
            await ws.send("x" * 100_000)
            with pytest.raises(ConnectionClosed) as info:
                await recv(ws)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1009


# ---------------------------------------------------------------- plain HTTP


async def test_http_health_and_metrics(gateway: GatewayFactory):
    async with gateway() as gw:
        status, headers, body = await gw.http("/healthz")
        assert status == 200 and headers["content-type"] == "application/json"
        health = json.loads(body)
        assert health["status"] == "ok" and health["kafka"] and health["redis"]

        status, headers, body = await gw.http("/metrics")
        assert status == 200 and headers["content-type"].startswith("text/plain")
        for name in (
            "cfnesa_gateway_clients",
            "cfnesa_gateway_subscriptions",
            "cfnesa_gateway_events_delivered_total",
            "cfnesa_gateway_events_dropped_total",
            "cfnesa_gateway_slow_clients_closed_total",
            'cfnesa_gateway_auth_failures_total{reason="expired"}',
            "cfnesa_gateway_delivery_seconds_bucket",
        ):
            assert name in body.decode(), name
        status, _, _ = await gw.http("/healthz", method="DELETE")
        assert status == 405
        status, _, _ = await gw.http("/ws")  # no token
        assert status == 401

        # the shipped page, whatever it holds today
        status, headers, body = await gw.http("/")
        assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
        assert body == (STATIC_DIR / "index.html").read_bytes()
        assert "default-src 'self'" in headers["content-security-policy"]
        # every script the page loads, and every module those import, is served as JavaScript
        # (a browser refuses a module script of any other type)
        scripts = set(re.findall(r'<script[^>]* src="([^"]+)"', body.decode()))
        assert {"sentiment.js", "app.js"} <= scripts
        pending, served = sorted(scripts), set()
        while pending:
            name = pending.pop()
            if name in served:
                continue
            served.add(name)
            status, headers, got = await gw.http(f"/{name}")
            assert status == 200, name
            assert headers["content-type"] == "text/javascript; charset=utf-8", name
            assert got == (STATIC_DIR / name).read_bytes(), name
            pending += re.findall(r"^import [^;]*? from '\./([\w-]+\.js)';", got.decode(), re.M)
        assert served == {p.name for p in STATIC_DIR.glob("*.js")}  # none unused, none missing


async def test_static_files_stay_inside_their_folder(gateway: GatewayFactory, tmp_path: Path):
    site = tmp_path / "site"
    (site / "img").mkdir(parents=True)
    (site / "index.html").write_text("<!doctype html><p>placeholder</p>")
    (site / "app.js").write_text("console.log(1);")
    (site / "style.css").write_text("p{}")
    (site / "img" / "logo.svg").write_text("<svg/>")
    (site / ".env").write_text("SECRET=1")
    (tmp_path / "outside.txt").write_text("[project] outside")
    (site / "link.txt").symlink_to(tmp_path / "outside.txt")

    async with gateway(static_dir=site) as gw:
        for path, kind, body in [
            ("/", "text/html; charset=utf-8", b"<!doctype html><p>placeholder</p>"),
            ("/index.html", "text/html; charset=utf-8", b"<!doctype html><p>placeholder</p>"),
            ("/app.js", "text/javascript; charset=utf-8", b"console.log(1);"),
            ("/style.css", "text/css; charset=utf-8", b"p{}"),
            ("/img/logo.svg", "image/svg+xml", b"<svg/>"),
            ("/img%2Flogo.svg", "image/svg+xml", b"<svg/>"),
        ]:
            status, headers, got = await gw.http(path)
            assert (status, headers["content-type"], got) == (200, kind, body), path
            assert headers["x-content-type-options"] == "nosniff"
        status, headers, got = await gw.http("/", method="HEAD")
        assert status == 200 and got == b"" and int(headers["content-length"]) > 0

        for path in (
            "/../pyproject.toml",
            "/../outside.txt",
            "/%2e%2e/outside.txt",
            "/..%2foutside.txt",
            "/img/../../outside.txt",
            "/%2e%2e%2f%2e%2e%2fpyproject.toml",
            "/img/..%5c..%5coutside.txt",
            "/link.txt",  # a symlink out of the folder
            "/.env",
            "/img/",
            "/img",
            "//etc/passwd",
            "/%00",
            "/%ff",
            "/nothing-here.js",
        ):
            status, _, got = await gw.http(path)
            assert status == 404 and b"outside" not in got and b"SECRET" not in got, path


async def test_healthz_says_503_when_redis_is_down(
    gateway: GatewayFactory, private_redis: EmbeddedRedis
):
    async with gateway(redis_url=private_redis.url) as gw:
        assert (await gw.http("/healthz"))[0] == 200
        private_redis.kill()
        status, _, body = await gw.http("/healthz")
        assert status == 503 and json.loads(body)["redis"] is False


# ---------------------------------------------------------------- the token command


def test_token_command_mints_what_the_gateway_accepts(capsys: pytest.CaptureFixture[str]):
    import argparse

    from workers.cli_gateway import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    grant = ["--tenant", "acme", "--conversations", "call-*", "vip-1", "--all"]
    args = parser.parse_args(["token", *grant, "--ttl", "60", "--secret", SECRET])
    assert args.func(args) == 0
    claims = TokenSigner(SECRET).verify(capsys.readouterr().out.strip())
    assert (claims.tenant, claims.conversations, claims.all_conversations) == (
        "acme",
        ("call-*", "vip-1"),
        True,
    )
    assert 0 < claims.exp - time.time() <= 60
    args = parser.parse_args(["token", "--tenant", "acme", "--secret", SECRET])
    assert args.func(args) == 2  # grants nothing: refused
    args = parser.parse_args(["token", "--tenant", "a b", "--all", "--secret", SECRET])
    assert args.func(args) == 2


async def test_snapshot_from_a_redis_cluster(
    gateway: GatewayFactory, redis_cluster: EmbeddedRedisCluster, unique: str
):
    """The same gateway, configured for Redis Cluster, reads snapshots across nodes."""
    cids = [f"call-c{i}" for i in range(6)]  # hash tags spread over the three masters
    store = StateStore.connect(redis_cluster.url, cluster=True, prefix=unique)
    try:
        for cid in cids:
            events = [emotion(cid, seq, "acme") for seq in range(3)]
            (result,) = await store.commit([Commit(cid, None, 2, {}, events)])
            assert result.ok
        slots = {store.client.keyslot(store.events_key(cid)) for cid in cids}
        owners = {store.client.get_node_from_key(store.events_key(c)).port for c in cids}
    finally:
        await store.close()
    assert len(slots) == len(cids) and len(owners) >= 2, owners

    async with (
        gateway(redis_url=redis_cluster.url, redis_cluster=True) as gw,
        connect(gw.url(gw.token("acme", ("call-c*",)))) as ws,
    ):
        assert (await request(ws, op="subscribe", conversations=cids))["type"] == "subscribed"
        snapshots = {}
        for _ in cids:
            msg = await recv(ws)
            assert msg["type"] == "snapshot"
            snapshots[msg["conversation_id"]] = [e["seq"] for e in msg["events"]]
        assert snapshots == {cid: [0, 1, 2] for cid in cids}
        await gw.produce([emotion(cids[0], 3, "acme")])
        live = await recv(ws)
        assert (live["conversation_id"], live["seq"]) == (cids[0], 3)
