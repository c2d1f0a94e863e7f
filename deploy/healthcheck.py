#!/usr/bin/env python
"""Container health check of the cfnesa image (installed as ``cfnesa-healthcheck``).

    cfnesa-healthcheck          GET /healthz of the cfnesa command running in this container
    cfnesa-healthcheck URL      GET that URL

Exit 0 when the endpoint answers 200, or when the command serves no endpoint
(``tail``, ``token``, a worker with ``CFNESA_METRICS_PORT=0``, a featurizer with
``CFNESA_FEATURIZER_METRICS_PORT=0``);
exit 1 otherwise, with the reason on stderr.

The endpoint is found the way the process itself finds it: its command line is
read from /proc and parsed by cfnesa's own argument parser, and the port and
host come from ``streaming.settings.Settings`` (the ``CFNESA_*`` variables of the
container, which a health check runs with), flags first.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path

TIMEOUT_S = 4.0
_ANY_ADDRESS = {"", "0.0.0.0", "::", "[::]"}  # noqa: S104 (compared with, never bound)


def endpoint(argv: list[str], environ: Mapping[str, str]) -> str | None:
    """The /healthz URL of the cfnesa process started with ``argv``, or None.

    Args:
        argv: the process's command line, e.g. ``["/opt/cfnesa/bin/python",
            "/opt/cfnesa/bin/cfnesa", "worker", "--metrics-port", "9500"]``.
        environ: the environment its settings come from (a health check runs
            with its container's environment, so ``os.environ``).

    Returns:
        ``http://HOST:PORT/healthz`` for a worker, a featurizer or a gateway; None for a
        command that serves no HTTP endpoint, or when ``argv`` is not cfnesa.
    """
    args = _cfnesa_args(argv)
    if args is None:
        return None
    from streaming.settings import Settings
    from workers.cli import build_parser

    try:
        parsed = build_parser().parse_args(args)
    except SystemExit:
        return None
    given = {
        name: environ[f"CFNESA_{name.upper()}"]
        for name in Settings.model_fields
        if f"CFNESA_{name.upper()}" in environ
    }
    settings = Settings(**given)
    if parsed.command == "worker":
        port = parsed.metrics_port if parsed.metrics_port is not None else settings.metrics_port
        host = settings.metrics_host
    elif parsed.command == "featurize":
        port = settings.featurizer_metrics_port
        host = settings.metrics_host
    elif parsed.command == "gateway":
        port = parsed.port if parsed.port is not None else settings.gateway_port
        host = parsed.host if parsed.host is not None else settings.gateway_host
    else:
        return None
    if not port:  # 0: no metrics server (worker) or a port nobody can know (gateway)
        return None
    if host in _ANY_ADDRESS:
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}/healthz"


def _cfnesa_args(argv: list[str]) -> list[str] | None:
    """The arguments after the ``cfnesa`` script in a command line, or None."""
    for i, arg in enumerate(argv):
        if Path(arg).name == "cfnesa":
            return argv[i + 1 :]
    return None


def _command_lines() -> Iterable[list[str]]:
    """The command line of PID 1, then of every other process (PID 1 is an init
    process when the container runs with ``--init``)."""
    proc = Path("/proc")
    others = sorted((p.name for p in proc.iterdir() if p.name.isdigit() and p.name != "1"), key=int)
    pids = ["1", *others]
    for pid in pids:
        try:
            cmdline = (proc / pid / "cmdline").read_bytes()
        except OSError:
            continue
        yield [a.decode(errors="replace") for a in cmdline.split(b"\0") if a]


def check(url: str) -> tuple[bool, str]:
    """GET ``url``: (answered 200, what it said)."""
    if not url.startswith(("http://", "https://")):
        return False, f"not an http(s) URL: {url}"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as reply:  # noqa: S310 (http(s) only, checked above)
            return reply.status == 200, f"{url}: {reply.status}"
    except urllib.error.HTTPError as exc:
        body = exc.read(500).decode(errors="replace")
        return False, f"{url}: {exc.code} {body}"
    except (urllib.error.URLError, OSError) as exc:
        return False, f"{url}: {exc}"


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        url: str | None = argv[1]
    else:
        url = None
        for proc_argv in _command_lines():
            if _cfnesa_args(proc_argv) is not None:
                url = endpoint(proc_argv, os.environ)
                break
    if url is None:
        return 0  # nothing here serves /healthz
    ok, detail = check(url)
    if not ok:
        print(f"unhealthy: {detail}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
