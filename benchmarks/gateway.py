"""Fan-out speed of the WebSocket gateway: Kafka -> ``cfnesa gateway`` -> N clients.

The embedded Tansu broker and redis-server, ONE ``cfnesa gateway`` process, and
in this process: a producer of synthetic emotion events at a steady rate
(round-robin over ``--calls`` live calls, keyed by call) and N WebSocket clients
on loopback, each subscribed by id to ``--per-client`` random calls (plus
``--all-clients`` clients subscribed to ``all``). Latency is measured on one
clock: the producer's ``send`` of an event (its time kept by event id) -> a
client's receive of it, over every delivery.

Phases, each on fresh services and a fresh gateway (Tansu's in-memory log gets
slower as it grows: its CPU share doubles within ~20 s at 500 events/s, which
would otherwise make a later phase look worse than an earlier one), alternating
``baseline, stalled, baseline, stalled, ..., baseline`` (``--pairs`` stalled
phases, each between two baselines):

- baseline: N clients reading;
- stalled: the same plus ONE extra client, subscribed to ``all``, that never
  reads (a 4 KiB socket receive buffer, a 1-message receive queue); the gateway
  should close it with 4008 once the kernel buffers and its queue are full,
  without delaying the others. This phase runs until half a phase after the
  close (at least one phase, at most three).

The stalled client's effect is the ratio of each stalled phase's p99 to the mean
of its two neighbouring baselines (the median over the pairs is the figure), and
the p99 of all stalled phases' deliveries pooled over all baselines' pooled. The
run-to-run noise it sits in: the spread of the baselines' p99 (max / min).

Figures per phase: p50/p95/p99/max delivery latency, deliveries/s, deliveries
missing, the gateway's own delivery histogram (emitted_at -> its send, p99 as a
bucket bound), and the CPU share (CPU seconds / wall seconds; 1.0 = one core) of
the gateway, this process (producer and clients), the broker and Redis. Phase 2
also gives when the stalled client was closed (from the gateway's
``cfnesa_gateway_slow_clients_closed_total``), the others' p99 while it was
still connected, and the close code the stalled client finally read.

Everything shares this machine's cores: the clients' receive path (Python,
asyncio, one process) costs about as much as the gateway's send path, so the
latencies are an upper bound for a gateway with cores of its own.

Usage: python benchmarks/gateway.py [--quick] [--clients 1000[,500]] [--rate 500]
Writes benchmarks/results/gateway-<date>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import resource
import secrets
import socket
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
from aiokafka import AIOKafkaProducer
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import git, machine, pct, scrape, warn_if_busy, write_result  # noqa: E402 (benchmarks/common.py)

from streaming.embedded import Services, free_port  # noqa: E402
from streaming.events import EmotionEvent, dump_event, format_ts  # noqa: E402
from streaming.gateway.auth import TokenSigner  # noqa: E402
from workers.processes import http_get, spawn, stop  # noqa: E402

TOPIC = "emotion-events"
PARTITIONS = 4
TENANT = "default"
P99_GOAL_MS = 50.0
STALL_RATIO_GOAL = 1.10
CONNECT_CONCURRENCY = 64
EVENT_ID_KEY = '"event_id":"'
PROBS = {"neutral": 0.7, "joy": 0.1, "anger": 0.1, "sadness": 0.1}


# ------------------------------------------------------------------ helpers


def ms(x: float) -> float:
    return round(x * 1e3, 2) if math.isfinite(x) else math.nan


def histogram_quantile(before: dict[str, float], after: dict[str, float], q: float) -> float:
    """Upper bucket bound holding quantile q of cfnesa_gateway_delivery_seconds' delta."""
    prefix = "cfnesa_gateway_delivery_seconds_bucket{le="
    buckets = []
    for key, value in after.items():
        if key.startswith(prefix):
            le = key[len(prefix) : -1]
            buckets.append((math.inf if le == "+Inf" else float(le), value - before.get(key, 0.0)))
    buckets.sort()
    if not buckets or buckets[-1][1] <= 0:
        return math.nan
    total = buckets[-1][1]
    for bound, count in buckets:
        if count >= q * total:
            return bound
    return math.inf


def counter_delta(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


class Cpu:
    """CPU seconds of a set of processes, for shares over a window."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self.procs = {k: psutil.Process(p) for k, p in pids.items() if p is not None}

    def sample(self) -> tuple[float, dict[str, float]]:
        out = {}
        for name, proc in self.procs.items():
            try:
                t = proc.cpu_times()
                out[name] = t.user + t.system
            except psutil.Error:
                out[name] = math.nan
        return time.perf_counter(), out

    @staticmethod
    def shares(a: tuple[float, dict[str, float]], b: tuple[float, dict[str, float]]) -> dict:
        wall = b[0] - a[0]
        return {k: round((b[1][k] - a[1][k]) / wall, 3) for k in a[1]}


# ------------------------------------------------------------------ load


class Recorder:
    """Send times by event id, and every delivery's latency, on one clock."""

    def __init__(self, fanout: dict[str, int]) -> None:
        self.phase: str | None = None
        self.sent: dict[str, tuple[float, str | None]] = {}
        self.fanout = fanout  # conversation -> readers that should get its events
        self.expected: dict[str, int] = {}
        self.sends: dict[str, int] = {}
        # phase -> [(send time, latency)]
        self.deliveries: dict[str, list[tuple[float, float]]] = {}

    def on_send(self, event_id: str, conversation_id: str, t: float) -> None:
        phase = self.phase
        self.sent[event_id] = (t, phase)
        if phase is not None:
            self.expected[phase] = self.expected.get(phase, 0) + self.fanout[conversation_id]
            self.sends[phase] = self.sends.get(phase, 0) + 1

    def on_message(self, text: str | bytes, now: float) -> None:
        if not isinstance(text, str):
            return
        i = text.find(EVENT_ID_KEY, 0, 80)  # event_id is the second key of an event
        if i < 0:
            return  # an acknowledgement or a snapshot
        i += len(EVENT_ID_KEY)
        sent = self.sent.get(text[i : text.index('"', i)])
        if sent is None or sent[1] is None:
            return
        self.deliveries.setdefault(sent[1], []).append((sent[0], now - sent[0]))


class Producer:
    """Emotion events at a steady rate, round-robin over the calls."""

    def __init__(self, bootstrap: str, calls: list[str], rate: float, rec: Recorder) -> None:
        self.producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=1)
        self.calls = calls
        self.rate = rate
        self.rec = rec
        self.seq = [0] * len(calls)
        self.count = 0
        self.task: asyncio.Task[None] | None = None
        self.failures = 0

    async def start(self) -> None:
        await self.producer.start()
        self.task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        await self.producer.stop()

    def _event(self, i: int) -> tuple[bytes, bytes, str, str]:
        cid = self.calls[i]
        seq = self.seq[i]
        self.seq[i] += 1
        event = EmotionEvent(
            conversation_id=cid,
            seq=seq,
            speaker="customer",
            emotion="neutral",
            confidence=0.7,
            probabilities=PROBS,
            model="bench",
            emitted_at=format_ts(datetime.now(UTC)),
        )
        return cid.encode(), dump_event(event), event.event_id, cid

    async def _run(self) -> None:
        t0 = time.perf_counter()
        n = len(self.calls)
        pending: list[asyncio.Future[Any]] = []
        while True:
            due = int((time.perf_counter() - t0) * self.rate) + 1
            while self.count < due:
                key, value, event_id, cid = self._event(self.count % n)
                self.count += 1
                t = time.perf_counter()
                self.rec.on_send(event_id, cid, t)
                pending.append(await self.producer.send(TOPIC, value=value, key=key))
            if len(pending) > 2000:
                done = [f for f in pending if f.done()]
                self.failures += sum(1 for f in done if f.exception() is not None)
                pending = [f for f in pending if not f.done()]
            await asyncio.sleep(max(t0 + due / self.rate - time.perf_counter(), 0.0))


async def open_client(
    url: str, token: str, subscribe: dict[str, Any], rec: Recorder
) -> tuple[ClientConnection, asyncio.Task[None]]:
    ws = await connect(
        url,
        additional_headers={"Authorization": f"Bearer {token}"},
        ping_interval=None,
        compression=None,
        open_timeout=60,
    )
    await ws.send(json.dumps(subscribe))
    ack = json.loads(await ws.recv())
    if ack.get("type") != "subscribed":
        raise RuntimeError(f"subscribe answered {ack}")

    async def read() -> None:
        with contextlib.suppress(ConnectionClosed):
            async for message in ws:
                rec.on_message(message, time.perf_counter())

    return ws, asyncio.create_task(read())


async def open_stalled(port: int, token: str) -> ClientConnection:
    """A client subscribed to all that never reads: tiny kernel buffer, 1-message queue."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # also stops autotuning
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    ws = await connect(
        f"ws://127.0.0.1:{port}/ws",
        sock=sock,
        additional_headers={"Authorization": f"Bearer {token}"},
        ping_interval=None,
        compression=None,
        max_queue=1,
    )
    await ws.send(json.dumps({"op": "subscribe", "all": True}))
    return ws  # never read again until the phase ends


# ------------------------------------------------------------------ one client count


def summarize(
    rec: Recorder, phase: str, wall: float, cpu: dict, before: dict, after: dict
) -> dict[str, Any]:
    lat = sorted(x[1] for x in rec.deliveries.get(phase, []))
    expected = rec.expected.get(phase, 0)
    return {
        "seconds": round(wall, 2),
        "events_sent": rec.sends.get(phase, 0),
        "deliveries_expected": expected,
        "deliveries": len(lat),
        "deliveries_missing": expected - len(lat),
        "deliveries_per_s": round(len(lat) / wall, 1),
        "p50_ms": ms(pct(lat, 0.50)),
        "p95_ms": ms(pct(lat, 0.95)),
        "p99_ms": ms(pct(lat, 0.99)),
        "max_ms": ms(lat[-1] if lat else math.nan),
        "gateway_histogram_p50_le_ms": ms(histogram_quantile(before, after, 0.50)),
        "gateway_histogram_p99_le_ms": ms(histogram_quantile(before, after, 0.99)),
        "gateway_events_delivered": counter_delta(
            before, after, "cfnesa_gateway_events_delivered_total"
        ),
        "gateway_events_dropped": counter_delta(
            before, after, "cfnesa_gateway_events_dropped_total"
        ),
        "cpu_share": cpu,
    }


async def run_count(
    n_clients: int, phase: str, port: int, services: Services, gw_pid: int, args: Any
) -> dict:
    """One phase (``baseline`` or ``stalled``); the result keeps the sorted latencies
    under ``_latencies`` for pooling (dropped before the JSON is written)."""
    secret = args.secret
    signer = TokenSigner(secret)
    rng = random.Random(args.seed)
    calls = [f"call-{i:04d}" for i in range(args.calls)]
    plans: list[tuple[str, dict[str, Any]]] = []
    fanout = dict.fromkeys(calls, args.all_clients)
    for _ in range(n_clients - args.all_clients):
        mine = rng.sample(calls, args.per_client)
        for c in mine:
            fanout[c] += 1
        plans.append(
            (
                signer.mint(TENANT, mine, ttl_s=3600),
                {"op": "subscribe", "conversations": mine},
            )
        )
    for _ in range(args.all_clients):
        plans.append(
            (
                signer.mint(TENANT, all_conversations=True, ttl_s=3600),
                {"op": "subscribe", "all": True},
            )
        )
    rec = Recorder(fanout)
    url = f"ws://127.0.0.1:{port}/ws"
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def one(plan: tuple[str, dict[str, Any]]) -> tuple[ClientConnection, asyncio.Task]:
        async with gate:
            return await open_client(url, plan[0], plan[1], rec)

    t = time.perf_counter()
    clients = await asyncio.gather(*(one(p) for p in plans))
    connect_s = time.perf_counter() - t
    print(f"  {n_clients} clients connected and subscribed in {connect_s:.1f} s", flush=True)

    pids = {"gateway": gw_pid, "clients_and_producer": os.getpid()}
    if services.kafka is not None:
        pids["broker"] = services.kafka.pid
    if services.redis is not None:
        pids["redis"] = services.redis.pid
    cpu = Cpu(pids)
    producer = Producer(services.bootstrap, calls, args.rate, rec)
    await producer.start()
    await asyncio.sleep(args.warmup_s)
    stalled_info: dict[str, Any] = {}
    before = await asyncio.to_thread(scrape, port)
    c0 = cpu.sample()
    rec.phase = phase
    t0 = time.perf_counter()
    if phase == "stalled":
        stalled = await open_stalled(port, signer.mint(TENANT, all_conversations=True))
        subscribed = time.perf_counter()
        closed_at = None
        # until the gateway closes it (+ half a phase), at least a phase, at most 3 phases
        while True:
            now = time.perf_counter()
            if now - t0 >= 3 * args.phase_s:
                break
            closed_long_ago = closed_at is not None and now - closed_at >= args.phase_s / 2
            if now - t0 >= args.phase_s and closed_long_ago:
                break
            await asyncio.sleep(0.25)
            m = await asyncio.to_thread(scrape, port)
            slow = counter_delta(before, m, "cfnesa_gateway_slow_clients_closed_total")
            if closed_at is None and slow >= 1:
                closed_at = time.perf_counter()
        stalled_info = {
            "closed_by_gateway_during_phase": closed_at is not None,
            "closed_after_s": round(closed_at - subscribed, 2) if closed_at else None,
        }
    else:
        await asyncio.sleep(args.phase_s)
    rec.phase = None
    wall = time.perf_counter() - t0
    c1 = cpu.sample()
    await asyncio.sleep(args.settle_s)  # the phase's last deliveries
    after = await asyncio.to_thread(scrape, port)
    result = summarize(rec, phase, wall, Cpu.shares(c0, c1), before, after)
    if phase == "stalled":
        stalled_info["slow_clients_closed"] = counter_delta(
            before, after, "cfnesa_gateway_slow_clients_closed_total"
        )
        end = closed_at if closed_at is not None else math.inf
        window = sorted(lat for ts, lat in rec.deliveries.get(phase, []) if ts <= end)
        stalled_info["others_p99_ms_while_stalled"] = ms(pct(window, 0.99))
        stalled_info["others_deliveries_while_stalled"] = len(window)
        code, reason = await read_close(stalled)
        stalled_info["close_code_read_by_client"] = code
        stalled_info["close_reason_read_by_client"] = reason
        result["stalled_client"] = stalled_info
    p = result
    print(
        f"  {phase:9s} p50 {p['p50_ms']:7.2f}  p95 {p['p95_ms']:7.2f}  p99 {p['p99_ms']:7.2f}"
        f"  max {p['max_ms']:8.2f} ms  {p['deliveries_per_s']:8.0f} deliveries/s"
        f"  missing {p['deliveries_missing']}  cpu {p['cpu_share']}",
        flush=True,
    )
    await producer.stop()
    for _ws, task in clients:
        task.cancel()
    await asyncio.gather(*(ws.close() for ws, _ in clients), return_exceptions=True)
    await asyncio.gather(*(task for _, task in clients), return_exceptions=True)
    result["_latencies"] = sorted(x[1] for x in rec.deliveries.get(phase, []))
    result["connect_s"] = round(connect_s, 2)
    result["mean_readers_per_call"] = round(sum(fanout.values()) / len(fanout), 2)
    result["producer_send_failures"] = producer.failures
    return result


def ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b and math.isfinite(a) and math.isfinite(b) else math.nan


async def read_close(ws: ClientConnection) -> tuple[int | None, str | None]:
    """Read the stalled client's backlog until the connection ends (bounded)."""
    with contextlib.suppress(ConnectionClosed, TimeoutError):
        async with asyncio.timeout(15):
            async for _ in ws:
                pass
    if ws.close_code is None:
        ws.transport.abort()
    return ws.close_code, ws.close_reason


def measure(n_clients: int, phase: str, label: str, args: Any, logs: Path) -> dict:
    """One phase on fresh services and a fresh gateway (spawned on the main thread)."""
    folder = logs / f"clients-{n_clients}-{label}"
    folder.mkdir(parents=True, exist_ok=True)
    with Services(log_dir=folder, topics={TOPIC: PARTITIONS}) as services:
        port = free_port()
        env = {
            **os.environ,
            "CFNESA_KAFKA_BOOTSTRAP": services.bootstrap,
            "CFNESA_REDIS_URL": services.redis_url,
            "CFNESA_GATEWAY_SECRET": args.secret,
            "CFNESA_GATEWAY_PORT": str(port),
            "CFNESA_OUTPUT_TOPIC": TOPIC,
            "CFNESA_CLIENT_QUEUE": str(args.client_queue),
            "CFNESA_LOG_LEVEL": "INFO",
        }
        gateway = spawn(["gateway"], env, folder / "gateway.log")
        try:
            deadline = time.monotonic() + 60
            while http_get(port, "/healthz")[0] != 200:
                if gateway.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the gateway did not start; see {folder / 'gateway.log'}")
                time.sleep(0.1)
            return asyncio.run(run_count(n_clients, phase, port, services, gateway.pid, args))
        finally:
            stop([gateway])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 clients, short phases")
    parser.add_argument("--clients", help="comma-separated client counts (default 1000)")
    parser.add_argument("--calls", type=int, default=200, help="live calls")
    parser.add_argument("--per-client", type=int, default=3, help="calls per client")
    parser.add_argument("--all-clients", type=int, default=2, help="clients subscribed to all")
    parser.add_argument("--rate", type=float, default=500.0, help="events/s")
    parser.add_argument("--phase-s", type=float, help="measured seconds per phase")
    parser.add_argument("--client-queue", type=int, default=1000, help="CFNESA_CLIENT_QUEUE")
    parser.add_argument("--pairs", type=int, help="stalled phases, each between baselines")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true", help="print only, write no JSON")
    args = parser.parse_args()
    counts = [int(c) for c in (args.clients or ("200" if args.quick else "1000")).split(",")]
    args.phase_s = args.phase_s or (6.0 if args.quick else 15.0)
    args.warmup_s = 1.5 if args.quick else 3.0
    args.settle_s = 1.0
    args.pairs = args.pairs or (1 if args.quick else 3)
    args.secret = secrets.token_urlsafe(32)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = max(counts) + 512
    if soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(max(need, soft), hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    cpus = os.cpu_count()
    print(
        f"clients {counts}, each on {args.per_client} of {args.calls} calls (+{args.all_clients} "
        f"on all); {args.rate:g} events/s; phases of {args.phase_s:g} s: baseline and, "
        f"{args.pairs} times, one stalled client added then baseline again.\n"
        f"NOTE: the producer and the clients (this process, one asyncio "
        f"loop), the broker, Redis and the gateway all share this machine's {cpus} cores; the "
        "clients' receive cost is in the latencies.",
        flush=True,
    )
    warn_if_busy()
    logs = Path(tempfile.mkdtemp(prefix="cfnesa-bench-gateway-"))
    print(f"logs in {logs}", flush=True)
    results = {}
    for n in counts:
        print(f"{n} clients:", flush=True)
        order = ["baseline"] + ["stalled", "baseline"] * args.pairs
        labels = [f"{kind}-{order[: i + 1].count(kind)}" for i, kind in enumerate(order)]
        phases = {
            label: measure(n, kind, label, args, logs)
            for kind, label in zip(order, labels, strict=True)
        }
        base_p99 = [phases[f"baseline-{k}"]["p99_ms"] for k in range(1, args.pairs + 2)]
        pair_ratios = [
            ratio(phases[f"stalled-{k}"]["p99_ms"], (base_p99[k - 1] + base_p99[k]) / 2)
            for k in range(1, args.pairs + 1)
        ]
        pooled = {
            kind: sorted(
                x for label, p in phases.items() if label.startswith(kind) for x in p["_latencies"]
            )
            for kind in ("baseline", "stalled")
        }
        for p in phases.values():
            del p["_latencies"]
        results[str(n)] = {
            "clients": n,
            "clients_all": args.all_clients,
            "phases": phases,
            "ratios": {
                "p99_stalled_vs_neighbour_baselines": pair_ratios,
                "p99_stalled_vs_neighbour_baselines_median": statistics.median(pair_ratios),
                "p99_pooled_stalled_vs_pooled_baseline": ratio(
                    ms(pct(pooled["stalled"], 0.99)), ms(pct(pooled["baseline"], 0.99))
                ),
                "baseline_p99_spread_max_vs_min": ratio(max(base_p99), min(base_p99)),
                "p99_while_stalled_vs_neighbour_baselines": [
                    ratio(
                        phases[f"stalled-{k}"]["stalled_client"]["others_p99_ms_while_stalled"],
                        (base_p99[k - 1] + base_p99[k]) / 2,
                    )
                    for k in range(1, args.pairs + 1)
                ],
            },
            "pooled_baseline_p99_ms": ms(pct(pooled["baseline"], 0.99)),
            "pooled_stalled_p99_ms": ms(pct(pooled["stalled"], 0.99)),
        }

    print()
    print(
        f"{'clients':>8s} {'phase':9s}{'p50 ms':>9s}{'p95 ms':>9s}{'p99 ms':>9s}{'max ms':>9s}"
        f"{'deliv/s':>9s}{'missing':>8s}{'gw CPU':>8s}{'clients CPU':>12s}"
    )
    for n, r in results.items():
        for phase, p in r["phases"].items():
            print(
                f"{n:>8s} {phase:9s}{p['p50_ms']:>9.2f}{p['p95_ms']:>9.2f}{p['p99_ms']:>9.2f}"
                f"{p['max_ms']:>9.2f}{p['deliveries_per_s']:>9.0f}{p['deliveries_missing']:>8d}"
                f"{p['cpu_share']['gateway']:>8.2f}{p['cpu_share']['clients_and_producer']:>12.2f}"
            )
        for label, p in r["phases"].items():
            if "stalled_client" in p:
                c = p["stalled_client"]
                print(
                    f"{n:>8s} {label}: the stalled client was closed by the gateway "
                    f"{c['closed_by_gateway_during_phase']} after {c['closed_after_s']} s; "
                    f"close code read {c['close_code_read_by_client']}"
                )
        print(
            f"{n:>8s} pooled p99: baseline {r['pooled_baseline_p99_ms']} ms, stalled "
            f"{r['pooled_stalled_p99_ms']} ms"
        )
        for key, value in r["ratios"].items():
            print(f"{n:>8s} {key:45s} {value}")

    record = {
        "benchmark": "gateway",
        "commit": git("rev-parse", "--short", "HEAD"),
        "dirty_tree": bool(git("status", "--porcelain", "--untracked-files=no")),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(
            shared="producer and WebSocket clients (one Python process, one asyncio loop), "
            "broker (Tansu), Redis and the gateway all run on these cores"
        ),
        "setup": {
            "calls": args.calls,
            "calls_per_client": args.per_client,
            "clients_all": args.all_clients,
            "rate_per_s": args.rate,
            "partitions": PARTITIONS,
            "phase_s": args.phase_s,
            "pairs": args.pairs,
            "warmup_s": args.warmup_s,
            "client_queue": args.client_queue,
            "latency": "producer.send of an event -> a client's receive of it (one clock, "
            "this process), over every delivery",
            "gateway_histogram": "the gateway's cfnesa_gateway_delivery_seconds: emitted_at "
            "(ms precision, set at send) -> its ws.send returned; bucket upper bounds",
            "stalled_client": "subscribed to all, SO_RCVBUF 4096, max_queue 1, never reads "
            "during its phase",
            "cpu_share": "CPU seconds / wall seconds over the phase; 1.0 = one core",
        },
        "quick": args.quick,
        "results": results,
        "targets": {
            "p99_ms": f"<= {P99_GOAL_MS:g} at 1000 clients, {args.rate:g} events/s",
            "ratios.p99_stalled_vs_neighbour_baselines_median": f"< {STALL_RATIO_GOAL}",
        },
    }
    if not args.no_write:
        write_result("gateway", record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
