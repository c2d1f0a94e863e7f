"""Temperature scaling: the fit, the metrics, and exactness of the calibrated step."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_train import FAST, SMALL, synthetic

from model import calibration
from model.checkpoint import fingerprint, load_checkpoint
from model.config import ModelConfig
from model.engine import StreamingEngine, Utterance
from model.errors import ConfigError
from model.network import CFNESA
from model.train import train


def _sampled(temperature: float, n: int = 20_000, classes: int = 5, seed: int = 0):
    """Logits, and labels drawn from softmax(logits / temperature)."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((n, classes)) * 3.0
    p = calibration.softmax(logits, temperature)
    labels = np.array([rng.choice(classes, p=row) for row in p])
    return logits, labels


@pytest.mark.parametrize("true_t", [0.6, 1.0, 2.5])
def test_fit_recovers_the_temperature_labels_were_drawn_with(true_t: float):
    logits, labels = _sampled(true_t)
    assert calibration.fit_temperature(logits, labels) == pytest.approx(true_t, rel=0.08)


def test_ece_is_small_when_calibrated_and_large_when_overconfident():
    logits, labels = _sampled(2.0)
    calibrated = calibration.expected_calibration_error(calibration.softmax(logits, 2.0), labels)
    overconfident = calibration.expected_calibration_error(calibration.softmax(logits), labels)
    assert calibrated < 0.02
    assert overconfident > 0.1


def test_brier_and_ece_on_a_hand_computed_case():
    probs = np.array([[1.0, 0.0], [0.5, 0.5], [0.2, 0.8]])
    labels = np.array([0, 1, 0])
    # squared errors summed over classes: 0, 0.5, 0.64 + 0.64
    assert calibration.brier(probs, labels) == pytest.approx((0 + 0.5 + 1.28) / 3)
    # bins: conf 1.0 (right), 0.5 (argmax 0, wrong), 0.8 (wrong)
    assert calibration.expected_calibration_error(probs, labels) == pytest.approx(
        (0.0 + 0.5 + 0.8) / 3
    )
    assert calibration.fit_temperature(np.zeros((0, 3)), np.zeros(0, np.int64)) == 1.0


def test_temperatures_are_part_of_the_config_and_the_fingerprint():
    base = SMALL
    # uncalibrated configs serialise as before, so old fingerprints stay valid
    assert "emotion_temperature" not in base.to_dict()
    hot = base.replace(emotion_temperature=1.7, shift_temperature=0.8)
    assert ModelConfig.from_json(hot.to_json()) == hot
    torch.manual_seed(0)
    weights = CFNESA(base).state_dict()
    assert fingerprint(base, weights) != fingerprint(hot, weights)
    with pytest.raises(ConfigError, match="emotion_temperature"):
        base.replace(emotion_temperature=0.0)


def _dialogue(rng: np.random.Generator, n: int) -> list[Utterance]:
    return [
        Utterance(f"s{int(rng.integers(3))}", text=rng.standard_normal(12).astype(np.float32))
        for _ in range(n)
    ]


def test_calibrated_step_equals_the_calibrated_whole_dialogue_forward():
    torch.manual_seed(3)
    model = CFNESA(SMALL)
    raw = StreamingEngine(model, "raw")
    hot_model = CFNESA(SMALL.replace(emotion_temperature=2.0, shift_temperature=0.5))
    hot_model.load_state_dict(model.state_dict())
    hot = StreamingEngine(hot_model, "hot")
    rng = np.random.default_rng(1)
    utterances = _dialogue(rng, 11)
    whole = hot.run_dialogue(utterances)
    state = None
    for t, u in enumerate(utterances):
        outs, states = hot.step([[u]], [state])
        state = states[0]
        step = outs[0][0]
        assert np.allclose(step.probabilities, whole[t].probabilities, atol=1e-5)
        for a, b in (
            (step.shift_vs_previous, whole[t].shift_vs_previous),
            (step.shift_vs_speaker_previous, whole[t].shift_vs_speaker_previous),
        ):
            assert (a is None) == (b is None)
            if a is not None:
                assert a == pytest.approx(b, abs=1e-5)
    # and the temperature really divides the logits: log-probability gaps halve at T=2
    cold = raw.run_dialogue(utterances)
    for c, h in zip(cold, whole, strict=True):
        gap_cold = np.log(c.probabilities) - np.log(c.probabilities).mean()
        gap_hot = np.log(h.probabilities) - np.log(h.probabilities).mean()
        assert np.allclose(gap_hot, gap_cold / 2.0, atol=1e-4)
        assert c.emotion == h.emotion  # argmax unchanged


def test_training_fits_the_temperatures_on_valid_and_reports_before_and_after(tmp_path):
    fs = synthetic(seed=2)
    result = train(fs, SMALL, FAST, tmp_path, progress=False, log=lambda *_: None)
    ckpt = load_checkpoint(tmp_path / "best")
    assert ckpt.fingerprint == result.fingerprint
    card = json.loads((tmp_path / "best" / "card.json").read_text())
    cal = card["calibration"]
    assert cal["fitted_on"] == "valid"
    t = ckpt.config.emotion_temperature
    assert cal["valid"]["emotion_temperature"] == t
    assert cal["valid"]["before"]["emotion"]["ece"] >= 0.0
    # the fit minimises the valid NLL: never worse than T = 1 there
    assert cal["valid"]["after"]["emotion"]["nll"] <= cal["valid"]["before"]["emotion"]["nll"]
    assert set(cal["test"]["after"]) == {"emotion", "shift", "utterances", "shift_pairs"}
