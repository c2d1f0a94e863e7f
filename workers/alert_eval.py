"""Alerts measured against what really happened in a call (``cfnesa eval-alerts``).

The model is streamed utterance by utterance through ``StreamingEngine.step``
(every dialogue of the split advances one utterance per batch, as a worker
would see them) and every result goes through ``observe_result``, the one
function the worker also calls, so what is measured here is what is shipped.

Definitions (docs/alerts.md):
- A gold negative episode is a maximal run of one speaker's consecutive
  utterances (in that speaker's turns) whose gold label is negative; its span
  runs from the call position of its first utterance to that of its last.
- An alert about a speaker detects the episode of that speaker it falls in,
  or one that ended at most ``slack`` call positions before it (model lag).
  The first alert on an undetected episode is a hit; every other alert counts
  against precision (``redundant`` when it falls on an already detected
  episode). Recall is the share of episodes detected; the delay of a hit is
  its call position minus the episode's first.
- Naive rule: alert when a speaker's predicted emotion is negative and their
  previous predicted emotion was not (or it is their first utterance).
- Random: as many alerts as the product raised, on utterances drawn at random
  (seeded), about those utterances' speakers.
- Precision at a budget of B alerts per 100 utterances: a rule's alerts with
  the highest scores, B per 100 utterances of the split (the product's at the
  loosest threshold that raises at least that many; the naive rule's ranked by
  the confidence of the negative prediction).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from model.data import Dialogue
from model.engine import StreamingEngine, Utterance, UtteranceResult
from streaming.alerts import AlertHead, AlertRules, CallTracker

BUDGETS = (2, 5, 10)
HEAD_FILE = "alert_head.json"


def observe_result(
    tracker: CallTracker,
    rules: AlertRules,
    speaker: str,
    out: UtteranceResult,
    labels: Sequence[str],
    *,
    ts: str | None = None,
    gap: bool = False,
    seq: int | None = None,
    role: str | None = None,
) -> list[Any]:
    """Feed one model result to a call's tracker: the worker's code path.

    The numbers are rounded to 6 decimals, as the emotion event carries them,
    so the rules see exactly what a dashboard shows. ``seq`` and ``role`` as
    `CallTracker.observe` takes them.
    """
    return tracker.observe(
        rules,
        speaker=speaker,
        emotion=out.emotion,
        confidence=round(out.confidence, 6),
        p_shift_speaker=_r(out.shift_vs_speaker_previous),
        ts=ts,
        gap=gap,
        seq=seq,
        role=role,
        probabilities={
            n: round(float(p), 6) for n, p in zip(labels, out.probabilities, strict=True)
        },
    )


def load_head(checkpoint_dir: str | Path | None) -> AlertHead | None:
    """The learned alert head shipped beside a checkpoint's weights, if any."""
    if checkpoint_dir is None:
        return None
    path = Path(checkpoint_dir) / HEAD_FILE
    return AlertHead.load(path) if path.is_file() else None


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 6)


# ----------------------------------------------------------------- streaming


def stream(
    engine: StreamingEngine, dialogues: Sequence[Dialogue], batch: int = 512
) -> list[list[UtteranceResult]]:
    """Every dialogue's results, fed one utterance per step, dialogues batched."""
    results: list[list[UtteranceResult]] = [[] for _ in dialogues]
    for start in range(0, len(dialogues), batch):
        group = list(range(start, min(start + batch, len(dialogues))))
        states: dict[int, Any] = dict.fromkeys(group)
        longest = max(dialogues[i].length for i in group)
        for t in range(longest):
            live = [i for i in group if dialogues[i].length > t]
            chunks = [[_utterance(dialogues[i], t)] for i in live]
            outs, new = engine.step(chunks, [states[i] for i in live])
            for i, o, s in zip(live, outs, new, strict=True):
                results[i].append(o[0])
                states[i] = s
    return results


def _utterance(d: Dialogue, t: int) -> Utterance:
    return Utterance(
        d.speakers[t],
        text=None if d.text is None else d.text[t],
        audio=None if d.audio is None else d.audio[t],
        visual=None if d.visual is None else d.visual[t],
    )


# ------------------------------------------------------------------- alerts


@dataclass(frozen=True)
class Raised:
    """One alert, as scored: where, about whom, which rule, how strongly."""

    call: int
    position: int
    speaker: str
    rule: str
    score: float


def run_rules(
    rules: AlertRules,
    dialogues: Sequence[Dialogue],
    results: Sequence[Sequence[UtteranceResult]],
    labels: Sequence[str],
    roles: Sequence[Sequence[str | None]] | None = None,
) -> list[Raised]:
    """The alerts the worker would raise for these calls, in call order
    (``roles``: each utterance's input role, as `role_plan` gives them)."""
    raised = []
    for c, (d, outs) in enumerate(zip(dialogues, results, strict=True)):
        tracker = CallTracker()
        for t, out in enumerate(outs):
            role = roles[c][t] if roles is not None else None
            for a in observe_result(tracker, rules, d.speakers[t], out, labels, seq=t, role=role):
                raised.append(Raised(c, t, a.speaker, a.rule, a.score))
    return raised


def role_plan(dialogues: Sequence[Dialogue], rule: str) -> list[list[str | None]] | None:
    """Each utterance's role under a replay role rule (`workers.replay.assign_roles`);
    None for "none" (no roles: every speaker is unknown, as in the issue's definitions)."""
    if rule == "none":
        return None
    from workers.replay import assign_roles

    return [assign_roles(d.speakers, rule) for d in dialogues]  # type: ignore[arg-type]


def naive_alerts(
    dialogues: Sequence[Dialogue],
    results: Sequence[Sequence[UtteranceResult]],
    negative: frozenset[str],
) -> list[Raised]:
    """Predicted negative now, not before (same speaker); scored by confidence."""
    raised = []
    for c, (d, outs) in enumerate(zip(dialogues, results, strict=True)):
        last: dict[str, bool] = {}
        for t, out in enumerate(outs):
            neg = out.emotion in negative
            if neg and not last.get(d.speakers[t], False):
                raised.append(Raised(c, t, d.speakers[t], "naive", out.confidence))
            last[d.speakers[t]] = neg
    return raised


def random_alerts(
    dialogues: Sequence[Dialogue],
    count: int,
    seed: int = 0,
    speakers: Sequence[set[str]] | None = None,
) -> list[Raised]:
    """``count`` alerts on utterances drawn without replacement (seeded), of
    ``speakers[c]`` in call c when given."""
    where = [
        (c, t)
        for c, d in enumerate(dialogues)
        for t in range(d.length)
        if speakers is None or d.speakers[t] in speakers[c]
    ]
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(where), size=min(count, len(where)), replace=False)
    chosen = sorted(where[int(i)] for i in pick)
    return [Raised(c, t, dialogues[c].speakers[t], "random", 0.0) for c, t in chosen]


# ------------------------------------------------------------------ scoring


@dataclass(frozen=True)
class Episode:
    speaker: str
    start: int  # call position of its first utterance
    end: int  # call position of its last utterance


def gold_episodes(speakers: Sequence[str], negative: Sequence[bool]) -> list[Episode]:
    """Maximal runs of negative gold labels in each speaker's own turns."""
    open_: dict[str, list[int]] = {}
    done: list[Episode] = []
    for t, (s, neg) in enumerate(zip(speakers, negative, strict=True)):
        if neg:
            open_.setdefault(s, [t, t])[1] = t
        elif s in open_:
            start, end = open_.pop(s)
            done.append(Episode(s, start, end))
    done.extend(Episode(s, a, b) for s, (a, b) in open_.items())
    return sorted(done, key=lambda e: (e.start, e.speaker))


@dataclass
class Figures:
    """How a set of alerts fares against the gold episodes (percentages 0-100)."""

    precision: float
    recall: float
    f1: float
    alerts: int
    hits: int
    redundant: int
    alerts_per_100_utterances: float
    median_delay_utterances: float | None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "precision": round(self.precision, 2),
            "recall": round(self.recall, 2),
            "f1": round(self.f1, 2),
            "alerts": self.alerts,
            "hits": self.hits,
            "redundant": self.redundant,
            "alerts_per_100_utterances": round(self.alerts_per_100_utterances, 2),
            "median_delay_utterances": self.median_delay_utterances,
            **self.extra,
        }


class Gold:
    """The gold negative episodes of a split, indexed for scoring."""

    def __init__(
        self,
        dialogues: Sequence[Dialogue],
        negative_labels: Sequence[bool],
        speakers: Sequence[set[str]] | None = None,
    ) -> None:
        """``negative_labels[k]``: class k counts as negative; ``speakers[c]``: the
        speakers of call c whose episodes count (None: everyone's)."""
        self.utterances = sum(d.length for d in dialogues)
        self.episodes: list[list[Episode]] = []
        for c, d in enumerate(dialogues):
            neg = [bool(y >= 0 and negative_labels[int(y)]) for y in d.labels]
            found = gold_episodes(d.speakers, neg)
            if speakers is not None:
                found = [e for e in found if e.speaker in speakers[c]]
            self.episodes.append(found)
        self.total = sum(len(e) for e in self.episodes)

    def score(self, alerts: Sequence[Raised], slack: int = 2) -> Figures:
        detected: set[tuple[int, int]] = set()
        hits = redundant = 0
        delays: list[int] = []
        for a in sorted(alerts, key=lambda a: (a.call, a.position)):
            match = None
            for k, e in enumerate(self.episodes[a.call]):
                if e.speaker == a.speaker and e.start <= a.position <= e.end + slack:
                    inside = a.position <= e.end
                    # the episode it falls in wins over one that ended just before
                    if match is None or inside:
                        match = k
                    if inside:
                        break
            if match is None:
                continue
            if (a.call, match) in detected:
                redundant += 1
                continue
            detected.add((a.call, match))
            hits += 1
            delays.append(a.position - self.episodes[a.call][match].start)
        n = len(alerts)
        p = 100.0 * hits / n if n else 0.0
        r = 100.0 * hits / self.total if self.total else 0.0
        return Figures(
            precision=p,
            recall=r,
            f1=2 * p * r / (p + r) if p + r else 0.0,
            alerts=n,
            hits=hits,
            redundant=redundant,
            alerts_per_100_utterances=100.0 * n / max(self.utterances, 1),
            median_delay_utterances=float(statistics.median(delays)) if delays else None,
        )

    def at_budget(self, alerts: Sequence[Raised], per_100: float, slack: int = 2) -> Figures:
        """The ``per_100`` highest-scored alerts (ties: earlier first)."""
        n = round(per_100 * self.utterances / 100.0)
        ranked = sorted(alerts, key=lambda a: (-a.score, a.call, a.position))[:n]
        return self.score(ranked, slack)


# --------------------------------------------------------------- the report


def negative_flags(label_names: Sequence[str], negative: frozenset[str]) -> list[bool]:
    return [name in negative for name in label_names]


def thresholds(steps: int = 200) -> list[float]:
    return [round(float(x), 4) for x in np.linspace(0.0, 1.0, steps + 1)]


def evaluate_alerts(
    engine: StreamingEngine,
    rules: AlertRules,
    dialogues: Sequence[Dialogue],
    data_labels: Sequence[str],
    *,
    gold_negative: frozenset[str] | None = None,
    slack: int = 2,
    seed: int = 0,
    results: Sequence[Sequence[UtteranceResult]] | None = None,
    curve: bool = True,
    roles: str = "none",
) -> dict[str, Any]:
    """The product's rules, the naive rule and random alerts on one split.

    ``roles``: "none" (no roles), or a replay role rule ("first-agent"): the calls
    are then scored from the customer's side: only customers' episodes count, and
    the naive rule and random alerts are about customers only.
    """
    labels = engine.label_names
    outs = results if results is not None else stream(engine, dialogues)
    plan = role_plan(dialogues, roles)
    customers = (
        None
        if plan is None
        else [
            {s for s, r in zip(d.speakers, p, strict=True) if r == "customer"}
            for d, p in zip(dialogues, plan, strict=True)
        ]
    )
    gold = Gold(
        dialogues,
        negative_flags(data_labels, gold_negative or rules.negative_emotions),
        customers,
    )
    product = run_rules(rules, dialogues, outs, labels, plan)
    naive = naive_alerts(dialogues, outs, rules.negative_emotions)
    if customers is not None:
        naive = [a for a in naive if a.speaker in customers[a.call]]
    rand = random_alerts(dialogues, len(product), seed, customers)
    report: dict[str, Any] = {
        "episodes": gold.total,
        "utterances": gold.utterances,
        "dialogues": len(dialogues),
        "slack": slack,
        "roles": roles,
        "gold_negative": sorted(set(data_labels) & (gold_negative or rules.negative_emotions)),
        "product": gold.score(product, slack).to_dict(),
        "naive": gold.score(naive, slack).to_dict(),
        "random": gold.score(rand, slack).to_dict(),
        "per_rule": {
            name: gold.score([a for a in product if a.rule == name], slack).to_dict()
            for name in rules.rule_names()
        },
        "threshold": _main_threshold(rules),
    }
    budgets: dict[str, Any] = {}
    sweep = _sweep(rules, dialogues, outs, labels, gold, slack, plan) if curve else []
    for b in BUDGETS:
        need = round(b * gold.utterances / 100.0)
        loosest = next((alerts for _, alerts in reversed(sweep) if len(alerts) >= need), None)
        if loosest is None and sweep:
            # no threshold raises that many (hysteresis bounds the rate): the most it can
            loosest = max((alerts for _, alerts in sweep), key=len)
        figures = gold.at_budget(loosest or product, b, slack)
        figures.extra["reached_budget"] = figures.alerts >= need
        budgets[str(b)] = {
            "product": figures.to_dict(),
            "naive": gold.at_budget(naive, b, slack).to_dict(),
        }
    report["budgets"] = budgets
    report["curve"] = [
        {"threshold": t, **{k: v for k, v in gold.score(a, slack).to_dict().items()}}
        for t, a in sweep
    ]
    return report


def _main_threshold(rules: AlertRules) -> dict[str, Any]:
    if rules.negative_onset.enabled:
        return {"rule": "negative_onset", "value": rules.negative_onset.min_score}
    return {"rule": "emotion_shift", "value": rules.emotion_shift.min_p_shift}


def _sweep(
    rules: AlertRules,
    dialogues: Sequence[Dialogue],
    outs: Sequence[Sequence[UtteranceResult]],
    labels: Sequence[str],
    gold: Gold,
    slack: int,
    plan: Sequence[Sequence[str | None]] | None = None,
) -> list[tuple[float, list[Raised]]]:
    """The product's alerts at each value of its main threshold (ascending)."""
    return [
        (t, run_rules(rules.with_threshold(t), dialogues, outs, labels, plan)) for t in thresholds()
    ]


def plot_curve(report: Mapping[str, Any], path: str | Path, title: str) -> Path:
    """Precision against recall over the main threshold, with naive and random."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 5.0))
    pts = [c for c in report["curve"] if c["alerts"]]
    ax.plot(
        [c["recall"] for c in pts],
        [c["precision"] for c in pts],
        color="#1f77b4",
        label=f"product rules over {report['threshold']['rule']} threshold",
    )
    marks = (("product", "#1f77b4", "o"), ("naive", "#d62728", "s"), ("random", "#7f7f7f", "^"))
    for key, colour, marker in marks:
        f = report[key]
        ax.scatter(
            [f["recall"]],
            [f["precision"]],
            color=colour,
            marker=marker,
            zorder=3,
            label=f"{key}: P {f['precision']:.1f} R {f['recall']:.1f} F1 {f['f1']:.1f}",
        )
    ax.set(xlim=(0, 100), ylim=(0, 100), xlabel="recall (% of episodes)", ylabel="precision (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
