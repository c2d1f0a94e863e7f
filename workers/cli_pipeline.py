"""The pipeline's adapter commands: `cfnesa replay`, `cfnesa featurize`, `cfnesa tail`.

    cfnesa replay    --data meld --calls 8 --rate 4     play test dialogues as live calls
    cfnesa featurize                                    utterance-text -> utterance-features
    cfnesa tail      --conversation 'call-0001-*'       print emotion-events as they flow

Settings come from CFNESA_* variables (`streaming.settings.Settings`); the flags
override them. SIGINT or SIGTERM stops a command cleanly (exit status 0): replay
ends the calls in progress, featurize finishes and commits its batch.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from streaming.settings import Settings


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add the ``replay``, ``featurize`` and ``tail`` subcommands to ``sub``.

    Each sets ``func`` to a handler that takes the parsed arguments and returns
    the exit status.
    """
    p = sub.add_parser("replay", help="play transcript dialogues as concurrent live calls")
    _add_bootstrap(p)
    p.add_argument(
        "--data", default="meld", help="transcript JSONL path, or a name in the data folder"
    )
    p.add_argument("--split", default="test", help="which split's dialogues to play")
    p.add_argument("--calls", type=_positive_int, default=8, help="concurrent calls")
    p.add_argument(
        "--rate", type=float, default=4.0, help="utterances per second overall (0: no limit)"
    )
    p.add_argument("--limit", type=_positive_int, help="play at most this many dialogues")
    p.add_argument(
        "--mode",
        choices=["features", "text"],
        default="features",
        help="features: encode here -> utterance-features; text: -> utterance-text",
    )
    p.add_argument("--loop", action="store_true", help="start over when every dialogue played")
    p.add_argument("--conversation-prefix", default="call-", help="conversation id prefix")
    p.add_argument("--no-text", action="store_true", help="leave transcripts out of features")
    p.add_argument(
        "--roles",
        choices=["first-agent", "none"],
        default="first-agent",
        help="first-agent: each call's first speaker is the agent, the others customers; "
        "none: send no roles",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("featurize", help="encode utterance-text into utterance-features")
    _add_bootstrap(p)
    p.add_argument("--group", default="cfnesa-featurizers", help="consumer group")
    p.add_argument("--max-batch", type=_positive_int, default=64, help="messages per batch")
    p.add_argument("--max-wait-ms", type=int, default=20, help="longest wait for a batch")
    p.add_argument(
        "--adapter",
        help="encoder adapter folder, or none for plain MiniLM (default: CFNESA_ENCODER_ADAPTER, "
        "else the shipped adapter)",
    )
    p.set_defaults(func=cmd_featurize)

    p = sub.add_parser("tail", help="print emotion events as they flow")
    _add_bootstrap(p)
    p.add_argument("--from-beginning", action="store_true", help="read the whole topic")
    p.add_argument("--conversation", help="only this conversation id (shell patterns work)")
    p.add_argument("--json", action="store_true", help="print the events' JSON as received")
    p.add_argument("--max-events", type=_positive_int, help="exit after this many events")
    p.add_argument(
        "--color",
        choices=["auto", "always", "never"],
        default="auto",
        help="ANSI colours (auto: on a terminal, unless NO_COLOR is set)",
    )
    p.set_defaults(func=cmd_tail)


def _add_bootstrap(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap", help="Kafka bootstrap servers (CFNESA_KAFKA_BOOTSTRAP)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {"kafka_bootstrap": args.bootstrap} if args.bootstrap else {}
    settings = Settings(**overrides)
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        # aiokafka narrates every group join at INFO; keep it for debugging
        logging.getLogger("aiokafka").setLevel(logging.WARNING)
    return settings


def _transcripts(data: str) -> Path:
    """A transcript file from a path or from a name in the data folder."""
    from model.data import default_data_dir

    given = Path(data).expanduser()
    if given.is_file():
        return given
    named = default_data_dir() / f"{data}.jsonl"
    if named.is_file():
        return named
    raise SystemExit(f"cfnesa: {data!r} is neither a transcript file nor {named}")


def _run(main: Callable[[asyncio.Event], Awaitable[object]]) -> int:
    """Run ``main(stop)``; the first SIGINT/SIGTERM sets ``stop``, a second one
    cancels it outright."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()

        def on_signal() -> None:
            if stop.is_set() and task is not None:
                task.cancel()
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        await main(stop)

    try:
        asyncio.run(runner())
    except asyncio.CancelledError:
        print("cfnesa: interrupted", file=sys.stderr)
        return 130
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from aiokafka.errors import KafkaError

    from model.data import read_transcripts
    from workers.replay import ROLE_RULES, replay

    settings = _settings(args)
    path = _transcripts(args.data)
    dialogues = [d for d in read_transcripts(path) if d.split == args.split]
    if not dialogues:
        raise SystemExit(f"cfnesa: no dialogue of split {args.split!r} in {path}")
    dialogues = dialogues[: args.limit]
    topic = settings.input_topic if args.mode == "features" else settings.text_topic
    print(
        f"replaying {len(dialogues)} {args.split} dialogues of {path.name} as "
        f"{min(args.calls, len(dialogues))} concurrent calls at {args.rate:g} utt/s "
        f"-> {topic} on {settings.kafka_bootstrap}{' (loop)' if args.loop else ''}\n"
        f"roles: {ROLE_RULES[args.roles]} (--roles)",
        file=sys.stderr,
    )

    async def main(stop: asyncio.Event) -> None:
        stats = await replay(
            settings,
            dialogues,
            calls=args.calls,
            rate=args.rate,
            mode=args.mode,
            loop=args.loop,
            progress=not args.quiet,
            prefix=args.conversation_prefix,
            include_text=not args.no_text,
            stop=stop,
            roles=args.roles,
        )
        print(
            f"sent {stats.utterances} utterances in {len(stats.conversation_ids)} calls "
            f"({stats.ended} ended, run tag {stats.run_tag}) in {stats.seconds:.1f} s",
            file=sys.stderr,
        )

    try:
        return _run(main)
    except KafkaError as exc:
        print(f"cfnesa: kafka at {settings.kafka_bootstrap}: {exc}", file=sys.stderr)
        return 1


def cmd_featurize(args: argparse.Namespace) -> int:
    from workers.featurize import featurize

    settings = _settings(args)
    if args.adapter:
        settings = settings.model_copy(update={"encoder_adapter": args.adapter})

    async def main(stop: asyncio.Event) -> None:
        await featurize(
            settings,
            stop,
            group_id=args.group,
            max_batch_messages=args.max_batch,
            max_wait_ms=max(args.max_wait_ms, 0),
        )

    return _run(main)


def cmd_tail(args: argparse.Namespace) -> int:
    from aiokafka.errors import KafkaError

    from workers.tail import tail

    settings = _settings(args)
    color: bool | None = {"always": True, "never": False}.get(args.color)
    if color is None and os.environ.get("NO_COLOR"):  # https://no-color.org
        color = False

    async def main(stop: asyncio.Event) -> None:
        await tail(
            settings,
            stop,
            from_beginning=args.from_beginning,
            conversation=args.conversation,
            color=color,
            max_events=args.max_events,
            raw=args.json,
        )

    try:
        return _run(main)
    except BrokenPipeError:  # `cfnesa tail | head`: the reader has gone
        return 0
    except KafkaError as exc:
        print(f"cfnesa: kafka at {settings.kafka_bootstrap}: {exc}", file=sys.stderr)
        return 1
