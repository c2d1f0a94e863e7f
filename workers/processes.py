"""Child processes of the `cfnesa` command (demo, benchmarks): start, probe, stop.

A child runs in its own session (a terminal's Ctrl-C reaches only the parent, which
stops the children in order) and dies with its parent (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable
from pathlib import Path

from streaming.embedded import parent_death_signal


def cfnesa_command() -> list[str]:
    """How to run `cfnesa` from this interpreter's environment."""
    script = Path(sys.executable).parent / "cfnesa"
    if script.exists():
        return [str(script)]
    found = shutil.which("cfnesa")
    return [found] if found else [sys.executable, "-m", "workers.cli"]


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``cfnesa ARGS...`` with its output appended to ``log``."""
    with log.open("ab") as fh:
        return subprocess.Popen(  # noqa: S603 (our own console script)
            [*cfnesa_command(), *args],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=parent_death_signal(),
        )


def stop(procs: Iterable[subprocess.Popen[bytes]], timeout: float = 10.0) -> None:
    """SIGTERM to all, then wait; SIGKILL whatever is still alive at the deadline."""
    procs = list(procs)
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET http://127.0.0.1:PORT/PATH: (status, body), or (0, b"") when unreachable."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return int(r.status), r.read()
    except OSError:
        return 0, b""
