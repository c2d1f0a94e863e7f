"""Installing a Debian package a test needs (chromium, redis-server with TLS) when missing."""

from __future__ import annotations

import os
import shutil
import subprocess

INSTALL_TIMEOUT_S = 600


def apt_install(package: str) -> str:
    """``apt-get install -y PACKAGE`` (after an update if the first try fails).

    Returns:
        "" when installed, else why not (for the test's failure or skip message).
    """
    if not shutil.which("apt-get"):
        return f"{package} is not installed and there is no apt-get to install it"
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        return f"{package} is not installed (apt-get install -y {package} needs root)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install_cmd = ["apt-get", "install", "-y", "--no-install-recommends", package]
    log: list[str] = []
    for cmd in (install_cmd, ["apt-get", "update"], install_cmd):
        try:
            done = subprocess.run(
                cmd, env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"installing {package} failed: {exc}"
        log.append(done.stderr[-300:])
        if cmd is install_cmd and done.returncode == 0:
            return ""
    return f"apt-get install -y {package} failed: {' | '.join(log).strip()}"
