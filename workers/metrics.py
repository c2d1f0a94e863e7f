"""The worker's and the featurizer's Prometheus metrics, and their small HTTP endpoint
(/metrics, /healthz)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# stages are shorter than whole batches: finer at the bottom
_STAGE_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
    5.0,
)
# The stages of one worker batch, in loop order (cfnesa_stage_seconds{stage}):
#   poll_wait  waiting for the batch's first record (idle time included)
#   batch_fill after the first record, waiting up to max_wait_ms for more
#   validate   parse, validate and decode the records, group by call
#   load       conversations from the cache or Redis
#   step       the model step (in the executor thread, awaited)
#   events     model results to output events, alerts and the state write
#   persist    the compare-and-set round trip to Redis
#   outputs    re-emitted duplicates, dead letters, per-event metrics
#   produce    send the outputs and await the acknowledgements
#   commit     the offset commit
STAGES = (
    "poll_wait",
    "batch_fill",
    "validate",
    "load",
    "step",
    "events",
    "persist",
    "outputs",
    "produce",
    "commit",
)


class WorkerMetrics:
    """One registry per worker (tests run several workers in one process)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.events_in = Counter(
            "cfnesa_events_in", "Input events read, by type", ["type"], registry=r
        )
        self.events_out = Counter(
            "cfnesa_events_out", "Output events produced, by type", ["type"], registry=r
        )
        self.emotions = Counter(
            "cfnesa_emotions",
            "Utterances applied, by predicted emotion (re-emitted duplicates not counted)",
            ["emotion"],
            registry=r,
        )
        self.alerts = Counter(
            "cfnesa_alerts",
            "Alerts fired, by rule (re-emitted duplicates not counted)",
            ["rule"],
            registry=r,
        )
        self.duplicates = Counter(
            "cfnesa_duplicates", "Input events already processed (seq <= last)", registry=r
        )
        self.gaps = Counter("cfnesa_gaps", "Utterances processed after a seq gap", registry=r)
        self.dead_letters = Counter(
            "cfnesa_dead_letters",
            "Input events sent to the dead-letter topic",
            ["reason"],
            registry=r,
        )
        self.state_resets = Counter(
            "cfnesa_state_resets",
            "Stored states refused and reset, by reason",
            ["reason"],
            registry=r,
        )
        self.conflicts = Counter(
            "cfnesa_state_conflicts",
            "Compare-and-set conflicts (stale cache or replay)",
            registry=r,
        )
        self.outages = Counter(
            "cfnesa_outages",
            "Batches retried after Redis or Kafka failed",
            ["service"],
            registry=r,
        )
        self.commit_failures = Counter(
            "cfnesa_commit_failures", "Offset commits refused (rebalance)", registry=r
        )
        self.redis_bytes = Counter(
            "cfnesa_redis_bytes_written", "Bytes of state and events written to Redis", registry=r
        )
        self.batch_size = Histogram(
            "cfnesa_batch_size",
            "Utterances per model step",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=r,
        )
        self.step_seconds = Histogram(
            "cfnesa_step_seconds", "Model step latency", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.batch_seconds = Histogram(
            "cfnesa_batch_seconds",
            "Whole batch latency (poll to commit)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e_seconds = Histogram(
            "cfnesa_end_to_end_seconds",
            "Input produced to emotion event produced",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_seconds = Histogram(
            "cfnesa_stage_seconds",
            "Where a batch's time goes, by stage (STAGES): each observed once per batch",
            ["stage"],
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        for stage in STAGES:  # exported from the start, zero until observed
            self.stage_seconds.labels(stage)
        # process_cpu_seconds_total & co.: CPU per utterance is its rate over
        # cfnesa_events_in_total's (Linux only; elsewhere the collector exports nothing)
        ProcessCollector(registry=r)
        self.lag = Gauge(
            "cfnesa_consumer_lag", "Input events not yet read, all partitions", registry=r
        )
        self.cached_states = Gauge(
            "cfnesa_cached_states", "Conversation states in memory", registry=r
        )
        self.last_batch = Gauge(
            "cfnesa_last_batch_timestamp", "Unix time of the last batch", registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def timing(self, stage: str, seconds: float) -> None:
        """Observe ``seconds`` spent in ``stage`` (one of STAGES) by one batch."""
        self.stage_seconds.labels(stage).observe(seconds)


class FeaturizerMetrics:
    """One registry per featurizer (tests run several in one process)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.utterances = Counter(
            "cfnesa_featurizer_utterances", "Feature events produced", registry=r
        )
        self.ends = Counter("cfnesa_featurizer_ends", "End events forwarded", registry=r)
        self.batches = Counter("cfnesa_featurizer_batches", "Batches committed", registry=r)
        self.dead_letters = Counter(
            "cfnesa_featurizer_dead_letters",
            "utterance-text messages sent to the dead-letter topic, by reason",
            ["reason"],
            registry=r,
        )
        self.outages = Counter(
            "cfnesa_featurizer_outages",
            "Batch steps retried after Redis or Kafka failed",
            ["service"],
            registry=r,
        )
        self.commit_failures = Counter(
            "cfnesa_featurizer_commit_failures", "Offset commits refused (rebalance)", registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


async def serve_ops(
    host: str,
    port: int,
    metrics: WorkerMetrics | FeaturizerMetrics,
    health: Callable[[], tuple[bool, dict]],
) -> asyncio.Server:
    """Serve GET /metrics (Prometheus text) and GET /healthz (200 or 503, JSON)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = line.decode("latin-1").split()
            path = parts[1].split("?")[0] if len(parts) >= 2 else ""
            if path == "/metrics":
                status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, metrics.render()
            elif path == "/healthz":
                ok, detail = health()
                status = "200 OK" if ok else "503 Service Unavailable"
                ctype, body = "application/json", json.dumps(detail).encode()
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"not found\n"
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host, port)
    log.info("metrics on http://%s:%d/metrics", host, server.sockets[0].getsockname()[1])
    return server
