"""Helpers shared by the benchmarks (run as scripts: `python benchmarks/NAME.py`)."""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from workers.processes import http_get

ROOT = Path(__file__).resolve().parents[1]


def pct(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of sorted values (nan when there are none)."""
    if not sorted_values:
        return math.nan
    return sorted_values[max(math.ceil(q * len(sorted_values)) - 1, 0)]


def finite(value: Any) -> Any:
    """The record with inf and nan (e.g. events that never came) as null, for strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def git(*argv: str) -> str:
    return subprocess.run(
        ["git", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()


def scrape(port: int) -> dict[str, float]:
    """A Prometheus endpoint's samples as {"name{label=value,...}": value}."""
    status, body = http_get(port, "/metrics")
    if status != 200:
        raise RuntimeError(f"GET /metrics answered {status}")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def warn_if_busy() -> None:
    """Say so when the machine is already busy: the figures would suffer."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    cpus = os.cpu_count()
    if load is not None and cpus and load[0] > 0.5 * cpus:
        print(f"WARNING: load average {load[0]:.2f} before the run: figures will suffer")


def machine(shared: str | None = None, **extra: Any) -> dict[str, Any]:
    """The ``machine`` part of a result record: platform, CPU, cores, load at the
    start, torch, what else shared the cores (``shared``), and any ``extra``."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    out: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in load] if load else None,
        "torch": importlib.metadata.version("torch"),
    }
    if shared:
        out["shared"] = shared
    out.update(extra)
    return out


def write_result(name: str, record: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/NAME-STAMP.json`` (strict JSON) and say where."""
    out = ROOT / "benchmarks" / "results" / f"{name}-{datetime.now(UTC):%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(finite(record), indent=2, allow_nan=False) + "\n")
    print(f"written {out.relative_to(ROOT)}")
    return out
