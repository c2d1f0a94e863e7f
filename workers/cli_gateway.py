"""The gateway's commands: `cfnesa gateway` and `cfnesa token`.

    cfnesa gateway                                    ws://127.0.0.1:8765/ws, /, /healthz, /metrics
    cfnesa token --tenant acme --conversations 'call-*' [--all] [--ttl 3600]

Settings come from CFNESA_* variables (`streaming.settings.GatewaySettings`, the
gateway_* fields among them); the flags override them. The secret that signs
tokens is CFNESA_GATEWAY_SECRET, for both commands (``token`` also takes
``--secret``). Without one, ``cfnesa gateway`` makes a random secret for this run
and prints it with a token for the default tenant: such tokens die with the
process. SIGINT or SIGTERM stops the gateway (clients get close code 1001).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
import signal
import sys
from typing import Any

from streaming.settings import GatewaySettings

DEV_TOKEN_TTL_S = 12 * 3600


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add the ``gateway`` and ``token`` subcommands to ``sub``."""
    p = sub.add_parser("gateway", help="serve emotion events to dashboards over WebSocket")
    p.add_argument("--host", help="listen address (CFNESA_GATEWAY_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="listen port, 0: any (CFNESA_GATEWAY_PORT, 8765)")
    p.add_argument("--bootstrap", help="Kafka bootstrap servers (CFNESA_KAFKA_BOOTSTRAP)")
    p.add_argument("--redis", help="Redis URL (CFNESA_REDIS_URL)")
    p.set_defaults(func=cmd_gateway)

    p = sub.add_parser("token", help="mint a bearer token for the gateway")
    p.add_argument("--tenant", required=True, help="the tenant whose events it shows")
    p.add_argument(
        "--conversations",
        nargs="+",
        default=[],
        metavar="ID_OR_PATTERN",
        help="conversation ids or shell patterns ('call-*') it may subscribe to",
    )
    p.add_argument("--all", action="store_true", help="may subscribe to all of the tenant's calls")
    p.add_argument("--ttl", type=float, default=3600.0, help="lifetime in seconds")
    p.add_argument("--secret", help="the gateway secret (default: CFNESA_GATEWAY_SECRET)")
    p.set_defaults(func=cmd_token)


def cmd_token(args: argparse.Namespace) -> int:
    from streaming.gateway.auth import TokenSigner

    secret = args.secret or GatewaySettings().gateway_secret
    if not secret:
        print("cfnesa: no secret: set CFNESA_GATEWAY_SECRET or pass --secret", file=sys.stderr)
        return 2
    if not args.conversations and not args.all:
        print("cfnesa: a token needs --conversations, --all, or both", file=sys.stderr)
        return 2
    if args.ttl <= 0:
        print("cfnesa: --ttl must be positive", file=sys.stderr)
        return 2
    try:
        token = TokenSigner(secret).mint(
            args.tenant, args.conversations, all_conversations=args.all, ttl_s=args.ttl
        )
    except ValueError as exc:
        print(f"cfnesa: {exc}", file=sys.stderr)
        return 2
    print(token)
    return 0


def cmd_gateway(args: argparse.Namespace) -> int:
    from aiokafka.errors import KafkaError

    from streaming.gateway import DEFAULT_TENANT, ConfigError, TokenSigner, serve_gateway

    overrides = {
        k: v
        for k, v in {
            "gateway_host": args.host,
            "gateway_port": args.port,
            "kafka_bootstrap": args.bootstrap,
            "redis_url": args.redis,
        }.items()
        if v is not None
    }
    settings = GatewaySettings(**overrides)
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("aiokafka").setLevel(logging.WARNING)
        logging.getLogger("websockets").setLevel(logging.WARNING)
    dev_token = None
    if not settings.gateway_secret:
        secret = secrets.token_urlsafe(32)
        settings = settings.model_copy(update={"gateway_secret": secret})
        dev_token = TokenSigner(secret).mint(
            DEFAULT_TENANT, all_conversations=True, ttl_s=DEV_TOKEN_TTL_S
        )
        print(
            "cfnesa: CFNESA_GATEWAY_SECRET is not set; this run signs tokens with a random "
            "secret, and its tokens die with the process:\n"
            f"  export CFNESA_GATEWAY_SECRET={secret}   (to mint more with `cfnesa token`)",
            file=sys.stderr,
        )

    def on_ready(port: int) -> None:
        base = f"{settings.gateway_host}:{port}"
        print(f"gateway: ws://{base}/ws   http://{base}/   /healthz   /metrics", file=sys.stderr)
        if dev_token is not None:
            print(
                f"a token for tenant {DEFAULT_TENANT!r}, all calls, {DEV_TOKEN_TTL_S // 3600} h:\n"
                f"  {dev_token}\n  http://{base}/?token={dev_token}",
                file=sys.stderr,
                flush=True,
            )

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()

        def on_signal() -> None:
            if stop.is_set() and task is not None:  # a second signal: no more waiting
                task.cancel()
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        await serve_gateway(settings, stop, ready=on_ready)

    try:
        asyncio.run(main())
    except asyncio.CancelledError:
        print("cfnesa: interrupted", file=sys.stderr)
        return 130
    except ConfigError as exc:
        print(f"cfnesa: {exc}", file=sys.stderr)
        return 2
    except KafkaError as exc:
        print(f"cfnesa: kafka at {settings.kafka_bootstrap}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the port is taken, the address is not ours
        print(f"cfnesa: cannot listen on {settings.gateway_host}: {exc}", file=sys.stderr)
        return 1
    return 0
