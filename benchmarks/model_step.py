"""Speed of the incremental step (issue 2's targets), on this machine.

Figures, all from one run (ratios within the run, since the machine is noisy):

- step at conversation position 100 vs recomputing the 100-utterance prefix
  with the whole-dialogue forward, one conversation (target: >= 30x);
- step time at position 1,000 vs position 10 (target: within 1.2x);
- batched steps of 64 conversations, text-only and with all three
  modalities (targets: >= 2,000 and >= 800 utterances/s);
- achieved GFLOP/s of the batched step beside the machine's measured
  float32 matmul rate, so the distance to the limit is visible;
- state bytes per conversation.

Usage: python benchmarks/model_step.py [--checkpoint DIR] [--quick]
Writes benchmarks/results/model_step-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.engine import StreamingEngine, Utterance  # noqa: E402
from model.network import CFNESA  # noqa: E402
from model.state import ConversationState, parts_size  # noqa: E402


def timeit(fn, repeat: int, warmup: int = 3) -> float:
    """Median seconds of fn() over `repeat` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_gflops(n: int = 1024, repeat: int = 20) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    sec = timeit(lambda: a @ b, repeat)
    return 2 * n**3 / sec / 1e9


def utterances(
    rng: np.random.Generator, cfg: ModelConfig, n: int, all_modalities: bool
) -> list[Utterance]:
    out = []
    for t in range(n):
        feats = {m: rng.standard_normal(cfg.dim(m)).astype(np.float32) for m in cfg.modalities}
        if not all_modalities:
            feats = {"text": feats["text"]}
        out.append(Utterance(speaker=("agent", "customer")[t % 2], **feats))
    return out


def state_at(engine: StreamingEngine, dialogue: list[Utterance]) -> ConversationState:
    """The state after the dialogue, built in chunks (fast; same numbers)."""
    state = None
    for start in range(0, len(dialogue), 50):
        _, (state,) = engine.step([dialogue[start : start + 50]], [state])
    assert state is not None
    return state


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (smoke run)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeat = 5 if args.quick else 30
    rng = np.random.default_rng(0)

    if (args.checkpoint / "config.json").is_file():
        ckpt = load_checkpoint(args.checkpoint)
        text_engine = StreamingEngine(ckpt.model, ckpt.fingerprint)
        source = str(
            args.checkpoint.relative_to(ROOT)
            if args.checkpoint.is_relative_to(ROOT)
            else args.checkpoint
        )
    else:
        torch.manual_seed(0)
        text_engine = StreamingEngine(CFNESA(ModelConfig()), "random")
        source = "default ModelConfig, random weights (no checkpoint found)"
    cfg = text_engine.config
    # The all-modality figure needs audio and visual branches: the same
    # config with the paper's MELD feature sizes (300-d audio, 342-d visual).
    torch.manual_seed(0)
    mm_cfg = cfg.replace(audio_dim=300, visual_dim=342)
    mm_engine = StreamingEngine(CFNESA(mm_cfg), "random-mm")

    results: dict[str, object] = {}
    matmul = matmul_gflops()
    results["matmul_gflops_fp32_1024"] = round(matmul, 1)

    # 1. step at position 100 vs recomputing the prefix (one conversation)
    dialogue = utterances(rng, cfg, 1001, False)
    state100 = state_at(text_engine, dialogue[:100])
    step100 = timeit(lambda: text_engine.step([[dialogue[100]]], [state100]), repeat * 4)
    recompute = timeit(lambda: text_engine.run_dialogue(dialogue[:101]), repeat)
    results["step_pos100_ms"] = round(step100 * 1e3, 3)
    results["recompute_prefix100_ms"] = round(recompute * 1e3, 3)
    results["speedup_vs_recompute_pos100"] = round(recompute / step100, 1)

    # 2. position 1,000 vs position 10
    state10 = state_at(text_engine, dialogue[:10])
    state1000 = state_at(text_engine, dialogue[:1000])
    t10, t1000 = [], []
    for _ in range(3):  # interleaved, so drift hits both alike
        t10.append(timeit(lambda: text_engine.step([[dialogue[10]]], [state10]), repeat * 2))
        t1000.append(timeit(lambda: text_engine.step([[dialogue[1000]]], [state1000]), repeat * 2))
    results["step_pos10_ms"] = round(min(t10) * 1e3, 3)
    results["step_pos1000_ms"] = round(min(t1000) * 1e3, 3)
    results["ratio_pos1000_vs_pos10"] = round(min(t1000) / min(t10), 3)

    # 3. batched steps of 64 conversations at mixed positions
    for name, engine, every in (
        ("text_only", text_engine, False),
        ("all_modalities", mm_engine, True),
    ):
        ecfg = engine.config
        convs = [utterances(rng, ecfg, int(rng.integers(5, 60)) + 1, every) for _ in range(64)]
        states = [state_at(engine, c[:-1]) for c in convs]
        chunks = [[c[-1]] for c in convs]
        sec = timeit(lambda e=engine, ch=chunks, st=states: e.step(ch, st), repeat)
        with FlopCounterMode(display=False) as counter:
            engine.step(chunks, states)
        flops = counter.get_total_flops()
        results[f"batch64_{name}_ms"] = round(sec * 1e3, 2)
        results[f"batch64_{name}_utterances_per_s"] = round(64 / sec)
        results[f"batch64_{name}_gflops_achieved"] = round(flops / sec / 1e9, 2)
        results[f"batch64_{name}_fraction_of_matmul_rate"] = round(flops / sec / 1e9 / matmul, 3)
        # what the worker stores per call: the parts format (core + window slots)
        results[f"state_bytes_{name}"] = int(np.mean([parts_size(s.to_parts()) for s in states]))

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    record = {
        "benchmark": "model_step",
        "commit": commit,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "model": {
            "source": source,
            "d_model": cfg.d_model,
            "window": cfg.window_utterances,
            "acme_layers": cfg.acme_layers,
            "rume_layers": cfg.rume_layers,
        },
        "quick": args.quick,
        "results": results,
        "targets": {
            "speedup_vs_recompute_pos100": ">= 30",
            "ratio_pos1000_vs_pos10": "<= 1.2",
            "batch64_text_only_utterances_per_s": ">= 2000",
            "batch64_all_modalities_utterances_per_s": ">= 800",
        },
    }
    for key, value in results.items():
        print(f"{key:45s} {value}")
    out = ROOT / "benchmarks" / "results" / f"model_step-{datetime.now(UTC):%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"written {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
