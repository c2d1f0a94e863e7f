"""Classification metrics (numpy): accuracy, weighted F1, per-class F1, confusion."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Scores:
    """Scores over the labelled utterances of a split (percentages for acc/F1)."""

    accuracy: float
    weighted_f1: float
    macro_f1: float
    per_class_f1: dict[str, float]
    confusion: list[list[int]]  # rows: true class, columns: predicted
    support: int

    def to_dict(self) -> dict[str, object]:
        return {
            "accuracy": round(self.accuracy, 2),
            "weighted_f1": round(self.weighted_f1, 2),
            "macro_f1": round(self.macro_f1, 2),
            "per_class_f1": {k: round(v, 2) for k, v in self.per_class_f1.items()},
            "confusion": self.confusion,
            "support": self.support,
        }


def score(true: np.ndarray, pred: np.ndarray, label_names: tuple[str, ...]) -> Scores:
    """Score predictions; entries with a negative true label are ignored."""
    keep = true >= 0
    true, pred = true[keep].astype(np.int64), pred[keep].astype(np.int64)
    k = len(label_names)
    confusion = np.zeros((k, k), np.int64)
    np.add.at(confusion, (true, pred), 1)
    tp = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(0).astype(np.float64)
    actual = confusion.sum(1).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(actual > 0, tp / actual, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    n = int(actual.sum())
    weighted = float((f1 * actual).sum() / n) if n else 0.0
    present = actual > 0
    macro = float(f1[present].mean()) if present.any() else 0.0
    return Scores(
        accuracy=100.0 * float(tp.sum() / n) if n else 0.0,
        weighted_f1=100.0 * weighted,
        macro_f1=100.0 * macro,
        per_class_f1={name: 100.0 * float(f1[i]) for i, name in enumerate(label_names)},
        confusion=confusion.tolist(),
        support=n,
    )
