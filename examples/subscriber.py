"""Print live emotions and alerts of calls from a cfnesa WebSocket gateway.

A standalone client to copy; it needs only `pip install websockets` (13 or newer)::

    export CFNESA_TOKEN=...   # from the operator (cfnesa token --tenant acme ...)
    python subscriber.py --url wss://emotions.example.com/ws call-0001 call-0002
    python subscriber.py --url wss://emotions.example.com/ws --all   # every call

Per conversation it gets a snapshot of the recent events, then the live ones. It
reconnects with backoff and subscribes again; the new snapshot repeats what it has
printed already, so it keeps the newest seq (and that seq's event ids) per call and
skips anything not newer. With --all the snapshots are those of the calls in
progress (up to the gateway's bound; the others show up when they next speak)
and of the recently ended calls. Status lines go to stderr, events to stdout.
"""

import argparse
import asyncio
import json
import os
import random
import sys

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus


def log(text):
    print(text, file=sys.stderr, flush=True)


def line(event):
    """One event as a line of text; None for types this client does not show."""
    head = f"{event['conversation_id']} #{event['seq']} {event.get('speaker', '')}"
    if event["type"] == "emotion":
        shift = event["shift"].get("vs_speaker_previous")
        tail = "" if shift is None else f", shift {shift:.2f}"
        return f"{head}: {event['emotion']} ({event['confidence']:.2f}{tail})"
    if event["type"] == "alert":
        change = f" {event['from']} -> {event['to']}" if event.get("from") else ""
        return f"ALERT {head}: {event['rule']} ({event['severity']}){change}"
    if event["type"] == "summary":
        counts = f"{event['utterances']} utterances, {event['alerts']} alerts"
        return f"END {event['conversation_id']} #{event['seq']}: {counts}"
    return None


def is_new(newest, event):
    """False for an event printed already: an older seq, or the same seq and event id."""
    cid, seq, event_id = event["conversation_id"], event["seq"], event["event_id"]
    last, ids = newest.get(cid, (-1, set()))
    if seq < last or (seq == last and event_id in ids):
        return False
    newest[cid] = (seq, ids | {event_id} if seq == last else {event_id})
    return True


async def subscribe(url, token, conversations, max_events=0):
    """Print events until max_events (0: forever); returns the exit status."""
    request = {"op": "subscribe", "all": True}
    if conversations:
        request = {"op": "subscribe", "conversations": conversations}
    newest = {}  # conversation id -> (newest seq printed, event ids printed at that seq)
    printed, delay = 0, 0.5
    while True:
        try:
            headers = {"Authorization": f"Bearer {token}"}
            async with connect(url, additional_headers=headers) as ws:
                await ws.send(json.dumps(request))
                async for frame in ws:
                    message = json.loads(frame)
                    kind = message.get("type")
                    if kind == "subscribed":
                        log(f"subscribed to {conversations or 'all calls'}")
                        delay = 0.5
                    elif kind == "error":
                        log(f"refused: {message['code']}: {message['detail']}")
                        if message["code"] != "unavailable":
                            return 2  # the request or the token is wrong: retrying won't help
                        await asyncio.sleep(1)  # Redis did not answer; nothing was subscribed
                        await ws.send(json.dumps(request))
                    elif kind in ("snapshot", "emotion", "alert", "summary"):
                        for event in message["events"] if kind == "snapshot" else [message]:
                            text = line(event) if is_new(newest, event) else None
                            if text:
                                print(text, flush=True)
                                printed += 1
                                if printed == max_events:
                                    return 0
                log(f"connection closed ({ws.close_code})")
        except InvalidStatus as exc:  # the upgrade was refused: 401 is a bad token
            log(f"refused: HTTP {exc.response.status_code} {exc.response.body.decode()}")
            if exc.response.status_code == 401:
                return 1
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd else None
            log(f"connection closed ({code})")
            if code == 4001:
                log("the token expired: get a new one")
                return 1
        except OSError as exc:
            log(f"cannot connect: {exc}")
        await asyncio.sleep(delay * random.uniform(0.5, 1.5))  # noqa: S311 (jitter)
        delay = min(delay * 2, 30.0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("conversations", nargs="*", help="conversation ids")
    parser.add_argument("--all", action="store_true", help="every call the token allows")
    parser.add_argument(
        "--url", default=os.environ.get("CFNESA_GATEWAY_URL", "ws://127.0.0.1:8765/ws")
    )
    parser.add_argument(
        "--token", default=os.environ.get("CFNESA_TOKEN"), help="default: $CFNESA_TOKEN"
    )
    parser.add_argument("--max-events", type=int, default=0, help="stop after printing this many")
    args = parser.parse_args()
    if not args.token or bool(args.conversations) == args.all:
        parser.error("give a token, and conversation ids or --all")
    try:
        return asyncio.run(subscribe(args.url, args.token, args.conversations, args.max_events))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
