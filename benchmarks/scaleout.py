"""Scale-out: how the pipeline's throughput grows from 1 to 2 worker processes.

Workers scale the Kafka way: one consumer group over a topic with 12 partitions,
each worker a separate ``cfnesa worker`` process with the shipped model. For each
shape (below) on fresh embedded services, this process sends a backlog of
synthetic text-only utterances from N concurrent calls at once and times how fast
emotion events come back (the capacity with no latency bound: batches grow to the
maximum). Each shape gets a warm-up backlog first (states created, caches warm),
then ``--repeats`` measured backlogs; the median counts.

Shapes:

- 1 worker x 1 torch thread;
- 1 worker x 2 torch threads (torch's intra-op parallelism instead of processes);
- 2 workers x 1 torch thread each.

Ratios against the first shape, in the same run: the scale-out factor on this
machine. Everything shares the 2 cores: the broker, Redis and this load generator
take their share, so 2 workers cannot reach 2x here; the per-worker CPU
(user+system seconds per second, from /proc) says what one worker costs, which is
what sizing needs: utterances per worker-core-second.

Usage: python benchmarks/scaleout.py [--quick] [--calls 400] [--backlog-s 6]
Writes benchmarks/results/scaleout-<date>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import git, machine, warn_if_busy, write_result  # noqa: E402 (benchmarks/common.py)
from pipeline import Calls, Receiver, cpu_seconds, offer  # noqa: E402 (benchmarks/pipeline.py)

from streaming.embedded import Services, free_port  # noqa: E402
from workers.processes import http_get, spawn, stop  # noqa: E402

PARTITIONS = 12
SHAPES: dict[str, tuple[int, int]] = {  # name -> (workers, torch threads each)
    "1 worker x 1 thread": (1, 1),
    "1 worker x 2 threads": (1, 2),
    "2 workers x 1 thread": (2, 1),
}
BASELINE = "1 worker x 1 thread"


def worker_env(services: Services, port: int, threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "CFNESA_KAFKA_BOOTSTRAP": services.bootstrap,
            "CFNESA_REDIS_URL": services.redis_url,
            "CFNESA_INPUT_TOPIC": "bench-features",
            "CFNESA_OUTPUT_TOPIC": "bench-events",
            "CFNESA_DLQ_TOPIC": "bench-features.dlq",
            "CFNESA_GROUP_ID": "bench-scaleout",
            "CFNESA_KEY_PREFIX": "bench-scaleout",
            "CFNESA_METRICS_PORT": str(port),
            "CFNESA_SESSION_TIMEOUT_MS": "3000",
            "CFNESA_HEARTBEAT_INTERVAL_MS": "500",
            "CFNESA_REBALANCE_TIMEOUT_MS": "3000",
            "CFNESA_TORCH_THREADS": str(threads),
            "CFNESA_LOG_LEVEL": "INFO",
        }
    )
    return env


async def drain_rate(
    producer: AIOKafkaProducer, receiver: Receiver, calls: Calls, backlog: int, pids: list[int]
) -> dict[str, Any]:
    """Send ``backlog`` utterances at once; the rate their events come back at."""
    msgs = calls.build(backlog)
    gc.collect()
    cpu0 = [cpu_seconds(p) or 0.0 for p in pids]
    t0 = time.perf_counter()
    await offer(producer, "bench-features", msgs, math.inf, {})
    idents = [m[2] for m in msgs]
    if not await receiver.wait_for(idents, t0 + 120):
        return {"backlog": backlog, "per_s": None, "note": "not cleared in 120 s"}
    last = max(receiver.received[i] for i in idents)
    wall = last - t0
    cpu = [(cpu_seconds(p) or 0.0) - c for p, c in zip(pids, cpu0, strict=True)]
    return {
        "backlog": backlog,
        "seconds": round(wall, 2),
        "per_s": round(backlog / wall, 1),
        "worker_cpu_cores": [round(c / wall, 2) for c in cpu],
        "per_worker_core_s": round(backlog / sum(cpu), 1) if sum(cpu) else None,
    }


async def run_shape(
    services: Services, workers: list[Any], ports: list[int], args: Any
) -> dict[str, Any]:
    deadline = time.monotonic() + 180
    for w, port in zip(workers, ports, strict=True):
        while (await asyncio.to_thread(http_get, port, "/healthz"))[0] != 200:
            if w.poll() is not None:
                raise RuntimeError(f"a worker exited with {w.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError("a worker did not become healthy")
            await asyncio.sleep(0.2)
    await asyncio.sleep(4)  # the group settles: every worker holds partitions
    producer = AIOKafkaProducer(
        bootstrap_servers=services.bootstrap, linger_ms=2, max_batch_size=65_536
    )
    receiver = Receiver(services.bootstrap, "bench-events")
    await producer.start()
    await receiver.start()
    try:
        calls = Calls(args.calls)
        backlog = int(args.backlog_s * args.expected_per_s)
        warm = await drain_rate(producer, receiver, calls, backlog // 2, [w.pid for w in workers])
        runs = [
            await drain_rate(producer, receiver, calls, backlog, [w.pid for w in workers])
            for _ in range(args.repeats)
        ]
    finally:
        await producer.stop()
        await receiver.stop()
    rates = [r["per_s"] for r in runs if r["per_s"]]
    return {
        "warmup": warm,
        "runs": runs,
        "median_per_s": statistics.median(rates) if rates else None,
        "median_per_worker_core_s": statistics.median(
            [r["per_worker_core_s"] for r in runs if r.get("per_worker_core_s")] or [0]
        ),
    }


def measure(name: str, n_workers: int, threads: int, args: Any, logs: Path) -> dict[str, Any]:
    topics = {"bench-features": PARTITIONS, "bench-events": PARTITIONS, "bench-features.dlq": 1}
    folder = logs / name.replace(" ", "")
    folder.mkdir(parents=True, exist_ok=True)
    with Services(log_dir=folder, topics=topics) as services:
        ports = [free_port() for _ in range(n_workers)]
        workers = [
            spawn(["worker"], worker_env(services, p, threads), folder / f"worker-{i}.log")
            for i, p in enumerate(ports)
        ]
        try:
            result = asyncio.run(run_shape(services, workers, ports, args))
        finally:
            stop(workers)
    result.update({"workers": n_workers, "torch_threads": threads})
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short backlogs (smoke run)")
    parser.add_argument("--calls", type=int, default=400, help="concurrent calls")
    parser.add_argument("--backlog-s", type=float, help="backlog size in seconds of work")
    parser.add_argument("--repeats", type=int, help="measured backlogs per shape")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated")
    parser.add_argument("--no-write", action="store_true", help="print only, write no JSON")
    args = parser.parse_args()
    args.backlog_s = args.backlog_s or (2.0 if args.quick else 6.0)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.expected_per_s = 1200  # sizes the backlogs: about backlog_s of one worker's work
    names = [n.strip() for n in args.shapes.split(",") if n.strip()]
    unknown = set(names) - set(SHAPES)
    if unknown:
        parser.error(f"unknown shapes {sorted(unknown)}; known: {sorted(SHAPES)}")

    cpus = os.cpu_count()
    print(
        f"{args.calls} concurrent calls, text-only, {PARTITIONS} partitions; backlogs of "
        f"~{args.backlog_s:g} s of one worker's work, {args.repeats} measured per shape.\n"
        f"NOTE: the broker, Redis, this load generator and the workers share {cpus} cores.",
        flush=True,
    )
    warn_if_busy()
    logs = Path(tempfile.mkdtemp(prefix="cfnesa-bench-scaleout-"))
    print(f"logs in {logs}", flush=True)
    results: dict[str, Any] = {}
    for name in names:
        n_workers, threads = SHAPES[name]
        results[name] = measure(name, n_workers, threads, args, logs)
        r = results[name]
        print(
            f"  {name:22s} median {r['median_per_s']} utt/s  "
            f"({', '.join(str(x['per_s']) for x in r['runs'])}); "
            f"worker CPU cores {[x.get('worker_cpu_cores') for x in r['runs']][-1]}; "
            f"{r['median_per_worker_core_s']} utt per worker-CPU-second",
            flush=True,
        )
    ratios = {}
    base = results.get(BASELINE, {}).get("median_per_s")
    for name, r in results.items():
        if name != BASELINE and base and r["median_per_s"]:
            ratios[f"{name} vs {BASELINE}"] = round(r["median_per_s"] / base, 2)
    print()
    for key, value in ratios.items():
        print(f"{key:50s} {value}x")

    record = {
        "benchmark": "scaleout",
        "commit": git("rev-parse", "--short", "HEAD"),
        "dirty_tree": bool(git("status", "--porcelain", "--untracked-files=no")),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(
            shared="broker (Tansu), Redis, load generator and workers all run on these cores"
        ),
        "settings": {
            "calls": args.calls,
            "partitions": PARTITIONS,
            "backlog_s": args.backlog_s,
            "repeats": args.repeats,
            "quick": args.quick,
        },
        "shapes": results,
        "ratios": ratios,
    }
    if not args.no_write:
        write_result("scaleout", record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
