"""`cfnesa replay`: play transcript dialogues as concurrent live calls.

Each dialogue becomes one call with a fresh conversation id; ``calls`` of them
run at once, and all of them together send ``rate`` utterances per second.
A call sends its utterances in order, seq 0, 1, ..., then an ``end`` whose seq
is the number of utterances; every message is keyed by the conversation id, so
one call stays on one partition and in order.

Two modes:

- ``features``: the text is encoded here with MiniLM and produced to
  ``utterance-features`` (what a real upstream with a feature extractor does).
  Encoding runs in an executor thread, a batch of dialogues at a time, ahead of
  the calls that need it, so the event loop never waits on a forward pass.
- ``text``: the text is produced to ``utterance-text``, for ``cfnesa featurize``.

Conversation ids are ``<prefix><n:04d>-<run tag>`` (``call-0001-3fa9c2``): the run
tag keeps a second replay from reusing the id of a call that already ended.

Roles (``roles``): the transcripts are not calls, so a rule gives them roles.
``first-agent`` (the default): the speaker of a dialogue's first utterance is the
agent (an agent opens the call), every other speaker a customer. ``none``: no
role is sent (as a producer from before roles).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, TypeVar

import numpy as np
from aiokafka import AIOKafkaProducer

from streaming.events import end_event, text_end_message, text_message, utc_now_iso, utterance_event
from streaming.security import kafka_client_options, start_kafka_client
from streaming.settings import Settings

if TYPE_CHECKING:
    from tqdm import tqdm

    from model.data import TranscriptDialogue
    from model.encoder import SentenceEncoder

log = logging.getLogger(__name__)

Mode = Literal["features", "text"]
MODES: tuple[Mode, ...] = ("features", "text")
RoleRule = Literal["first-agent", "none"]
ROLE_RULES: dict[str, str] = {
    "first-agent": "the first speaker of each call is the agent, the others customers",
    "none": "no roles are sent",
}


def assign_roles(speakers: Sequence[str], rule: RoleRule = "first-agent") -> list[str | None]:
    """Each utterance's role under ``rule`` (module docstring)."""
    if rule == "none" or not speakers:
        return [None] * len(speakers)
    if rule != "first-agent":
        raise ValueError(f"roles must be one of {sorted(ROLE_RULES)}, got {rule!r}")
    agent = speakers[0]
    return ["agent" if s == agent else "customer" for s in speakers]


ENCODE_BATCH_UTTERANCES = 64  # dialogues are encoded together until they hold this many

T = TypeVar("T")


@dataclass
class ReplayStats:
    """What a replay sent.

    Attributes:
        run_tag: the tag appended to this run's conversation ids.
        conversation_ids: every call started, in start order.
        utterances: utterance messages acknowledged by the broker.
        ended: calls whose end message was acknowledged (a call cut short by a
            stop still gets its end).
        seconds: wall time of the replay.
    """

    run_tag: str
    conversation_ids: list[str] = field(default_factory=list)
    utterances: int = 0
    ended: int = 0
    seconds: float = 0.0

    @property
    def utterances_per_s(self) -> float:
        """The achieved send rate."""
        return self.utterances / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class _Call:
    """One dialogue scheduled as a call, with its vectors in features mode."""

    conversation_id: str
    dialogue: TranscriptDialogue
    vectors: np.ndarray | None  # float32 (L, 384), or None in text mode


class _Pacer:
    """Hands out send slots ``1 / rate`` seconds apart, shared by every call.

    A slot is reserved before sleeping, so concurrent calls get distinct slots;
    a pacer that falls behind does not burst to catch up.
    """

    def __init__(self, rate: float) -> None:
        self.interval_s = 1.0 / rate if rate > 0 else 0.0
        self._next = 0.0

    async def wait(self, stop: asyncio.Event) -> bool:
        """Wait for the next slot; False if ``stop`` was set first."""
        if self.interval_s:
            now = time.monotonic()
            slot = max(self._next, now)
            self._next = slot + self.interval_s
            if slot > now:
                await _sleep_unless(stop, slot - now)
        return not stop.is_set()


def new_run_tag() -> str:
    """Six hex digits, different for every run."""
    return secrets.token_hex(3)


async def replay(
    settings: Settings,
    dialogues: Sequence[TranscriptDialogue],
    *,
    calls: int = 8,
    rate: float = 4.0,
    mode: Mode = "features",
    encoder: SentenceEncoder | None = None,
    loop: bool = False,
    progress: bool = True,
    prefix: str = "call-",
    run_tag: str | None = None,
    include_text: bool = True,
    stop: asyncio.Event | None = None,
    roles: RoleRule = "first-agent",
) -> ReplayStats:
    """Play dialogues as concurrent calls into Kafka.

    Args:
        settings: bootstrap servers, their TLS / SASL settings, and topics
            (input_topic for features, text_topic for text).
        dialogues: the transcripts to play, in order (see
            `model.data.read_transcripts`).
        calls: how many calls run at once.
        rate: utterances per second over all calls; 0 or less sends as fast as
            the broker acknowledges.
        mode: "features" (encode here) or "text" (for `cfnesa featurize`).
        encoder: a sentence encoder to reuse in features mode; MiniLM is loaded
            when None.
        loop: start over with new conversation ids when every dialogue was played.
        progress: draw a tqdm bar of utterances sent.
        prefix: conversation id prefix.
        run_tag: the id suffix; a random one when None, none at all when "".
        include_text: carry the transcript in features events.
        stop: set it to end the replay: calls in progress send their end and stop.
        roles: how the speakers get roles (module docstring).

    Returns:
        What was sent.

    Raises:
        ValueError: bad calls or mode, or no dialogues.
        aiokafka.errors.KafkaError: the broker refused a message after the
            producer's own retries.
        streaming.security.ConnectionSecurityError: authentication or TLS failed.
    """
    if calls < 1:
        raise ValueError(f"calls must be >= 1, got {calls}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not dialogues:
        raise ValueError("no dialogues to replay")
    if roles not in ROLE_RULES:
        raise ValueError(f"roles must be one of {sorted(ROLE_RULES)}, got {roles!r}")
    stop = stop or asyncio.Event()
    tag = new_run_tag() if run_tag is None else run_tag
    stats = ReplayStats(run_tag=tag)
    started = time.monotonic()
    security = kafka_client_options(settings)
    executor = ThreadPoolExecutor(1, thread_name_prefix="cfnesa-replay")
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers(),
        acks="all",
        linger_ms=2,
        max_request_size=max(settings.max_message_bytes * 2, 1_048_576),
        **security,
    )
    bar: tqdm[None] | None = None
    queue: asyncio.Queue[_Call | None] = asyncio.Queue(maxsize=2 * calls)
    # halt: the caller's stop, or a failed feeder; the players stop on either.
    halt = asyncio.Event()
    relay = asyncio.create_task(_set_when(stop, halt))
    feeder: asyncio.Task[None] | None = None
    try:
        # first: a wrong bootstrap or password fails before the model loads
        await start_kafka_client(producer, settings.bootstrap_servers(), security)
        if mode == "features" and encoder is None:
            encoder = await asyncio.get_running_loop().run_in_executor(executor, _load_encoder)
        bar = _progress_bar(None if loop else sum(d.length for d in dialogues), progress)
        feeder = asyncio.create_task(
            _feed(
                queue,
                dialogues,
                _conversation_ids(prefix, tag),
                encoder if mode == "features" else None,
                executor,
                loop,
                calls,
            )
        )
        feeder.add_done_callback(lambda _: halt.set() if _failed(feeder) else None)
        spec = encoder.feature_spec if encoder is not None else ""
        player = _Player(settings, producer, mode, spec, _Pacer(rate), halt, stats, bar)
        player.include_text = include_text
        player.roles = roles
        await asyncio.gather(*(player.run(queue) for _ in range(calls)))
        if _failed(feeder):
            feeder.result()  # an encoding error surfaces here
    finally:
        for task in (feeder, relay):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        with contextlib.suppress(Exception):
            await producer.stop()
        executor.shutdown(wait=False)
        if bar is not None:
            bar.close()
        stats.seconds = time.monotonic() - started
    return stats


def _load_encoder() -> SentenceEncoder:
    from model.encoder import TextEncoder

    return TextEncoder()


def _progress_bar(total: int | None, enabled: bool) -> tqdm[None] | None:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="utt", desc="replay", dynamic_ncols=True)


def _conversation_ids(prefix: str, tag: str) -> Iterator[str]:
    n = 1
    while True:
        yield f"{prefix}{n:04d}-{tag}" if tag else f"{prefix}{n:04d}"
        n += 1


async def _feed(
    queue: asyncio.Queue[_Call | None],
    dialogues: Sequence[TranscriptDialogue],
    names: Iterator[str],
    encoder: SentenceEncoder | None,
    executor: ThreadPoolExecutor,
    loop: bool,
    calls: int,
) -> None:
    """Put calls on the queue in dialogue order, then one None per call slot.

    In features mode a batch of dialogues is encoded at a time; the bounded
    queue keeps the encoder only a little ahead of the calls.
    """
    event_loop = asyncio.get_running_loop()
    cache: dict[int, np.ndarray] = {}  # with loop, each dialogue is encoded once
    while True:
        for group in _encode_groups(dialogues):
            if encoder is not None and group[0] not in cache:
                texts = [t for i in group for t in dialogues[i].texts]
                matrix = await event_loop.run_in_executor(executor, encoder.encode, texts)
                start = 0
                for i in group:  # (L_i, 384) slices of (sum L_i, 384)
                    cache[i] = matrix[start : start + dialogues[i].length]
                    start += dialogues[i].length
            for i in group:
                vectors = (cache.get(i) if loop else cache.pop(i, None)) if encoder else None
                await queue.put(_Call(next(names), dialogues[i], vectors))
        if not loop:
            break
    for _ in range(calls):
        await queue.put(None)


def _encode_groups(dialogues: Sequence[TranscriptDialogue]) -> Iterator[list[int]]:
    """Consecutive dialogue indices, grouped until a group holds
    ENCODE_BATCH_UTTERANCES utterances."""
    group: list[int] = []
    size = 0
    for i, d in enumerate(dialogues):
        group.append(i)
        size += d.length
        if size >= ENCODE_BATCH_UTTERANCES:
            yield group
            group, size = [], 0
    if group:
        yield group


def _failed(task: asyncio.Task[None]) -> bool:
    return task.done() and not task.cancelled() and task.exception() is not None


async def _set_when(source: asyncio.Event, target: asyncio.Event) -> None:
    await source.wait()
    target.set()


class _Player:
    """What every call slot shares: the producer, the pacer, the counters."""

    def __init__(
        self,
        settings: Settings,
        producer: AIOKafkaProducer,
        mode: Mode,
        feature_spec: str,
        pacer: _Pacer,
        halt: asyncio.Event,
        stats: ReplayStats,
        bar: tqdm[None] | None,
    ) -> None:
        self.producer = producer
        self.mode = mode
        self.topic = settings.input_topic if mode == "features" else settings.text_topic
        self.pacer = pacer
        self.halt = halt
        self.stats = stats
        self.bar = bar
        self.feature_spec = feature_spec
        self.include_text = True  # carry transcripts in features events
        self.roles: RoleRule = "first-agent"

    async def run(self, queue: asyncio.Queue[_Call | None]) -> None:
        """One call slot: take the next call and play it, until none is left or halted."""
        while not self.halt.is_set():
            call = await _unless_set(queue.get(), self.halt)
            if call is None:
                return
            await self.play(call)

    async def play(self, call: _Call) -> None:
        """Send one call's utterances in seq order, then its end."""
        cid = call.conversation_id
        key = cid.encode()
        d = call.dialogue
        sent = 0
        roles = assign_roles(d.speakers, self.roles)
        for seq, (speaker, text) in enumerate(zip(d.speakers, d.texts, strict=True)):
            if not await self.pacer.wait(self.halt):
                break
            ts = utc_now_iso()
            if self.mode == "features":
                assert call.vectors is not None  # the feeder encodes in features mode
                value = utterance_event(
                    cid,
                    seq,
                    speaker,
                    {"text": call.vectors[seq]},
                    self.feature_spec,
                    text=text if self.include_text else None,
                    ts=ts,
                    role=roles[seq],
                )
            else:
                value = text_message(cid, seq, speaker, text, ts=ts, role=roles[seq])
            await self.producer.send_and_wait(self.topic, value=value, key=key)
            if sent == 0:
                self.stats.conversation_ids.append(cid)
            sent += 1
            self.stats.utterances += 1
            if self.bar is not None:
                self.bar.update(1)
        if sent == 0:
            return  # halted before it began: the call never existed
        # A call cut short by a stop still ends, so that the workers summarise it
        # and free its state now rather than when it expires.
        end = end_event if self.mode == "features" else text_end_message
        await self.producer.send_and_wait(self.topic, value=end(cid, sent, utc_now_iso()), key=key)
        self.stats.ended += 1


async def _unless_set(aw: Awaitable[T], event: asyncio.Event) -> T | None:
    """``await aw``, or None (and ``aw`` cancelled) if ``event`` is set first."""
    task = asyncio.ensure_future(aw)
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        return task.result() if task.done() else None
    finally:
        for pending in (task, waiter):
            pending.cancel()


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
