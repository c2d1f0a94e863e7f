"""The sentiment score against gold sentiment labels: the statistics on known answers,
and the whole evaluation on a tiny trained model (cut points chosen on valid only)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

from model.engine import StreamingEngine
from streaming.alerts import AlertRules
from workers.sentiment_eval import (
    auroc,
    choose_cuts,
    evaluate_sentiment,
    label,
    macro_f1,
    ranks,
    spearman,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from test_train import FAST, LABELS, SMALL, synthetic


def test_ranks_share_ties():
    assert ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]


def test_auroc_known_answers():
    pos = np.array([True, True, False, False])
    assert auroc(pos, np.array([0.9, 0.8, 0.1, 0.2])) == 1.0
    assert auroc(pos, np.array([0.1, 0.2, 0.9, 0.8])) == 0.0
    assert auroc(pos, np.array([0.5, 0.5, 0.5, 0.5])) == 0.5  # ties count half
    assert auroc(pos, np.array([0.9, 0.3, 0.5, 0.2])) == 0.75  # 3 of 4 pairs ordered
    assert math.isnan(auroc(np.array([True, True]), np.array([0.1, 0.2])))


def test_spearman_known_answers():
    a = np.array([1.0, 2.0, 3.0, 4.0])
    assert spearman(a, a**3) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)


def test_macro_f1_and_labels():
    gold = np.array([-1, 0, 1, 1])
    assert macro_f1(gold, gold) == 1.0
    # class -1: F1 1; class 0: predicted twice, right once -> 2/3; class 1: 1 of 2 -> 2/3
    assert macro_f1(gold, np.array([-1, 0, 0, 1])) == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert label(np.array([-0.5, 0.0, 0.5]), -0.2, 0.2).tolist() == [-1, 0, 1]


def test_cut_points_separate_separable_classes():
    score = np.array([-0.8, -0.6, -0.1, 0.0, 0.1, 0.7, 0.9])
    gold = np.array([-1, -1, 0, 0, 0, 1, 1])
    low, high, f1 = choose_cuts(score, gold)
    assert f1 == 100.0
    assert -0.6 < low <= -0.1 and 0.1 <= high < 0.7


def test_evaluate_sentiment_on_a_tiny_model(tmp_path: Path):
    from model.train import train

    fs = synthetic(seed=5)
    train(fs, SMALL, FAST, tmp_path / "run", progress=False, log=lambda *_: None)
    engine = StreamingEngine.load(tmp_path / "run" / "best")
    rules = AlertRules.model_validate(
        {
            "label_sets": {
                "t": {"labels": list(LABELS), "positive": [LABELS[0]], "negative": [LABELS[-1]]}
            }
        }
    ).for_labels(LABELS)
    # gold sentiment from the emotion labels: what the score is built to follow
    by_label = {0: "positive", len(LABELS) - 1: "negative"}
    gold = {
        d.dialogue_id: [by_label.get(int(x), "neutral") for x in d.labels] for d in fs.dialogues
    }
    report = evaluate_sentiment(engine, rules, fs.split("valid"), fs.split("test"), gold)
    assert report["chosen_on"] == "valid"
    test = report["test"]
    assert test["utterances"] == sum(d.length for d in fs.split("test"))
    assert test["cuts"] == report["valid"]["cuts"]  # chosen on valid, applied to test
    # a model that learned the labels ranks them well above chance
    assert test["auroc_negative"] > 70 and test["auroc_positive"] > 70
    assert test["spearman"] > 0.3
    assert test["mean_by_gold"]["negative"] < test["mean_by_gold"]["positive"]
    with pytest.raises(ValueError, match="no sentiment labels"):
        evaluate_sentiment(engine, rules, fs.split("valid"), fs.split("test"), {})
