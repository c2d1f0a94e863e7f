from __future__ import annotations

import pytest

from model.config import ModelConfig, preset
from model.errors import ConfigError


def test_presets_match_the_paper():
    meld, iemocap = preset("meld"), preset("iemocap")
    assert (meld.d_model, meld.acme_layers, meld.mode) == (384, 3, "paper")
    assert (iemocap.d_model, iemocap.acme_layers) == (512, 5)
    assert meld.label_names[0] == "neutral" and iemocap.label_names[-1] == "frustrated"
    assert preset("meld", mode="causal").causal


def test_json_round_trip():
    cfg = ModelConfig(window_utterances=5, label_names=("x", "y"))
    assert ModelConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize(
    "bad",
    [
        dict(mode="future"),
        dict(text_dim=0),
        dict(d_model=30, heads=8),
        dict(window_utterances=0),
        dict(label_names=("only",)),
        dict(label_names=("a", "a")),
        dict(acme_dropout=1.0),
        dict(audio_dim=-1),
        dict(feature_spec=""),
    ],
)
def test_invalid_configs_are_refused(bad):
    with pytest.raises(ConfigError):
        ModelConfig(**bad)


def test_unknown_keys_are_refused():
    with pytest.raises(ConfigError):
        ModelConfig.from_dict({"d_model": 64, "dmodel": 64})
