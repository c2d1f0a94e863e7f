"""Tests for model.encoder.

Most tests use a stand-in encoder; one test loads the real all-MiniLM-L6-v2
(a few seconds on CPU) and checks the pooling, the ordering and the cache.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

import model.encoder
from model.data import FeatureSet
from model.encoder import FEATURE_SPEC_MINILM, MINILM_DIM, TextEncoder, encode_transcripts
from model.errors import DataError, InputError


class CountingEncoder:
    """Deterministic stand-in: a vector from each text's length and first character."""

    dim = 4
    feature_spec = "fake-4"

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        self.calls += 1
        return np.array(
            [[len(t), ord(t[0]) if t else 0, 1.0, -1.0] for t in texts], dtype=np.float32
        )


def write_transcripts(path: Path) -> Path:
    lines = [
        {
            "dialogue_id": "call-1",
            "split": "train",
            "utterances": [
                {"speaker": "agent", "text": "Good morning, how can I help?", "emotion": "calm"},
                {"speaker": "customer", "text": "My parcel never arrived.", "emotion": "tense"},
                {"speaker": "agent", "text": "Let me check that.", "emotion": None},
            ],
        },
        {
            "dialogue_id": "call-2",
            "split": "test",
            "utterances": [
                {"speaker": "customer", "text": "Thanks, that solved it!", "emotion": "calm"},
            ],
        },
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n", encoding="utf-8")
    return path


def test_import_is_cheap() -> None:
    # transformers is imported only when an encoder is built.
    code = "import sys, model.encoder; print('transformers' in sys.modules)"
    root = Path(model.encoder.__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


def test_encode_transcripts_builds_and_caches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CFNESA_CACHE_DIR", str(tmp_path / "cache"))
    path = write_transcripts(tmp_path / "calls.jsonl")
    enc = CountingEncoder()
    fs = encode_transcripts(path, encoder=enc, progress=False)
    assert enc.calls == 1
    assert fs.dims == {"text": 4, "audio": 0, "visual": 0}
    assert fs.feature_spec == "fake-4"
    assert fs.label_names == ("calm", "tense")
    assert fs.source.startswith("calls.jsonl@sha256:")
    assert [d.dialogue_id for d in fs.dialogues] == ["call-1", "call-2"]
    assert fs.dialogues[0].labels.tolist() == [0, 1, -1]
    assert fs.dialogues[0].texts is not None and fs.dialogues[0].texts[1].startswith("My parcel")
    assert fs.dialogues[1].text is not None
    assert fs.dialogues[1].text[0, 0] == len("Thanks, that solved it!")
    cached = list((tmp_path / "cache" / "features").glob("calls-emotion-fake-4-*.npz"))
    assert len(cached) == 1

    again = encode_transcripts(path, encoder=enc, progress=False)
    assert enc.calls == 1  # served from the cache
    np.testing.assert_array_equal(again.dialogues[0].text, fs.dialogues[0].text)

    # Other bytes, other cache entry.
    path.write_text(path.read_text(encoding="utf-8") + "\n", encoding="utf-8")
    encode_transcripts(path, encoder=enc, progress=False)
    assert enc.calls == 2


def test_encode_transcripts_explicit_path_checks_the_source(tmp_path: Path) -> None:
    a = write_transcripts(tmp_path / "a.jsonl")
    b = tmp_path / "b.jsonl"
    b.write_text(a.read_text(encoding="utf-8").replace("parcel", "letter"), encoding="utf-8")
    out = tmp_path / "features.npz"
    enc = CountingEncoder()
    encode_transcripts(a, out_path=out, encoder=enc, progress=False)
    # Same output path, another transcript: the stale file is not served.
    fs = encode_transcripts(b, out_path=out, encoder=enc, progress=False)
    assert enc.calls == 2
    assert fs.source.startswith("b.jsonl@")
    assert FeatureSet.load(out).source == fs.source


def test_encode_transcripts_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"absent\.jsonl"):
        encode_transcripts(tmp_path / "absent.jsonl", encoder=CountingEncoder())
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl:1:"):
        encode_transcripts(bad, out_path=tmp_path / "x.npz", encoder=CountingEncoder())


def test_real_minilm_encoder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The test that loads plain all-MiniLM-L6-v2 (a few seconds); the adapter's are
    in test_finetune.py."""
    enc = TextEncoder(batch_size=3, adapter=None)
    assert enc.dim == MINILM_DIM == 384
    assert enc.feature_spec == FEATURE_SPEC_MINILM == "minilm-l6-v2"

    texts = [
        "Hi.",
        "I have been waiting on hold for almost an hour and nobody has picked up my call.",
        "",
        "Okay, thank you so much for your patience today.",
        "No!",
        "Could you please confirm the address on the account?",
        "word " * 400,  # past 128 tokens: truncated, not an error
    ]
    vectors = enc.encode(texts)
    assert vectors.shape == (len(texts), 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # Deterministic, and each row belongs to its text whatever the batching order.
    np.testing.assert_array_equal(enc.encode(texts), vectors)
    one_by_one = np.concatenate([enc.encode([t]) for t in texts])
    np.testing.assert_allclose(one_by_one, vectors, atol=1e-5)
    assert enc.encode([]).shape == (0, 384)
    with pytest.raises(InputError):
        enc.encode("not a list")
    with pytest.raises(InputError):
        enc.encode(["fine", 3])  # type: ignore[list-item]

    happy, glad, invoice = enc.encode(["I am happy", "I am glad", "The invoice is overdue"])
    assert float(happy @ glad) > float(happy @ invoice)

    # Cache hit: the second call neither encodes nor builds an encoder.
    monkeypatch.setenv("CFNESA_CACHE_DIR", str(tmp_path / "cache"))
    path = write_transcripts(tmp_path / "calls.jsonl")
    fs = encode_transcripts(path, encoder=enc, progress=False)
    assert fs.feature_spec == "minilm-l6-v2" and fs.dims["text"] == 384
    assert fs.dialogues[0].text is not None
    np.testing.assert_allclose(
        fs.dialogues[0].text[1], enc.encode(["My parcel never arrived."])[0], atol=1e-5
    )

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("re-encoded despite the cache")

    monkeypatch.setattr(enc, "encode", refuse)
    monkeypatch.setattr(model.encoder, "TextEncoder", refuse)
    again = encode_transcripts(path, progress=False, adapter=None)  # the plain encoder's cache
    again_with_encoder = encode_transcripts(path, encoder=enc, progress=False)
    for other in (again, again_with_encoder):
        np.testing.assert_array_equal(other.dialogues[0].text, fs.dialogues[0].text)


def test_the_onnx_backend_gives_the_same_vectors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shipped encoder exported to ONNX and run by ONNX Runtime: same vectors and
    feature spec as torch's, with and without context; the export is cached."""
    monkeypatch.setenv("CFNESA_CACHE_DIR", str(tmp_path / "cache"))
    torch_enc = TextEncoder(batch_size=4)
    onnx_enc = TextEncoder(batch_size=4, backend="onnx")
    assert onnx_enc.feature_spec == torch_enc.feature_spec
    assert len(list((tmp_path / "cache" / "onnx").glob("*.onnx"))) == 1
    texts = ["Hi.", "Why would you do that to me?", "word " * 200, "Thanks, bye!", ""]
    np.testing.assert_allclose(onnx_enc.encode(texts), torch_enc.encode(texts), atol=1e-5)
    with pytest.raises(InputError):
        TextEncoder(backend="onnx", quantize=True)
    with pytest.raises(InputError):
        TextEncoder(backend="tensorrt")
