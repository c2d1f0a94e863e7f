"""The stream-processing core shared by the worker and the featurizer.

One batch, always in this order (as Quix Streams' Checkpoint keeps it in one
object)::

    poll -> process (and persist) -> produce -> after produce -> commit

- ``process`` turns the records into output messages; the worker persists its state
  there (compare-and-set before produce: a replay after a crash is then a duplicate).
- ``after_produce`` runs once every output is acknowledged (the featurizer stores the
  calls' texts there: a replay sees the context the first pass saw).
- Offsets are committed last, and only for a batch that went through: a crash or a
  stop anywhere before replays the batch, never skips it.

Every step is retried the same way: whatever it raised is classified
(`streaming.faults.classify`); a transient error pauses the loop with `Backoff`
while `Health` reports the cause and since when, then the step runs again; a fatal
one is raised to the process, which exits 1. A stop (SIGTERM) lets the batch in flight
finish unless it is waiting out an outage, in which case nothing is committed and
the batch is read again by whoever owns its partitions next.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord

from streaming.errors import MissingTopicError, StreamError
from streaming.faults import Backoff, Health, classify
from streaming.security import start_kafka_client
from streaming.topics import next_offsets

if TYPE_CHECKING:
    from streaming.settings import WorkerSettings

__all__ = ["Message", "StreamCore"]

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Message:
    """One output record: the topic, key, value and headers."""

    topic: str
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = field(default=())


class StreamCore:
    """A consumer and a producer run as poll -> process -> produce -> commit.

    Args:
        consumer: the group consumer (auto-commit off); subscribed by `start`.
        producer: where outputs go (acks=all).
        servers: the bootstrap servers (for diagnosing a failed start).
        security: the clients' security options (for the same).
        redis_address: the Redis URL, credentials redacted, for messages.
        health: the health the loop reports on ``/healthz``.
        on_outage: called with the service of each transient failure (a metric).
        on_point: called at ``after_poll``, ``after_produce``, ``after_commit`` (fault
            injection in the crash tests).
        on_commit_refused: called when a rebalance refused an offset commit (a metric).
        overlap: `run_batch` returns once the batch is processed; its produce and
            commit go on while the caller polls and processes the next batch, whose
            produce waits for them (`settle`), so outputs and offsets keep their order.
            Only for a ``process`` that persists what the outputs need before it
            returns (the worker), with an ``after_produce`` that does not read state
            the next ``process`` changes.
        on_timing: called with (stage, seconds) for the core's stages of a batch:
            ``poll_wait`` (until the first record), ``batch_fill`` (waiting for more),
            ``produce`` and ``commit`` (a metric: where a batch's time goes).
        backoff: makes the retry schedule of one step.
    """

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        producer: AIOKafkaProducer,
        *,
        servers: list[str],
        security: dict[str, Any],
        redis_address: str = "",
        health: Health | None = None,
        on_outage: Callable[[str], None] | None = None,
        on_point: Callable[[str], None] | None = None,
        on_commit_refused: Callable[[], None] | None = None,
        on_timing: Callable[[str, float], None] | None = None,
        overlap: bool = False,
        backoff: Callable[[], Backoff] = Backoff,
    ) -> None:
        self.consumer = consumer
        self.producer = producer
        self.servers = servers
        self.security = security
        self.addresses = {"kafka": ",".join(servers), "redis": redis_address}
        self.health = health or Health()
        self.on_outage = on_outage or (lambda _service: None)
        self.on_point = on_point or (lambda _point: None)
        self.on_commit_refused = on_commit_refused or (lambda: None)
        self.on_timing = on_timing or (lambda _stage, _seconds: None)
        self.overlap = overlap
        self._finishing: asyncio.Task[bool] | None = None  # produce + commit in flight
        self.new_backoff = backoff

    # ------------------------------------------------------------ start, stop

    async def start_clients(self, stop: asyncio.Event) -> bool:
        """Start the producer, then the consumer, each retried while Kafka is down;
        False if stopped first. A security failure is raised (fatal)."""
        for client in (self.producer, self.consumer):
            ok, _ = await self.retry(
                functools.partial(start_kafka_client, client, self.servers, self.security),
                stop,
                service="kafka",
                what="start",
            )
            if not ok:
                return False
        return True

    async def check_topics(self, topics: Iterable[str], stop: asyncio.Event) -> bool:
        """Raise `MissingTopicError` for topics the cluster does not have; False if
        stopped while Kafka was down.

        The cluster's topic list is read without naming topics, which auto-creates
        nothing (on Tansu either): a missing topic is an operator's to create.
        """
        ok, present = await self.retry(
            self.consumer.topics, stop, service="kafka", what="topic check"
        )
        if not ok:
            return False
        missing = set(topics) - set(present or ())
        if missing:
            self.health.fatal = f"missing topics {sorted(missing)}"
            raise MissingTopicError(missing, address=",".join(self.servers))
        return True

    def subscribe(self, topics: list[str], listener: Any = None) -> None:
        if listener is None:
            self.consumer.subscribe(topics)
        else:
            self.consumer.subscribe(topics, listener=listener)
        self.health.started = True
        self.health.beat()

    async def close(self) -> None:
        """Leave the group and close both clients (errors ignored: shutting down)."""
        for client in (self.consumer, self.producer):
            try:
                await client.stop()
            except Exception as exc:  # a client already broken: we are leaving
                log.debug("closing %s: %s", type(client).__name__, exc)

    # ------------------------------------------------------------------- batch

    async def poll(self, max_records: int, max_wait_ms: int) -> list[ConsumerRecord]:
        """Up to ``max_records``: wait up to 200 ms for the first, then at most
        ``max_wait_ms`` more for the batch to fill."""
        self.health.beat()
        if self._finishing is not None and self._finishing.done():
            await self.settle()  # what it raised (a fatal error) surfaces now
        started = time.perf_counter()
        found = await self.consumer.getmany(timeout_ms=200, max_records=max_records)
        records = [r for part in found.values() for r in part]
        if not records:
            return records
        first = time.perf_counter()
        self.on_timing("poll_wait", first - started)
        deadline = time.monotonic() + max_wait_ms / 1000
        while len(records) < max_records:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                break
            more = await self.consumer.getmany(
                timeout_ms=left_ms, max_records=max_records - len(records)
            )
            records.extend(r for part in more.values() for r in part)
        self.on_timing("batch_fill", time.perf_counter() - first)
        self.on_point("after_poll")
        return records

    async def run_batch(
        self,
        records: Sequence[ConsumerRecord],
        process: Callable[[Sequence[ConsumerRecord]], Awaitable[list[Message]]],
        stop: asyncio.Event,
        *,
        after_produce: Callable[[], Awaitable[Any]] | None = None,
    ) -> bool:
        """Process, produce, run ``after_produce``, commit; each step retried while
        transient. False when stopped during an outage (nothing committed).

        Raises:
            streaming.errors.FatalError: what waiting does not fix.
        """
        ok, messages = await self.retry(lambda: process(records), stop, what="batch")
        if not ok or messages is None:
            return False
        if not self.overlap:
            return await self._finish(records, messages, stop, after_produce)
        # the previous batch's outputs and offsets first: the order per partition
        if not await self.settle():
            return False
        self._finishing = asyncio.create_task(self._finish(records, messages, stop, after_produce))
        return True

    async def settle(self) -> bool:
        """Wait for the batch whose produce and commit are in flight (``overlap``);
        False if it was stopped during an outage (nothing of it committed).

        Raises:
            streaming.errors.FatalError: what that batch's produce raised.
        """
        task, self._finishing = self._finishing, None
        return True if task is None else await task

    async def _finish(
        self,
        records: Sequence[ConsumerRecord],
        messages: list[Message],
        stop: asyncio.Event,
        after_produce: Callable[[], Awaitable[Any]] | None,
    ) -> bool:
        """Produce, run ``after_produce``, commit; False when stopped in an outage."""
        started = time.perf_counter()
        if not (await self.retry(lambda: self.produce(messages), stop, service="kafka"))[0]:
            return False
        self.on_timing("produce", time.perf_counter() - started)
        self.on_point("after_produce")
        if after_produce is not None and not (await self.retry(after_produce, stop))[0]:
            return False
        started = time.perf_counter()
        await self.commit(records)
        self.on_timing("commit", time.perf_counter() - started)
        self.on_point("after_commit")
        return True

    async def produce(self, messages: Sequence[Message]) -> None:
        """Send every message and wait for every acknowledgement. A partial failure
        re-sends the whole batch: duplicates (same event ids), never gaps."""
        futures = [
            await self.producer.send(
                m.topic,
                value=m.value,
                key=m.key,
                headers=list(m.headers) or None,
            )
            for m in messages
        ]
        await asyncio.gather(*futures)

    async def commit(self, records: Sequence[ConsumerRecord]) -> None:
        """Commit the offsets after ``records``. A commit refused because the group
        rebalanced is not an error: the next owner re-reads from the last committed
        offset, and what it redoes is harmless (compare-and-set, event ids)."""
        try:
            await self.consumer.commit(next_offsets(records))
        except KafkaError as exc:
            self.on_commit_refused()
            log.warning("offset commit refused (%s); the new owner re-reads", exc)

    # ------------------------------------------------------------------ retry

    async def retry(
        self,
        step: Callable[[], Awaitable[T]],
        stop: asyncio.Event,
        *,
        service: str = "",
        what: str = "batch",
    ) -> tuple[bool, T | None]:
        """(True, ``await step()``), retried with backoff while it fails transiently;
        (False, None) once ``stop`` is set during an outage.

        Raises:
            streaming.errors.FatalError: ``step`` failed in a way waiting won't fix.
        """
        backoff = self.new_backoff()
        while True:
            try:
                result = await step()
            except (asyncio.CancelledError, KeyboardInterrupt):
                raise
            except Exception as exc:  # classified: transient or fatal
                error: StreamError = classify(exc, service=service, addresses=self.addresses)
                if not error.retriable:
                    self.health.fatal = str(error)[:300]
                    if error is exc:
                        raise
                    raise error from exc
                self.health.degrade(error)
                self.on_outage(error.service)
                delay = backoff.next_delay()
                log.warning(
                    "%s unavailable (%s); %s retried in %.1fs", error.service, error, what, delay
                )
                if not await backoff.wait(stop, delay):
                    return False, None
                continue
            if self.health.outage is not None:
                log.info("%s: recovered", what)
            self.health.recover()
            self.health.beat()
            return True, result


def worker_kafka_clients(
    s: WorkerSettings, security: dict[str, Any]
) -> tuple[AIOKafkaProducer, AIOKafkaConsumer]:
    """The emotion worker's producer and group consumer (not started); benchmarks/echo.py
    measures the broker's floor with these very clients."""
    servers = s.bootstrap_servers()
    producer = AIOKafkaProducer(
        bootstrap_servers=servers,
        acks="all",
        linger_ms=1,
        max_request_size=max(s.max_message_bytes * 2, 1_048_576),
        request_timeout_ms=15_000,
        **security,
    )
    consumer = AIOKafkaConsumer(
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
    return producer, consumer
