"""`cfnesa demo`: the whole pipeline on embedded services, live in the terminal.

    embedded Tansu + redis-server
    replay (test conversations as live calls) -> utterance-text
    cfnesa featurize (MiniLM)                 -> utterance-features
    cfnesa worker (CFN-ESA, Redis state)      -> emotion-events
    cfnesa gateway                            -> the live dashboard (URL with a token printed)
    this process prints the emotion events, alerts and summaries as they arrive

Ctrl-C stops everything within a few seconds: the child processes get SIGTERM
(and die with this process anyway: PR_SET_PDEATHSIG), the services are stopped.

The embedded services speak plaintext on loopback, so the demo and its children
run with every TLS / SASL / Redis credential setting at its default, whatever the
shell exports (a terminal set up for production must not point them elsewhere).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

from aiokafka import AIOKafkaConsumer

from streaming.embedded import Services, free_port
from streaming.events import SummaryEvent, load_output
from streaming.gateway.auth import TokenSigner
from streaming.security import PLAINTEXT, kafka_client_options, start_kafka_client
from streaming.settings import Settings
from workers.processes import http_get, spawn
from workers.processes import stop as stop_processes
from workers.tail import format_event


def _env(settings: Settings) -> dict[str, str]:
    # the children read their settings from here: no security setting leaks in
    security = {f"CFNESA_{name.upper()}" for name in PLAINTEXT}
    env = {k: v for k, v in os.environ.items() if k not in security}
    env.update(
        {
            "CFNESA_GATEWAY_SECRET": settings.gateway_secret or "",
            "CFNESA_GATEWAY_PORT": str(settings.gateway_port),
            "CFNESA_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "CFNESA_REDIS_URL": settings.redis_url,
            "CFNESA_METRICS_PORT": str(settings.metrics_port),
            "CFNESA_FEATURIZER_METRICS_PORT": str(settings.featurizer_metrics_port),
            "CFNESA_INCLUDE_TEXT": "true" if settings.include_text else "false",
            "CFNESA_ANALYZE_ROLES": settings.analyze_roles,
            "CFNESA_LOG_LEVEL": "WARNING",
            "CFNESA_SESSION_TIMEOUT_MS": "3000",
            "CFNESA_HEARTBEAT_INTERVAL_MS": "500",
        }
    )
    if settings.checkpoint is not None:
        env["CFNESA_CHECKPOINT"] = str(settings.checkpoint)
    return env


async def _wait_ready(port: int, procs: list[subprocess.Popen[bytes]], logs: Path) -> None:
    deadline = time.monotonic() + 120
    while (await asyncio.to_thread(http_get, port, "/healthz", 1.0))[0] != 200:
        for p in procs:
            if p.poll() is not None:
                raise SystemExit(f"cfnesa demo: a pipeline process exited; see {logs}")
        if time.monotonic() > deadline:
            raise SystemExit(f"cfnesa demo: the worker did not become ready; see {logs}")
        await asyncio.sleep(0.3)


async def _show(
    settings: Settings, stop: asyncio.Event, out: TextIO, color: bool, counts: dict[str, Any]
) -> None:
    security = kafka_client_options(settings)
    consumer = AIOKafkaConsumer(
        settings.output_topic,
        bootstrap_servers=settings.bootstrap_servers(),
        group_id=None,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=settings.fetch_max_wait_ms,
        enable_auto_commit=False,
        **security,
    )
    await start_kafka_client(consumer, settings.bootstrap_servers(), security)
    try:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=200)
            for rec in (r for part in batches.values() for r in part):
                try:
                    event = load_output(rec.value or b"")
                except ValueError:
                    continue
                counts[event.type] = counts.get(event.type, 0) + 1
                if isinstance(event, SummaryEvent):
                    counts.setdefault("ended", set()).add(event.conversation_id)
                print(format_event(event, color), file=out, flush=True)
    finally:
        with contextlib.suppress(Exception):
            await consumer.stop()


async def run_demo(
    *,
    data: Path,
    split: str = "test",
    calls: int = 6,
    rate: float = 6.0,
    limit: int | None = None,
    checkpoint: Path | None = None,
    out: TextIO = sys.stdout,
    color: bool | None = None,
    stop: asyncio.Event | None = None,
    gateway_port: int | None = None,
    analyze_roles: str | None = None,
) -> dict[str, Any]:
    """Run the demo until ``stop`` (or, with ``limit``, until those calls ended).

    ``analyze_roles`` is the worker's CFNESA_ANALYZE_ROLES (None: every role).
    """
    from model.data import read_transcripts
    from workers.replay import ROLE_RULES, replay

    stop = stop or asyncio.Event()
    color = out.isatty() if color is None else color
    dialogues = [d for d in read_transcripts(data) if d.split == split]
    if not dialogues:
        raise SystemExit(f"cfnesa demo: no dialogue of split {split!r} in {data}")
    if limit is not None:
        dialogues = dialogues[:limit]
    logs = Path(tempfile.mkdtemp(prefix="cfnesa-demo-"))
    base = Settings(**PLAINTEXT)
    topics = {
        base.input_topic: 4,
        base.output_topic: 4,
        base.dlq_topic: 1,
        base.text_topic: 4,
        f"{base.text_topic}.dlq": 1,
    }
    print("starting embedded Kafka (Tansu) and redis-server ...", file=out, flush=True)
    services = await asyncio.to_thread(Services(log_dir=logs, topics=topics).start)
    procs: list[subprocess.Popen[bytes]] = []
    counts: dict[str, Any] = {}
    try:
        settings = Settings(
            **PLAINTEXT,
            kafka_bootstrap=services.bootstrap,
            redis_url=services.redis_url,
            metrics_port=free_port(),
            featurizer_metrics_port=free_port(),
            include_text=True,
            checkpoint=checkpoint,
            gateway_port=gateway_port or free_port(),
            gateway_secret=secrets.token_urlsafe(32),
            analyze_roles=analyze_roles or Settings().analyze_roles,
        )
        env = _env(settings)
        procs.append(spawn(["worker"], env, logs / "worker.log"))
        procs.append(
            spawn(
                ["featurize", "--bootstrap", settings.kafka_bootstrap], env, logs / "featurize.log"
            )
        )
        procs.append(spawn(["gateway"], env, logs / "gateway.log"))
        assert settings.gateway_secret is not None
        token = TokenSigner(settings.gateway_secret).mint(
            "default", all_conversations=True, ttl_s=12 * 3600
        )
        dashboard = f"http://127.0.0.1:{settings.gateway_port}/?token={token}"
        print(
            f"  kafka   {settings.kafka_bootstrap}\n  redis   {settings.redis_url}\n"
            f"  metrics http://127.0.0.1:{settings.metrics_port}/metrics\n  logs    {logs}\n"
            "loading the model and the text encoder ...",
            file=out,
            flush=True,
        )
        await _wait_ready(settings.metrics_port, procs, logs)
        print(f"\ndashboard: {dashboard}\n", file=out, flush=True)
        counts["dashboard"] = dashboard
        print(
            f"replaying {len(dialogues)} {split} conversations of {data.name} as {calls} live "
            f"calls at {rate:g} utterances/s (Ctrl-C stops)\n"
            f"roles: {ROLE_RULES['first-agent']}; emotions inferred for: "
            f"{settings.analyze_roles.replace(',', ', ')}"
            + ("" if analyze_roles else " (--analyze-roles customer leaves the agent out)")
            + "\n",
            file=out,
            flush=True,
        )
        shown = asyncio.create_task(_show(settings, stop, out, color, counts))
        stats = await replay(
            settings,
            dialogues,
            calls=calls,
            rate=rate,
            mode="text",
            loop=limit is None,
            progress=False,
            stop=stop,
        )
        if limit is not None and not stop.is_set():
            wanted = set(stats.conversation_ids)
            deadline = time.monotonic() + 120
            while not wanted <= counts.get("ended", set()) and time.monotonic() < deadline:
                if stop.is_set():
                    break
                await asyncio.sleep(0.2)
        stop.set()
        await shown
    finally:
        stop.set()
        await asyncio.to_thread(stop_processes, procs)
        await asyncio.to_thread(services.close)
    print(
        f"\ndemo stopped: {counts.get('emotion', 0)} emotion events, "
        f"{counts.get('alert', 0)} alerts, {counts.get('summary', 0)} call summaries",
        file=out,
        flush=True,
    )
    return counts
