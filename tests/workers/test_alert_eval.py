"""eval-alerts: the episode definition, the scoring and the baselines on hand-made
calls with known answers, and the command on a tiny trained model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from model.data import Dialogue
from model.engine import StreamingEngine, UtteranceResult
from streaming.alerts import AlertHead, AlertRules, AlertRulesError
from workers.alert_eval import (
    Episode,
    Gold,
    Raised,
    evaluate_alerts,
    gold_episodes,
    naive_alerts,
    random_alerts,
    role_plan,
    run_rules,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from test_train import FAST, SMALL, synthetic

LABELS = ("calm", "tense", "upset")


def _dialogue(speakers: str, labels: str, did: str = "d0") -> Dialogue:
    """speakers "ABAB..", labels "c/t/u" per utterance."""
    return Dialogue(
        dialogue_id=did,
        split="test",
        speakers=tuple(speakers),
        labels=np.array(["ctu".index(x) for x in labels]),
        text=np.zeros((len(labels), 4), np.float32),
    )


def _results(speakers: str, p_upset: list[float]) -> list[UtteranceResult]:
    """Model outputs where only P(upset) varies (the rest split calm / tense)."""
    out = []
    for t, (s, p) in enumerate(zip(speakers, p_upset, strict=True)):
        probs = np.array([(1 - p) * 0.7, (1 - p) * 0.3, p])
        k = int(probs.argmax())
        out.append(UtteranceResult(t, s, probs, LABELS[k], float(probs[k]), None, None))
    return out


def _raised(call: int, position: int, speaker: str, score: float = 1.0) -> Raised:
    return Raised(call, position, speaker, "r", score)


def test_episodes_are_runs_in_each_speakers_own_turns():
    # A's turns: 0 neg, 2 calm, 3 neg, 5 neg -> (0,0), (3,5); B's: 1, 4 -> one run (1,4)
    eps = gold_episodes(list("ABAABA"), [True, True, False, True, True, True])
    assert eps == [Episode("A", 0, 0), Episode("B", 1, 4), Episode("A", 3, 5)]
    assert gold_episodes(list("AB"), [False, False]) == []


def test_hits_redundant_and_false_alerts_are_counted_as_defined():
    d = _dialogue("ABAABA", "uucuuu")  # episodes A(0,0), B(1,4), A(3,5)
    gold = Gold([d], [False, False, True])
    assert gold.total == 3 and gold.utterances == 6
    alerts = [
        _raised(0, 0, "A"),  # hit A(0,0), delay 0
        _raised(0, 2, "A"),  # ended at 0, within slack 2: redundant
        _raised(0, 4, "B"),  # hit B(1,4), delay 3
        _raised(0, 4, "A"),  # A(3,5) spans 4 (a B turn, but A's episode span): hit, delay 1
        _raised(0, 5, "B"),  # B's episode ended at 4, slack: redundant
    ]
    f = gold.score(alerts, slack=2)
    assert (f.alerts, f.hits, f.redundant) == (5, 3, 2)
    assert f.precision == pytest.approx(60.0) and f.recall == pytest.approx(100.0)
    assert f.f1 == pytest.approx(75.0)
    assert f.median_delay_utterances == 1.0
    assert f.alerts_per_100_utterances == pytest.approx(100 * 5 / 6)
    # without slack, the late alert on A's first episode is a false alert, not redundant
    g = gold.score([_raised(0, 2, "A")], slack=0)
    assert (g.hits, g.redundant, g.precision) == (0, 0, 0.0)
    # an alert about the wrong speaker detects nothing
    assert gold.score([_raised(0, 1, "C")], slack=2).hits == 0
    # nor one before the episode starts
    early = Gold([_dialogue("AAA", "cuu")], [False, False, True])
    assert early.score([_raised(0, 0, "A")]).hits == 0
    assert early.score([_raised(0, 2, "A")]).hits == 1


def test_an_alert_inside_an_episode_wins_over_one_just_ended():
    # A: 0 neg, 1 calm, 2 neg -> A(0,0), A(2,2); an alert at 2 is inside the second
    d = _dialogue("AAA", "ucu")
    gold = Gold([d], [False, False, True])
    f = gold.score([_raised(0, 0, "A"), _raised(0, 2, "A")], slack=2)
    assert f.hits == 2 and f.redundant == 0


def test_budget_keeps_the_best_scored_alerts():
    d = _dialogue("AAAAAAAAAA", "uccccucccc")  # episodes at 0 and 5
    gold = Gold([d], [False, False, True])
    alerts = [_raised(0, 0, "A", 0.9), _raised(0, 3, "A", 0.8), _raised(0, 5, "A", 0.7)]
    assert gold.at_budget(alerts, 20).hits == 1  # 2 alerts: 0.9 (hit), 0.8 (false)
    assert gold.at_budget(alerts, 10).precision == pytest.approx(100.0)


def test_naive_rule_fires_on_turns_into_a_predicted_negative():
    d = _dialogue("ABAABA", "cccccc")
    outs = _results("ABAABA", [0.9, 0.1, 0.2, 0.95, 0.9, 0.99])
    naive = naive_alerts([d], [outs], frozenset({"upset"}))
    # A: 0 upset (first) fires; 2 calm; 3 upset fires; 5 upset (previous A was upset): no
    # B: 1 calm; 4 upset fires
    assert [(a.position, a.speaker) for a in naive] == [(0, "A"), (3, "A"), (4, "B")]
    assert naive[0].score == pytest.approx(0.9)


def test_random_baseline_is_seeded_and_sized():
    ds = [_dialogue("AB" * 5, "c" * 10, f"d{i}") for i in range(3)]
    a, b = random_alerts(ds, 7, seed=4), random_alerts(ds, 7, seed=4)
    assert a == b and len(a) == 7 and len({(x.call, x.position) for x in a}) == 7
    assert random_alerts(ds, 7, seed=5) != a


LABEL_SETS = {"test": {"labels": list(LABELS), "positive": ["calm"], "negative": ["upset"]}}
RULES_HEAD = (  # the same label set in a rules file
    '[label_sets.test]\nlabels = ["calm", "tense", "upset"]\npositive = ["calm"]\n'
    'negative = ["upset"]\n'
)
ONSET = {
    "label_sets": LABEL_SETS,
    "negative_onset": {"enabled": True, "min_score": 0.5, "rearm_after": 1},
    "emotion_shift": {"enabled": False},
    "sustained_negative": {"enabled": False},
}


def test_onset_rule_fires_on_crossings_and_rearms_per_speaker():
    rules = AlertRules.model_validate(ONSET).resolve(None)
    outs = _results("AAAAAB", [0.6, 0.7, 0.3, 0.55, 0.2, 0.5])
    raised = run_rules(rules, [_dialogue("AAAAAB", "cccccc")], [outs], LABELS)
    # 0 fires; 1 stays high (disarmed); 2 low re-arms; 3 fires; 5 is B's first: fires
    assert [(a.position, a.speaker, a.rule) for a in raised] == [
        (0, "A", "negative_onset"),
        (3, "A", "negative_onset"),
        (5, "B", "negative_onset"),
    ]
    two = AlertRules.model_validate(
        {**ONSET, "negative_onset": {**ONSET["negative_onset"], "rearm_after": 2}}
    ).resolve(None)
    assert [a.position for a in run_rules(two, [_dialogue("AAAAAB", "c" * 6)], [outs], LABELS)] == [
        0,
        5,
    ]


def _head(points: list[tuple[float, float, float, float]]) -> AlertHead:
    n = 8
    return AlertHead.model_validate(
        {
            "features": [
                "p_negative",
                "p_negative_speaker_before",
                "first_of_speaker",
                "p_negative_call_before",
                "p_shift_speaker",
                "confidence",
                "speaker_negative_run",
                "position",
            ],
            "mean": [0.0] * n,
            "scale": [1.0] * n,
            "weights": [4.0] + [0.0] * (n - 1),
            "bias": -2.0,
            "operating_points": {
                "alert_head": [
                    {"threshold": t, "alerts_per_100": a, "precision": p, "recall": r}
                    for t, a, p, r in points
                ]
            },
        }
    )


def test_operating_points_turn_a_budget_or_a_precision_into_a_threshold():
    head = _head([(0.3, 12.0, 50.0, 60.0), (0.5, 6.0, 62.0, 40.0), (0.7, 2.5, 75.0, 20.0)])
    base = {**ONSET, "negative_onset": {"enabled": True, "score": "alert_head"}}
    budget = {**base, "negative_onset": {**base["negative_onset"], "alerts_per_100": 5}}
    assert AlertRules.model_validate(budget).resolve(head).negative_onset.min_score == 0.5
    precise = {**base, "negative_onset": {**base["negative_onset"], "min_precision": 70}}
    assert AlertRules.model_validate(precise).resolve(head).negative_onset.min_score == 0.7
    too_precise = {**base, "negative_onset": {**base["negative_onset"], "min_precision": 90}}
    with pytest.raises(AlertRulesError, match="90"):
        AlertRules.model_validate(too_precise).resolve(head)
    with pytest.raises(AlertRulesError, match="alert head"):
        AlertRules.model_validate(base).resolve(None)
    with pytest.raises(ValueError, match="one of"):
        AlertRules.model_validate(
            {**base, "negative_onset": {"min_score": 0.4, "alerts_per_100": 5}}
        )
    # the head's score: sigmoid(-2 + 4 * p_negative); fires at p_negative >= 0.5 for 0.5
    rules = AlertRules.model_validate(
        {**base, "negative_onset": {**base["negative_onset"], "min_score": 0.5}}
    ).resolve(head)
    outs = _results("AA", [0.45, 0.55])
    assert [a.position for a in run_rules(rules, [_dialogue("AA", "cc")], [outs], LABELS)] == [1]


def test_eval_alerts_command_on_a_tiny_trained_model(tmp_path: Path):
    from model.train import train
    from workers.cli import main as cli

    fs = synthetic(seed=3)
    train(fs, SMALL, FAST, tmp_path / "run", progress=False, log=lambda *_: None)
    fs.save(tmp_path / "features.npz")
    rules = tmp_path / "rules.toml"
    rules.write_text(
        RULES_HEAD + "[negative_onset]\nenabled = true\nmin_score = 0.5\n"
        "[emotion_shift]\nenabled = false\n[sustained_negative]\nenabled = false\n"
    )
    out, plot = tmp_path / "alerts.json", tmp_path / "pr.png"
    code = cli(
        [
            "eval-alerts",
            "--checkpoint",
            str(tmp_path / "run" / "best"),
            "--features",
            str(tmp_path / "features.npz"),
            "--rules",
            str(rules),
            "--json",
            str(out),
            "--plot",
            str(plot),
        ]
    )
    assert code == 0
    report = json.loads(out.read_text())
    assert plot.stat().st_size > 10_000
    for key in ("product", "naive", "random"):
        assert {"precision", "recall", "f1", "redundant", "alerts_per_100_utterances"} <= set(
            report[key]
        )
    assert report["gold_negative"] == ["upset"]
    # the command's figures are those of the library on the same engine and rules
    engine = StreamingEngine.load(tmp_path / "run" / "best")
    again = evaluate_alerts(
        engine, AlertRules.load(rules), fs.split("test"), fs.label_names, curve=False
    )
    assert report["product"] == again["product"] and report["episodes"] == again["episodes"]
    assert report["episodes"] == Gold(fs.split("test"), [False, False, True]).total
    assert report["random"]["alerts"] == report["product"]["alerts"]
    assert set(report["budgets"]) == {"2", "5", "10"}
    assert len(report["curve"]) > 100


def test_fit_alerts_learns_a_head_from_cross_fitted_folds(tmp_path: Path, capsys):
    from model.train import train
    from workers.cli import main as cli

    fs = synthetic(seed=5)
    fs.save(tmp_path / "features.npz")
    quiet = dict(progress=False, log=lambda *_: None)
    train(fs, SMALL, FAST, tmp_path / "run", **quiet)
    folds = []
    for k in range(2):
        train(fs.hold_out(2, k), SMALL, FAST, tmp_path / f"fold{k}", **quiet)
        folds.append(str(tmp_path / f"fold{k}" / "best"))
    held = [json.loads((Path(f) / "card.json").read_text())["heldout"] for f in folds]
    train_ids = {d.dialogue_id for d in fs.split("train")}
    assert set(held[0]) | set(held[1]) == train_ids and not set(held[0]) & set(held[1])
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES_HEAD + "[negative_onset]\nenabled = true\n")
    args = ["--features", str(tmp_path / "features.npz"), "--rules", str(rules)]
    code = cli(
        ["fit-alerts", "--checkpoint", str(tmp_path / "run" / "best"), *args, "--crossfit", *folds]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "validation chose" in printed and "naive rule" in printed
    head = AlertHead.load(tmp_path / "run" / "best" / "alert_head.json")
    assert set(head.operating_points) == {"p_negative", "alert_head"}
    assert head.trained_on["utterances"] == sum(d.length for d in fs.split("train"))
    assert head.trained_on["chosen_on_valid"] in head.trained_on["valid"]
    # the worker's default rules now resolve against it, and eval-alerts runs with it
    resolved = AlertRules.load(rules, head=head)
    assert resolved.negative_onset.min_score is not None
    out = tmp_path / "a.json"
    assert cli(["eval-alerts", "--checkpoint", str(tmp_path / "run" / "best"), *args,
                "--json", str(out)]) == 0  # fmt: skip
    assert json.loads(out.read_text())["product"]["alerts"] > 0


def test_roles_score_from_the_customers_side():
    """With roles (the first speaker is the agent), rules that watch customers only are
    scored on customers' episodes, and so are the baselines."""
    # A (agent, first) and B (customer) are both upset twice, apart
    d = _dialogue("ABABABAB", "uuccuucc")
    outs = _results("ABABABAB", [0.9, 0.9, 0.1, 0.1, 0.9, 0.9, 0.1, 0.1])
    rules = AlertRules.model_validate(
        {**ONSET, "negative_onset": {**ONSET["negative_onset"], "roles": ["customer"]}}
    ).resolve(None)
    plan = role_plan([d], "first-agent")
    assert plan == [["agent", "customer"] * 4]
    raised = run_rules(rules, [d], [outs], LABELS, plan)
    assert [(a.position, a.speaker) for a in raised] == [(1, "B"), (5, "B")]
    # without roles nobody is a customer: a customers-only rule raises nothing
    assert run_rules(rules, [d], [outs], LABELS) == []
    customers = [{"B"}]
    gold = Gold([d], [False, False, True], customers)
    assert gold.total == 2 and all(e.speaker == "B" for e in gold.episodes[0])
    assert gold.score(raised).f1 == 100.0
    assert Gold([d], [False, False, True]).total == 4  # everyone's episodes
    drawn = random_alerts([d], 3, seed=1, speakers=customers)
    assert len(drawn) == 3 and {a.speaker for a in drawn} == {"B"}
