"""The dashboard (streaming/gateway/static/) in a real headless Chromium, end to end.

    events built with streaming.events -> Redis (recent events, as a worker persists them)
                                       -> Kafka (the gateway's topic, as a worker produces them)
    the real gateway (serve_gateway) on a free port -> the page at /?token=...
    -> DevTools protocol (browser.py): Runtime.evaluate on the DOM, mouse clicks, screenshots

Chromium is Debian's ``chromium`` package; when it is missing the set-up installs it
(root and a Debian mirror needed) or skips the module, saying why.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer
from browser import Chromium, Page, find_chromium

from streaming.call_index import CallActivity, CallIndex
from streaming.events import AlertEvent, EmotionEvent, Shift, SummaryEvent, dump_event
from streaming.gateway import TokenSigner, serve_gateway
from streaming.settings import Settings
from streaming.state_store import StateStore
from streaming.topics import ensure_topics

pytestmark = pytest.mark.slow

SECRET = "dashboard-test-secret-not-for-production"
MODEL = "cfnesa-test@dashboard"
LABELS = ("neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger")
# CFNESA_SCREENSHOT_DIR=benchmarks/results keeps a copy of the screenshot (the tests
# themselves never write into the checkout)
SCREENSHOT_DIR = os.environ.get("CFNESA_SCREENSHOT_DIR")
T0 = datetime(2026, 11, 24, 10, 0, 0, tzinfo=UTC)


def _keep_screenshot(shot: Path, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, folder / shot.name)


# ---------------------------------------------------------------- events


def _ts(seconds: float) -> str:
    return (
        (T0 + timedelta(seconds=seconds)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


def emotion(
    cid: str,
    seq: int,
    speaker: str,
    label: str,
    *,
    confidence: float = 0.7,
    shift: float = 0.1,
    text: str | None = None,
) -> EmotionEvent:
    rest = (1.0 - confidence) / (len(LABELS) - 1)
    probabilities = {name: round(confidence if name == label else rest, 4) for name in LABELS}
    return EmotionEvent(
        conversation_id=cid,
        seq=seq,
        speaker=speaker,
        emotion=label,
        confidence=confidence,
        probabilities=probabilities,
        shift=Shift(vs_previous=shift, vs_speaker_previous=shift),
        model=MODEL,
        ts=_ts(seq * 4),
        text=text,
    )


def alert(
    cid: str,
    seq: int,
    speaker: str,
    rule: str,
    severity: str,
    move: tuple[str, str] | None = None,
    p_shift: float | None = None,
    detail: str = "",
) -> AlertEvent:
    return AlertEvent.model_validate(
        {
            "conversation_id": cid,
            "seq": seq,
            "speaker": speaker,
            "rule": rule,
            "severity": severity,
            "from": move[0] if move else None,
            "to": move[1] if move else None,
            "p_shift": p_shift,
            "detail": detail,
            "model": MODEL,
            "ts": _ts(seq * 4),
        }
    )


Event = EmotionEvent | AlertEvent | SummaryEvent | bytes  # bytes: an event's JSON as produced


def with_fields(event: EmotionEvent | AlertEvent | SummaryEvent, **fields: Any) -> bytes:
    """The event's JSON with fields added as a newer worker sends them (roles, sentiment,
    evidence: issue 14's shape), whether or not streaming.events knows them yet."""
    body = json.loads(dump_event(event))
    body.update(fields)
    return json.dumps(body, separators=(",", ":")).encode()


def _raw(event: Event) -> bytes:
    return event if isinstance(event, bytes) else dump_event(event)


def _cid(event: Event) -> str:
    return (
        str(json.loads(event)["conversation_id"])
        if isinstance(event, bytes)
        else event.conversation_id
    )


def scripted_call(cid: str, script: list[tuple[str, str, float]]) -> list[EmotionEvent]:
    """Utterances from (speaker, emotion, shift) triples, with transcripts."""
    return [
        emotion(cid, seq, spk, label, shift=shift, text=f"{cid} utterance {seq} ({spk})")
        for seq, (spk, label, shift) in enumerate(script)
    ]


# ---------------------------------------------------------------- services


class Publisher:
    """Writes events the way a worker does: persisted to Redis first, then produced."""

    def __init__(
        self, bootstrap: str, redis_url: str, topic: str, prefix: str, timeout_s: float
    ) -> None:
        self.topic = topic
        self.timeout_s = timeout_s  # a stuck broker fails the test instead of hanging it
        self.producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=2)
        self.redis = aioredis.from_url(redis_url)
        self.store = StateStore(self.redis, prefix=prefix)

    async def start(self) -> None:
        await self.producer.start()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.producer.stop()
        await self.redis.aclose()

    async def persist(self, events: Iterable[Event]) -> list[Event]:
        events = list(events)
        async with self.redis.pipeline(transaction=False) as pipe:
            for ev in events:
                key = self.store.events_key(_cid(ev))
                pipe.rpush(key, _raw(ev))
                pipe.ltrim(key, -self.store.recent_events, -1)
            await pipe.execute()
        return events

    async def publish(self, events: Iterable[Event], *, persist: bool = True) -> None:
        async with asyncio.timeout(self.timeout_s):
            events = await self.persist(events) if persist else list(events)
            futures = [
                await self.producer.send(self.topic, _raw(ev), key=_cid(ev).encode("utf-8"))
                for ev in events
            ]
            await self.producer.flush()
            await asyncio.gather(*futures)


class GatewayProcess:
    """The real gateway in this event loop, stoppable and restartable on its port."""

    def __init__(self, settings: Settings, scaled: Callable[[float], float]) -> None:
        self.settings = settings
        self.scaled = scaled
        self.port = 0
        self._stop: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._stop = asyncio.Event()
        ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        settings = self.settings.model_copy(update={"gateway_port": self.port})
        self._task = asyncio.create_task(
            serve_gateway(settings, self._stop, ready=ready.set_result)
        )
        await asyncio.wait(
            {self._task, ready}, timeout=self.scaled(30), return_when="FIRST_COMPLETED"
        )
        if self._task.done():
            self._task.result()  # raises why it stopped
        self.port = await asyncio.wait_for(ready, 0.1)

    async def stop(self) -> None:
        if self._task is None or self._stop is None:
            return
        self._stop.set()
        await asyncio.wait_for(self._task, self.scaled(15))
        self._task = None

    def url(self, token: str) -> str:
        return f"http://127.0.0.1:{self.port}/?token={token}"


@pytest.fixture(scope="module")
def chromium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chromium]:
    path, why = find_chromium()
    if path is None:
        # the dashboard's contract is a real browser: without one this is a failure, unless
        # a developer says explicitly that this machine cannot have one
        if os.environ.get("CFNESA_ALLOW_NO_BROWSER") == "1":
            pytest.skip(f"CFNESA_ALLOW_NO_BROWSER=1 and no headless browser: {why}")
        pytest.fail(f"no headless browser for the dashboard test: {why}")
    with Chromium.launch(path, tmp_path_factory.mktemp("chromium")) as browser:
        yield browser


@pytest.fixture
async def stack(
    kafka: Any, redis_server: Any, unique: str, scaled: Callable[[float], float]
) -> AsyncIterator[tuple[GatewayProcess, Publisher, str]]:
    """(gateway, publisher, token) on the shared broker and Redis, under this test's names."""
    topic = f"{unique}-emotion-events"
    await ensure_topics(kafka.bootstrap, {topic: 2}, timeout=scaled(30))
    settings = Settings(
        kafka_bootstrap=kafka.bootstrap,
        redis_url=redis_server.url,
        output_topic=topic,
        key_prefix=unique,
        gateway_host="127.0.0.1",
        gateway_port=0,
        gateway_secret=SECRET,
    )
    gateway = GatewayProcess(settings, scaled)
    publisher = Publisher(kafka.bootstrap, redis_server.url, topic, unique, scaled(30))
    await publisher.start()
    await gateway.start()
    token = TokenSigner(SECRET).mint("default", all_conversations=True, ttl_s=3600)
    try:
        yield gateway, publisher, token
    finally:
        await gateway.stop()
        await publisher.close()


async def open_dashboard(page: Page, url: str, timeout_s: float) -> None:
    await page.goto(url)
    await page.wait_for("window.__cfnesa && window.__cfnesa.connected", timeout_s)


# ---------------------------------------------------------------- tests


ROWS_JS = """[...document.querySelectorAll('li.call')].map((r) => ({
    id: r.dataset.id,
    ended: r.classList.contains('ended'),
    focusable: r.tabIndex === 0,
    chips: [...r.querySelectorAll('.c-chips .chip')].map((c) => c.textContent),
    cells: r.querySelectorAll('.c-timeline .cell').length,
    shiftCells: r.querySelectorAll('.c-timeline .cell.shift').length,
    badge: r.querySelector('.c-alerts .badge')?.textContent ?? null,
    severity: r.dataset.severity ?? null,
    shift: r.querySelector('.c-shift .val').textContent,
    summary: ((s) => (s.hidden ? null : s.textContent))(r.querySelector('.c-summary')),
}))"""


async def test_dashboard_shows_calls_emotions_alerts_and_details(
    chromium: Chromium,
    stack: tuple[GatewayProcess, Publisher, str],
    tmp_path: Path,
    scaled: Callable[[float], float],
) -> None:
    gateway, publisher, token = stack
    # A call already under way before the page opens: only Redis (and the past) has it.
    early = scripted_call("call-early", [("agent", "neutral", 0.1), ("customer", "joy", 0.2)] * 3)
    await publisher.publish(early[:5])

    async with Page.open(chromium.ws_url) as page:
        await open_dashboard(page, gateway.url(token), scaled(15))
        assert "token=" not in await page.evaluate("location.href")  # kept in memory only

        calm = [("agent", "neutral", 0.1), ("customer", "neutral", 0.1)] * 4
        angry = [("agent", "neutral", 0.1), ("customer", "neutral", 0.1)] * 2 + [
            ("agent", "neutral", 0.1),
            ("customer", "anger", 0.83),  # seq 5: the shift that fires the alert
            ("agent", "sadness", 0.3),
            ("customer", "anger", 0.2),
        ]
        sad = [("agent", "neutral", 0.1)] + [
            ("customer", "sadness", 0.6),
            ("agent", "fear", 0.2),
        ] * 3
        sad.append(("customer", "sadness", 0.1))
        calls = {
            "call-0001": scripted_call("call-0001", calm),
            "call-0002": scripted_call("call-0002", angry),
            "call-0003": scripted_call("call-0003", sad),
            "call-0004": scripted_call("call-0004", calm),
            # a label outside the known palette ("contempt") gets a colour of its own
            "call-0005": scripted_call(
                "call-0005",
                [("agent", "joy", 0.1), ("customer", "surprise", 0.4)] * 3
                + [("agent", "joy", 0.1), ("customer", "contempt", 0.4)],
            ),
        }
        extras: dict[int, list[Event]] = {
            5: [
                alert(
                    "call-0002", 5, "customer", "emotion_shift", "high", ("neutral", "anger"), 0.83
                ),
                alert(
                    "call-0003", 5, "customer", "sustained_negative", "medium", detail="3 in a row"
                ),
            ],
        }
        summary = SummaryEvent(
            conversation_id="call-0004",
            seq=8,
            utterances=8,
            speakers={"agent": {"neutral": 4}, "customer": {"neutral": 4}},
            shifts=0,
            alerts=0,
            gaps=0,
            first_ts=_ts(0),
            last_ts=_ts(28),
            duration_s=28.0,
            dominant={"agent": "neutral", "customer": "neutral"},
            model=MODEL,
        )
        # The replay, interleaved like live traffic: one utterance of every call per step.
        for seq in range(8):
            step: list[Event] = [events[seq] for events in calls.values()]
            step += extras.get(seq, [])
            if seq == 5:
                step.append(
                    early[5]
                )  # the early call speaks again: its history comes as a snapshot
            await publisher.publish(step)
        await publisher.publish([summary])
        expected = 5 * 8 + 2 + 1 + len(early)
        await page.wait_for(f"window.__cfnesa.eventsSeen >= {expected}", scaled(15))
        await page.wait_for("document.querySelectorAll('li.call').length === 6", scaled(5))
        await page.evaluate(
            "new Promise((ok) => requestAnimationFrame(() => requestAnimationFrame(ok)))"
        )

        rows = {row["id"]: row for row in await page.evaluate(ROWS_JS)}
        assert set(rows) == {*calls, "call-early"}
        assert all(row["focusable"] for row in rows.values())
        assert "customer: anger" in rows["call-0002"]["chips"]
        assert "agent: sadness" in rows["call-0002"]["chips"]
        assert rows["call-0002"]["cells"] == 8
        assert rows["call-0002"]["shiftCells"] == 1  # only seq 5 is >= 0.5
        assert rows["call-0002"]["badge"] == "⚠ 1 alert" and rows["call-0002"]["severity"] == "high"
        assert rows["call-0003"]["severity"] == "medium"
        assert rows["call-0001"]["badge"] is None and not rows["call-0001"]["ended"]
        ended = rows["call-0004"]
        assert ended["ended"]
        assert ended["summary"] is not None and "8 utterances" in ended["summary"]
        assert "dominant agent: neutral, customer: neutral" in ended["summary"]
        assert "duration 28s" in ended["summary"]
        # the mid-call join was filled in from the gateway's snapshot, without duplicates
        assert rows["call-early"]["cells"] == 6
        state = await page.evaluate(
            "({seen: __cfnesa.eventsSeen, dups: __cfnesa.duplicates,"
            " early: __cfnesa.calls.get('call-early').utterances.map((u) => u.seq),"
            " alerts: document.getElementById('n-alerts').textContent,"
            " feed: [...document.querySelectorAll('#feed li')].map((li) => li.textContent)})"
        )
        assert state["early"] == [0, 1, 2, 3, 4, 5]
        assert state["seen"] == expected
        assert state["dups"] >= 1  # seq 5 came live and again in the snapshot
        assert state["alerts"] == "2"
        assert any("call-0002" in item and "neutral→anger" in item for item in state["feed"])

        # Click a call: the detail panel shows its utterances, bars, shift and alerts.
        await page.click('li.call[data-id="call-0002"]')
        await page.wait_for(
            "!document.getElementById('detail').hidden &&"
            " document.getElementById('detail-title').textContent === 'call-0002'",
            scaled(5),
        )
        detail = await page.evaluate(
            """(() => {
                const items = [...document.querySelectorAll('#detail-utterances li.utt')];
                const seqs = (cls) => items.filter((li) => li.classList.contains(cls))
                    .map((li) => li.dataset.seq);
                const alerts = document.querySelectorAll('#detail-alerts li');
                return {
                    texts: items.map((li) => li.querySelector('.u-text')?.textContent),
                    bars: items.map((li) => li.querySelectorAll('.probs .fill').length),
                    shifts: seqs('shift'),
                    alerted: seqs('alerted'),
                    alerts: [...alerts].map((li) => li.textContent),
                    selected: document.querySelector('li.call.selected')?.dataset.id,
                };
            })()"""
        )
        assert detail["texts"] == [
            f"call-0002 utterance {i} ({'agent' if i % 2 == 0 else 'customer'})" for i in range(8)
        ]
        assert detail["bars"] == [len(LABELS)] * 8
        assert detail["shifts"] == ["5"] and detail["alerted"] == ["5"]
        assert len(detail["alerts"]) == 1 and "emotion shift" in detail["alerts"][0]
        assert detail["selected"] == "call-0002"
        chip = await page.evaluate(
            """(() => {
                const chip = [...document.querySelectorAll('li.call[data-id="call-0005"] .chip')]
                    .find((c) => c.textContent === 'customer: contempt');
                return chip && getComputedStyle(chip).backgroundColor;
            })()"""
        )
        assert chip and chip != "rgb(154, 165, 177)"  # not the fallback grey

        # The keyboard does what the mouse does: Enter on a focused row opens it.
        await page.evaluate(
            """(() => {
                const row = document.querySelector('li.call[data-id="call-0003"]');
                row.focus();
                row.dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter', bubbles: true}));
            })()"""
        )
        await page.wait_for(
            "document.getElementById('detail-title').textContent === 'call-0003'"
            " && document.activeElement.dataset.id === 'call-0003'",
            scaled(5),
        )
        await page.click('li.call[data-id="call-0002"]')
        await page.wait_for(
            "document.getElementById('detail-title').textContent === 'call-0002'", scaled(5)
        )
        assert not [line for line in page.console if line.startswith("exception")], page.console

        shot = await page.screenshot(tmp_path / "dashboard.png")
        assert shot.stat().st_size > 10_000
        if SCREENSHOT_DIR:
            await asyncio.to_thread(_keep_screenshot, shot, Path(SCREENSHOT_DIR))


async def test_dashboard_reconnects_and_resumes_from_a_snapshot(
    chromium: Chromium,
    stack: tuple[GatewayProcess, Publisher, str],
    scaled: Callable[[float], float],
) -> None:
    gateway, publisher, token = stack
    events = scripted_call("call-r1", [("agent", "neutral", 0.1), ("customer", "anger", 0.7)] * 4)
    async with Page.open(chromium.ws_url) as page:
        await open_dashboard(page, gateway.url(token), scaled(15))
        await publisher.publish(events[:3])
        await page.wait_for("__cfnesa.calls.get('call-r1')?.utterances.length === 3", scaled(10))

        await gateway.stop()  # clients get 1001 going away
        status = await page.wait_for(
            "!__cfnesa.connected && __cfnesa.status === 'reconnecting'"
            " && document.getElementById('status-text').textContent",
            scaled(5),
        )
        assert "reconnecting" in status
        assert await page.evaluate("document.body.classList.contains('stale')")
        # While the gateway is away the call goes on; a restarted gateway reads Kafka
        # from the latest offset, so these reach the page only through the snapshot.
        await publisher.publish(events[3:6])
        down_at = time.monotonic()
        await gateway.start()  # same port
        await page.wait_for("__cfnesa.connected", scaled(15))
        reconnect_s = time.monotonic() - down_at
        await page.wait_for("__cfnesa.calls.get('call-r1').utterances.length === 6", scaled(10))
        await publisher.publish(events[6:])
        await page.wait_for("__cfnesa.calls.get('call-r1').utterances.length === 8", scaled(10))
        await page.evaluate(
            "new Promise((ok) => requestAnimationFrame(() => requestAnimationFrame(ok)))"
        )
        result = await page.evaluate(
            "({seqs: __cfnesa.calls.get('call-r1').utterances.map((u) => u.seq),"
            " cells: document.querySelectorAll('li.call[data-id=\"call-r1\"] .cell').length,"
            " seen: __cfnesa.eventsSeen, status: __cfnesa.status})"
        )
        assert result == {"seqs": list(range(8)), "cells": 8, "seen": 8, "status": "live"}
        print(f"\ndashboard reconnected {reconnect_s:.2f} s after the gateway came back")


async def test_dashboard_first_paint_with_200_live_calls(
    chromium: Chromium,
    stack: tuple[GatewayProcess, Publisher, str],
    scaled: Callable[[float], float],
) -> None:
    gateway, publisher, token = stack
    n_calls, history, rate_per_s = 200, 20, 500
    ids = [f"live-{i:04d}" for i in range(n_calls)]
    speakers = ("agent", "customer")

    def utterance(i: int, seq: int) -> EmotionEvent:
        label = LABELS[(i + seq) % len(LABELS)]
        return emotion(ids[i], seq, speakers[seq % 2], label, shift=((i * 7 + seq) % 10) / 10)

    # 200 calls under way: their recent history is in Redis, as workers left it.
    await publisher.persist(utterance(i, seq) for i in range(n_calls) for seq in range(history))
    next_seq = [history] * n_calls
    produced = 0
    # A flag, not cancel(), ends the stream: on Python 3.11 asyncio.wait_for (inside
    # redis-py) can swallow a cancellation, and this loop would then never end.
    streaming = asyncio.Event()
    streaming.set()

    async def stream() -> None:  # ~500 events/s over all calls, in 20 ms ticks
        nonlocal produced
        tick_s = 0.02
        per_tick = int(rate_per_s * tick_s)
        start = time.monotonic()
        k = 0
        while streaming.is_set():
            batch = []
            for _ in range(per_tick):
                i = k % n_calls
                batch.append(utterance(i, next_seq[i]))
                next_seq[i] += 1
                k += 1
            await publisher.publish(batch)
            produced += len(batch)
            await asyncio.sleep(max(0.0, start + produced / rate_per_s - time.monotonic()))

    streamer = asyncio.create_task(stream())
    try:
        await asyncio.sleep(0.5)  # the calls are live before the page opens
        async with Page.open(chromium.ws_url) as page:
            t_nav = time.monotonic()
            await page.goto(gateway.url(token))
            await page.wait_for(
                "performance.getEntriesByName('cfnesa:rows-200').length", scaled(15)
            )
            wall_s = time.monotonic() - t_nav
            paint = await page.evaluate(
                """(() => {
                    const at = (name) => performance.getEntriesByName(name)[0]?.startTime ?? null;
                    const fcp = performance.getEntriesByType('paint')
                        .find((e) => e.name === 'first-contentful-paint')?.startTime ?? null;
                    return {fcp, connected: at('cfnesa:connected'), rows1: at('cfnesa:rows-1'),
                            rows200: at('cfnesa:rows-200'),
                            loaded: performance.getEntriesByType('navigation')[0]?.loadEventEnd};
                })()"""
            )
            # Stay a while at 500 events/s: frames stay short, nobody is closed for being slow.
            await page.evaluate(
                "Object.assign(__cfnesa.perf, {frames: 0, renderMsMax: 0, renderMsTotal: 0,"
                " longFrames: 0, longTasks: 0}); __cfnesa.mark0 = __cfnesa.eventsLive;"
            )
            measure_s = 4.0
            produced_before = produced
            await asyncio.sleep(measure_s)
            produced_during = produced - produced_before
            live = await page.evaluate(
                "({perf: __cfnesa.perf, events: __cfnesa.eventsLive - __cfnesa.mark0,"
                " connected: __cfnesa.connected, rows: document.querySelectorAll('li.call').length,"
                " minCells: Math.min(...[...document.querySelectorAll('li.call')].map("
                "(r) => r.querySelectorAll('.cell').length)),"
                " snapshots: [...__cfnesa.calls.values()]"
                ".filter((c) => c.utterances[0].seq === 0).length})"
            )
    finally:
        streaming.clear()
        await asyncio.wait_for(streamer, scaled(15))
    perf = live["perf"]
    frames = max(perf["frames"], 1)
    report = {
        "first_contentful_paint_ms": round(paint["fcp"] or -1, 1),
        "connected_ms": round(paint["connected"] or -1, 1),
        "first_row_ms": round(paint["rows1"] or -1, 1),
        "rows_200_ms": round(paint["rows200"], 1),
        "wall_to_200_rows_s": round(wall_s, 2),
        "produced_events_per_s": round(produced_during / measure_s),
        "live_events_per_s": round(live["events"] / measure_s),
        "frames_per_s": round(perf["frames"] / measure_s, 1),
        "render_ms_mean": round(perf["renderMsTotal"] / frames, 2),
        "render_ms_max": round(perf["renderMsMax"], 2),
        "frames_over_16ms": perf["longFrames"],
        "long_tasks": perf["longTasks"],
    }
    print("\ndashboard with 200 live calls at ~500 events/s:", json.dumps(report))
    assert live["connected"], "the dashboard was disconnected (4008 too slow?)"
    assert live["rows"] == n_calls
    assert live["snapshots"] == n_calls  # every call's history came from its snapshot
    assert live["minCells"] >= history
    assert live["events"] >= 0.6 * rate_per_s * measure_s
    assert paint["rows200"] < scaled(3000), report  # the goal is 1 s; a 2-core CI box gets slack


async def test_dashboard_explains_tokens_it_cannot_use(
    chromium: Chromium,
    stack: tuple[GatewayProcess, Publisher, str],
    scaled: Callable[[float], float],
) -> None:
    gateway, publisher, _ = stack
    stopped = (
        "__cfnesa.status === 'stopped' && !document.getElementById('banner').hidden"
        " && document.getElementById('banner').textContent"
    )
    async with Page.open(chromium.ws_url) as page:
        await page.goto(gateway.url("").replace("?token=", ""))
        assert "No token" in await page.wait_for(stopped, scaled(5))

        forged = TokenSigner("another-secret-of-16-chars").mint("default", all_conversations=True)
        await page.goto(gateway.url(forged))
        assert "bad_signature" in await page.wait_for(stopped, scaled(10))

        # A token without "all": the gateway answers forbidden, the page says so and shows
        # the calls the token names.
        named = TokenSigner(SECRET).mint("default", ["call-x1", "vip-*"])
        await page.goto(gateway.url(named))
        await page.wait_for("__cfnesa.connected", scaled(10))
        text = await page.wait_for(
            "!document.getElementById('banner').hidden"
            " && document.getElementById('banner').textContent",
            scaled(5),
        )
        assert "forbidden" in text and "call-x1" in text and "vip-*" in text
        await publisher.publish([emotion("call-x2", 0, "agent", "joy")])
        await publisher.publish([emotion("call-x1", 0, "agent", "anger")])
        await page.wait_for("__cfnesa.calls.has('call-x1')", scaled(10))
        assert await page.evaluate("[...__cfnesa.calls.keys()]") == ["call-x1"]


DEMO_LINES = [
    ("agent", "Good morning, you are through to billing, how can I help?"),
    ("customer", "I was charged twice this month and nobody answers my emails."),
    ("agent", "I am sorry about that, let me look at your account."),
    ("customer", "This is ridiculous, I have been waiting for two weeks!"),
    ("agent", "I can see the double charge; I am refunding it now."),
    ("customer", "Oh, thank you, that is a relief."),
]


async def test_the_demo_moves_the_dashboard(
    chromium: Chromium, tmp_path: Path, scaled: Callable[[float], float]
) -> None:
    """`cfnesa demo` as a newcomer runs it: open the URL it prints and watch calls
    appear and their timelines grow while the replay goes on; open one call."""
    data = tmp_path / "calls.jsonl"
    with data.open("w") as fh:
        for i in range(3):
            utterances = [{"speaker": s, "text": t, "emotion": "neutral"} for s, t in DEMO_LINES]
            fh.write(
                json.dumps({"dialogue_id": f"d{i}", "split": "test", "utterances": utterances})
            )
            fh.write("\n")
    cfnesa = Path(sys.executable).parent / "cfnesa"
    demo = await asyncio.create_subprocess_exec(
        str(cfnesa), "demo", "--data", str(data), "--calls", "3", "--rate", "1.5",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=tmp_path,
    )  # fmt: skip
    assert demo.stdout is not None
    seen: list[str] = []
    try:
        url = None
        while url is None:
            line = (await asyncio.wait_for(demo.stdout.readline(), scaled(120))).decode()
            assert line, "the demo ended before printing the dashboard URL:\n" + "".join(seen)
            seen.append(line)
            if "dashboard: http://127.0.0.1:" in line:
                url = line.split("dashboard: ", 1)[1].strip()

        async def drain() -> None:  # keep reading so the demo never blocks on its pipe
            while line := await demo.stdout.readline():
                seen.append(line.decode())

        reader = asyncio.create_task(drain())
        async with Page.open(chromium.ws_url) as page:
            await open_dashboard(page, url, scaled(15))
            cells = "document.querySelectorAll('li.call .c-timeline .cell').length"
            await page.wait_for(f"{cells} >= 2", scaled(90))
            first = await page.evaluate(cells)
            await page.wait_for(f"{cells} > {first} + 2", scaled(30))  # it moves
            # the replay loops: between one round's ends and the next round's first
            # emotions every listed call may have ended for a moment
            active_js = "document.querySelectorAll('li.call:not(.ended)').length"
            await page.wait_for(f"{active_js} >= 1", scaled(30))
            rows = await page.evaluate(ROWS_JS)
            # 3 calls at a time; ended ones stay listed (how many depends on the machine's pace)
            active = [r for r in rows if not r["ended"]]
            assert 1 <= len(active) <= 3 and all(r["id"].startswith("call-") for r in rows), rows
            speakers = {chip.split(": ")[0] for r in rows for chip in r["chips"]}
            assert speakers and speakers <= {"agent", "customer"}, rows
            await page.click(f'li.call[data-id="{rows[0]["id"]}"]')
            await page.wait_for(
                "!document.getElementById('detail').hidden && "
                "document.querySelectorAll('#detail-utterances li.utt').length > 0",
                scaled(10),
            )
            texts = await page.evaluate(
                "[...document.querySelectorAll('#detail-utterances .u-text')]"
                ".map((e) => e.textContent)"
            )
            assert set(texts) <= {t for _, t in DEMO_LINES}, texts  # the demo enables text
            assert not [c for c in page.console if c.startswith("exception")], page.console
            shot = await page.screenshot(tmp_path / "demo-dashboard.png")
            assert shot.stat().st_size > 10_000
    finally:
        if demo.returncode is None:
            demo.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(demo.wait(), scaled(30))
    await reader
    assert code in (0, 130), "".join(seen)[-3000:]


# ---------------------------------------------------------------- calls in progress, roles, agents


def feeling(cid: str, seq: int, role: str | None, label: str, sentiment: float | None) -> bytes:
    """An emotion event of issue 14's shape: the speaker's role and the sentiment."""
    speaker = role or ("agent" if seq % 2 == 0 else "customer")
    fields: dict[str, Any] = {"role": role}
    if sentiment is not None:
        fields["sentiment"] = sentiment
    return with_fields(emotion(cid, seq, speaker, label), **fields)


async def index_calls(publisher: Publisher, active: list[str], ended: list[str]) -> None:
    """What workers write after their commits: the tenant's calls in progress and ended."""
    index = CallIndex(publisher.store, state_ttl_s=3600, ended_ttl_s=600, keep_ended=20)
    now = time.time()
    for i, cid in enumerate(active):  # the last one the most recently active
        await index.record([CallActivity(cid, None)], now + i)
    await index.record([CallActivity(cid, None, ended=True) for cid in ended], now)


ORDER_JS = "[...document.querySelectorAll('#active li.call')].map((r) => r.dataset.id)"


async def test_dashboard_opened_mid_shift_shows_calls_in_progress_roles_sentiment_risk(
    chromium: Chromium,
    stack: tuple[GatewayProcess, Publisher, str],
    tmp_path: Path,
    scaled: Callable[[float], float],
) -> None:
    gateway, publisher, token = stack
    calm = [feeling("calm", s, r, "joy", 0.6) for s, r in enumerate(["agent", "customer"] * 3)]
    sour = [feeling("sour", s, r, "sadness", -0.3) for s, r in enumerate(["agent", "customer"] * 3)]
    angry = [
        feeling("angry", 0, "agent", "neutral", 0.1),
        feeling("angry", 1, "customer", "neutral", 0.0),
        feeling("angry", 2, "agent", "neutral", 0.1),
        feeling("angry", 3, "customer", "anger", -0.6),
        feeling("angry", 4, "agent", "fear", -0.2),
        feeling("angry", 5, "customer", "anger", -0.8),
        with_fields(
            alert("angry", 5, "customer", "negative_onset", "high", ("neutral", "anger"), 0.8),
            role="customer",
            evidence=[
                {"seq": 3, "emotion": "anger", "probability": 0.7, "sentiment": -0.6},
                {"seq": 5, "emotion": "anger", "probability": 0.7, "sentiment": -0.8},
            ],
        ),
    ]
    # a customer-only analysis policy: no agent events at all
    customer_only = [feeling("cust-only", s, "customer", "neutral", -0.1) for s in (1, 3, 5)]
    # an older producer: no role, no sentiment anywhere
    legacy = [emotion("legacy", s, ("agent", "customer")[s % 2], "neutral") for s in range(4)]
    done = [feeling("done", s, r, "neutral", -0.3) for s, r in enumerate(["agent", "customer"])]
    figures = {
        "utterances": 1, "sentiment_mean": -0.3, "sentiment_first_third": -0.3,
        "sentiment_last_third": -0.3, "sentiment_trend": -0.25, "sentiment_min": -0.3,
        "negative_share": 0.0, "shifts": 0, "alerts": 0,
    }  # fmt: skip
    done_summary = with_fields(
        SummaryEvent(
            conversation_id="done", seq=2, utterances=2,
            speakers={"agent": {"neutral": 1}, "customer": {"neutral": 1}},
            shifts=0, alerts=0, gaps=0, dominant={"customer": "neutral"}, model=MODEL,
        ),
        roles={"customer": figures, "agent": {**figures, "sentiment_mean": -0.3}},
        by_speaker={"customer": {**figures, "role": "customer"}},
    )  # fmt: skip
    # Workers left all of this in Redis before the page opens; nothing is produced live.
    await publisher.persist([*calm, *sour, *angry, *customer_only, *legacy, *done, done_summary])
    await index_calls(publisher, ["calm", "sour", "angry", "cust-only", "legacy"], ["done"])

    async with Page.open(chromium.ws_url) as page:
        await open_dashboard(page, gateway.url(token), scaled(15))
        # at once: the snapshot of "subscribe all" brought every call in progress
        assert await page.evaluate("__cfnesa.allSnapshot") == {
            "active": 5, "snapshots": 5, "truncated": False, "ended": 1,
        }  # fmt: skip
        assert await page.evaluate("__cfnesa.eventsLive") == 0
        await page.evaluate(
            "new Promise((ok) => requestAnimationFrame(() => requestAnimationFrame(ok)))"
        )
        rows = await page.evaluate(
            """Object.fromEntries([...document.querySelectorAll('li.call')].map((r) => [
                r.dataset.id, {
                    ended: r.classList.contains('ended'),
                    roles: [...r.querySelectorAll('.c-chips .role')].map((c) => c.textContent),
                    chips: [...r.querySelectorAll('.c-chips .chip')].map((c) => c.textContent),
                    points: (r.querySelector('.c-spark polyline')?.getAttribute('points') ?? '')
                        .split(' ').filter(Boolean).length,
                    label: r.querySelector('.c-spark svg')?.getAttribute('aria-label') ?? null,
                    summary: ((s) => (s.hidden ? null : s.textContent))(
                        r.querySelector('.c-summary')),
                }]))"""
        )
        assert set(rows) == {"calm", "sour", "angry", "cust-only", "legacy", "done"}
        assert rows["angry"]["roles"] == ["agent", "customer"]
        assert rows["angry"]["chips"] == ["agent: fear", "customer: anger"]
        assert rows["angry"]["points"] == 3  # the customer's three utterances, not the agent's
        assert "customer sentiment −0.80" in rows["angry"]["label"]
        assert "worsening" in rows["angry"]["label"]
        assert rows["cust-only"]["roles"] == ["customer"] and rows["cust-only"]["points"] == 3
        assert rows["legacy"]["roles"] == ["unknown", "unknown"] and rows["legacy"]["points"] == 0
        assert rows["done"]["ended"] and "customer sentiment −0.30" in rows["done"]["summary"]
        assert "trend −0.25" in rows["done"]["summary"]
        # risk: the open high alert and the most negative customer first, the happy one last
        order = await page.wait_for(f"(({ORDER_JS})[0] === 'angry') && {ORDER_JS}", scaled(5))
        # risk: 2 + 0.9, 0.65, 0.55, 0.5 (no sentiment: neutral), 0.2
        assert order == ["angry", "sour", "cust-only", "legacy", "calm"], order

        # evidence on click: the alert lists the utterances that raised it, and marks them
        await page.click('li.call[data-id="angry"]')
        await page.wait_for(
            "!!document.querySelector('#detail-alerts button.alert-open')", scaled(5)
        )
        await page.click("#detail-alerts button.alert-open")
        evidence = await page.wait_for(
            "document.querySelectorAll('#detail-alerts .evidence li').length === 2 && ({"
            " items: [...document.querySelectorAll('#detail-alerts .evidence li')]"
            "   .map((li) => li.textContent),"
            " marked: [...document.querySelectorAll('#detail-utterances li.utt.evidence')]"
            "   .map((li) => li.dataset.seq)})",
            scaled(5),
        )
        assert evidence["marked"] == ["3", "5"]
        assert "#3" in evidence["items"][0] and "anger 70%" in evidence["items"][0]
        assert "sentiment −0.60" in evidence["items"][0]

        # live: the calm call turns (an alert and a very negative customer): it goes first,
        # and keeps the keyboard focus while its row moves
        await page.evaluate("document.querySelector('li.call[data-id=\"calm\"]').focus()")
        await publisher.publish(
            [
                feeling("calm", 6, "agent", "neutral", 0.0),
                feeling("calm", 7, "customer", "anger", -0.9),
                with_fields(
                    alert("calm", 7, "customer", "negative_onset", "high"), role="customer"
                ),
            ]
        )
        order = await page.wait_for(f"(({ORDER_JS})[0] === 'calm') && {ORDER_JS}", scaled(10))
        assert order[:2] == ["calm", "angry"]
        assert await page.evaluate("document.activeElement.dataset.id") == "calm"
        points = await page.evaluate(
            "document.querySelector('li.call[data-id=\"calm\"] .c-spark polyline')"
            ".getAttribute('points').split(' ').length"
        )
        assert points == 4
        assert not [line for line in page.console if line.startswith("exception")], page.console
        shot = await page.screenshot(tmp_path / "dashboard-risk.png")
        assert shot.stat().st_size > 10_000
        if SCREENSHOT_DIR:
            await asyncio.to_thread(_keep_screenshot, shot, Path(SCREENSHOT_DIR))


async def test_agent_view_opens_one_call_large_for_a_one_call_token(
    chromium: Chromium,
    stack: tuple[GatewayProcess, Publisher, str],
    tmp_path: Path,
    scaled: Callable[[float], float],
) -> None:
    gateway, publisher, _ = stack
    script = [("agent", "joy", 0.5), ("customer", "neutral", 0.3), ("agent", "joy", 0.5),
              ("customer", "sadness", -0.1), ("agent", "joy", 0.6), ("customer", "anger", -0.5),
              ("agent", "joy", 0.6), ("customer", "anger", -0.7)]  # fmt: skip
    events = [feeling("desk-7", s, r, label, v) for s, (r, label, v) in enumerate(script)]
    await publisher.persist(events)
    await publisher.persist([feeling("desk-8", 0, "customer", "fear", -0.4)])
    await index_calls(publisher, ["desk-7", "desk-8"], [])
    token = TokenSigner(SECRET).mint("default", ["desk-7"], ttl_s=600)
    agent_js = """(() => {
        const a = document.getElementById('agent');
        return {
            visible: !a.hidden && document.getElementById('main').hidden,
            mode: document.body.classList.contains('agent-mode'),
            call: document.getElementById('agent-call').textContent,
            emotion: document.getElementById('agent-emotion').textContent,
            sentiment: document.getElementById('agent-sentiment').textContent,
            trend: document.getElementById('agent-trend').dataset.word,
            points: (a.querySelector('svg.spark polyline')?.getAttribute('points') ?? '')
                .split(' ').filter(Boolean).length,
            text: a.textContent,
            calls: [...__cfnesa.calls.keys()],
        };
    })()"""
    async with Page.open(chromium.ws_url) as page:
        await open_dashboard(page, gateway.url(token), scaled(15))
        await page.wait_for(
            "document.getElementById('agent-emotion').textContent.startsWith('anger')", scaled(10)
        )
        view = await page.evaluate(agent_js)
        assert view["visible"] and view["mode"] and view["call"] == "desk-7"
        assert view["emotion"] == "anger 70%"
        assert view["sentiment"] == "−0.70 negative"
        assert view["trend"] == "worsening" and view["points"] == 4
        assert "joy" not in view["text"]  # the agent's emotions are not shown
        assert view["calls"] == ["desk-7"]

        await publisher.publish([feeling("desk-7", 8, "agent", "surprise", 0.2)])
        await publisher.publish([feeling("desk-7", 9, "customer", "joy", 0.8)])
        await publisher.publish([feeling("desk-8", 1, "customer", "anger", -0.9)])
        await page.wait_for(
            "document.getElementById('agent-emotion').textContent.startsWith('joy')", scaled(10)
        )
        view = await page.evaluate(agent_js)
        assert view["sentiment"] == "+0.80 positive" and view["points"] == 5
        assert "surprise" not in view["text"] and view["calls"] == ["desk-7"]
        assert not [line for line in page.console if line.startswith("exception")], page.console
        shot = await page.screenshot(tmp_path / "dashboard-agent.png")
        assert shot.stat().st_size > 10_000
        if SCREENSHOT_DIR:
            await asyncio.to_thread(_keep_screenshot, shot, Path(SCREENSHOT_DIR))
