"""End-to-end speed of the pipeline, against the broker's own floor in the same run.

N concurrent synthetic calls (text-only 384-d features, base64) go through the
embedded Tansu broker, redis-server and ONE ``cfnesa worker`` process with the
shipped model. This process is both the load generator and the consumer of the
outputs, so latency is measured on one clock: input produced (``producer.send``)
-> its output event consumed.

Two stages share the same broker (and run side by side for the whole run):

- pipeline: ``cfnesa worker`` with the shipped defaults (batches of up to 256
  events across conversations, owned states cached in memory, only new window
  slots written);
- echo: ``benchmarks/echo.py``, the worker's Kafka clients and loop
  (`streaming.processor.StreamCore`: poll -> produce -> commit) with no model and
  no Redis: what the broker and the clients cost here, the floor.

Per offered rate (250, 500 and 1,000 utterances/s, then the echo alone up the
ladder 1,500, 2,000, 3,000 ... until it fails, and the pipeline at the highest rate
the echo sustains), one step of each, back to back, in alternating order (so both
see the same noise); each step sends for ``--step-s`` seconds after a short warm-up
at its rate. A step passes when p99 < 100 ms AND every event of the step came out
within the step + 1 s. Figures:

1. per rate: pipeline and echo p50/p99 and their ratios (the JSON's ``rates``);
2. where the worker's batch time goes (``cfnesa_stage_seconds{stage}``: poll wait,
   batch fill, validate, load, step, events, persist, outputs, produce, commit), per
   batch and per utterance, at every rate;
3. CPU per utterance (process user + system time over the step / utterances sent)
   of the worker and of the echo, at every rate (the goal is stated at 500/s);
4. Redis bytes written per utterance: the worker's metric
   ``cfnesa_redis_bytes_written_total / cfnesa_events_in_total{type="utterance"}``,
   cross-checked with redis INFO ``total_net_input_bytes``, and what one
   utterance's write is made of (``--redis-parts``: a sample of the stored fields);
5. capacity with no latency bound: how fast each stage clears a backlog sent at
   once (about ``--capacity-s`` seconds of it).

Everything shares this machine's cores: the load generator and the consumer
(this process), the broker, Redis, the worker and the echo (idle while the other
is measured, but still polling). Figures are therefore a floor for a worker with
cores of its own; each step records every process's CPU share.

A naive worker (one event at a time, whole state read and written: the old
baseline) is one setting away: ``--worker-env CFNESA_MAX_BATCH_EVENTS=1
--worker-env CFNESA_STATE_CACHE=false``.

Usage: python benchmarks/pipeline.py [--quick] [--calls 200] [--rates 250,500,1000]
Writes benchmarks/results/pipeline-<date>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import git, machine, pct, scrape, warn_if_busy, write_result  # noqa: E402 (benchmarks/common.py)

from streaming.embedded import Services, free_port  # noqa: E402
from streaming.events import load_output, utterance_event  # noqa: E402
from workers.metrics import STAGES  # noqa: E402
from workers.processes import http_get, parent_death_signal, spawn, stop  # noqa: E402

# what the shipped model expects (plain MiniLM or the shipped adapter's features)
FEATURE_SPEC = json.loads(
    (ROOT / "model/checkpoints/streaming-meld-minilm/config.json").read_text()
)["feature_spec"]
TEXT_DIM = 384
PARTITIONS = 4
P99_LIMIT_S = 0.100
KEEP_UP_S = 1.0  # every event of a step must be out this long after its last send
RATES = (250, 500, 1000)  # offered to both, interleaved
ECHO_LADDER = (1500, 2000, 3000, 4000, 5000, 6000, 8000)  # then the echo alone, up
CPU_RATE = 500  # the rate the CPU-per-utterance goal is stated at
RATIO_GOAL = 1.3  # pipeline p99 <= 1.3x the echo's, where the echo's p99 < 150 ms
RATIO_WHERE_ECHO_P99_MS = 150.0
CPU_GOAL_MS = 0.5
REDIS_GOAL_BYTES = 4096
FETCH_MAX_WAIT_MS = 5  # the benchmark's own consumers of the output topics
# Quick trial runs on the 2-core machine (optimized config, two runs each):
# 1 thread gave the lower latency at 250/s, torch's default (2) the higher
# capacity; the pass criterion is about latency, so 1 (the other core is busy
# with the broker, Redis and the load generator anyway).
DEFAULT_TORCH_THREADS = 1
TORCH_THREADS_TRIAL = (
    "quick runs, optimized config, worker consumer at fetch_max_wait_ms=5: p50 at 250/s "
    "55-61 ms with 1 thread vs 67-76 ms with torch's default (2); capacity with no "
    "latency bound ~1280/s vs 1400-1650/s"
)
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# ------------------------------------------------------------------ load


class Calls:
    """N live calls; each ``build`` continues every call's seq, round-robin."""

    def __init__(self, n: int, prefix: str, seed: int = 0) -> None:
        self.ids = [f"{prefix}-{i:04d}" for i in range(n)]
        self.keys = [cid.encode() for cid in self.ids]
        self.next_seq = [0] * n
        self.turn = 0
        self.rng = np.random.default_rng(seed)

    def build(self, count: int) -> list[tuple[bytes, bytes, tuple[str, int]]]:
        """``count`` messages (key, value, (conversation_id, seq)), in send order."""
        vecs = self.rng.standard_normal((count, TEXT_DIM)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        out = []
        n = len(self.ids)
        for k in range(count):
            i = self.turn % n
            self.turn += 1
            seq = self.next_seq[i]
            self.next_seq[i] += 1
            cid = self.ids[i]
            speaker = ("agent", "customer")[seq % 2]
            value = utterance_event(cid, seq, speaker, {"text": vecs[k]}, FEATURE_SPEC)
            out.append((self.keys[i], value, (cid, seq)))
        return out


class Receiver:
    """Reads an output topic; notes when each (conversation_id, seq) first arrives."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=bootstrap,
            group_id=None,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            # Tansu answers a fetch only after its max wait even when data is there
            # (aiokafka's default, 500 ms, adds ~135 ms p50 / ~250 ms p99 per hop)
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
        )
        self.received: dict[tuple[str, int], float] = {}
        self.arrivals: list[float] = []  # receive time of each first emotion event
        self.model: str | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.consumer.start()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.consumer.stop()

    async def _run(self) -> None:
        while True:
            batches = await self.consumer.getmany(timeout_ms=100)
            now = time.perf_counter()
            for records in batches.values():
                for rec in records:
                    event = json.loads(rec.value or b"{}")
                    if event.get("type") != "emotion":
                        continue  # alerts share the topic
                    if self.model is None and "model" in event:  # the contract, checked once
                        self.model = load_output(rec.value or b"").model
                    ident = (event["conversation_id"], event["seq"])
                    if ident not in self.received:
                        self.received[ident] = now
                        self.arrivals.append(now)

    async def wait_for(self, idents: list[tuple[str, int]], until: float) -> bool:
        """Wait until every ident arrived or ``time.perf_counter()`` passes ``until``."""
        pending = [i for i in idents if i not in self.received]
        while pending:
            if time.perf_counter() >= until:
                return False
            await asyncio.sleep(0.01)
            pending = [i for i in pending if i not in self.received]
        return True


async def offer(
    producer: AIOKafkaProducer,
    topic: str,
    messages: list[tuple[bytes, bytes, tuple[str, int]]],
    rate: float,
    sent: dict[tuple[str, int], float],
) -> list[float]:
    """Send ``messages`` paced at ``rate``/s (inf: at once); returns the send times."""
    times = []
    futures = []
    t0 = time.perf_counter()
    for i, (key, value, ident) in enumerate(messages):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0.001:
            await asyncio.sleep(delay)
        elif i % 32 == 0:
            await asyncio.sleep(0)  # behind schedule: still let the consumer run
        now = time.perf_counter()
        sent[ident] = now
        times.append(now)
        futures.append(await producer.send(topic, value=value, key=key))
    failures = [
        r
        for r in await asyncio.gather(*futures, return_exceptions=True)
        if isinstance(r, Exception)
    ]
    if failures:
        raise RuntimeError(f"{len(failures)} sends failed, first: {failures[0]!r}")
    return times


# ------------------------------------------------------------------ processes


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of a process (Linux /proc), None elsewhere."""
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def spawn_echo(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``python benchmarks/echo.py`` with the worker's settings, output to ``log``."""
    with log.open("ab") as fh:
        return subprocess.Popen(
            [sys.executable, str(ROOT / "benchmarks" / "echo.py")],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=parent_death_signal(),
        )


# ------------------------------------------------------------------ one stage


@dataclass
class Step:
    stage: str
    offered_per_s: float
    sent: int
    achieved_per_s: float  # output events received per second while sending
    p50_ms: float
    p99_ms: float
    max_ms: float
    kept_up: bool  # every event out within the step + KEEP_UP_S
    passed: bool
    cpu_ms_per_utterance: float | None  # the stage's process CPU / utterances sent
    cpu_share: dict[str, float | None] = field(default_factory=dict)
    # the worker only (from its /metrics)
    mean_batch_utterances: float | None = None
    mean_step_ms: float | None = None  # the model step per batch
    mean_batch_ms: float | None = None  # the whole batch, poll to offset commit
    batches: int | None = None
    breakdown_ms_per_batch: dict[str, float] | None = None
    breakdown_ms_per_utterance: dict[str, float] | None = None
    # a step that did not keep up: its latencies once the backlog drained
    p50_ms_drained: float | None = None
    p99_ms_drained: float | None = None


def ms(x: float) -> float:
    return round(x * 1e3, 2) if math.isfinite(x) else math.inf


class Stage:
    """One stage under test (the worker or the echo): its process, topics, load and
    receiver. Both share the broker and the load generator's producer."""

    def __init__(
        self,
        name: str,
        proc: subprocess.Popen[bytes],
        port: int | None,
        topics: tuple[str, str],
        producer: AIOKafkaProducer,
        services: Services,
        args: Any,
    ) -> None:
        self.name = name
        self.proc = proc
        self.port = port  # /metrics and /healthz (the worker); None: no endpoint
        self.in_topic, self.out_topic = topics
        self.producer = producer
        self.args = args
        self.calls = Calls(args.calls, prefix=f"bench-{name}", seed=len(name))
        self.sent: dict[tuple[str, int], float] = {}
        self.last_measured: list[tuple[str, int]] = []
        self.receiver = Receiver(services.bootstrap, self.out_topic)
        assert services.kafka is not None and services.redis is not None
        self.pids = {
            name: proc.pid,
            "broker": services.kafka.pid,
            "redis": services.redis.pid,
            "loadgen": os.getpid(),
        }

    def cpu(self) -> dict[str, float | None]:
        return {k: cpu_seconds(pid) for k, pid in self.pids.items()}

    async def ready(self) -> None:
        deadline = time.monotonic() + 180
        while self.port is not None:
            if (await asyncio.to_thread(http_get, self.port, "/healthz"))[0] == 200:
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not become healthy")
            await asyncio.sleep(0.2)
        await self.receiver.start()

    async def close(self) -> None:
        await self.receiver.stop()

    async def scrape(self) -> dict[str, float]:
        return {} if self.port is None else await asyncio.to_thread(scrape, self.port)

    async def unmeasured(self, count: int, rate: float, within_s: float) -> None:
        """Send ``count`` utterances at ``rate`` and wait for all their events."""
        msgs = self.calls.build(count)
        await offer(self.producer, self.in_topic, msgs, rate, self.sent)
        ok = await self.receiver.wait_for([m[2] for m in msgs], time.perf_counter() + within_s)
        if not ok:
            raise RuntimeError(f"{self.name}: events missing after {within_s:g} s")

    async def step(self, rate: float) -> Step:
        a = self.args
        warm = self.calls.build(int(rate * a.step_warmup_s))
        measured = self.calls.build(int(rate * a.step_s))
        gc.collect()
        gc.freeze()  # the prebuilt messages are never garbage: keep collections short
        before = await self.scrape()
        cpu0, wall0 = self.cpu(), time.perf_counter()
        times = await offer(self.producer, self.in_topic, warm + measured, rate, self.sent)
        end = time.perf_counter()
        start = times[len(warm)]
        kept_up = await self.receiver.wait_for([m[2] for m in warm + measured], end + KEEP_UP_S)
        cpu1, wall1 = self.cpu(), time.perf_counter()
        after = await self.scrape()
        gc.unfreeze()
        self.last_measured = [m[2] for m in measured]
        lat = self.latencies(self.last_measured)
        arrivals = sum(1 for t in self.receiver.arrivals if start <= t <= end)
        share: dict[str, float | None] = {}
        for k, c0 in cpu0.items():
            c1 = cpu1[k]
            share[k] = None if c0 is None or c1 is None else round((c1 - c0) / (wall1 - wall0), 3)
        own0, own1 = cpu0[self.name], cpu1[self.name]
        sent = len(warm) + len(measured)
        p99 = pct(lat, 0.99)
        st = Step(
            stage=self.name,
            offered_per_s=rate,
            sent=sent,
            achieved_per_s=round(arrivals / max(end - start, 1e-9), 1),
            p50_ms=ms(pct(lat, 0.50)),
            p99_ms=ms(p99),
            max_ms=ms(lat[-1]),
            kept_up=kept_up,
            passed=kept_up and p99 < P99_LIMIT_S,
            # every event of the step was out when the CPU was read, unless it fell behind
            cpu_ms_per_utterance=None
            if own0 is None or own1 is None
            else round((own1 - own0) / sent * 1e3, 3),
            cpu_share=share,
        )
        if before and after:
            worker_figures(st, before, after)
        return st

    def latencies(self, idents: list[tuple[str, int]]) -> list[float]:
        """Sorted send -> receive seconds; inf for events not received (yet)."""
        got = self.receiver.received
        return sorted(got.get(i, math.inf) - self.sent[i] for i in idents)

    async def capacity(self, backlog: int) -> dict[str, Any]:
        """Send ``backlog`` utterances at once; the rate the stage clears them at
        (its throughput with no latency bound: batches grow to the maximum)."""
        msgs = self.calls.build(backlog)
        gc.collect()
        gc.freeze()
        before = await self.scrape()
        cpu0 = cpu_seconds(self.proc.pid)
        t0 = time.perf_counter()
        await offer(self.producer, self.in_topic, msgs, math.inf, self.sent)
        idents = [m[2] for m in msgs]
        done = await self.receiver.wait_for(idents, t0 + self.args.drain_timeout_s)
        cpu1 = cpu_seconds(self.proc.pid)
        after = await self.scrape()
        gc.unfreeze()
        if not done:
            return {"backlog": backlog, "per_s": None, "note": "not cleared in time"}
        last = max(self.receiver.received[i] for i in idents)
        out: dict[str, Any] = {
            "backlog": backlog,
            "per_s": round(backlog / (last - t0), 1),
            "seconds": round(last - t0, 2),
            "cpu_ms_per_utterance": None
            if cpu0 is None or cpu1 is None
            else round((cpu1 - cpu0) / backlog * 1e3, 3),
        }
        if before and after:
            count = after["cfnesa_batch_size_count"] - before["cfnesa_batch_size_count"]
            total = after["cfnesa_batch_size_sum"] - before["cfnesa_batch_size_sum"]
            out["mean_batch_utterances"] = round(total / count, 1) if count else None
        return out

    async def drain(self) -> bool:
        """Wait for every event sent so far (a failed step leaves a backlog)."""
        return await self.receiver.wait_for(
            list(self.sent), time.perf_counter() + self.args.drain_timeout_s
        )


def worker_figures(st: Step, before: dict[str, float], after: dict[str, float]) -> None:
    """The worker's means over a step, from two scrapes of its /metrics."""

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    def mean(name: str, scale: float = 1.0) -> float | None:
        count = delta(f"{name}_count")
        return round(delta(f"{name}_sum") / count * scale, 2) if count else None

    st.mean_batch_utterances = mean("cfnesa_batch_size")
    st.mean_step_ms = mean("cfnesa_step_seconds", 1e3)
    st.mean_batch_ms = mean("cfnesa_batch_seconds", 1e3)
    batches = delta("cfnesa_batch_seconds_count")
    utterances = delta("cfnesa_events_in_total{type=utterance}")
    st.batches = int(batches)
    per_batch, per_utt = {}, {}
    for stage in STAGES:
        total = delta(f"cfnesa_stage_seconds_sum{{stage={stage}}}")
        per_batch[stage] = round(total / batches * 1e3, 3) if batches else math.nan
        per_utt[stage] = round(total / utterances * 1e3, 4) if utterances else math.nan
    st.breakdown_ms_per_batch = per_batch
    st.breakdown_ms_per_utterance = per_utt


async def mark(worker: Stage, rds: redis.Redis) -> dict[str, float]:
    """The counters behind the Redis bytes per utterance, now."""
    m = await worker.scrape()
    info = await asyncio.to_thread(rds.info, "stats")
    return {
        "utterances": m.get("cfnesa_events_in_total{type=utterance}", 0.0),
        "written": m.get("cfnesa_redis_bytes_written_total", 0.0),
        "net_input": float(info["total_net_input_bytes"]),
        "net_output": float(info["total_net_output_bytes"]),
    }


def redis_traffic(a: dict[str, float], b: dict[str, float]) -> dict[str, Any]:
    """Bytes per utterance between two marks: the worker's own count of what it
    wrote, and what redis-server received (INFO: commands, reads included) and sent."""
    n = b["utterances"] - a["utterances"]
    if n <= 0:
        return {"utterances": 0}
    return {
        "utterances": int(n),
        "metric": round((b["written"] - a["written"]) / n),
        "info_net_input": round((b["net_input"] - a["net_input"]) / n),
        "info_net_output": round((b["net_output"] - a["net_output"]) / n),
    }


async def redis_parts(rds: redis.Redis, prefix: str, calls: Calls) -> dict[str, Any]:
    """What a stored call holds (bytes by field, and the events list), over a sample
    of live calls: the make-up of the bytes written per utterance."""

    def one(cid: str) -> tuple[dict[bytes, bytes], list[bytes]]:
        state = rds.hgetall(f"{prefix}:{{{cid}}}:state")
        events = rds.lrange(f"{prefix}:{{{cid}}}:events", 0, -1)
        return state, events

    sizes: dict[str, list[int]] = {}
    event_sizes: list[int] = []
    for cid in calls.ids[:20]:
        state, events = await asyncio.to_thread(one, cid)
        for k, v in state.items():
            name = k.decode()
            name = "w*" if name.startswith("w") and name[1:].isdigit() else name
            sizes.setdefault(name, []).append(len(v))
        event_sizes.extend(len(e) for e in events)
    means = {k: round(sum(v) / len(v)) for k, v in sorted(sizes.items())}
    event = round(sum(event_sizes) / len(event_sizes)) if event_sizes else 0
    return {
        "field_mean_bytes": means,
        "event_mean_bytes": event,
        "events_per_call": round(len(event_sizes) / min(len(calls.ids), 20), 1),
        # what a call's write holds when a batch has one utterance of it (the common
        # case at one utterance per call every few seconds): the core, one window slot,
        # the tracker and one emotion event (alerts are rare); batches holding several
        # utterances of a call write the core and tracker once for all of them
        "one_utterance_write_bytes": {
            "core": means.get("core", 0),
            "window_slot": means.get("w*", 0),
            "app": means.get("app", 0),
            "event": event,
            "total": means.get("core", 0) + means.get("w*", 0) + means.get("app", 0) + event,
        },
    }


# ------------------------------------------------------------------ the run


def describe(st: Step) -> str:
    cpu = " ".join(f"{k} {v:.0%}" for k, v in st.cpu_share.items() if v is not None)
    line = (
        f"[{st.stage:8s}] offered {st.offered_per_s:6.0f}/s  achieved {st.achieved_per_s:7.1f}/s"
        f"  p50 {st.p50_ms:8.1f} ms  p99 {st.p99_ms:8.1f} ms  max {st.max_ms:8.1f} ms"
        f"  kept up {st.kept_up!s:5}  {'PASS' if st.passed else 'FAIL'}"
        f"  cpu/utt {st.cpu_ms_per_utterance} ms  cpu: {cpu}"
    )
    if st.breakdown_ms_per_batch is not None:
        parts = " ".join(f"{k} {v:.2f}" for k, v in st.breakdown_ms_per_batch.items())
        line += (
            f"\n[{st.stage:8s}]   batches {st.batches}, {st.mean_batch_utterances} utt,"
            f" {st.mean_batch_ms} ms poll-to-commit; ms per batch: {parts}"
        )
    if st.p99_ms_drained is not None:
        line += (
            f"\n[{st.stage:8s}]   (events of that step once drained: p50 {st.p50_ms_drained} ms,"
            f" p99 {st.p99_ms_drained} ms)"
        )
    return line


async def measured(stage: Stage, rate: float, notes: list[str]) -> Step:
    """One step at ``rate``, its drained latencies if it fell behind, printed."""
    st = await stage.step(rate)
    if await stage.drain():
        if not st.kept_up:
            late = stage.latencies(stage.last_measured)
            st.p50_ms_drained, st.p99_ms_drained = ms(pct(late, 0.5)), ms(pct(late, 0.99))
    else:
        notes.append(f"{stage.name} at {rate:g}/s: backlog not drained in time")
    print(describe(st), flush=True)
    return st


def pair(rate: float, pipe: Step, echo: Step) -> dict[str, Any]:
    """One offered rate's figures, as the JSON's ``rates`` list holds them."""

    def ratio(a: float, b: float) -> float | None:
        return round(a / b, 2) if math.isfinite(a) and math.isfinite(b) and b > 0 else None

    judged = math.isfinite(echo.p99_ms) and echo.p99_ms < RATIO_WHERE_ECHO_P99_MS
    p99_ratio = ratio(pipe.p99_ms, echo.p99_ms)
    return {
        "offered": rate,
        "pipeline_p50_ms": pipe.p50_ms,
        "pipeline_p99_ms": pipe.p99_ms,
        "echo_p50_ms": echo.p50_ms,
        "echo_p99_ms": echo.p99_ms,
        "p50_ratio": ratio(pipe.p50_ms, echo.p50_ms),
        "p99_ratio": p99_ratio,
        "pipeline_kept_up": pipe.kept_up,
        "echo_kept_up": echo.kept_up,
        "pipeline_passed": pipe.passed,
        "echo_passed": echo.passed,
        "ratio_target_applies": judged,
        "ratio_target_met": None
        if not judged
        else bool(p99_ratio is not None and pipe.kept_up and p99_ratio <= RATIO_GOAL),
        "pipeline_cpu_ms_per_utterance": pipe.cpu_ms_per_utterance,
        "echo_cpu_ms_per_utterance": echo.cpu_ms_per_utterance,
        "breakdown_ms_per_batch": pipe.breakdown_ms_per_batch,
        "breakdown_ms_per_utterance": pipe.breakdown_ms_per_utterance,
        "pipeline_mean_batch_utterances": pipe.mean_batch_utterances,
        "pipeline": asdict(pipe),
        "echo": asdict(echo),
    }


async def run(services: Services, procs: dict[str, tuple[Any, int | None]], args: Any) -> dict:
    """The interleaved steps, the echo's ladder, capacities and Redis figures, over the
    stages ``procs`` (name -> (process, metrics port)): "pipeline", "echo" and any
    ``--variant`` (pipeline-NAME)."""
    producer = AIOKafkaProducer(
        bootstrap_servers=services.bootstrap, linger_ms=2, max_batch_size=65_536
    )
    await producer.start()
    stages = [
        Stage(name, proc, port, stage_topics(name), producer, services, args)
        for name, (proc, port) in procs.items()
    ]
    by_name = {s.name: s for s in stages}
    pipe, echo = by_name["pipeline"], by_name["echo"]
    variants = [s for s in stages if s.name.startswith("pipeline-")]
    assert services.redis is not None
    rds = redis.Redis.from_url(services.redis.url)
    notes: list[str] = []
    rates: list[dict[str, Any]] = []
    echo_ladder: list[dict[str, Any]] = []

    async def interleaved(rate: float, turn: int) -> None:
        # rotate the order from rate to rate, so that no stage always goes first
        order = stages[turn % len(stages) :] + stages[: turn % len(stages)]
        got = {s.name: await measured(s, rate, notes) for s in order}
        entry = pair(rate, got["pipeline"], got["echo"])
        if variants:
            entry["variants"] = {v.name: pair(rate, got[v.name], got["echo"]) for v in variants}
        rates.append(entry)

    try:
        t0 = time.monotonic()
        for stage in stages:
            await stage.ready()
            # seq 0 of every call: the stage joins the group and loads its partitions
            await stage.unmeasured(args.calls, 500, within_s=120)
            await stage.unmeasured(int(RATES[0] * args.warmup_s), RATES[0], within_s=60)
            if not await stage.drain():
                raise RuntimeError(f"{stage.name}: warm-up events missing")
        print(f"all stages ready and warm after {time.monotonic() - t0:.1f} s", flush=True)
        marks = [await mark(pipe, rds)]
        for i, rate in enumerate(args.rates):
            await interleaved(rate, i)
        # the echo alone up the ladder, then every stage at the highest it sustains
        best: float | None = None
        for rate in (r for r in ECHO_LADDER if r > max(args.rates)):
            if args.no_ladder:
                break
            st = await measured(echo, rate, notes)
            echo_ladder.append(asdict(st))
            if not st.passed:
                break
            best = rate
        if best is not None:
            await interleaved(best, len(args.rates))
        await pipe.drain()
        marks.append(await mark(pipe, rds))
        parts = await redis_parts(rds, "bench-pipeline", pipe.calls)
        capacity = {}
        for stage in stages:
            probe = await stage.capacity(500)
            size = int(min(max(args.capacity_s * (probe["per_s"] or 0), 200), 30_000))
            capacity[stage.name] = await stage.capacity(size)
            print(
                f"[{stage.name:8s}] capacity (no latency bound): {capacity[stage.name]['per_s']}/s"
                f" clearing a backlog of {size}, cpu/utt "
                f"{capacity[stage.name]['cpu_ms_per_utterance']} ms",
                flush=True,
            )
            await stage.drain()
    finally:
        for stage in stages:
            await stage.close()
        await producer.stop()
        rds.close()
    return {
        "rates": rates,
        "echo_ladder": echo_ladder,
        "echo_highest_sustained_per_s": best,
        "capacity_no_latency_bound": capacity,
        "redis": {
            **redis_traffic(marks[0], marks[1]),
            "stored_call": parts,
            **(
                {"note": "info_net_* count every worker's traffic (the variants' too)"}
                if variants
                else {}
            ),
        },
        "model": pipe.receiver.model,
        "utterances_sent": {s.name: len(s.sent) for s in stages},
        "variants": {v.name: dict(args.variants[v.name]) for v in variants},
        "notes": notes,
    }


def stage_topics(name: str) -> tuple[str, str]:
    """A stage's input and output topics (the pipeline keeps its historical names)."""
    if name == "pipeline":
        return "bench-features", "bench-events"
    if name == "echo":
        return "echo-in", "echo-out"
    return f"bench-{name}-features", f"bench-{name}-events"


def stage_env(
    services: Services, args: Any, extra: dict[str, str] | None = None, **topics: str
) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "CFNESA_KAFKA_BOOTSTRAP": services.bootstrap,
            "CFNESA_REDIS_URL": services.redis_url,
            "CFNESA_SESSION_TIMEOUT_MS": "3000",
            "CFNESA_HEARTBEAT_INTERVAL_MS": "500",
            "CFNESA_REBALANCE_TIMEOUT_MS": "3000",
            "CFNESA_TORCH_THREADS": str(args.torch_threads),
            "CFNESA_LOG_LEVEL": "WARNING",
        }
    )
    env.update(dict(args.worker_env))
    env.update(extra or {})
    env.update(topics)
    return env


def measure(args: Any, logs: Path) -> dict[str, Any]:
    """Every stage on one set of services. Services and processes start on the main
    thread (their PR_SET_PDEATHSIG is tied to the thread that forks)."""
    names = ["pipeline", "echo", *args.variants]
    topics = {"echo-in.dlq": 1}
    for name in names:
        for t in stage_topics(name):
            topics[t] = PARTITIONS
        if name != "echo":
            topics[f"{stage_topics(name)[0]}.dlq"] = 1
    with Services(log_dir=logs, topics=topics) as services:
        procs: dict[str, tuple[Any, int | None]] = {}
        try:
            for name in names:
                source, sink = stage_topics(name)
                if name == "echo":
                    env = stage_env(
                        services,
                        args,
                        CFNESA_INPUT_TOPIC=source,
                        CFNESA_OUTPUT_TOPIC=sink,
                        CFNESA_DLQ_TOPIC="echo-in.dlq",
                        CFNESA_GROUP_ID="bench-echo",
                        CFNESA_METRICS_PORT="0",
                    )
                    procs[name] = (spawn_echo(env, logs / "echo.log"), None)
                    continue
                port = free_port()
                env = stage_env(
                    services,
                    args,
                    args.variants.get(name),
                    CFNESA_INPUT_TOPIC=source,
                    CFNESA_OUTPUT_TOPIC=sink,
                    CFNESA_DLQ_TOPIC=f"{source}.dlq",
                    CFNESA_GROUP_ID=f"bench-{name}",
                    CFNESA_KEY_PREFIX=f"bench-{name}",
                    CFNESA_METRICS_PORT=str(port),
                )
                procs[name] = (spawn(["worker"], env, logs / f"{name}.log"), port)
            return asyncio.run(run(services, procs, args))
        finally:
            stop([p for p, _ in procs.values()])


def variant(text: str) -> tuple[str, dict[str, str]]:
    """``NAME:CFNESA_X=V[,CFNESA_Y=W]`` -> ("pipeline-NAME", settings)."""
    name, colon, rest = text.partition(":")
    if not colon or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME:CFNESA_X=V[,...], got {text!r}")
    return f"pipeline-{name}", dict(env_pair(item) for item in rest.split(",") if item)


def env_pair(text: str) -> tuple[str, str]:
    name, eq, value = text.partition("=")
    if not eq or not name.startswith("CFNESA_"):
        raise argparse.ArgumentTypeError(f"expected CFNESA_NAME=VALUE, got {text!r}")
    return name, value


def targets(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, each with what this run measured and whether it is met."""
    judged = [r for r in result["rates"] if r["ratio_target_applies"]]
    at_cpu = next((r for r in result["rates"] if r["offered"] == CPU_RATE), None)
    cpu = at_cpu["pipeline_cpu_ms_per_utterance"] if at_cpu else None
    written = result["redis"].get("metric")
    return {
        "p99_ratio": {
            "goal": f"pipeline p99 <= {RATIO_GOAL}x the echo's at every rate where the echo's "
            f"p99 < {RATIO_WHERE_ECHO_P99_MS:g} ms",
            "measured": {str(r["offered"]): r["p99_ratio"] for r in judged},
            "met": bool(judged) and all(r["ratio_target_met"] for r in judged),
        },
        "cpu_ms_per_utterance_at_500": {
            "goal": f"<= {CPU_GOAL_MS} ms",
            "measured": cpu,
            "met": cpu is not None and cpu <= CPU_GOAL_MS,
        },
        "redis_bytes_per_utterance": {
            "goal": f"<= {REDIS_GOAL_BYTES}",
            "measured": written,
            "met": written is not None and written <= REDIS_GOAL_BYTES,
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short steps (smoke run)")
    parser.add_argument("--calls", type=int, default=200, help="concurrent calls")
    parser.add_argument(
        "--rates",
        default=",".join(str(r) for r in RATES),
        help="offered rates, utterances/s, comma-separated (both stages, interleaved)",
    )
    parser.add_argument(
        "--no-ladder", action="store_true", help="skip the echo's ladder above the rates"
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=DEFAULT_TORCH_THREADS,
        help="the worker's CFNESA_TORCH_THREADS (0: torch's default)",
    )
    parser.add_argument("--step-s", type=float, help="measured seconds per step")
    parser.add_argument(
        "--worker-env",
        action="append",
        default=[],
        type=env_pair,
        metavar="CFNESA_X=VALUE",
        help="extra setting for the worker and the echo (repeatable)",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        type=variant,
        metavar="NAME:CFNESA_X=V[,...]",
        help="one more worker, pipeline-NAME, with these settings, interleaved with the "
        "others at every rate (a lever measured against the defaults in the same run)",
    )
    parser.add_argument("--no-write", action="store_true", help="print only, write no JSON")
    args = parser.parse_args()
    args.variants = dict(args.variant)
    args.rates = [float(r) for r in args.rates.split(",") if r.strip()]
    args.step_s = args.step_s or (4.0 if args.quick else 10.0)
    args.step_warmup_s = 0.5 if args.quick else 1.0
    args.warmup_s = 1.0 if args.quick else 3.0
    args.drain_timeout_s = 180.0  # a step the pipeline cannot sustain leaves a backlog
    args.capacity_s = 2.5 if args.quick else 5.0

    cpus = os.cpu_count()
    print(
        f"{args.calls} concurrent calls per stage, text-only {TEXT_DIM}-d features, "
        f"{PARTITIONS} partitions, one worker (CFNESA_TORCH_THREADS={args.torch_threads}) and "
        f"one echo on the same broker; steps of {args.step_s:g} s; pass: p99 < "
        f"{P99_LIMIT_S * 1e3:.0f} ms and all events out within the step + {KEEP_UP_S:g} s.\n"
        f"NOTE: the load generator and consumers (this process), the broker, Redis, the "
        f"worker and the echo all share this machine's {cpus} cores.",
        flush=True,
    )
    warn_if_busy()
    load_at_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    logs = Path(tempfile.mkdtemp(prefix="cfnesa-bench-"))
    print(f"logs in {logs}", flush=True)
    result = measure(args, logs)
    goals = targets(result)

    print()
    print(
        f"{'offered/s':>10s}{'pipe p50':>10s}{'pipe p99':>10s}{'echo p50':>10s}{'echo p99':>10s}"
        f"{'p50 x':>8s}{'p99 x':>8s}{'pipe cpu/utt':>14s}{'echo cpu/utt':>14s}"
    )
    for r in result["rates"]:
        for label, row in [("", r), *((f" {k}", v) for k, v in r.get("variants", {}).items())]:
            print(
                f"{row['offered']:>10g}{row['pipeline_p50_ms']:>10g}{row['pipeline_p99_ms']:>10g}"
                f"{row['echo_p50_ms']:>10g}{row['echo_p99_ms']:>10g}"
                f"{row['p50_ratio'] or math.nan:>8.2f}{row['p99_ratio'] or math.nan:>8.2f}"
                f"{row['pipeline_cpu_ms_per_utterance'] or math.nan:>12.3f}ms"
                f"{row['echo_cpu_ms_per_utterance'] or math.nan:>12.3f}ms{label}"
            )
    at = next((r for r in result["rates"] if r["offered"] == CPU_RATE), None)
    if at and at["breakdown_ms_per_utterance"]:
        print(f"\nwhere the worker's time goes at {CPU_RATE}/s (ms per batch / per utterance):")
        for stage in STAGES:
            print(
                f"  {stage:11s}{at['breakdown_ms_per_batch'][stage]:>9.3f}"
                f"{at['breakdown_ms_per_utterance'][stage]:>10.4f}"
            )
    red = result["redis"]
    print(
        f"\nRedis bytes written per utterance: {red.get('metric')} (metric), "
        f"{red.get('info_net_input')} (INFO net input); a stored call: {red['stored_call']}"
    )
    for k, v in result["capacity_no_latency_bound"].items():
        print(f"capacity (no latency bound) {k}: {v}")
    for k, v in goals.items():
        print(
            f"target {k}: {v['goal']}; measured {v['measured']}; {'MET' if v['met'] else 'NOT MET'}"
        )

    record = {
        "benchmark": "pipeline",
        "commit": git("rev-parse", "--short", "HEAD"),
        "dirty_tree": bool(git("status", "--porcelain", "--untracked-files=no")),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(
            shared="load generator, consumers, broker (Tansu), Redis, the worker and the "
            "echo all run on these cores",
            load_average_at_start=[round(x, 2) for x in load_at_start] if load_at_start else None,
        ),
        "setup": {
            "calls": args.calls,
            "features": f"text only, {TEXT_DIM}-d float32, base64",
            "partitions": PARTITIONS,
            "workers": 1,
            "torch_threads": args.torch_threads,
            "torch_threads_trial": TORCH_THREADS_TRIAL,
            "worker_env_extra": dict(args.worker_env),
            "step_s": args.step_s,
            "step_warmup_s": args.step_warmup_s,
            "pass": f"p99 < {P99_LIMIT_S * 1e3:.0f} ms and all events out within the "
            f"step + {KEEP_UP_S:g} s",
            "latency": "producer.send of the input -> output event consumed, one clock",
            "producer": "aiokafka, linger_ms=2, keyed by conversation id",
            "echo": "benchmarks/echo.py: the worker's Kafka clients and StreamCore loop, "
            "no model, no Redis; same broker, own topics and group",
            "interleaving": "per rate one step of each, back to back, order alternating",
            "cpu_per_utterance": "the stage process's user+system CPU over the step "
            "(sending and the wait for every event) / utterances sent",
        },
        "quick": args.quick,
        **result,
        "ratios": {
            "p99_pipeline_vs_echo": {str(r["offered"]): r["p99_ratio"] for r in result["rates"]},
            "p50_pipeline_vs_echo": {str(r["offered"]): r["p50_ratio"] for r in result["rates"]},
        },
        "targets": goals,
    }
    if not args.no_write:
        write_result("pipeline", record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
