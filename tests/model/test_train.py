"""A tiny train-and-eval run on synthetic data, the checkpoint round trip,
resuming, and the command line on the same data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import ModelConfig
from model.data import Dialogue, FeatureSet
from model.engine import StreamingEngine, Utterance
from model.errors import CheckpointError
from model.network import CFNESA
from model.train import TrainConfig, evaluate, train
from workers.cli import main as cli

LABELS = ("calm", "tense", "upset")


def synthetic(seed: int = 0, dim: int = 12, audio: bool = False) -> FeatureSet:
    """Dialogues whose label is readable from the text vector (plus noise),
    with an unusual label set, so a model that learns anything beats chance."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((len(LABELS), dim)) * 2
    dialogues = []
    for i, split in enumerate(["train"] * 40 + ["valid"] * 10 + ["test"] * 10):
        n = int(rng.integers(2, 12))
        labels = rng.integers(0, len(LABELS), n)
        text = (centres[labels] + rng.standard_normal((n, dim))).astype(np.float32)
        dialogues.append(
            Dialogue(
                dialogue_id=f"d{i}",
                split=split,
                speakers=tuple(f"s{rng.integers(2)}" for _ in range(n)),
                labels=labels,
                text=text,
                audio=rng.standard_normal((n, 3)).astype(np.float32) if audio else None,
            )
        )
    return FeatureSet(
        dialogues=tuple(dialogues),
        label_names=LABELS,
        feature_spec="synthetic-v1",
        dims={"text": dim, "audio": 3 if audio else 0, "visual": 0},
        source="synthetic",
    )


SMALL = ModelConfig(
    text_dim=12,
    d_model=16,
    heads=2,
    acme_layers=1,
    rume_layers=1,
    window_utterances=4,
    label_names=LABELS,
    feature_spec="synthetic-v1",
)
FAST = TrainConfig(epochs=6, batch_size=8, lr=3e-3, patience=3, seed=1)


def test_tiny_train_and_eval(tmp_path):
    fs = synthetic(audio=True)
    result = train(
        fs, SMALL.replace(audio_dim=3), FAST, tmp_path, progress=False, log=lambda *_: None
    )
    # chance is ~33%; the labels are readable from the features
    assert result.valid.accuracy > 60, result.valid
    assert result.test is not None and result.test.accuracy > 60
    assert 1 <= result.best_epoch <= FAST.epochs
    best_valid = max(r.valid["weighted_f1"] for r in result.history)
    assert result.valid.weighted_f1 == pytest.approx(best_valid, abs=0.01)
    card = json.loads((tmp_path / "best" / "card.json").read_text())
    assert card["fingerprint"] == result.fingerprint
    assert card["label_names"] == list(LABELS) and card["feature_spec"] == "synthetic-v1"
    assert card["test"]["weighted_f1"] == pytest.approx(result.test.weighted_f1, abs=0.01)
    assert len(card["test"]["confusion"]) == 3
    # the checkpoint scores what the card says
    ckpt = load_checkpoint(tmp_path / "best")
    assert ckpt.fingerprint == result.fingerprint
    assert evaluate(ckpt.model, fs.split("test")).weighted_f1 == pytest.approx(
        result.test.weighted_f1, abs=0.01
    )


class _Stop(Exception):
    pass


def test_resume_continues_where_it_stopped(tmp_path):
    fs = synthetic()
    cfg = TrainConfig(epochs=4, batch_size=8, lr=3e-3, patience=99, seed=1)
    quiet = dict(progress=False, log=lambda *_: None)
    straight = train(fs, SMALL, cfg, tmp_path / "straight", **quiet)

    def crash_after_epoch_2(line: str) -> None:
        if line.startswith("epoch   2"):
            raise _Stop

    with pytest.raises(_Stop):
        train(fs, SMALL, cfg, tmp_path / "resumed", progress=False, log=crash_after_epoch_2)
    lines: list[str] = []
    resumed = train(fs, SMALL, cfg, tmp_path / "resumed", progress=False, log=lines.append)
    assert lines[0].startswith("resuming from epoch 3")
    # seeded, and the RNG states are restored: the same run as without the crash
    assert [r.loss for r in resumed.history] == pytest.approx([r.loss for r in straight.history])
    assert resumed.fingerprint == straight.fingerprint
    # other settings over an existing run are refused, not silently mixed
    with pytest.raises(Exception, match="other settings"):
        train(
            fs,
            SMALL,
            TrainConfig(epochs=5, batch_size=8, lr=3e-3, seed=1),
            tmp_path / "resumed",
            **quiet,
        )


def test_checkpoint_round_trip_and_half_weights(tmp_path):
    torch.manual_seed(0)
    model = CFNESA(SMALL).eval()
    fp32 = save_checkpoint(tmp_path / "f32", model, {"note": "x"})
    fp16 = save_checkpoint(tmp_path / "f16", model, half=True)
    assert fp32 != fp16
    a, b = load_checkpoint(tmp_path / "f32"), load_checkpoint(tmp_path / "f16")
    assert a.fingerprint == fp32 and b.fingerprint == fp16 and a.card["note"] == "x"
    assert a.model_id == f"{SMALL.name}@{fp32}"
    utt = [Utterance("a", text=np.ones(12, np.float32))]
    out_a = StreamingEngine(a.model, a.fingerprint).run_dialogue(utt)[0].probabilities
    out_ref = StreamingEngine(model, fp32).run_dialogue(utt)[0].probabilities
    out_b = StreamingEngine(b.model, b.fingerprint).run_dialogue(utt)[0].probabilities
    assert np.array_equal(out_a, out_ref)
    assert np.abs(out_a - out_b).max() < 1e-2  # fp16 storage changes little
    assert (tmp_path / "f16" / "model.safetensors").stat().st_size < (
        tmp_path / "f32" / "model.safetensors"
    ).stat().st_size * 0.6


def test_broken_checkpoints_are_refused(tmp_path):
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "x", CFNESA(SMALL))
    save_checkpoint(tmp_path / "y", CFNESA(SMALL.replace(d_model=32)))
    (tmp_path / "x" / "config.json").write_text((tmp_path / "y" / "config.json").read_text())
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "x")


def test_cli_train_and_eval(tmp_path, capsys):
    features = tmp_path / "feats.npz"
    synthetic().save(features)
    args = [
        "train",
        "--features",
        str(features),
        "--out",
        str(tmp_path / "run"),
        "--d-model",
        "16",
        "--heads",
        "2",
        "--acme-layers",
        "1",
        "--window",
        "3",
        "--epochs",
        "2",
        "--lr",
        "3e-3",
        "--batch-size",
        "8",
        "--quiet",
    ]
    assert cli(args) == 0
    out = capsys.readouterr().out
    assert "test at the best-validation epoch" in out and "max test wF1 over epochs" in out
    assert (
        cli(["eval", "--features", str(features), "--checkpoint", str(tmp_path / "run" / "best")])
        == 0
    )
    scores = json.loads(capsys.readouterr().out)
    assert scores["split"] == "test" and scores["support"] > 0
