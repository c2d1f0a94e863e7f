"""The emotion worker: Kafka in, Redis state, batched incremental inference, events out.

One batch, in the order of the loop in ``Worker.run``::

    poll -> validate -> group by conversation -> load states -> model step
         -> persist (compare-and-set) -> produce outputs -> commit offsets

Correctness comes from the compare-and-set and from deterministic event ids,
not from Kafka transactions (the embedded broker has none):

- Persist happens before produce, and the stored state carries the output
  events. A crash after persist and before produce or commit replays the
  input; its seq is then <= the stored seq, so it is a duplicate: the state is
  not touched and the stored events are produced again, with the same ids and
  the same content.
- A cached state is only a shortcut: every write names the seq it was computed
  from, and Redis refuses it when that is not the stored seq (another worker
  advanced the call after a rebalance, or this cache is stale). The worker
  then drops the cache entry, reloads and redoes that conversation.
- Redis or Kafka down: the batch is retried with backoff; offsets are
  committed only after its outputs are produced.
- A wrong password or an untrusted certificate is not an outage: start-up raises
  `streaming.security.ConnectionSecurityError` naming the cause instead of
  retrying (`cfnesa worker` exits 1).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord
from redis.exceptions import (
    ClusterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from model.engine import StreamingEngine, Utterance, UtteranceResult
from model.errors import CFNESAError, FingerprintMismatchError, StateFormatError
from model.state import ConversationState
from streaming.alerts import AlertRules, CallTracker
from streaming.events import (
    AlertEvent,
    DeadLetter,
    DeadLetterReason,
    EmotionEvent,
    EndEvent,
    Expectations,
    InvalidInput,
    ParsedUtterance,
    Shift,
    SummaryEvent,
    dump_event,
    format_ts,
    parse_input,
    utc_now_iso,
)
from streaming.security import (
    kafka_client_options,
    redact_url,
    security_failure,
    start_kafka_client,
)
from streaming.settings import Settings
from streaming.state_store import Commit, StateStore
from streaming.topics import next_offsets
from workers.alert_eval import load_head, observe_result
from workers.metrics import WorkerMetrics, serve_ops

log = logging.getLogger(__name__)

APP = "app"  # the call tracker (alerts, summary figures), JSON
ENDED = "ended"  # present once the call ended: the end event's seq
SUMMARY = "summary"  # the summary event of an ended call, JSON

# Redis errors that pass: the server unreachable or slow, a replica promoted (READONLY
# until clients follow), a cluster failing over or resharding (CLUSTERDOWN, TRYAGAIN,
# a slot with no owner yet), the server out of memory (OOM under noeviction), a
# dataset loading. The worker pauses and retries them with backoff instead of exiting
# into a restart loop. Inside a Lua script or a pipeline redis-py reports them as a
# plain ResponseError carrying the server's error code, hence the codes.
_REDIS_DOWN = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    ReadOnlyError,
    ClusterDownError,
    TryAgainError,
    OutOfMemoryError,
    SlotNotCoveredError,
)
_REDIS_TRANSIENT_CODES = ("OOM", "READONLY", "CLUSTERDOWN", "TRYAGAIN", "MASTERDOWN", "LOADING")


def _redis_transient(exc: BaseException) -> bool:
    if isinstance(exc, _REDIS_DOWN):
        return True
    if isinstance(exc, ResponseError):
        text = str(exc)
        return any(
            text.startswith(f"{code} ") or f"-{code} " in text for code in _REDIS_TRANSIENT_CODES
        )
    return False


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


@dataclass
class Conv:
    """A conversation as the worker knows it (what Redis holds, decoded)."""

    seq: int | None  # last processed seq; None: nothing stored
    state: ConversationState | None
    tracker: CallTracker
    ended: bool = False
    partition: int = -1
    reset: bool = False  # the stored model state was refused: replace it


@dataclass
class _Plan:
    """What one batch does to one conversation."""

    cid: str
    conv: Conv
    partition: int
    chunk: list[tuple[ConsumerRecord, ParsedUtterance, bool]] = field(default_factory=list)
    end: EndEvent | None = None
    duplicates: list[tuple[int, str]] = field(default_factory=list)  # (seq, "utterance"|"end")
    dead: list[tuple[ConsumerRecord, InvalidInput]] = field(default_factory=list)


@dataclass
class _Done:
    """A conversation's computed outcome, before it is persisted."""

    commit: Commit | None
    events: list[bytes]
    conv: Conv
    e2e_from: list[float] = field(default_factory=list)  # input timestamps (s)
    emotions: list[str] = field(default_factory=list)  # predicted, for the metrics
    alerts: list[str] = field(default_factory=list)  # rules fired, for the metrics


class Worker:
    """One member of the workers' consumer group. ``await worker.run(stop)``."""

    def __init__(
        self,
        settings: Settings,
        engine: StreamingEngine | None = None,
        rules: AlertRules | None = None,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine or StreamingEngine.load(settings.checkpoint)
        # the learned alert head ships beside the checkpoint's weights (alert_head.json)
        self.rules = rules or AlertRules.load(
            settings.alert_rules, head=load_head(self.engine.path)
        )
        self.metrics = metrics or WorkerMetrics()
        cfg = self.engine.config
        self.model_id = f"{cfg.name}@{self.engine.fingerprint}"
        self.expect = Expectations(
            feature_spec=cfg.feature_spec,
            dims={"text": cfg.text_dim, "audio": cfg.audio_dim, "visual": cfg.visual_dim},
            max_bytes=settings.max_message_bytes,
        )
        self.faults = FaultPlan(os.environ.get("CFNESA_FAULTS"))
        self.cache: OrderedDict[str, Conv] = OrderedDict()
        self.store = StateStore.from_settings(settings)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="cfnesa-step")
        self._lock = asyncio.Lock()  # a rebalance waits for the batch in flight
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._ops: asyncio.Server | None = None
        self._healthy_at = 0.0
        self._outage: str | None = None
        self.processed = 0  # utterances stepped by this process

    # ------------------------------------------------------------ lifecycle

    async def start(self, stop: asyncio.Event | None = None) -> bool:
        """Connect to Kafka, then Redis (each retried with backoff until ``stop``);
        False if stopped.

        Raises:
            streaming.security.ConnectionSecurityError: authentication or TLS failed
                (a wrong password, an untrusted certificate, a missing file): fatal.
        """
        stop = stop or asyncio.Event()
        s = self.settings
        security = kafka_client_options(s)
        servers = s.bootstrap_servers()
        if s.torch_threads:
            import torch

            torch.set_num_threads(s.torch_threads)
        if s.metrics_port:
            self._ops = await serve_ops(s.metrics_host, s.metrics_port, self.metrics, self.health)
        producer = self._producer = AIOKafkaProducer(
            bootstrap_servers=servers,
            acks="all",
            linger_ms=1,
            max_request_size=max(s.max_message_bytes * 2, 1_048_576),
            request_timeout_ms=15_000,
            **security,
        )
        consumer = self._consumer = AIOKafkaConsumer(
            bootstrap_servers=servers,
            group_id=s.group_id,
            group_instance_id=s.group_instance_id,
            rebalance_timeout_ms=s.rebalance_timeout_ms,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=s.session_timeout_ms,
            heartbeat_interval_ms=s.heartbeat_interval_ms,
            max_poll_interval_ms=s.max_poll_interval_ms,
            fetch_max_wait_ms=s.fetch_max_wait_ms,
            fetch_max_bytes=max(s.max_message_bytes * 4, 52_428_800),
            max_partition_fetch_bytes=max(s.max_message_bytes * 2, 1_048_576),
            **security,
        )
        if not await self._retry(
            "kafka", lambda: start_kafka_client(producer, servers, security), stop
        ):
            return False
        if not await self._retry(
            "kafka", lambda: start_kafka_client(consumer, servers, security), stop
        ):
            return False
        # Redis answers (and accepts the credentials) before the first batch needs it
        if not await self._retry("redis", self.store.ping, stop):
            return False
        consumer.subscribe([s.input_topic], listener=_Listener(self))
        self._healthy_at = time.monotonic()
        log.info(
            "worker up: model %s, group %s, topic %s", self.model_id, s.group_id, s.input_topic
        )
        return True

    async def close(self) -> None:
        """Leave the group and close connections (after ``run`` returned)."""
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                await self._consumer.stop()
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await self._producer.stop()
        with contextlib.suppress(Exception):
            await self.store.close()
        if self._ops is not None:
            self._ops.close()
        self._executor.shutdown(wait=False)

    def health(self) -> tuple[bool, dict[str, Any]]:
        idle = time.monotonic() - self._healthy_at
        ok = self._consumer is not None and self._outage is None and idle < 60
        return ok, {
            "ok": ok,
            "outage": self._outage,
            "seconds_since_loop": round(idle, 3),
            "model": self.model_id,
            "cached_states": len(self.cache),
        }

    # ----------------------------------------------------------------- loop

    async def run(self, stop: asyncio.Event) -> None:
        """Process batches until ``stop`` is set; the batch in flight is finished."""
        if self._consumer is None and not await self.start(stop):
            return
        consumer = self._consumer
        assert consumer is not None
        s = self.settings
        while not stop.is_set():
            self._healthy_at = time.monotonic()
            batches = await consumer.getmany(timeout_ms=100, max_records=s.max_batch_events)
            records = [r for part in batches.values() for r in part]
            if not records:
                continue
            if s.max_wait_ms and len(records) < s.max_batch_events:
                # let the batch fill a little: more calls per step, bounded added latency
                more = await consumer.getmany(
                    timeout_ms=s.max_wait_ms, max_records=s.max_batch_events - len(records)
                )
                records += [r for part in more.values() for r in part]
            self.faults.reach("after_poll")
            started = time.monotonic()
            async with self._lock:
                done = await self._until_done(self._handle, records, stop)
                if not done:
                    break  # stopped during an outage: nothing committed, replayed later
                await self._commit(records)
                self.faults.reach("after_commit")
            self.metrics.batch_seconds.observe(time.monotonic() - started)
            self.metrics.last_batch.set(time.time())
            await self._update_lag()

    async def _handle(self, records: Sequence[ConsumerRecord]) -> None:
        """One batch, from validation to produced outputs (not the commit)."""
        m = self.metrics
        inputs: dict[str, list[tuple[ConsumerRecord, Any]]] = {}  # per conversation, in order
        partition: dict[str, int] = {}
        dead: list[tuple[ConsumerRecord, InvalidInput]] = []
        for rec in records:
            try:
                parsed = parse_input(rec.value or b"", self.expect)
            except InvalidInput as bad:
                dead.append((rec, bad))
                continue
            ev = parsed.event if isinstance(parsed, ParsedUtterance) else parsed
            m.events_in.labels(ev.type).inc()
            inputs.setdefault(ev.conversation_id, []).append((rec, parsed))
            partition[ev.conversation_id] = rec.partition

        events: list[tuple[str | None, bytes, str]] = []  # (key, value, topic)
        reemit: dict[str, list[tuple[int, str]]] = {}
        fresh: dict[str, list[bytes]] = {}
        pending = inputs
        for _attempt in range(5):
            if not pending:
                break
            convs = await self._contexts(pending, partition)
            todo = []
            for cid, items in pending.items():
                plan = _Plan(cid, convs[cid], partition[cid])
                self._plan(plan, items)
                todo.append(plan)
            outcomes = await self._step(todo)
            commits = [o.commit for o in outcomes if o.commit is not None]
            results = await self.store.commit(commits)
            m.redis_bytes.inc(sum(c.size for c in commits))
            by_cid = {c.conversation_id: r for c, r in zip(commits, results, strict=True)}
            self.faults.reach("after_persist")
            retry = {}
            for plan, out in zip(todo, outcomes, strict=True):
                res = by_cid.get(plan.cid)
                if res is not None and not res.ok:
                    m.conflicts.inc()
                    self.cache.pop(plan.cid, None)
                    retry[plan.cid] = pending[plan.cid]
                    continue
                dead.extend(plan.dead)
                if plan.duplicates:
                    reemit[plan.cid] = plan.duplicates
                    m.duplicates.inc(len(plan.duplicates))
                fresh[plan.cid] = out.events
                for label in out.emotions:
                    m.emotions.labels(label).inc()
                for rule in out.alerts:
                    m.alerts.labels(rule).inc()
                now = time.time()
                for t in out.e2e_from:
                    m.e2e_seconds.observe(max(now - t, 0.0))
                if out.commit is not None:
                    self._remember(plan.cid, out.conv)
            pending = retry
        else:
            raise RuntimeError(f"conversations {sorted(pending)} kept conflicting; retrying")

        # per conversation: re-emitted events first (their seqs are older), then new ones
        stored = await self.store.events(reemit) if reemit else {}
        for cid in inputs:
            for seq, kind in reemit.get(cid, ()):
                found = _stored_events(stored.get(cid, []), seq, kind)
                events.extend((cid, e, self.settings.output_topic) for e in found)
            events.extend((cid, e, self.settings.output_topic) for e in fresh.get(cid, ()))
        for rec, error in dead:
            m.dead_letters.labels(error.reason.value).inc()
            letter = DeadLetter.from_error(
                error, rec.value or b"", topic=rec.topic, partition=rec.partition, offset=rec.offset
            )
            events.append((error.conversation_id, dump_event(letter), self.settings.dlq_topic))
        await self._produce(events)
        self.faults.reach("after_produce")

    # ------------------------------------------------------------- planning

    def _plan(self, plan: _Plan, items: list[tuple[ConsumerRecord, Any]]) -> None:
        """Sort one conversation's input into step / end / duplicate / dead letter."""
        conv = plan.conv
        stepped: list[tuple[ConsumerRecord, ParsedUtterance, bool]] = []
        for rec, parsed in items:
            is_end = isinstance(parsed, EndEvent)
            seq = parsed.seq if is_end else parsed.event.seq
            if conv.ended or plan.end is not None:
                if conv.ended and is_end:
                    plan.duplicates.append((conv.seq or 0, "summary"))
                elif conv.ended and conv.seq is not None and seq <= conv.seq:
                    plan.duplicates.append((seq, "utterance"))
                else:
                    plan.dead.append(
                        (
                            rec,
                            InvalidInput(
                                DeadLetterReason.CONVERSATION_ENDED,
                                "the conversation has ended",
                                plan.cid,
                                seq,
                            ),
                        )
                    )
                continue
            if is_end:
                plan.end = parsed
                continue
            last = stepped[-1][1].event.seq if stepped else conv.seq
            if last is not None and seq <= last:
                if conv.seq is not None and seq <= conv.seq:
                    plan.duplicates.append((seq, "utterance"))  # processed before: re-emit
                continue  # else a repeat inside this batch: its first copy is processed
            gap = seq != (last if last is not None else -1) + 1
            stepped.append((rec, parsed, gap))
        plan.chunk = stepped

    async def _contexts(
        self, pending: dict[str, Any], partition: dict[str, int]
    ) -> dict[str, Conv]:
        out: dict[str, Conv] = {}
        missing = []
        for cid in pending:
            conv = self.cache.get(cid) if self.settings.state_cache else None
            if conv is not None:
                out[cid] = conv
            else:
                missing.append(cid)
        stored = await self.store.load(missing)
        for cid in missing:
            out[cid] = self._decode(cid, stored[cid], partition[cid])
        return out

    def _decode(self, cid: str, stored: Any, partition: int) -> Conv:
        fields = stored.fields
        tracker = CallTracker.from_json(fields.get(APP))
        if ENDED in fields:
            return Conv(stored.seq, None, tracker, ended=True, partition=partition)
        state = None
        reset = False
        if "core" in fields:
            try:
                state = ConversationState.from_parts(
                    fields, expected_fingerprint=self.engine.fingerprint
                )
            except (FingerprintMismatchError, StateFormatError) as exc:
                reason = "fingerprint" if isinstance(exc, FingerprintMismatchError) else "format"
                self.metrics.state_resets.labels(reason).inc()
                log.warning(
                    "conversation %s: stored state refused (%s); the model restarts from an "
                    "empty state at seq %s",
                    cid,
                    exc,
                    stored.seq,
                )
                reset = True
        return Conv(stored.seq, state, tracker, partition=partition, reset=reset)

    # ----------------------------------------------------------------- step

    async def _step(self, plans: list[_Plan]) -> list[_Done]:
        """Run the model on every conversation's new utterances in one batch."""
        work = [p for p in plans if p.chunk]
        results: dict[str, tuple[list[UtteranceResult], ConversationState]] = {}
        if work:
            chunks = [[_utterance(parsed) for _, parsed, _ in p.chunk] for p in work]
            states = [p.conv.state for p in work]
            ids = [p.cid for p in work]
            loop = asyncio.get_running_loop()
            started = time.perf_counter()
            try:
                outs, new_states = await loop.run_in_executor(
                    self._executor, self.engine.step, chunks, states, ids
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
                        for rec, parsed, _ in p.chunk:
                            p.dead.append(
                                (
                                    rec,
                                    InvalidInput(
                                        DeadLetterReason.INVALID,
                                        f"model refused: {exc}",
                                        p.cid,
                                        parsed.event.seq,
                                    ),
                                )
                            )
                        p.chunk = []
            self.metrics.step_seconds.observe(time.perf_counter() - started)
            self.metrics.batch_size.observe(sum(len(c) for c in chunks))
            self.faults.reach("after_step")
            self.processed += sum(len(o) for o, _ in results.values())
        return [self._outcome(p, results.get(p.cid)) for p in plans]

    def _outcome(
        self, plan: _Plan, result: tuple[list[UtteranceResult], ConversationState] | None
    ) -> _Done:
        s = self.settings
        conv = plan.conv
        tracker = CallTracker(_tracker_copy(conv.tracker))
        events: list[bytes] = []
        e2e: list[float] = []
        emotions: list[str] = []
        alerts: list[str] = []
        new_seq = conv.seq
        state = conv.state
        labels = self.engine.label_names
        if result is not None:
            outs, state = result
            emitted = utc_now_iso()
            for (rec, parsed, gap), out in zip(plan.chunk, outs, strict=True):
                ev = parsed.event
                ts = _ts(ev.ts)
                emotion = EmotionEvent(
                    event_id=f"{plan.cid}:{ev.seq}:emotion",
                    conversation_id=plan.cid,
                    seq=ev.seq,
                    tenant=ev.tenant,
                    speaker=ev.speaker,
                    emotion=out.emotion,
                    confidence=round(out.confidence, 6),
                    probabilities={
                        n: round(float(p), 6)
                        for n, p in zip(labels, out.probabilities, strict=True)
                    },
                    shift=Shift(
                        vs_previous=_r(out.shift_vs_previous),
                        vs_speaker_previous=_r(out.shift_vs_speaker_previous),
                    ),
                    model=self.model_id,
                    ts=ts,
                    emitted_at=emitted,
                    gap=gap,
                    text=ev.text if s.include_text else None,
                )
                events.append(dump_event(emotion))
                emotions.append(out.emotion)
                if gap:
                    self.metrics.gaps.inc()
                for alert in observe_result(
                    tracker, self.rules, ev.speaker, out, labels, ts=ts, gap=gap
                ):
                    alerts.append(alert.rule)
                    events.append(
                        dump_event(
                            AlertEvent(
                                event_id=f"{plan.cid}:{ev.seq}:alert:{alert.rule}",
                                conversation_id=plan.cid,
                                seq=ev.seq,
                                tenant=ev.tenant,
                                speaker=alert.speaker,
                                rule=alert.rule,
                                severity=alert.severity,
                                from_emotion=alert.from_emotion,
                                to_emotion=alert.to_emotion,
                                p_shift=_r(alert.p_shift),
                                detail=alert.detail,
                                model=self.model_id,
                                ts=ts,
                                emitted_at=emitted,
                            )
                        )
                    )
                if rec.timestamp is not None and rec.timestamp > 0:
                    e2e.append(rec.timestamp / 1000.0)
                new_seq = ev.seq
        if plan.end is not None:
            end_seq = max(plan.end.seq, new_seq if new_seq is not None else -1)
            summary = SummaryEvent(
                event_id=f"{plan.cid}:{end_seq}:summary",
                conversation_id=plan.cid,
                seq=end_seq,
                tenant=plan.end.tenant,
                model=self.model_id,
                emitted_at=utc_now_iso(),
                **tracker.summary(),
            )
            body = dump_event(summary)
            events.append(body)
            commit = Commit(
                plan.cid,
                expected_seq=conv.seq,
                new_seq=end_seq,
                fields={APP: tracker.to_json(), ENDED: str(end_seq).encode(), SUMMARY: body},
                events=events,
                ttl_s=s.ended_ttl_s,
                replace=True,
            )
            done = Conv(end_seq, None, tracker, ended=True, partition=plan.partition)
            return _Done(commit, events, done, e2e, emotions, alerts)
        if result is None or state is None:
            return _Done(None, events, conv, e2e)
        assert new_seq is not None
        old_position = conv.state.position if conv.state is not None else 0
        full = conv.reset or conv.state is None or not s.state_cache
        parts = state.to_parts(since=None if full else old_position)
        parts[APP] = tracker.to_json()
        commit = Commit(
            plan.cid,
            expected_seq=conv.seq,
            new_seq=new_seq,
            fields=parts,
            events=events,
            ttl_s=s.state_ttl_s,
            replace=conv.reset,
        )
        advanced = Conv(new_seq, state, tracker, partition=plan.partition)
        return _Done(commit, events, advanced, e2e, emotions, alerts)

    # ------------------------------------------------------ outputs, offsets

    async def _produce(self, events: list[tuple[str | None, bytes, str]]) -> None:
        if not events:
            return
        producer = self._producer
        assert producer is not None
        futures = []
        for key, value, topic in events:
            futures.append(
                await producer.send(topic, value=value, key=key.encode() if key else None)
            )
        await asyncio.gather(*futures)
        for _, value, topic in events:
            kind = "dead_letter" if topic == self.settings.dlq_topic else _type_of(value)
            self.metrics.events_out.labels(kind).inc()

    async def _commit(self, records: Sequence[ConsumerRecord]) -> None:
        consumer = self._consumer
        assert consumer is not None
        try:
            await consumer.commit(next_offsets(records))
        except KafkaError as exc:
            # a rebalance took the partitions: the next owner replays from the
            # last committed offset, and the compare-and-set makes that harmless
            self.metrics.commit_failures.inc()
            log.warning("offset commit refused (%s); the new owner replays", exc)

    def _remember(self, cid: str, conv: Conv) -> None:
        if not self.settings.state_cache or conv.ended:
            self.cache.pop(cid, None)
            return
        self.cache[cid] = conv
        self.cache.move_to_end(cid)
        while len(self.cache) > self.settings.max_cached_states:
            self.cache.popitem(last=False)
        self.metrics.cached_states.set(len(self.cache))

    def forget_partitions(self, partitions: set[int]) -> None:
        for cid in [c for c, conv in self.cache.items() if conv.partition in partitions]:
            del self.cache[cid]
        self.metrics.cached_states.set(len(self.cache))

    async def _update_lag(self) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        lag = 0
        with contextlib.suppress(KafkaError, AssertionError, ValueError):
            for tp in consumer.assignment():
                high = consumer.highwater(tp)
                if high is not None:
                    lag += max(high - await consumer.position(tp), 0)
        self.metrics.lag.set(lag)

    # -------------------------------------------------------------- retries

    async def _retry(self, service: str, fn: Callable[[], Any], stop: asyncio.Event) -> bool:
        delay = 0.2
        while not stop.is_set():
            try:
                await fn()
                return True
            # RedisClusterException: a cluster client that cannot initialize (its cause
            # may be a refused password); not a RedisError
            except (KafkaError, RedisError, RedisClusterException, OSError) as exc:
                failure = security_failure(exc, service=service, address=self._address(service))
                if failure is not None:
                    raise failure from exc
                if not isinstance(exc, KafkaError) and not _redis_transient(exc):
                    raise
                self.metrics.outages.labels(service).inc()
                log.warning("%s unavailable (%s); retrying in %.1fs", service, exc, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, 5.0)
        return False

    def _address(self, service: str) -> str:
        if service == "kafka":
            return self.settings.kafka_bootstrap
        return redact_url(self.settings.redis_url)

    async def _until_done(
        self,
        fn: Callable[[Sequence[ConsumerRecord]], Any],
        records: Sequence[ConsumerRecord],
        stop: asyncio.Event,
    ) -> bool:
        """Run the batch until it succeeds; back off while Redis or Kafka is down."""
        delay = 0.1
        while True:
            try:
                await fn(records)
                self._outage = None
                return True
            except (RedisError, RedisClusterException, OSError) as exc:
                failure = security_failure(exc, service="redis", address=self._address("redis"))
                if failure is not None:
                    raise failure from exc  # credentials revoked or rotated: not an outage
                if not _redis_transient(exc):
                    raise
                service, err = "redis", exc
            except KafkaError as exc:
                service, err = "kafka", exc
            self._outage = service
            self.metrics.outages.labels(service).inc()
            log.warning("%s unavailable (%s); batch retried in %.1fs", service, err, delay)
            if stop.is_set():
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set():
                return False
            delay = min(delay * 2, 5.0)


class _Listener(ConsumerRebalanceListener):
    """Forget the states of partitions this worker no longer owns, after the
    batch in flight is finished (the lock)."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: Any) -> None:
        async with self.worker._lock:
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


def _stored_events(stored: list[bytes], seq: int, kind: str) -> list[bytes]:
    """The stored output events of one input: by their deterministic ids."""
    out = []
    for raw in stored:
        try:
            ev = json.loads(raw)
        except ValueError:
            continue
        if ev.get("seq") != seq:
            continue
        if (kind == "summary") == (ev.get("type") == "summary"):
            out.append(raw)
    return out


def _tracker_copy(t: CallTracker) -> dict[str, Any]:
    return dict(json.loads(t.to_json()))


def _type_of(value: bytes) -> str:
    for t in ("emotion", "alert", "summary"):
        if value.startswith(b'{"type":"' + t.encode()):
            return t
    return "other"


def _r(x: float | None) -> float | None:
    return None if x is None else round(float(x), 6)


def _ts(ts: Any) -> str | None:
    if ts is None or isinstance(ts, str):
        return ts
    return format_ts(ts)


async def serve(settings: Settings, *, ready: Callable[[Worker], None] | None = None) -> int:
    """Run one worker until SIGINT or SIGTERM: the batch in flight is finished,
    persisted, produced and committed, then the worker leaves the group."""
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
