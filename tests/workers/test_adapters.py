"""replay, featurize and tail against a real embedded broker (Tansu), no mocks.

One broker and one MiniLM encoder serve the whole module; every test has its own
topic names, so tests do not see each other's messages.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import ConsumerRecord

from model.data import TranscriptDialogue, read_transcripts
from model.encoder import DEFAULT_ADAPTER, TextEncoder, default_feature_spec
from streaming.embedded import EmbeddedKafka
from streaming.events import (
    AlertEvent,
    DeadLetter,
    DeadLetterReason,
    EmotionEvent,
    EndEvent,
    Evidence,
    Expectations,
    Figures,
    InvalidInput,
    ParsedUtterance,
    Shift,
    SummaryEvent,
    TextEnd,
    TextUtterance,
    dump_event,
    parse_input,
    parse_text,
    text_end_message,
    text_message,
)
from streaming.settings import Settings
from streaming.topics import ensure_topics
from workers import cli_pipeline
from workers.featurize import featurize, text_dlq_topic
from workers.replay import ReplayStats, replay
from workers.tail import RED, RESET, format_event, tail

TIMEOUT_FACTOR = float(os.environ.get("CFNESA_TEST_TIMEOUT_FACTOR", "1"))
WAIT_S = 20 * TIMEOUT_FACTOR
EXPECT = Expectations(
    feature_spec=default_feature_spec(), dims={"text": 384, "audio": 0, "visual": 0}
)

DIALOGUES = [
    {
        "dialogue_id": "d-0",
        "split": "test",
        "utterances": [
            {"speaker": "spk0", "text": "Hi, I have a problem with my bill.", "emotion": "neutral"},
            {"speaker": "spk1", "text": "Sure, let me look.", "emotion": "neutral"},
            {"speaker": "spk0", "text": "You charged me twice!", "emotion": "anger"},
        ],
    },
    {
        "dialogue_id": "d-1",
        "split": "test",
        "utterances": [
            {"speaker": "M", "text": "Good morning.", "emotion": None},
            {"speaker": "F", "text": "Morning! Great news today.", "emotion": "joy"},
        ],
    },
    {
        "dialogue_id": "d-2",
        "split": "test",
        "utterances": [
            {"speaker": "spk2", "text": "Is anyone there?", "emotion": "fear"},
            {"speaker": "spk0", "text": "Yes, ünïcode works too.", "emotion": "surprise"},
            {"speaker": "spk2", "text": "Oh.", "emotion": "neutral"},
            {"speaker": "spk0", "text": "Bye.", "emotion": "neutral"},
        ],
    },
]


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def kafka() -> Iterator[EmbeddedKafka]:
    with EmbeddedKafka() as broker:
        yield broker


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder()


@pytest.fixture
def settings(kafka: EmbeddedKafka) -> Settings:
    """Settings with this test's own topic names."""
    tag = uuid.uuid4().hex[:8]
    return Settings(
        kafka_bootstrap=kafka.bootstrap,
        featurizer_metrics_port=0,
        input_topic=f"features-{tag}",
        output_topic=f"events-{tag}",
        dlq_topic=f"features-{tag}.dlq",
        text_topic=f"text-{tag}",
        session_timeout_ms=6_000,
        heartbeat_interval_ms=500,
    )


@pytest.fixture
def dialogues(tmp_path: Path) -> list[TranscriptDialogue]:
    path = tmp_path / "tiny.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in DIALOGUES), encoding="utf-8")
    return read_transcripts(path)


async def _topics(settings: Settings, *names: str, partitions: int = 3) -> None:
    await ensure_topics(settings.kafka_bootstrap, dict.fromkeys(names, partitions))


async def _read(settings: Settings, topic: str, count: int) -> list[ConsumerRecord]:
    """The first ``count`` messages of ``topic`` (all partitions), waiting up to WAIT_S."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    records: list[ConsumerRecord] = []
    deadline = time.monotonic() + WAIT_S
    try:
        while len(records) < count and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=100)
            records.extend(r for part in batches.values() for r in part)
    finally:
        await consumer.stop()
    assert len(records) >= count, f"{topic}: {len(records)} of {count} messages"
    return records


async def _produce(settings: Settings, topic: str, messages: list[tuple[str, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for key, value in messages:
            await producer.send_and_wait(topic, value=value, key=key.encode())
    finally:
        await producer.stop()


def _by_conversation(records: list[ConsumerRecord]) -> dict[str, list[dict[str, object]]]:
    """Message bodies per key, in offset order (one key lives on one partition)."""
    out: dict[str, list[dict[str, object]]] = {}
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        body = json.loads(r.value)
        assert r.key == str(body["conversation_id"]).encode(), "key = conversation_id"
        out.setdefault(str(body["conversation_id"]), []).append(body)
    return out


# ------------------------------------------------------------------ replay


async def test_replay_text_mode_plays_each_call_in_order_then_ends(
    settings: Settings, dialogues: list[TranscriptDialogue]
) -> None:
    await _topics(settings, settings.text_topic)
    started = time.monotonic()
    stats = await replay(
        settings, dialogues, calls=2, rate=50, mode="text", progress=False, run_tag="r1"
    )
    elapsed = time.monotonic() - started
    total = sum(d.length for d in dialogues)
    assert isinstance(stats, ReplayStats)
    assert (stats.utterances, stats.ended) == (total, 3)
    ids = ["call-0001-r1", "call-0002-r1", "call-0003-r1"]  # numbered in dialogue order
    assert sorted(stats.conversation_ids) == ids
    assert elapsed >= (total - 1) / 50  # paced: 50 utterances per second over all calls

    records = await _read(settings, settings.text_topic, total + 3)
    assert len(records) == total + 3  # every utterance exactly once, one end per call
    calls = _by_conversation(records)
    assert sorted(calls) == ids
    for cid, dialogue in zip(ids, dialogues, strict=True):
        *utterances, end = calls[cid]
        assert [u["seq"] for u in utterances] == list(range(dialogue.length))
        assert [u["speaker"] for u in utterances] == list(dialogue.speakers)
        assert [u["text"] for u in utterances] == list(dialogue.texts)
        assert all(
            isinstance(parse_text(json.dumps(u).encode(), 10_000), TextUtterance)
            for u in utterances
        )
        assert end["type"] == "end" and end["seq"] == dialogue.length


async def test_replay_features_mode_produces_valid_feature_events(
    settings: Settings, dialogues: list[TranscriptDialogue], encoder: TextEncoder
) -> None:
    await _topics(settings, settings.input_topic)
    stats = await replay(
        settings, dialogues, calls=3, rate=0, encoder=encoder, progress=False, prefix="x-"
    )
    total = sum(d.length for d in dialogues)
    records = await _read(settings, settings.input_topic, total + 3)
    assert len(records) == total + 3
    ids = sorted(stats.conversation_ids)
    assert ids == [f"x-{n:04d}-{stats.run_tag}" for n in (1, 2, 3)]
    assert len(stats.run_tag) == 6
    for cid, dialogue in zip(ids, dialogues, strict=True):
        mine = sorted((r for r in records if r.key == cid.encode()), key=lambda r: r.offset)
        *parsed, end = [parse_input(r.value, EXPECT) for r in mine]
        assert all(isinstance(p, ParsedUtterance) for p in parsed)
        utterances = [p for p in parsed if isinstance(p, ParsedUtterance)]
        assert [p.seq for p in utterances] == list(range(dialogue.length))
        assert [p.event.speaker for p in utterances] == list(dialogue.speakers)
        # the default role rule: the dialogue's first speaker is the agent
        first = dialogue.speakers[0]
        assert [p.event.role for p in utterances] == [
            "agent" if spk == first else "customer" for spk in dialogue.speakers
        ]
        assert [p.event.text for p in utterances] == list(dialogue.texts)
        assert all(p.event.ts is not None for p in utterances)
        np.testing.assert_allclose(
            np.stack([p.vectors["text"] for p in utterances]),  # (L, 384)
            encoder.encode(dialogue.texts),
            atol=1e-5,
        )
        assert isinstance(end, EndEvent) and end.seq == dialogue.length


async def test_replay_stop_ends_the_calls_in_progress(
    settings: Settings, dialogues: list[TranscriptDialogue]
) -> None:
    await _topics(settings, settings.text_topic)
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.5, stop.set)
    # loop: it would run forever without the stop
    stats = await replay(
        settings, dialogues, calls=2, rate=20, mode="text", loop=True, progress=False, stop=stop
    )
    assert 3 <= stats.utterances <= 20
    assert stats.ended == len(stats.conversation_ids)
    records = await _read(settings, settings.text_topic, stats.utterances + stats.ended)
    for cid, messages in _by_conversation(records).items():
        *utterances, end = messages
        assert [u["seq"] for u in utterances] == list(range(len(utterances))), cid
        assert end["type"] == "end" and end["seq"] == len(utterances), cid


# ------------------------------------------------------------------ featurize


def test_parse_text_reasons() -> None:
    ok = parse_text(text_message("c", 0, "agent", "hello", ts="2026-01-01T00:00:00Z"), 1000)
    assert isinstance(ok, TextUtterance) and ok.text == "hello"
    untyped = parse_text(b'{"conversation_id":"c","seq":1,"speaker":"a","text":""}', 1000)
    assert isinstance(untyped, TextUtterance)
    assert isinstance(parse_text(text_end_message("c", 2), 1000), TextEnd)
    cases = {
        b"not json": DeadLetterReason.NOT_JSON,
        b"[1]": DeadLetterReason.NOT_OBJECT,
        b'{"type":"audio","conversation_id":"c","seq":0}': DeadLetterReason.UNKNOWN_TYPE,
        b'{"seq":0,"speaker":"a","text":"x"}': DeadLetterReason.MISSING_CONVERSATION_ID,
        b'{"conversation_id":"c","seq":-1,"speaker":"a","text":"x"}': DeadLetterReason.BAD_SEQ,
        b'{"conversation_id":"c","seq":0,"speaker":"a"}': DeadLetterReason.INVALID,
        b'{"schema_version":2,"conversation_id":"c","seq":0,"speaker":"a","text":"x"}': (
            DeadLetterReason.UNSUPPORTED_SCHEMA_VERSION
        ),
        b'{"conversation_id":"c","seq":0,"speaker":"a","text":"' + b"x" * 2000 + b'"}': (
            DeadLetterReason.OVERSIZE
        ),
    }
    for raw, reason in cases.items():
        with pytest.raises(InvalidInput) as caught:
            parse_text(raw, 1000)
        assert caught.value.reason == reason, raw
    with pytest.raises(InvalidInput) as caught:
        parse_text(b'{"conversation_id":"c","seq":"7","speaker":"a","text":"x"}', 1000)
    assert (caught.value.conversation_id, caught.value.seq) == ("c", None)


async def test_featurize_encodes_text_forwards_ends_and_dead_letters_bad_input(
    settings: Settings, encoder: TextEncoder
) -> None:
    dlq = text_dlq_topic(settings)
    await _topics(settings, settings.text_topic, settings.input_topic, dlq)
    texts = ["I want to cancel.", "Why is that?", "Because it never works!"]
    roles = ["customer", "agent", None]  # the last one sends no role
    messages = [
        ("c-1", text_message("c-1", i, "customer" if i != 1 else "agent", t, role=roles[i]))
        for i, t in enumerate(texts)
    ]
    messages.insert(1, ("c-1", b'{"conversation_id":"c-1","seq":"one","speaker":"x","text":"y"}'))
    messages.append(("c-1", text_end_message("c-1", 3, ts="2026-11-24T10:00:03.120Z")))
    await _produce(settings, settings.text_topic, messages)

    stop = asyncio.Event()
    task = asyncio.create_task(featurize(settings, stop, encoder))
    try:
        features = await _read(settings, settings.input_topic, 4)
        letters = await _read(settings, dlq, 1)
    finally:
        stop.set()
        stats = await asyncio.wait_for(task, WAIT_S)
    assert (stats.utterances, stats.ends, stats.dead_letters) == (3, 1, 1)

    parsed = [parse_input(r.value, EXPECT) for r in sorted(features, key=lambda r: r.offset)]
    assert all(r.key == b"c-1" for r in features)
    utterances = [p for p in parsed if isinstance(p, ParsedUtterance)]
    assert [(p.seq, p.event.speaker, p.event.text) for p in utterances] == [
        (0, "customer", texts[0]),
        (1, "agent", texts[1]),
        (2, "customer", texts[2]),
    ]
    assert [p.event.role for p in utterances] == roles  # passed on as given
    np.testing.assert_allclose(
        np.stack([p.vectors["text"] for p in utterances]), encoder.encode(texts), atol=1e-5
    )
    end = parsed[-1]
    assert isinstance(end, EndEvent) and end.seq == 3 and end.ts is not None

    letter = DeadLetter.model_validate_json(letters[0].value)
    assert letter.reason == DeadLetterReason.BAD_SEQ
    assert letter.conversation_id == "c-1" and letter.source.topic == settings.text_topic
    assert letters[0].key == b"c-1"


def _context_encoder(folder: Path, context: int) -> TextEncoder:
    """The shipped adapter's weights with a card that says "read the previous
    ``context`` texts": an encoder with causal context, without a fine-tune."""
    shutil.copytree(DEFAULT_ADAPTER, folder)
    card = json.loads((folder / "card.json").read_text())
    card["config"]["context"] = context
    (folder / "card.json").write_text(json.dumps(card))
    return TextEncoder(adapter=folder, batch_size=8)


@pytest.mark.parametrize("cluster", [False, True], ids=["redis", "cluster"])
async def test_featurize_reads_each_calls_previous_texts_from_redis(
    settings: Settings,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    unique: str,
    cluster: bool,
) -> None:
    """An encoder with causal context: each utterance is encoded with its call's
    previous texts, also across a featurizer restart (they live in Redis or Redis
    Cluster), never with a later one; an ended call's texts expire soon."""
    server = request.getfixturevalue("redis_cluster" if cluster else "redis_server")
    encoder = _context_encoder(tmp_path / "ctx-adapter", 2)
    assert encoder.context == 2 and encoder.feature_spec.endswith("+ctx2x64")
    settings = settings.model_copy(
        update={
            "redis_url": server.url,
            "redis_cluster": cluster,
            "key_prefix": unique,
            "ended_ttl_s": 30,
        }
    )
    await _topics(settings, settings.text_topic, settings.input_topic, text_dlq_topic(settings))
    calls = {
        "c-1": ["I want to cancel.", "Why is that?", "Because it never works!", "Fine.", "Bye."],
        "c-2": ["Hello?", "Great, thanks a lot!"],
    }
    first = [("c-1", 0), ("c-1", 1), ("c-2", 0), ("c-1", 2)]
    second = [("c-1", 3), ("c-2", 1), ("c-1", 4)]

    async def run(part: list[tuple[str, int]], extra: list[tuple[str, bytes]], n: int) -> None:
        messages = [(c, text_message(c, i, f"s{i % 2}", calls[c][i])) for c, i in part]
        await _produce(settings, settings.text_topic, messages + extra)
        stop = asyncio.Event()
        task = asyncio.create_task(featurize(settings, stop, encoder))
        try:
            await _read(settings, settings.input_topic, n)
        finally:
            stop.set()
            await asyncio.wait_for(task, WAIT_S)

    await run(first, [], 4)
    await run(second, [("c-1", text_end_message("c-1", 5))], 8)  # a fresh featurizer

    expect = Expectations(feature_spec=encoder.feature_spec, dims=EXPECT.dims)
    records = await _read(settings, settings.input_topic, 8)
    got = {}
    for r in records:
        parsed = parse_input(r.value, expect)
        if isinstance(parsed, ParsedUtterance):
            got[(parsed.event.conversation_id, parsed.seq)] = parsed.vectors["text"]
    for cid, texts in calls.items():
        contexts = [texts[max(0, i - 2) : i] for i in range(len(texts))]
        want = encoder.encode(texts, contexts=contexts)
        alone = encoder.encode(texts)
        vectors = np.stack([got[(cid, i)] for i in range(len(texts))])
        np.testing.assert_allclose(vectors, want, atol=1e-5, err_msg=cid)
        assert np.allclose(vectors[0], alone[0], atol=1e-5)  # a call's start has no context
        assert not np.allclose(vectors[1:], alone[1:], atol=1e-3)  # the context was read
    client = (redis.RedisCluster if cluster else redis.Redis).from_url(server.url)
    try:
        key = f"{unique}:{{c-1}}:texts"
        assert 0 < client.ttl(key) <= 30  # ended: expires with ended_ttl_s
        assert client.zcard(key) == 2  # only the last `context` texts are kept
        assert client.ttl(f"{unique}:{{c-2}}:texts") > 30
    finally:
        client.close()


# ------------------------------------------------------------------ tail


def _events() -> list[EmotionEvent | AlertEvent | SummaryEvent]:
    model, at = "m@1", "2026-11-24T10:00:04.000Z"
    return [
        EmotionEvent(
            conversation_id="call-0001",
            seq=12,
            speaker="customer",
            emotion="anger",
            confidence=0.71,
            probabilities={"neutral": 0.29, "anger": 0.71},
            shift=Shift(vs_previous=0.83, vs_speaker_previous=0.77),
            model=model,
            emitted_at=at,
        ),
        AlertEvent(
            conversation_id="call-0001",
            seq=12,
            speaker="customer",
            rule="emotion_shift",
            severity="high",
            from_emotion="neutral",
            to_emotion="anger",
            p_shift=0.77,
            model=model,
            emitted_at=at,
        ),
        SummaryEvent(
            conversation_id="call-0001",
            seq=13,
            utterances=13,
            speakers={"customer": {"anger": 2, "neutral": 5}, "agent": {"neutral": 6}},
            shifts=3,
            alerts=1,
            gaps=0,
            duration_s=95.5,
            dominant={"customer": "neutral", "agent": "neutral"},
            model=model,
            emitted_at=at,
        ),
    ]


def test_tail_shows_roles_sentiment_evidence_and_figures() -> None:
    emotion, alert, summary = _events()
    line = format_event(
        emotion.model_copy(update={"speaker": "spk1", "role": "customer", "sentiment": -0.705})
    )
    assert line == "call-0001 #12  spk1      customer anger     0.71  sentiment -0.70  shift 0.77"
    evidence = [Evidence(seq=12, emotion="anger", probability=0.71, sentiment=-0.71)]
    line = format_event(alert.model_copy(update={"role": "customer", "evidence": evidence}))
    assert line.endswith("high  (evidence #12)") and " customer [ALERT " in line
    figures = Figures(
        utterances=6,
        sentiment_mean=-0.25,
        sentiment_first_third=0.1,
        sentiment_last_third=-0.6,
        sentiment_trend=-0.7,
        negative_share=0.5,
    )
    box = format_event(
        summary.model_copy(update={"roles": {"customer": figures}, "not_analyzed": 7})
    )
    assert "customer sentiment -0.25, +0.10 -> -0.60 (trend -0.70), 50% negative" in box
    assert "7 utterances of roles not analysed" in box


async def test_tail_prints_one_line_per_event(settings: Settings) -> None:
    await _topics(settings, settings.output_topic, partitions=1)
    emotion, alert, summary = _events()
    other = EmotionEvent.model_validate(
        emotion.model_dump() | {"conversation_id": "call-0002", "event_id": ""}
    )
    await _produce(
        settings,
        settings.output_topic,
        [
            ("call-0002", dump_event(other)),  # filtered out
            ("call-0001", b"not an event"),  # skipped
            ("call-0001", dump_event(emotion)),
            ("call-0001", dump_event(alert)),
            ("call-0001", dump_event(summary)),
        ],
    )
    out = io.StringIO()
    printed = await asyncio.wait_for(
        tail(
            settings,
            asyncio.Event(),
            out=out,
            from_beginning=True,
            conversation="call-0001",
            color=None,  # a StringIO is no terminal: no colours
            max_events=3,
        ),
        WAIT_S,
    )
    assert printed == 3
    lines = out.getvalue().splitlines()
    assert lines[0] == "call-0001 #12  customer  anger     0.71  shift 0.77"
    assert lines[1] == (
        "call-0001 #12  customer  [ALERT emotion_shift neutral->anger] p_shift 0.77 high"
    )
    assert lines[2:] == [
        "┌" + "─" * 50 + "┐",
        "│ summary of call-0001 (end #13)                   │",
        "│ 13 utterances, 3 shifts, 1 alert, 0 gaps, 95.5 s │",
        "│ agent: neutral (neutral 6)                       │",
        "│ customer: neutral (neutral 5, anger 2)           │",
        "└" + "─" * 50 + "┘",
    ]
    assert "\x1b[" not in out.getvalue()


async def test_tail_json_prints_events_as_received(settings: Settings) -> None:
    await _topics(settings, settings.output_topic, partitions=1)
    emotion, alert, _ = _events()
    await _produce(
        settings,
        settings.output_topic,
        [("call-0001", dump_event(emotion)), ("call-0001", dump_event(alert))],
    )
    out = io.StringIO()
    await asyncio.wait_for(
        tail(settings, asyncio.Event(), out=out, from_beginning=True, max_events=2, raw=True),
        WAIT_S,
    )
    assert out.getvalue().splitlines() == [dump_event(emotion).decode(), dump_event(alert).decode()]


def test_format_event_colours() -> None:
    emotion, alert, summary = _events()
    line = format_event(emotion, color=True)
    assert f"{RED}anger    {RESET}" in line
    assert "\x1b[1m\x1b[31m[ALERT emotion_shift neutral->anger]" in format_event(alert, True)
    box = format_event(summary, color=True).splitlines()
    assert len(box) == 6 and all(RESET in row for row in box)


# ------------------------------------------------------------------ command line


def test_register_adds_the_subcommands() -> None:
    parser = argparse.ArgumentParser(prog="cfnesa")
    cli_pipeline.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["replay", "--bootstrap", "h:1", "--calls", "3", "--mode", "text", "--loop"]
    )
    assert (args.calls, args.rate, args.mode, args.loop, args.split) == (
        3,
        4.0,
        "text",
        True,
        "test",
    )
    assert args.conversation_prefix == "call-" and args.func is cli_pipeline.cmd_replay
    args = parser.parse_args(["featurize"])
    assert args.func is cli_pipeline.cmd_featurize and args.bootstrap is None
    args = parser.parse_args(["tail", "--from-beginning", "--json", "--conversation", "c-*"])
    assert (args.from_beginning, args.json, args.conversation) == (True, True, "c-*")
    with pytest.raises(SystemExit):
        parser.parse_args(["replay", "--calls", "0"])


def test_tail_shows_the_transcript_when_events_carry_it():
    event = EmotionEvent(
        conversation_id="c1",
        seq=0,
        speaker="customer",
        emotion="anger",
        confidence=0.7,
        probabilities={"anger": 0.7, "neutral": 0.3},
        model="m@1",
        text="x" * 100,
    )
    line = format_event(event, color=False)
    assert line.endswith('"' + "x" * 69 + '…"')
    bare = format_event(event.model_copy(update={"text": None}), color=False)
    assert '"' not in bare


def test_the_featurizer_loads_the_adapter_its_settings_name(tmp_path: Path) -> None:
    from model.encoder import FEATURE_SPEC_MINILM
    from workers.featurize import _load_encoder

    assert _load_encoder(1, "torch", "none").feature_spec == FEATURE_SPEC_MINILM
    assert _load_encoder(1, "torch", "").feature_spec == default_feature_spec()
    with pytest.raises(Exception, match="not an encoder adapter"):
        _load_encoder(1, "torch", str(tmp_path))


def test_the_featurizer_picks_the_adapter_of_the_workers_checkpoint(tmp_path: Path) -> None:
    """No adapter named: the encoder whose features the checkpoint was trained on."""
    from model.checkpoint import DEFAULT_CHECKPOINT
    from model.encoder import FEATURE_SPEC_MINILM
    from workers.featurize import _load_encoder

    shipped = _load_encoder(1, "torch", "", DEFAULT_CHECKPOINT)
    assert shipped.feature_spec == default_feature_spec()
    plain = tmp_path / "plain-checkpoint"
    shutil.copytree(DEFAULT_CHECKPOINT, plain)
    config = json.loads((plain / "config.json").read_text())
    config["feature_spec"] = FEATURE_SPEC_MINILM
    (plain / "config.json").write_text(json.dumps(config))
    assert _load_encoder(1, "torch", "", plain).feature_spec == FEATURE_SPEC_MINILM
    config["feature_spec"] = "minilm-l6-v2+lora-0000000000000000"  # nothing installed makes it
    (plain / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="no installed encoder"):
        _load_encoder(1, "torch", "", plain)
