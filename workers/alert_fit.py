"""Learning the alert rule from the train split (``cfnesa fit-alerts``).

The shipped model was fit on the train split, so its outputs there are
over-confident; rules tuned on them would not transfer. Cross-fitting fixes
that: K models of the same recipe, each trained without one fold of the train
dialogues (``cfnesa train --fold k``), stream the fold they never saw. Those
out-of-fold results, about 1,500 MELD episodes against 170 in validation, are
what the alert head and the rule's settings are learned from:

1. the learned head: a logistic regression on the tracker's features
   (``streaming.alerts.FEATURES``), target "this utterance starts a gold
   negative episode of its speaker" or "is inside one" (both fitted; the
   out-of-fold F1 picks);
2. for each score (``p_negative``, ``alert_head``) the re-arm setting and the
   threshold with the best out-of-fold F1, and the table of operating points
   (threshold -> alerts per 100 utterances, precision, recall) that turns a
   rules file's ``alerts_per_100`` or ``min_precision`` into a threshold;
3. validation (the shipped model on the valid split) then compares the
   candidates with the current rules and the naive rule; it chooses, it does
   not tune. The test split is reported by ``cfnesa eval-alerts`` only.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model.data import Dialogue, FeatureSet
from model.engine import StreamingEngine, UtteranceResult
from streaming.alerts import FEATURES, AlertHead, AlertRules, CallTracker, OperatingPoint
from workers.alert_eval import (
    Gold,
    naive_alerts,
    negative_flags,
    observe_result,
    run_rules,
    stream,
    thresholds,
)

REARM_CHOICES = (1, 2)


@dataclass
class Streamed:
    """Dialogues with the model results a worker would have produced for them."""

    dialogues: list[Dialogue]
    results: list[list[UtteranceResult]]
    labels: tuple[str, ...]


def out_of_fold(
    fold_dirs: Sequence[str | Path], features: FeatureSet, log: Any = print
) -> Streamed:
    """Each fold model streams the train dialogues it was trained without."""
    by_id = {d.dialogue_id: d for d in features.split("train")}
    dialogues: list[Dialogue] = []
    results: list[list[UtteranceResult]] = []
    labels: tuple[str, ...] = ()
    seen: set[str] = set()
    for path in fold_dirs:
        engine = StreamingEngine.load(path)
        card = json.loads((Path(path) / "card.json").read_text())
        held = [by_id[i] for i in card.get("heldout", []) if i in by_id]
        if not held:
            raise SystemExit(f"cfnesa: {path} held out no train dialogue (trained with --fold?)")
        if seen & {d.dialogue_id for d in held}:
            raise SystemExit(f"cfnesa: {path} holds out dialogues another fold holds out")
        seen |= {d.dialogue_id for d in held}
        labels = engine.label_names
        log(f"  {path}: streaming its {len(held)} held-out train dialogues")
        dialogues.extend(held)
        results.extend(stream(engine, held))
    return Streamed(dialogues, results, labels)


def feature_rows(rules: AlertRules, streamed: Streamed) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """The head's inputs for every utterance (rows), and each row's (call, position)."""
    rows, where = [], []
    quiet = rules.model_copy(
        update={
            "negative_onset": rules.negative_onset.model_copy(update={"enabled": False}),
        }
    )
    for c, (d, outs) in enumerate(zip(streamed.dialogues, streamed.results, strict=True)):
        tracker = CallTracker()
        for t, out in enumerate(outs):
            observe_result(tracker, quiet, d.speakers[t], out, streamed.labels)
            rows.append([tracker.last_features[f] for f in FEATURES])
            where.append((c, t))
    return np.asarray(rows, np.float64), where


def targets(
    gold: Gold, dialogues: Sequence[Dialogue], where: Sequence[tuple[int, int]], kind: str
) -> np.ndarray:
    """1 where an utterance starts (``start``) or lies in (``inside``) a gold
    episode of its own speaker."""
    hot: set[tuple[int, int]] = set()
    for c, episodes in enumerate(gold.episodes):
        for e in episodes:
            if kind == "start":
                hot.add((c, e.start))
            else:
                spk = dialogues[c].speakers
                hot.update((c, t) for t in range(e.start, e.end + 1) if spk[t] == e.speaker)
    return np.asarray([1.0 if w in hot else 0.0 for w in where])


def logistic(x: np.ndarray, y: np.ndarray, l2: float = 1.0, iterations: int = 50) -> np.ndarray:
    """L2-regularised logistic regression by Newton's method; returns (bias, w...)."""
    a = np.hstack([np.ones((len(x), 1)), x])
    w = np.zeros(a.shape[1])
    reg = np.full(a.shape[1], l2)
    reg[0] = 0.0
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(a @ w, -60, 60)))
        grad = a.T @ (p - y) + reg * w
        hess = (a * (p * (1 - p))[:, None]).T @ a + np.diag(reg + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w


def fit_head(x: np.ndarray, y: np.ndarray, trained_on: dict[str, Any]) -> AlertHead:
    mean, scale = x.mean(0), x.std(0)
    scale[scale < 1e-9] = 1.0
    w = logistic((x - mean) / scale, y)
    return AlertHead(
        features=FEATURES,
        mean=tuple(float(v) for v in mean),
        scale=tuple(float(v) for v in scale),
        weights=tuple(round(float(v), 6) for v in w[1:]),
        bias=round(float(w[0]), 6),
        trained_on=trained_on,
    )


def onset_rules(
    base: AlertRules, score: str, rearm_after: int, head: AlertHead | None
) -> AlertRules:
    """Only the onset rule, on ``score``; the other rules off."""
    data = base.model_dump(exclude={"head"})
    data["negative_onset"] = {
        "enabled": True,
        "score": score,
        "min_score": 0.5,
        "rearm_after": rearm_after,
        "severity": base.negative_onset.severity,
    }
    data["emotion_shift"] = {**data["emotion_shift"], "enabled": False}
    data["sustained_negative"] = {**data["sustained_negative"], "enabled": False}
    data["sentiment_below"] = {**data["sentiment_below"], "enabled": False}
    rules = AlertRules.model_validate(data).resolve(head)
    return rules.model_copy(update={"label_set": base.label_set})


def operating_points(
    rules: AlertRules, streamed: Streamed, gold: Gold, slack: int
) -> list[OperatingPoint]:
    points = []
    for t in thresholds(100):
        f = gold.score(
            run_rules(
                rules.with_threshold(t), streamed.dialogues, streamed.results, streamed.labels
            ),
            slack,
        )
        points.append(
            OperatingPoint(
                threshold=t,
                alerts_per_100=round(f.alerts_per_100_utterances, 3),
                precision=round(f.precision, 3),
                recall=round(f.recall, 3),
            )
        )
    return points


def best_point(points: Sequence[OperatingPoint]) -> tuple[OperatingPoint, float]:
    def f1(p: OperatingPoint) -> float:
        return (
            2 * p.precision * p.recall / (p.precision + p.recall) if p.precision + p.recall else 0
        )

    best = max(points, key=lambda p: (f1(p), -p.threshold))
    return best, f1(best)


@dataclass
class Candidate:
    """One onset rule learned on out-of-fold train results."""

    name: str
    score: str
    head: AlertHead | None
    rearm_after: int
    threshold: float
    f1: float
    table: list[OperatingPoint]

    def rules(self, base: AlertRules) -> AlertRules:
        return onset_rules(base, self.score, self.rearm_after, self.head).with_threshold(
            self.threshold
        )


def fit_alerts(
    train: Streamed,
    data_labels: Sequence[str],
    base: AlertRules,
    *,
    slack: int = 2,
    gold_negative: frozenset[str] | None = None,
    log: Any = print,
) -> dict[str, Candidate]:
    """Learn the heads and each score's settings on out-of-fold train results."""
    negative = gold_negative or base.negative_emotions
    gold = Gold(train.dialogues, negative_flags(data_labels, negative))
    x, where = feature_rows(base, train)
    log(
        f"  out-of-fold train: {len(train.dialogues)} calls, {len(x)} utterances, "
        f"{gold.total} episodes"
    )
    naive = gold.score(naive_alerts(train.dialogues, train.results, base.negative_emotions), slack)
    log(f"  naive rule on them: P {naive.precision:.1f} R {naive.recall:.1f} F1 {naive.f1:.2f}")
    options: list[tuple[str, str, AlertHead | None]] = [("p_negative", "p_negative", None)]
    for kind in ("start", "inside"):
        y = targets(gold, train.dialogues, where, kind)
        info = {
            "target": kind,
            "utterances": len(x),
            "positives": int(y.sum()),
            "episodes": gold.total,
            "slack": slack,
            "out_of_fold_naive_f1": round(naive.f1, 2),
        }
        options.append((f"alert_head[{kind}]", "alert_head", fit_head(x, y, info)))
    found: dict[str, Candidate] = {}
    for name, score, head in options:
        for rearm in REARM_CHOICES:
            points = operating_points(onset_rules(base, score, rearm, head), train, gold, slack)
            point, f1 = best_point(points)
            log(
                f"  {name:20s} rearm_after={rearm}: best out-of-fold F1 {f1:.2f} at "
                f"{point.threshold:.3f} (P {point.precision:.1f} R {point.recall:.1f}, "
                f"{point.alerts_per_100:.1f}/100)"
            )
            if name not in found or f1 > found[name].f1:
                found[name] = Candidate(name, score, head, rearm, point.threshold, f1, points)
    return found


def package(head: Candidate, p_negative: Candidate) -> AlertHead:
    """The file shipped beside the checkpoint: the head, and both scores' tables."""
    assert head.head is not None
    return head.head.model_copy(
        update={
            "operating_points": {
                "p_negative": tuple(p_negative.table),
                "alert_head": tuple(head.table),
            },
            "trained_on": {
                **head.head.trained_on,
                "rearm_after": {
                    "p_negative": p_negative.rearm_after,
                    "alert_head": head.rearm_after,
                },
                "best_threshold": {
                    "p_negative": p_negative.threshold,
                    "alert_head": head.threshold,
                },
                "out_of_fold_f1": {
                    "p_negative": round(p_negative.f1, 2),
                    "alert_head": round(head.f1, 2),
                },
            },
        }
    )
