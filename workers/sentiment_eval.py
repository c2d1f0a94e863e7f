"""The sentiment score measured against gold sentiment labels (``cfnesa eval-sentiment``).

Every emotion event carries ``sentiment``: the probability mass of the positive
emotions minus that of the negative ones (the rules file's label set). MELD also
labels each utterance's sentiment (positive, neutral, negative), annotated apart
from its emotion, so the score can be checked against it:

- ranking: AUROC of the score for "negative vs the rest" (lower is more negative)
  and "positive vs the rest", and Spearman's rank correlation with the gold
  sentiment as -1 / 0 / +1;
- labels, as Contact Lens or CCAI give them: negative below ``low``, positive above
  ``high``, else neutral. The two cut points are chosen on the validation split
  (best macro-F1 over a grid) and applied to the test split once.

The model runs through ``StreamingEngine.step`` one utterance at a time, as in the
worker, and the score is computed by the same function (`AlertRules.sentiment`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from model.data import Dialogue
from model.engine import StreamingEngine
from streaming.alerts import AlertRules
from workers.alert_eval import stream

GOLD = {"negative": -1, "neutral": 0, "positive": 1}
GRID = np.round(np.arange(-0.9, 0.91, 0.05), 2)


def scores(
    engine: StreamingEngine, rules: AlertRules, dialogues: Sequence[Dialogue]
) -> list[list[float]]:
    """Each utterance's sentiment, streamed as the worker streams it."""
    labels = engine.label_names
    out = []
    for results in stream(engine, dialogues):
        out.append(
            [
                rules.sentiment(
                    {n: round(float(p), 6) for n, p in zip(labels, r.probabilities, strict=True)}
                )
                for r in results
            ]
        )
    return out


def gold_values(
    dialogues: Sequence[Dialogue], gold: Mapping[str, Sequence[str | None]]
) -> list[list[int | None]]:
    """The gold sentiment of each utterance as -1 / 0 / +1 (None: unlabelled)."""
    out = []
    for d in dialogues:
        labels = gold.get(d.dialogue_id)
        if labels is None or len(labels) != d.length:
            raise ValueError(f"no sentiment labels for every utterance of {d.dialogue_id}")
        out.append([None if x is None else GOLD[x] for x in labels])
    return out


def ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank."""
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    values, inverse = np.unique(x, return_inverse=True)
    sums = np.bincount(inverse, weights=r, minlength=len(values))
    counts = np.bincount(inverse, minlength=len(values))
    return np.asarray((sums / counts)[inverse])


def auroc(positive: np.ndarray, score: np.ndarray) -> float:
    """P(a random positive scores above a random other), ties counting half."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return float("nan")
    r = ranks(score)
    return float((r[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (Pearson's on average ranks)."""
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def macro_f1(gold: np.ndarray, predicted: np.ndarray) -> float:
    """Mean F1 over the classes -1, 0, +1 (a class never predicted nor present: 0)."""
    out = []
    for c in (-1, 0, 1):
        tp = float(((predicted == c) & (gold == c)).sum())
        fp = float(((predicted == c) & (gold != c)).sum())
        fn = float(((predicted != c) & (gold == c)).sum())
        out.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(out) / 3


def _flat(s: Sequence[Sequence[float]], g: Sequence[Sequence[int | None]]) -> tuple[Any, Any]:
    pairs = [(a, b) for xs, ys in zip(s, g, strict=True) for a, b in zip(xs, ys, strict=True)]
    kept = [(a, b) for a, b in pairs if b is not None]
    return np.array([a for a, _ in kept]), np.array([b for _, b in kept])


def label(score: np.ndarray, low: float, high: float) -> np.ndarray:
    """-1 below ``low``, +1 above ``high``, else 0."""
    return np.where(score < low, -1, np.where(score > high, 1, 0))


def choose_cuts(score: np.ndarray, gold: np.ndarray) -> tuple[float, float, float]:
    """The (low, high) cut points with the best macro-F1, and that F1 (percent)."""
    best = (-1.0, 0.0, 0.0)
    for low in GRID:
        for high in GRID[low <= GRID]:
            f1 = macro_f1(gold, label(score, low, high))
            if f1 > best[0] + 1e-12:
                best = (float(f1), float(low), float(high))
    return best[1], best[2], round(100 * best[0], 2)


def figures(score: np.ndarray, gold: np.ndarray, low: float, high: float) -> dict[str, Any]:
    """How well the score ranks and labels the gold sentiment (percentages 0-100)."""
    predicted = label(score, low, high)
    return {
        "utterances": len(gold),
        "auroc_negative": round(100 * auroc(gold == -1, -score), 2),
        "auroc_positive": round(100 * auroc(gold == 1, score), 2),
        "spearman": round(spearman(score, gold), 4),
        "mean_by_gold": {
            name: round(float(score[gold == v].mean()), 4) if (gold == v).any() else None
            for name, v in GOLD.items()
        },
        "cuts": {"low": low, "high": high},
        "macro_f1": round(100 * macro_f1(gold, predicted), 2),
        "accuracy": round(100 * float((predicted == gold).mean()), 2),
        "majority_accuracy": round(100 * max(float((gold == v).mean()) for v in (-1, 0, 1)), 2),
    }


def evaluate_sentiment(
    engine: StreamingEngine,
    rules: AlertRules,
    valid: Sequence[Dialogue],
    test: Sequence[Dialogue],
    gold: Mapping[str, Sequence[str | None]],
) -> dict[str, Any]:
    """Cut points chosen on ``valid``; the figures of both splits with them."""
    v_score, v_gold = _flat(scores(engine, rules, valid), gold_values(valid, gold))
    low, high, valid_f1 = choose_cuts(v_score, v_gold)
    t_score, t_gold = _flat(scores(engine, rules, test), gold_values(test, gold))
    return {
        "positive": sorted(rules.positive_emotions),
        "negative": sorted(rules.negative_emotions),
        "chosen_on": "valid",
        "valid": {**figures(v_score, v_gold, low, high), "chosen_macro_f1": valid_f1},
        "test": figures(t_score, t_gold, low, high),
    }
