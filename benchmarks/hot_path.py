"""CPU per utterance of the worker's pure stages, no Kafka, no Redis.

Synthetic calls (text-only 384-d features, base64, as `benchmarks/pipeline.py` sends
them) go through what one worker batch does between the poll and the persist, one
utterance per call per batch, at batch sizes 1, 8 and 64 (a quiet call centre, the
worker at ~250/s, a backlog):

- validate: `workers.planner.intake` (JSON, pydantic, base64, finiteness, grouping);
- step: `StreamingEngine.step`, split into building the inputs, the network's
  forward and building the results and new states;
- events: `workers.results.EventMapper.outcome` (emotion events, alerts, the tracker,
  the state parts to write) and the stored events' packing (`pack_event`).

CPU time (``time.process_time``) per utterance, min over alternating rounds. The
baseline in the same run: ``--against REV`` also times the network of git revision
REV (``model/network.py`` as it was there, the same weights) on the same inputs and
checks that both give the same probabilities, so a change to the step is measured
against what it replaces.

Usage: python benchmarks/hot_path.py [--against HEAD~1] [--quick]
Writes benchmarks/results/hot_path-<date>.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import git, machine, write_result  # noqa: E402 (benchmarks/common.py)
from pipeline import Calls  # noqa: E402 (benchmarks/pipeline.py)

from model.engine import StreamingEngine  # noqa: E402
from streaming.alerts import AlertRules, CallTracker  # noqa: E402
from streaming.events import Expectations  # noqa: E402
from workers.alert_eval import load_head  # noqa: E402
from workers.conversations import Conv  # noqa: E402
from workers.planner import intake, plan  # noqa: E402
from workers.results import EventMapper  # noqa: E402
from workers.worker import _utterance  # noqa: E402

BATCHES = (1, 8, 64)


@dataclass
class Record:
    """What the planner and the mapper read of a Kafka record."""

    value: bytes
    partition: int = 0
    timestamp: int = 0
    key: bytes = b""
    offset: int = 0
    topic: str = "bench"
    headers: tuple = ()


class Timed:
    """Wraps the engine's three parts to time them (CPU seconds, accumulated)."""

    def __init__(self, engine: StreamingEngine) -> None:
        self.t = {"inputs": 0.0, "forward": 0.0, "results": 0.0}
        for name, key in (("_inputs", "inputs"), ("_results", "results")):
            setattr(engine, name, self._wrap(getattr(engine, name), key))
        model = engine.model
        model.forward = self._wrap(model.forward, "forward")  # type: ignore[method-assign]

    def _wrap(self, fn: Any, key: str) -> Any:
        def timed(*a: Any, **k: Any) -> Any:
            t0 = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                self.t[key] += time.process_time() - t0

        return timed


def network_of(rev: str) -> Any:
    """``model/network.py`` as it was at git revision ``rev``, as a module."""
    source = git("show", f"{rev}:model/network.py")
    if not source:
        raise SystemExit(f"no model/network.py at {rev!r}")
    path = Path(tempfile.mkdtemp(prefix="cfnesa-net-")) / "network_then.py"
    path.write_text(source + "\n")
    spec = importlib.util.spec_from_file_location("network_then", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def stages(engine: StreamingEngine, batch: int, rounds: int, per_round: int) -> dict[str, float]:
    """Min over rounds of CPU ms per utterance of each stage, at ``batch`` calls per batch."""
    cfg = engine.config
    rules = AlertRules.load(None, head=load_head(engine.path))
    mapper = EventMapper(model_id="bench@x", labels=list(engine.label_names), rules=rules)
    expect = Expectations(
        feature_spec=cfg.feature_spec,
        dims={"text": cfg.text_dim, "audio": cfg.audio_dim, "visual": cfg.visual_dim},
        max_bytes=1_000_000,
    )
    calls = Calls(batch, prefix="hot")
    convs = {cid: Conv(None, None, CallTracker.from_json(None)) for cid in calls.ids}
    timer = Timed(engine)
    best: dict[str, float] = {}

    def one() -> dict[str, float]:
        recs = [Record(v) for _, v, _ in calls.build(batch)]
        t: dict[str, float] = {}
        t0 = time.process_time()
        got = intake(recs, expect)
        steps = [plan(c, convs[c], 0, items) for c, items in got.inputs.items()]
        t["validate"] = time.process_time() - t0
        t0 = time.process_time()
        chunks = [[_utterance(p) for _, p, _ in s.chunk] for s in steps]
        outs, states = engine.step(chunks, [s.conv.state for s in steps])
        t["step"] = time.process_time() - t0
        t0 = time.process_time()
        for s, o, st in zip(steps, outs, states, strict=True):
            out = mapper.outcome(s, (o, st))
            convs[s.cid] = out.conv
            if out.commit is not None:
                _ = out.commit.stored_events  # the packing the store does
        t["events"] = time.process_time() - t0
        return t

    for _ in range(5):  # states past the first utterance, caches warm
        one()
    for _ in range(rounds):
        timer.t = dict.fromkeys(timer.t, 0.0)
        acc: dict[str, float] = {}
        for _ in range(per_round):
            for k, v in one().items():
                acc[k] = acc.get(k, 0.0) + v
        acc.update({f"step.{k}": v for k, v in timer.t.items()})
        n = per_round * batch
        for k, v in acc.items():
            best[k] = min(best.get(k, float("inf")), v / n * 1e3)
    return {k: round(v, 4) for k, v in best.items()}


def step_ab(new: StreamingEngine, old: StreamingEngine, batch: int, rounds: int) -> dict:
    """The step alone, this tree's network vs the other revision's, alternating."""
    rng = np.random.default_rng(batch)
    from model.engine import Utterance

    def warm(e: StreamingEngine) -> list:
        st: list = [None] * batch
        for i in range(8):
            chunk = [
                [Utterance(("agent", "customer")[i % 2], text=rng.standard_normal(384))]
                for _ in range(batch)
            ]
            _, st = e.step(chunk, st)
        return st

    states = warm(new)
    chunks = [[Utterance("agent", text=rng.standard_normal(384))] for _ in range(batch)]
    (a, _), (b, _) = new.step(chunks, states), old.step(chunks, states)
    same = all(
        np.array_equal(x[0].probabilities, y[0].probabilities) for x, y in zip(a, b, strict=True)
    )
    n = max(1500 // batch, 20)
    times: dict[str, float] = {"this": float("inf"), "against": float("inf")}
    for r in range(rounds):
        pairs = [("this", new), ("against", old)]
        for name, e in pairs if r % 2 == 0 else pairs[::-1]:
            t0 = time.process_time()
            for _ in range(n):
                e.step(chunks, states)
            times[name] = min(times[name], (time.process_time() - t0) / n / batch * 1e3)
    return {
        "ms_per_utterance": {k: round(v, 4) for k, v in times.items()},
        "against_vs_this": round(times["against"] / times["this"], 3),
        "same_probabilities": same,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (smoke run)")
    parser.add_argument("--against", metavar="REV", help="also time REV's network (A/B)")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--no-write", action="store_true", help="print only, write no JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)
    rounds = 2 if args.quick else 4
    engine = StreamingEngine.load()
    results: dict[str, Any] = {}
    for batch in BATCHES:
        per_round = max((100 if args.quick else 400) // batch, 5)
        results[str(batch)] = stages(StreamingEngine.load(), batch, rounds, per_round)
        r = results[str(batch)]
        print(
            f"batch {batch:3d}: ms CPU per utterance  validate {r['validate']:.3f}  step "
            f"{r['step']:.3f} (inputs {r['step.inputs']:.3f} forward {r['step.forward']:.3f} "
            f"results {r['step.results']:.3f})  events {r['events']:.3f}",
            flush=True,
        )
    ab: dict[str, Any] = {}
    if args.against:
        then = network_of(args.against)
        old_model = then.CFNESA(engine.config)
        old_model.load_state_dict(engine.model.state_dict())
        old = StreamingEngine(old_model, engine.fingerprint)
        for batch in BATCHES:
            ab[str(batch)] = step_ab(engine, old, batch, rounds)
            x = ab[str(batch)]
            print(
                f"step at batch {batch:3d}: this {x['ms_per_utterance']['this']:.3f} ms/utt, "
                f"{args.against} {x['ms_per_utterance']['against']:.3f} "
                f"({x['against_vs_this']}x; same probabilities: {x['same_probabilities']})",
                flush=True,
            )
    record = {
        "benchmark": "hot_path",
        "commit": git("rev-parse", "--short", "HEAD"),
        "dirty_tree": bool(git("status", "--porcelain", "--untracked-files=no")),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(threads=args.torch_threads),
        "setup": {
            "features": "text only, 384-d float32, base64; one utterance per call per batch",
            "cpu": "time.process_time per utterance, min over alternating rounds",
            "rounds": rounds,
        },
        "quick": args.quick,
        "ms_cpu_per_utterance": results,
        "ratios": {
            "step_batch1_vs_batch64": round(results["1"]["step"] / results["64"]["step"], 1),
        },
        "step_against": {"rev": args.against, **ab} if args.against else None,
    }
    print(f"step at batch 1 vs 64, per utterance: {record['ratios']['step_batch1_vs_batch64']}x")
    if not args.no_write:
        write_result("hot_path", record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
