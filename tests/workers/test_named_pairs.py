"""The shipped pairs (encoder adapter + calibrated model + alert head), chosen by name."""

from __future__ import annotations

import json

import pytest

from model.checkpoint import NAMED, load_checkpoint
from model.config import IEMOCAP_EMOTIONS, MELD_EMOTIONS
from model.encoder import adapter_for_spec
from model.engine import StreamingEngine
from streaming.alerts import AlertRules
from streaming.settings import Settings
from workers.alert_eval import load_head
from workers.featurize import _load_encoder


@pytest.mark.parametrize(
    ("name", "labels"), [("meld", MELD_EMOTIONS), ("iemocap", IEMOCAP_EMOTIONS)]
)
def test_a_shipped_pair_loads_by_name_with_its_adapter_head_and_calibration(name, labels):
    ckpt = load_checkpoint(name)
    assert ckpt.path == NAMED[name]
    assert ckpt.config.label_names == labels
    card = json.loads((NAMED[name] / "card.json").read_text())
    assert card["fingerprint"] == ckpt.fingerprint
    # calibrated on valid: the temperatures are in the config, the figures in the card
    assert ckpt.config.emotion_temperature != 1.0 and ckpt.config.shift_temperature != 1.0
    after = card["calibration"]["test"]["after"]["emotion"]["ece"]
    assert after < card["calibration"]["test"]["before"]["emotion"]["ece"]
    # its encoder adapter is installed, so the featurizer can make its features
    assert adapter_for_spec(ckpt.config.feature_spec) is not None
    # its alert head resolves the default rules to a threshold learned on held-out calls
    head = load_head(ckpt.path)
    assert head is not None and head.operating_points["alert_head"]
    rules = AlertRules.load(None, head=head)
    # score = "auto": what fit-alerts chose on validation for this pair, with its re-arm
    assert rules.negative_onset.score == head.recommended["score"]
    assert rules.negative_onset.rearm_after == head.recommended["rearm_after"]
    assert 0.0 < rules.negative_onset.threshold < 1.0
    assert rules.negative_onset.threshold in {
        p.threshold for p in head.operating_points[rules.negative_onset.score]
    }


def test_the_worker_and_the_featurizer_follow_a_checkpoint_named_in_the_settings():
    settings = Settings(checkpoint="iemocap")
    engine = StreamingEngine.load(settings.checkpoint)
    assert engine.label_names == IEMOCAP_EMOTIONS and engine.path == NAMED["iemocap"]
    encoder = _load_encoder(1, "torch", "", settings.checkpoint)
    assert encoder.feature_spec == engine.config.feature_spec
    assert encoder.feature_spec != load_checkpoint("meld").config.feature_spec
