"""The emotion worker: Kafka in, Redis state, batched incremental inference, events out.

One batch, as `Worker.process` reads (the order around it, poll -> process ->
produce -> commit, is `streaming.processor.StreamCore`'s)::

    intake -> load conversations -> plan -> model step -> outcomes
           -> persist (compare-and-set) -> outputs (re-emitted, new, dead letters)

Correctness comes from the compare-and-set and from deterministic event ids,
not from Kafka transactions (the embedded broker has none):

- Persist happens before produce, and the stored state carries the output
  events. A crash after persist and before produce or commit replays the
  input; its seq is then <= the stored seq, so it is a duplicate: the state is
  not touched and the stored events are produced again, with the same ids and
  the same content.
- A cached state is only a shortcut: every write names the seq it was computed
  from, and Redis refuses it when that is not the stored seq. The worker then
  forgets the cache entry, reloads and redoes that conversation; conflicts that
  persist make the whole batch wait and retry (`StateConflictError`, transient).
- Redis or Kafka down, a cluster slot moving: the batch is retried with backoff
  and /healthz says why and since when; offsets are committed only after its
  outputs are produced.
- What waiting does not fix (a wrong password, a missing topic, a refused request)
  stops the worker: `cfnesa worker` exits 1 (`streaming.errors.FatalError`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiokafka import ConsumerRebalanceListener
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord

from model.engine import StreamingEngine, Utterance, UtteranceResult
from model.errors import CFNESAError
from model.state import ConversationState
from streaming.alerts import AlertRules
from streaming.call_index import CallIndex
from streaming.errors import StateConflictError
from streaming.events import (
    DeadLetter,
    DeadLetterReason,
    Expectations,
    InvalidInput,
    ParsedUtterance,
    dead_letter_headers,
    dump_event,
)
from streaming.faults import Health
from streaming.processor import Message, StreamCore, worker_kafka_clients
from streaming.security import kafka_client_options, redact_url
from streaming.settings import WorkerSettings
from streaming.state_store import StateStore
from workers.activity import activity
from workers.alert_eval import load_head
from workers.conversations import Conversations
from workers.metrics import WorkerMetrics, serve_ops
from workers.planner import Intake, Step, intake, plan
from workers.results import EventMapper, Outcome, event_type, stored_events

log = logging.getLogger(__name__)

CONFLICT_ROUNDS = 5  # reload-and-redo rounds for conflicting conversations per attempt


class FaultPlan:
    """Deliberate crashes for the crash tests: ``CFNESA_FAULTS="after_step:3"``
    kills this process with SIGKILL the 3rd time it reaches ``after_step``.

    Points: after_poll, after_step, after_persist, after_produce, after_commit.
    Unset in production; costs one dict lookup per point.
    """

    def __init__(self, spec: str | None) -> None:
        self.targets: dict[str, int] = {}
        for item in (spec or "").split(","):
            if item.strip():
                point, _, n = item.strip().partition(":")
                self.targets[point] = int(n or 1)
        self.counts: dict[str, int] = defaultdict(int)

    def reach(self, point: str) -> None:
        if point in self.targets:
            self.counts[point] += 1
            if self.counts[point] == self.targets[point]:
                log.warning("fault injection: SIGKILL at %s #%d", point, self.counts[point])
                os.kill(os.getpid(), signal.SIGKILL)


class Worker:
    """One member of the workers' consumer group. ``await worker.run(stop)``."""

    def __init__(
        self,
        settings: WorkerSettings,
        engine: StreamingEngine | None = None,
        rules: AlertRules | None = None,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.settings = s = settings
        self.engine = engine or StreamingEngine.load(s.checkpoint)
        # the learned alert head ships beside the checkpoint's weights (alert_head.json)
        labels = list(self.engine.label_names)
        if rules is None:
            rules = AlertRules.load(s.alert_rules, head=load_head(self.engine.path), labels=labels)
        elif rules.label_set is None:
            rules = rules.for_labels(labels)
        self.metrics = metrics or WorkerMetrics()
        cfg = self.engine.config
        self.model_id = f"{cfg.name}@{self.engine.fingerprint}"
        self.expect = Expectations(
            feature_spec=cfg.feature_spec,
            dims={"text": cfg.text_dim, "audio": cfg.audio_dim, "visual": cfg.visual_dim},
            max_bytes=s.max_message_bytes,
        )
        self.mapper = EventMapper(
            model_id=self.model_id,
            labels=list(self.engine.label_names),
            rules=rules,
            include_text=s.include_text,
            state_ttl_s=s.state_ttl_s,
            ended_ttl_s=s.ended_ttl_s,
            full_writes=not s.state_cache,
            analyze_roles=s.analyzed_roles(),
        )
        self.faults = FaultPlan(os.environ.get("CFNESA_FAULTS"))
        self.store = StateStore.from_settings(s)
        self.conversations = Conversations(
            self.store,
            self.engine.fingerprint,
            enabled=s.state_cache,
            max_cached=s.max_cached_states,
            on_reset=lambda reason: self.metrics.state_resets.labels(reason).inc(),
        )
        self.calls = CallIndex(
            self.store,
            state_ttl_s=s.state_ttl_s,
            ended_ttl_s=s.ended_ttl_s,
            keep_ended=s.recent_ended_calls,
        )
        self.status = Health()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="cfnesa-step")
        self._lock = asyncio.Lock()  # a rebalance waits for the batch in flight
        self._core: StreamCore | None = None
        self._ops: asyncio.Server | None = None
        self.processed = 0  # utterances stepped by this process
        # types of each processed batch's output messages, until produced (in order)
        self._outgoing: deque[list[str]] = deque()

    @property
    def cache(self) -> Any:
        """The cached conversations (id -> `workers.conversations.Conv`)."""
        return self.conversations.cache

    # ------------------------------------------------------------ lifecycle

    async def start(self, stop: asyncio.Event | None = None) -> bool:
        """Connect to Kafka, check the topics, then Redis (each retried with backoff
        until ``stop``); False if stopped.

        Raises:
            streaming.errors.FatalError: authentication or TLS failed (a wrong
                password, an untrusted certificate), or a topic does not exist.
        """
        stop = stop or asyncio.Event()
        s = self.settings
        if s.torch_threads:
            import torch

            torch.set_num_threads(s.torch_threads)
        if s.metrics_port:
            self._ops = await serve_ops(s.metrics_host, s.metrics_port, self.metrics, self.health)
        security = kafka_client_options(s)
        servers = s.bootstrap_servers()
        producer, consumer = worker_kafka_clients(s, security)
        core = self._core = StreamCore(
            consumer,
            producer,
            servers=servers,
            security=security,
            redis_address=redact_url(s.redis_url),
            health=self.status,
            on_outage=lambda service: self.metrics.outages.labels(service).inc(),
            on_point=self.faults.reach,
            on_commit_refused=self.metrics.commit_failures.inc,
            on_timing=self.metrics.timing,
            overlap=s.overlap_batches,
        )
        if not await core.start_clients(stop):
            return False
        # Redis answers (and accepts the credentials) before the first batch needs it
        if not (await core.retry(self.store.ping, stop, service="redis", what="start"))[0]:
            return False
        if not await core.check_topics([s.input_topic, s.output_topic, s.dlq_topic], stop):
            return False
        core.subscribe([s.input_topic], listener=_Listener(self))
        log.info(
            "worker up: model %s, group %s, topic %s", self.model_id, s.group_id, s.input_topic
        )
        return True

    async def close(self) -> None:
        """Leave the group and close connections (after ``run`` returned)."""
        if self._core is not None:
            await self._core.close()
        with contextlib.suppress(Exception):
            await self.store.close()
        if self._ops is not None:
            self._ops.close()
        self._executor.shutdown(wait=False)

    def health(self) -> tuple[bool, dict[str, Any]]:
        """What /healthz reports: (ok, the JSON body)."""
        return self.status.report(model=self.model_id, cached_states=len(self.conversations))

    # ----------------------------------------------------------------- loop

    async def run(self, stop: asyncio.Event) -> None:
        """Process batches until ``stop`` is set; the batch in flight is finished."""
        if self._core is None and not await self.start(stop):
            return
        core = self._core
        assert core is not None
        s = self.settings
        while not stop.is_set():
            records = await core.poll(s.max_batch_events, s.max_wait_ms)
            if not records:
                continue
            started = time.monotonic()
            async with self._lock:
                if not await core.run_batch(
                    records, self.process, stop, after_produce=self._count_produced
                ):
                    break  # stopped during an outage: nothing committed, replayed later
            self.metrics.batch_seconds.observe(time.monotonic() - started)
            self.metrics.last_batch.set(time.time())
            await self._update_lag()
        await core.settle()  # the batch whose produce and commit are in flight

    async def process(self, records: Sequence[ConsumerRecord]) -> list[Message]:
        """One batch, from validation to persisted state: its output messages."""
        started = time.perf_counter()
        batch = intake(records, self.expect)
        for kind in batch.types:
            self.metrics.events_in.labels(kind).inc()
        self.metrics.timing("validate", time.perf_counter() - started)
        done = await self._persisted(batch)
        started = time.perf_counter()
        out = await self._outputs(batch, done)
        self.metrics.timing("outputs", time.perf_counter() - started)
        return out

    async def _persisted(self, batch: Intake) -> dict[str, tuple[Step, Outcome]]:
        """Plan, step and persist every conversation; conflicting ones are reloaded and
        redone (a stale cache), up to CONFLICT_ROUNDS times."""
        done: dict[str, tuple[Step, Outcome]] = {}
        pending = batch.inputs
        for _round in range(CONFLICT_ROUNDS):
            if not pending:
                return done
            started = time.perf_counter()
            convs = await self.conversations.load({c: batch.partitions[c] for c in pending})
            steps = [plan(c, convs[c], batch.partitions[c], items) for c, items in pending.items()]
            self.metrics.timing("load", time.perf_counter() - started)
            outcomes = await self._step(steps)
            commits = [o.commit for o in outcomes if o.commit is not None]
            started = time.perf_counter()
            results = await self.store.commit(commits)
            self.metrics.timing("persist", time.perf_counter() - started)
            self.metrics.redis_bytes.inc(sum(c.size for c in commits))
            refused = {c.conversation_id for c, r in zip(commits, results, strict=True) if not r.ok}
            self.faults.reach("after_persist")
            for step, out in zip(steps, outcomes, strict=True):
                if step.cid in refused:
                    continue
                done[step.cid] = (step, out)
                if out.commit is not None:
                    self.conversations.remember(step.cid, out.conv)
            self.metrics.conflicts.inc(len(refused))
            self.conversations.forget(refused)
            # the calls-in-progress index (streaming/call_index.py), after the commits
            await self.calls.record(activity(batch, steps, outcomes, refused))
            pending = {c: pending[c] for c in refused}
        if pending:
            raise StateConflictError(pending)
        return done

    async def _outputs(self, batch: Intake, done: dict[str, tuple[Step, Outcome]]) -> list[Message]:
        """Per conversation: re-emitted events first (their seqs are older), then new
        ones; then the dead letters."""
        m, s = self.metrics, self.settings
        reemit = {cid: step.duplicates for cid, (step, _) in done.items() if step.duplicates}
        stored = await self.store.events(reemit) if reemit else {}
        out: list[Message] = []
        dead = list(batch.dead)
        now = time.time()
        for cid in batch.inputs:
            step, outcome = done[cid]
            dead.extend(step.dead)
            m.duplicates.inc(len(step.duplicates))
            for seq, kind in step.duplicates:
                found = stored_events(stored.get(cid, []), seq, kind)
                out.extend(Message(s.output_topic, cid.encode(), e) for e in found)
            out.extend(Message(s.output_topic, cid.encode(), e) for e in outcome.events)
            for label in outcome.emotions:
                m.emotions.labels(label).inc()
            for rule in outcome.alerts:
                m.alerts.labels(rule).inc()
            m.gaps.inc(outcome.gaps)
            for t in outcome.e2e_from:
                m.e2e_seconds.observe(max(now - t, 0.0))
        for rec, error in dead:
            m.dead_letters.labels(error.reason.value).inc()
            out.append(_dead_letter(rec, error, s.dlq_topic))
        self._outgoing.append(
            ["dead_letter" if msg.topic == s.dlq_topic else event_type(msg.value) for msg in out]
        )
        return out

    async def _count_produced(self) -> None:
        """After the batch's outputs are acknowledged: count them by type."""
        for kind in self._outgoing.popleft() if self._outgoing else ():
            self.metrics.events_out.labels(kind).inc()

    # ----------------------------------------------------------------- step

    async def _step(self, steps: list[Step]) -> list[Outcome]:
        """Run the model on every conversation's new utterances in one batch."""
        work = [p for p in steps if p.chunk]
        results: dict[str, tuple[list[UtteranceResult], ConversationState]] = {}
        if work:
            chunks = [[_utterance(parsed) for _, parsed, _ in p.chunk] for p in work]
            states = [p.conv.state for p in work]
            loop = asyncio.get_running_loop()
            started = time.perf_counter()
            try:
                outs, new_states = await loop.run_in_executor(
                    self._executor, self.engine.step, chunks, states, [p.cid for p in work]
                )
                results = {p.cid: (o, st) for p, o, st in zip(work, outs, new_states, strict=True)}
            except CFNESAError:
                # find the one that failed, keep the others
                for p, chunk, state in zip(work, chunks, states, strict=True):
                    try:
                        (o,), (st,) = await loop.run_in_executor(
                            self._executor, self.engine.step, [chunk], [state], [p.cid]
                        )
                        results[p.cid] = (o, st)
                    except CFNESAError as exc:
                        log.error("conversation %s: the model refused its input: %s", p.cid, exc)
                        p.dead.extend(
                            (
                                rec,
                                InvalidInput(
                                    DeadLetterReason.INVALID,
                                    f"model refused: {exc}",
                                    p.cid,
                                    parsed.event.seq,
                                ),
                            )
                            for rec, parsed, _ in p.chunk
                        )
                        p.chunk = []
            self.metrics.step_seconds.observe(time.perf_counter() - started)
            self.metrics.timing("step", time.perf_counter() - started)
            self.metrics.batch_size.observe(sum(len(c) for c in chunks))
            self.faults.reach("after_step")
            self.processed += sum(len(o) for o, _ in results.values())
        started = time.perf_counter()
        outcomes = [self.mapper.outcome(p, results.get(p.cid)) for p in steps]
        self.metrics.timing("events", time.perf_counter() - started)
        return outcomes

    # ------------------------------------------------------------- offsets

    def forget_partitions(self, partitions: set[int]) -> None:
        self.conversations.forget_partitions(partitions)
        self.metrics.cached_states.set(len(self.conversations))

    async def _update_lag(self) -> None:
        self.metrics.cached_states.set(len(self.conversations))
        if self._core is None:
            return
        consumer = self._core.consumer
        lag = 0
        with contextlib.suppress(KafkaError, AssertionError, ValueError):
            for tp in consumer.assignment():
                high = consumer.highwater(tp)
                if high is not None:
                    lag += max(high - await consumer.position(tp), 0)
        self.metrics.lag.set(lag)


def _dead_letter(rec: ConsumerRecord, error: InvalidInput, topic: str) -> Message:
    """The dead letter of ``rec``: the original key and headers, the error's headers,
    the JSON letter (with the original bytes) as the value."""
    letter = DeadLetter.from_error(
        error, rec.value or b"", topic=rec.topic, partition=rec.partition, offset=rec.offset
    )
    key = rec.key if rec.key is not None else (error.conversation_id or "").encode() or None
    return Message(topic, key, dump_event(letter), dead_letter_headers(letter, rec.headers))


class _Listener(ConsumerRebalanceListener):
    """Forget the states of partitions this worker no longer owns, after the
    batch in flight is finished (the lock)."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: Any) -> None:
        async with self.worker._lock:
            if self.worker._core is not None:
                await self.worker._core.settle()  # its commit, before the partitions go
            self.worker.forget_partitions({tp.partition for tp in revoked})
        log.info("partitions revoked: %s", sorted(tp.partition for tp in revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        # states of newly assigned partitions load from Redis on first use
        log.info("partitions assigned: %s", sorted(tp.partition for tp in assigned))


def _utterance(parsed: ParsedUtterance) -> Utterance:
    v = parsed.vectors
    return Utterance(
        speaker=parsed.event.speaker,
        text=v.get("text"),
        audio=v.get("audio"),
        visual=v.get("visual"),
    )


async def serve(settings: WorkerSettings, *, ready: Callable[[Worker], None] | None = None) -> int:
    """Run one worker until SIGINT or SIGTERM: the batch in flight is finished,
    persisted, produced and committed, then the worker leaves the group.

    Raises:
        streaming.errors.FatalError: what waiting does not fix (`cfnesa` exits 1).
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    worker = Worker(settings)
    try:
        if await worker.start(stop):
            if ready is not None:
                ready(worker)
            await worker.run(stop)
    finally:
        await worker.close()
        log.info("worker stopped after %d utterances", worker.processed)
    return 0
