"""The encoder adapter: a tiny real fine-tune on synthetic transcripts, its files and
card, the adapter round trip through TextEncoder, resuming, and its feature spec."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pytest

from model.data import read_transcripts
from model.encoder import FEATURE_SPEC_MINILM, TextEncoder, encode_transcripts, with_context
from model.errors import ConfigError, InputError
from model.finetune import (
    ADAPTER_WEIGHTS,
    CARD,
    SPEC_PREFIX,
    FinetuneConfig,
    adapter_fingerprint,
    feature_spec_for,
    finetune_encoder,
)

pytestmark = pytest.mark.slow

WORDS = {  # a label set nobody tuned for: each label has words of its own
    "calm": ["fine", "okay", "sure", "thanks", "alright"],
    "upset": ["terrible", "awful", "unacceptable", "angry", "worst"],
    "curious": ["why", "how", "what", "really", "wonder"],
}
FILLER = ["the", "order", "call", "account", "today", "bill", "we", "it", "is"]


def _transcripts(path: Path, seed: int = 0) -> Path:
    rng = random.Random(seed)
    splits = ["train"] * 12 + ["valid"] * 3 + ["test"] * 3
    with path.open("w") as fh:
        for d, split in enumerate(splits):
            utterances = []
            for j in range(6):
                label = rng.choice(sorted(WORDS))
                words = [*rng.sample(FILLER, 3), rng.choice(WORDS[label])]
                rng.shuffle(words)
                speaker = ("agent", "customer")[j % 2]
                utterances.append({"speaker": speaker, "text": " ".join(words), "mood": label})
            fh.write(json.dumps({"dialogue_id": f"x{d}", "split": split, "utterances": utterances}))
            fh.write("\n")
    return path


TINY = FinetuneConfig(epochs=2, batch_size=8, rank=4, alpha=8, lr=3e-3, head_lr=3e-2, seed=1)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("finetune")
    data = _transcripts(folder / "calls.jsonl")
    out = folder / "adapter"
    finetune_encoder(data, out, TINY, label_field="mood", progress=False, log=lambda *_: None)
    return data, out


def test_the_adapter_is_small_with_a_card_and_a_spec(adapter):
    _, out = adapter
    weights = out / ADAPTER_WEIGHTS
    assert weights.is_file() and weights.stat().st_size < 1_000_000
    assert not (out / "resume.pt").exists()  # a finished run leaves no resume state
    card = json.loads((out / CARD).read_text())
    assert set(card["label_names"]) == set(WORDS)
    assert card["fingerprint"] == adapter_fingerprint(out)
    assert card["feature_spec"] == SPEC_PREFIX + card["fingerprint"] == feature_spec_for(out)
    assert len(card["history"]) == 2 and card["best_epoch"] in (0, 1)
    assert card["valid"]["support"] == 18 and card["test"]["support"] == 18
    # the words decide the labels: even a tiny fine-tune separates them on valid
    assert card["valid"]["weighted_f1"] > 50, card["history"]


def test_the_adapter_round_trips_through_the_encoder(adapter):
    _, out = adapter
    tuned = TextEncoder(adapter=out, batch_size=4)
    plain = TextEncoder(adapter=None, batch_size=4)
    assert tuned.feature_spec == feature_spec_for(out) != plain.feature_spec == FEATURE_SPEC_MINILM
    texts = ["this is awful", "thanks, that is fine", "why is the bill so high"]
    a, b = tuned.encode(texts), plain.encode(texts)
    assert a.shape == b.shape == (3, 384) and a.dtype == np.float32
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(a, b, atol=1e-3)  # the adapter changed the vectors
    again = TextEncoder(adapter=out, batch_size=2).encode(texts)
    assert np.allclose(a, again, atol=1e-5)  # deterministic, batch-size independent


def test_features_record_the_adapter_spec(adapter, tmp_path: Path):
    data, out = adapter
    fs = encode_transcripts(data, tmp_path / "f.npz", "mood", progress=False, adapter=out)
    assert fs.feature_spec == feature_spec_for(out)
    plain = encode_transcripts(data, tmp_path / "p.npz", "mood", progress=False, adapter=None)
    assert plain.feature_spec == FEATURE_SPEC_MINILM


def test_an_interrupted_run_resumes(tmp_path: Path):
    data = _transcripts(tmp_path / "calls.jsonl", seed=3)
    out = tmp_path / "adapter"
    lines: list[str] = []

    def stop_after_first_epoch(line: str) -> None:
        lines.append(line)
        if line.startswith("epoch 1:"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune_encoder(
            data, out, TINY, label_field="mood", progress=False, log=stop_after_first_epoch
        )
    assert (out / "resume.pt").is_file() and not (out / ADAPTER_WEIGHTS).exists()
    with pytest.raises(ConfigError):  # other settings: refused, not mixed
        finetune_encoder(data, out, FinetuneConfig(epochs=3), label_field="mood", progress=False)
    result = finetune_encoder(data, out, TINY, label_field="mood", progress=False, log=lines.append)
    assert any(line.startswith("resuming after epoch 0") for line in lines)
    assert [h["epoch"] for h in result.history] == [0, 1]


def test_an_adapter_with_context_reads_earlier_utterances_only(tmp_path: Path):
    """``context=2``: its own feature spec, and each utterance's vector depends on the
    previous two of its call, never on a later one (causal)."""
    data = _transcripts(tmp_path / "calls.jsonl", seed=7)
    out = tmp_path / "ctx"
    cfg = dataclasses.replace(TINY, epochs=1, context=2)
    result = finetune_encoder(
        data, out, cfg, label_field="mood", progress=False, log=lambda *_: None
    )
    spec = SPEC_PREFIX + adapter_fingerprint(out) + "+ctx2x64"
    assert result.feature_spec == feature_spec_for(out) == spec
    assert json.loads((out / CARD).read_text())["feature_spec"] == spec
    encoder = TextEncoder(adapter=out, batch_size=4)
    assert encoder.context == 2 and encoder.feature_spec == spec

    fs = encode_transcripts(data, tmp_path / "f.npz", "mood", progress=False, encoder=encoder)
    assert fs.feature_spec == spec
    texts = list(read_transcripts(data, label_field="mood")[0].texts)

    def encoded(lines: list[str]) -> np.ndarray:
        return encoder.encode(lines, contexts=[lines[max(0, i - 2) : i] for i in range(len(lines))])

    want = encoded(texts)
    assert fs.dialogues[0].text is not None
    np.testing.assert_allclose(fs.dialogues[0].text, want, atol=1e-5)
    changed = [*texts[:3], "a completely different remark", *texts[4:]]
    again = encoded(changed)
    np.testing.assert_allclose(again[:3], want[:3], atol=1e-6)  # the past does not move
    for i in (3, 4, 5):  # the changed one and the two that read it as context
        assert not np.allclose(again[i], want[i], atol=1e-4), i
    alone = encoder.encode(texts)
    np.testing.assert_allclose(alone[0], want[0], atol=1e-5)  # nothing before the first
    assert not np.allclose(alone[1:], want[1:], atol=1e-4)


def test_with_context_keeps_the_nearest_texts_within_the_budget():
    cls, sep = 101, 102
    assert with_context([7, 8], [], cls, sep) == ([cls, 7, 8, sep], 0)
    ids, n = with_context([7], [[1, 2, 3], [4, 5]], cls, sep, context_tokens=64)
    assert (ids, n) == ([cls, 1, 2, 3, sep, 4, 5, sep, 7, sep], 7)
    ids, n = with_context([7], [[1, 2, 3], [4, 5]], cls, sep, context_tokens=5)
    assert (ids, n) == ([cls, 3, sep, 4, 5, sep, 7, sep], 5)  # the oldest cut at the front


def test_bad_adapter_paths_and_settings_are_refused(tmp_path: Path):
    with pytest.raises(InputError):
        TextEncoder(adapter=tmp_path)
    with pytest.raises(ConfigError):
        FinetuneConfig(rank=0)
    with pytest.raises(ConfigError):
        FinetuneConfig(context=-1)


def test_cli_finetune_then_train_and_eval_on_an_untuned_label_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
):
    """`cfnesa finetune-encoder` then `cfnesa train` / `eval` with its adapter, on a
    transcript file whose labels nobody tuned for: no code changes, just the commands."""
    from workers.cli import main as cli

    monkeypatch.setenv("CFNESA_CACHE_DIR", str(tmp_path / "cache"))
    data = str(_transcripts(tmp_path / "calls.jsonl", seed=5))
    adapter = tmp_path / "adapter"
    common = ["--data", data, "--label-field", "mood"]
    assert cli(["finetune-encoder", *common, "--out", str(adapter), "--epochs", "1",
                "--rank", "4", "--batch-size", "8", "--quiet"]) == 0  # fmt: skip
    spec = feature_spec_for(adapter)
    assert spec in capsys.readouterr().out
    run = tmp_path / "run"
    assert cli(["train", *common, "--adapter", str(adapter), "--out", str(run),
                "--d-model", "16", "--heads", "2", "--acme-layers", "1", "--window", "3",
                "--epochs", "2", "--batch-size", "4", "--quiet"]) == 0  # fmt: skip
    card = json.loads((run / "best" / "card.json").read_text())
    assert card["feature_spec"] == spec and set(card["label_names"]) == set(WORDS)
    capsys.readouterr()
    # eval finds no installed encoder for this adapter's spec: it says so, clearly
    assert cli(["eval", *common, "--checkpoint", str(run / "best")]) == 1
    assert "no installed encoder makes" in capsys.readouterr().err
    assert cli(["eval", *common, "--adapter", str(adapter), "--checkpoint", str(run / "best")]) == 0
    assert json.loads(capsys.readouterr().out)["support"] == 18
