"""Calibrated probabilities: temperature scaling of the emotion and shift heads.

One scalar per head divides its logits (Guo et al., "On Calibration of Modern
Neural Networks", ICML 2017). It is fitted on the validation split after the
epoch is chosen, by minimising the negative log-likelihood over log T, and
stored in the model config (``emotion_temperature``, ``shift_temperature``),
so it is part of the fingerprint and the network applies it in every forward:
a streamed step and the whole-dialogue forward stay equal.

A temperature never changes an argmax, so accuracy and F1 are untouched; what
changes is what a probability means, which is what alert thresholds rely on.

The shift head is fitted on the comparisons it serves: each utterance against
the previous one and against the same speaker's previous one (target: the
gold emotions differ).

Metrics: expected calibration error over 15 equal-width confidence bins (the
top-class probability against accuracy), and the Brier score (mean squared
error of the probability vector against the one-hot label, summed over classes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.batching import batches, make_batch
from model.data import Dialogue
from model.network import CFNESA

ECE_BINS = 15


@dataclass
class HeadOutputs:
    """Raw (temperature-free) logits of a split with their targets.

    Attributes:
        emotion_logits: (N, C) of the labelled utterances; emotion_labels (N,).
        shift_logits: (P, 2) of the served comparisons (previous utterance,
            same speaker's previous one) between labelled utterances;
            shift_labels (P,) 1 where the two gold emotions differ.
    """

    emotion_logits: np.ndarray
    emotion_labels: np.ndarray
    shift_logits: np.ndarray
    shift_labels: np.ndarray


@torch.inference_mode()
def head_outputs(model: CFNESA, dialogues: Sequence[Dialogue], batch_size: int = 64) -> HeadOutputs:
    """The logits of both heads with the temperatures divided back out."""
    model.eval()
    t_e, t_s = model.config.emotion_temperature, model.config.shift_temperature
    e_logits, e_labels, s_logits, s_labels = [], [], [], []
    for chunk in batches(dialogues, batch_size, None):
        b = make_batch(chunk, model.config)
        out = model(b.features, b.present, b.valid, b.prev_index, b.speaker_prev_index)
        for i, d in enumerate(chunk):
            n, y = d.length, d.labels
            keep = y >= 0
            e_logits.append(out.logits[i, :n][torch.from_numpy(keep)].numpy() * t_e)
            e_labels.append(y[keep])
            for index, logits in (
                (b.prev_index[i, :n].numpy(), out.shift_prev[i, :n].numpy()),
                (b.speaker_prev_index[i, :n].numpy(), out.shift_speaker[i, :n].numpy()),
            ):
                ok = keep & (index >= 0)
                ok[ok] &= y[index[ok]] >= 0
                s_logits.append(logits[ok] * t_s)
                s_labels.append((y[ok] != y[index[ok]]).astype(np.int64))
    c = model.config.num_classes
    return HeadOutputs(
        emotion_logits=np.concatenate(e_logits) if e_logits else np.zeros((0, c), np.float32),
        emotion_labels=np.concatenate(e_labels) if e_labels else np.zeros(0, np.int64),
        shift_logits=np.concatenate(s_logits) if s_logits else np.zeros((0, 2), np.float32),
        shift_labels=np.concatenate(s_labels) if s_labels else np.zeros(0, np.int64),
    )


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=-1, keepdims=True))


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    p = softmax(logits, temperature)
    return float(-np.log(np.clip(p[np.arange(len(labels)), labels], 1e-12, None)).mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T minimising the NLL of softmax(logits / T); 1.0 when there is no data.

    NLL is unimodal in log T, so a golden-section search on log T in
    [log 0.05, log 20] finds it without gradients or randomness.
    """
    if len(labels) == 0:
        return 1.0
    lo, hi = math.log(0.05), math.log(20.0)
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(logits, labels, math.exp(a)), nll(logits, labels, math.exp(b))
    for _ in range(60):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(logits, labels, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(logits, labels, math.exp(b))
    return round(math.exp((lo + hi) / 2), 4)


def expected_calibration_error(
    probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS
) -> float:
    """ECE of the top-class probability over equal-width bins (0-1, not percent)."""
    if len(labels) == 0:
        return 0.0
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    total = 0.0
    for k in range(bins):
        m = which == k
        if m.any():
            total += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(total)


def brier(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean over samples of the squared error summed over classes."""
    if len(labels) == 0:
        return 0.0
    onehot = np.zeros_like(probs)
    onehot[np.arange(len(labels)), labels] = 1.0
    return float(((probs - onehot) ** 2).sum(axis=1).mean())


def calibration_figures(
    outputs: HeadOutputs, emotion_temperature: float, shift_temperature: float
) -> dict[str, Any]:
    """ECE and Brier of both heads at the given temperatures."""
    pe = softmax(outputs.emotion_logits, emotion_temperature)
    ps = softmax(outputs.shift_logits, shift_temperature)
    return {
        "emotion": {
            "ece": round(expected_calibration_error(pe, outputs.emotion_labels), 4),
            "brier": round(brier(pe, outputs.emotion_labels), 4),
            "nll": round(
                nll(outputs.emotion_logits, outputs.emotion_labels, emotion_temperature), 4
            ),
        },
        "shift": {
            "ece": round(expected_calibration_error(ps, outputs.shift_labels), 4),
            "brier": round(brier(ps, outputs.shift_labels), 4),
        },
        "utterances": len(outputs.emotion_labels),
        "shift_pairs": len(outputs.shift_labels),
    }


def fit(model: CFNESA, valid: Sequence[Dialogue]) -> tuple[float, float]:
    """Both temperatures fitted on ``valid`` (the model's own are ignored)."""
    out = head_outputs(model, valid)
    return (
        fit_temperature(out.emotion_logits, out.emotion_labels),
        fit_temperature(out.shift_logits, out.shift_labels),
    )


def report(model: CFNESA, dialogues: Sequence[Dialogue]) -> dict[str, Any]:
    """Before (T = 1) and after (the model's temperatures) on some dialogues."""
    out = head_outputs(model, dialogues)
    c = model.config
    return {
        "emotion_temperature": c.emotion_temperature,
        "shift_temperature": c.shift_temperature,
        "before": calibration_figures(out, 1.0, 1.0),
        "after": calibration_figures(out, c.emotion_temperature, c.shift_temperature),
    }


def reliability_diagram(
    model: CFNESA, dialogues: Sequence[Dialogue], path: str | Path, title: str = ""
) -> Path:
    """A PNG: accuracy per confidence bin before and after scaling, both heads."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = head_outputs(model, dialogues)
    c = model.config
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    heads = (
        ("emotion head", out.emotion_logits, out.emotion_labels, c.emotion_temperature),
        (
            "shift head (vs previous, vs same speaker)",
            out.shift_logits,
            out.shift_labels,
            c.shift_temperature,
        ),
    )
    edges = np.linspace(0.0, 1.0, ECE_BINS + 1)
    for ax, (name, logits, labels, t) in zip(axes, heads, strict=True):
        ax.plot([0, 1], [0, 1], color="#999", lw=1, ls="--", label="perfect")
        for temp, colour, tag in ((1.0, "#d62728", "before"), (t, "#1f77b4", "after")):
            p = softmax(logits, temp)
            conf, correct = p.max(1), p.argmax(1) == labels
            which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, ECE_BINS - 1)
            xs = [conf[which == k].mean() for k in range(ECE_BINS) if (which == k).any()]
            ys = [correct[which == k].mean() for k in range(ECE_BINS) if (which == k).any()]
            ece = expected_calibration_error(p, labels)
            ax.plot(xs, ys, marker="o", color=colour, label=f"{tag} (T={temp:g}): ECE {ece:.3f}")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title=name)
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(title or f"{c.name}: reliability, {ECE_BINS} bins")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
