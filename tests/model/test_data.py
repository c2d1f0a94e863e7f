"""Tests for model.data: feature sets on disk, transcript reading, label sets.

All data is synthetic: no text from the real data sets appears here.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.data import (
    IEMOCAP_EMOTIONS,
    MELD_EMOTIONS,
    MELD_SENTIMENTS,
    Dialogue,
    FeatureSet,
    TranscriptDialogue,
    default_cache_dir,
    default_data_dir,
    label_names_for,
    read_transcripts,
)
from model.errors import DataError, DimensionError, InputError, NonFiniteError

# --------------------------------------------------------------------------- helpers


def make_dialogue(
    dialogue_id: str,
    split: str,
    length: int,
    rng: np.random.Generator,
    *,
    text_dim: int = 5,
    audio_dim: int = 0,
    num_classes: int = 3,
    speakers: tuple[str, ...] | None = None,
    texts: bool = False,
) -> Dialogue:
    return Dialogue(
        dialogue_id=dialogue_id,
        split=split,
        speakers=speakers or tuple(f"spk{i % 2}" for i in range(length)),
        labels=rng.integers(-1, num_classes, size=length),
        text=rng.standard_normal((length, text_dim)).astype(np.float32) if text_dim else None,
        audio=rng.standard_normal((length, audio_dim)).astype(np.float32) if audio_dim else None,
        visual=None,
        texts=tuple(f"utterance {i} ✓" for i in range(length)) if texts else None,
    )


def write_jsonl(path: Path, lines: list[object | str]) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for line in lines:
            handle.write(line if isinstance(line, str) else json.dumps(line, ensure_ascii=False))
            handle.write("\n")
    return path


def dialogue_line(dialogue_id: str, split: str, labels: list[str | None]) -> dict[str, object]:
    utterances: list[dict[str, object]] = []
    for i, label in enumerate(labels):
        utt: dict[str, object] = {"speaker": f"spk{i % 2}", "text": f"synthetic line {i}"}
        if label is not None:
            utt["emotion"] = label
        utterances.append(utt)
    return {"dialogue_id": dialogue_id, "split": split, "utterances": utterances}


def assert_sets_equal(a: FeatureSet, b: FeatureSet) -> None:
    assert a.label_names == b.label_names
    assert a.feature_spec == b.feature_spec
    assert a.dims == b.dims
    assert a.source == b.source
    assert a.label_field == b.label_field
    assert len(a.dialogues) == len(b.dialogues)
    for x, y in zip(a.dialogues, b.dialogues, strict=True):
        assert (x.dialogue_id, x.split, x.speakers, x.texts) == (
            y.dialogue_id,
            y.split,
            y.speakers,
            y.texts,
        )
        np.testing.assert_array_equal(x.labels, y.labels)
        assert y.labels.dtype == np.int64
        for m in ("text", "audio", "visual"):
            xm, ym = x.modality(m), y.modality(m)
            assert (xm is None) == (ym is None)
            if xm is not None and ym is not None:
                assert ym.dtype == np.float32
                np.testing.assert_array_equal(xm, ym)


# --------------------------------------------------------------------------- FeatureSet


def test_round_trip_with_absent_modalities_and_unicode(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    dialogues = (
        make_dialogue("d-0", "train", 4, rng, speakers=("Zoë", "客服", "Zoë", "agent 🎧")),
        make_dialogue("d-1", "train", 1, rng, texts=True),
        make_dialogue("d-2", "valid", 3, rng),
        make_dialogue("d-3", "test", 2, rng, texts=True),
    )
    fs = FeatureSet(
        dialogues=dialogues,
        label_names=("calm", "tense", "ölig"),
        feature_spec="synthetic-5",
        dims={"text": 5, "audio": 0, "visual": 0},
        source="synthetic.jsonl",
        label_field="emotion",
    )
    # No .npz suffix: the file is written exactly where asked.
    path = fs.save(tmp_path / "sub" / "set.features")
    assert path == tmp_path / "sub" / "set.features"
    assert path.is_file()
    assert not list(path.parent.glob("*.tmp"))
    loaded = FeatureSet.load(path)
    assert_sets_equal(fs, loaded)
    assert loaded.dialogues[0].speakers == ("Zoë", "客服", "Zoë", "agent 🎧")
    assert loaded.dialogues[0].audio is None and loaded.dialogues[0].visual is None
    # Plain arrays only: numpy can read every member without pickle.
    with np.load(path, allow_pickle=False) as npz:
        assert set(npz.files) == {"meta", "offsets", "labels", "text"}
        assert all(npz[k].dtype != object for k in npz.files)


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 6), min_size=0, max_size=5),
    text_dim=st.integers(0, 4),
    audio_dim=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_round_trip_property(
    tmp_path_factory: pytest.TempPathFactory,
    lengths: list[int],
    text_dim: int,
    audio_dim: int,
    seed: int,
) -> None:
    rng = np.random.default_rng(seed)
    splits = ["train", "valid", "test", "extra"]
    dialogues = tuple(
        make_dialogue(f"d{i}", splits[i % 4], n, rng, text_dim=text_dim, audio_dim=audio_dim)
        for i, n in enumerate(lengths)
    )
    fs = FeatureSet(dialogues, ("a", "b", "c"), "spec", {"text": text_dim, "audio": audio_dim})
    path = fs.save(tmp_path_factory.mktemp("rt") / "x.npz")
    assert_sets_equal(fs, FeatureSet.load(path))


def test_splits_counts_and_summary() -> None:
    rng = np.random.default_rng(1)
    dialogues = (
        Dialogue("a", "test", ("x", "y"), np.array([0, 2]), text=np.zeros((2, 3))),
        Dialogue("b", "zeta", ("x",), np.array([1]), text=np.zeros((1, 3))),
        Dialogue("c", "train", ("x", "y", "x"), np.array([2, 2, -1]), text=np.ones((3, 3))),
        make_dialogue("d", "train", 2, rng, text_dim=3),
    )
    fs = FeatureSet(dialogues, ("p", "q", "r"), "spec", {"text": 3}, source="s.jsonl")
    assert fs.splits() == ["train", "test", "zeta"]
    assert [d.dialogue_id for d in fs.split("train")] == ["c", "d"]
    assert fs.class_counts("test").tolist() == [1, 0, 1]
    assert fs.class_counts("zeta").dtype == np.int64
    assert fs.dims == {"text": 3, "audio": 0, "visual": 0}
    assert fs.dialogues[0].text is not None and fs.dialogues[0].text.dtype == np.float32
    summary = fs.summary()
    assert "s.jsonl" in summary and "train: 2 dialogues" in summary
    with pytest.raises(InputError, match="no split 'valid'"):
        fs.split("valid")


def test_dialogue_validation() -> None:
    with pytest.raises(DimensionError):
        Dialogue("a", "train", ("x", "y"), np.array([0, 1]), text=np.zeros((3, 4)))
    with pytest.raises(NonFiniteError):
        Dialogue("a", "train", ("x",), np.array([0]), audio=np.array([[np.nan, 1.0]]))
    with pytest.raises(InputError, match="speaker"):
        Dialogue("a", "train", ("x",), np.array([0, 1]))
    with pytest.raises(InputError, match="integers"):
        Dialogue("a", "train", ("x",), np.array([0.5]))
    with pytest.raises(DimensionError):
        Dialogue("a", "train", (), np.array([], dtype=np.int64))
    with pytest.raises(InputError, match="text strings"):
        Dialogue("a", "train", ("x",), np.array([0]), texts=("one", "two"))


def test_feature_set_validation() -> None:
    ok = Dialogue("a", "train", ("x",), np.array([1]), text=np.zeros((1, 4)))
    with pytest.raises(DimensionError, match="width 4"):
        FeatureSet((ok,), ("p", "q"), "spec", {"text": 3})
    with pytest.raises(DimensionError, match="audio"):
        FeatureSet((ok,), ("p", "q"), "spec", {"text": 4, "audio": 2})
    with pytest.raises(InputError, match="outside"):
        FeatureSet((ok,), ("p",), "spec", {"text": 4})
    with pytest.raises(InputError, match="duplicate"):
        FeatureSet((ok, ok), ("p", "q"), "spec", {"text": 4})
    with pytest.raises(InputError, match="unknown modalities"):
        FeatureSet((ok,), ("p", "q"), "spec", {"text": 4, "smell": 1})


def test_load_rejects_bad_files(tmp_path: Path) -> None:
    not_npz = tmp_path / "plain.npz"
    not_npz.write_text("hello")
    with pytest.raises(DataError, match=r"plain\.npz"):
        FeatureSet.load(not_npz)
    with pytest.raises(DataError, match=r"missing\.npz"):
        FeatureSet.load(tmp_path / "missing.npz")

    fs = FeatureSet(
        (Dialogue("a", "train", ("x",), np.array([0]), text=np.zeros((1, 2))),),
        ("p",),
        "spec",
        {"text": 2},
    )
    path = fs.save(tmp_path / "ok.npz")
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    meta = json.loads(arrays["meta"].tobytes())
    meta["format_version"] = 99
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    np.savez(tmp_path / "future.npz", **arrays)
    with pytest.raises(DataError, match="format 99"):
        FeatureSet.load(tmp_path / "future.npz")

    arrays["meta"] = np.frombuffer(b"{not json", np.uint8)
    np.savez(tmp_path / "broken.npz", **arrays)
    with pytest.raises(DataError, match=r"broken\.npz"):
        FeatureSet.load(tmp_path / "broken.npz")

    # An object array would need pickle to load: refused, not unpickled.
    np.savez(tmp_path / "obj.npz", meta=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DataError, match=r"obj\.npz"):
        FeatureSet.load(tmp_path / "obj.npz")


# --------------------------------------------------------------------------- transcripts


def test_read_transcripts_valid(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "t.jsonl",
        [
            dialogue_line("x-0", "train", ["calm", None, "tense"]),
            "",  # blank lines are skipped
            {
                "dialogue_id": "x-1",
                "split": "test",
                "utterances": [
                    {"speaker": "Zoë", "text": "ça va ✓", "emotion": None, "extra": 1},
                ],
                "other": "ignored",
            },
        ],
    )
    dialogues = read_transcripts(path)
    assert [d.dialogue_id for d in dialogues] == ["x-0", "x-1"]
    assert dialogues[0].labels == ("calm", None, "tense")
    assert dialogues[0].length == 3
    assert dialogues[1].speakers == ("Zoë",)
    assert dialogues[1].texts == ("ça va ✓",)
    d = dialogues[0].to_dialogue(("tense", "calm"), text=np.zeros((3, 2)))
    assert d.labels.tolist() == [1, -1, 0]
    assert d.texts == dialogues[0].texts
    with pytest.raises(DataError, match="'tense' is not one of"):
        dialogues[0].label_indices(("calm",))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"dialogue_id": "b", "split": "train", "utterances": [', "not valid JSON"),
        ('["a list"]', "expected a JSON object"),
        ('{"split": "train", "utterances": []}', "no 'dialogue_id'"),
        ('{"dialogue_id": "b", "utterances": []}', "no 'split'"),
        ('{"dialogue_id": "b", "split": "train"}', "no 'utterances'"),
        ('{"dialogue_id": "b", "split": "train", "utterances": []}', "has no utterances"),
        ('{"dialogue_id": 7, "split": "train", "utterances": []}', "must be str, got int"),
        ('{"dialogue_id": "b", "split": "train", "utterances": {}}', "must be list"),
        ('{"dialogue_id": "b", "split": "train", "utterances": ["hi"]}', "must be an object"),
        ('{"dialogue_id": "b", "split": "train", "utterances": [{"text": "t"}]}', "no 'speaker'"),
        (
            '{"dialogue_id": "b", "split": "train", "utterances": [{"speaker": "s"}]}',
            "no 'text'",
        ),
        (
            '{"dialogue_id": "b", "split": "train", "utterances": [{"speaker": "s", "text": 3}]}',
            "'text' must be str",
        ),
        (
            '{"dialogue_id": "b", "split": "train", '
            '"utterances": [{"speaker": "s", "text": "t", "emotion": 2}]}',
            "'emotion' must be a non-empty string or null",
        ),
        (
            '{"dialogue_id": "a", "split": "train", "utterances": [{"speaker": "s", "text": "t"}]}',
            "repeats line 1",
        ),
    ],
)
def test_read_transcripts_errors(tmp_path: Path, line: str, message: str) -> None:
    # The bad line is line 3 (line 2 is blank): the message must say so.
    path = write_jsonl(tmp_path / "bad.jsonl", [dialogue_line("a", "train", ["p"]), "", line])
    with pytest.raises(DataError, match=message) as info:
        read_transcripts(path)
    assert f"{path}:3:" in str(info.value)


def test_read_transcripts_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot read"):
        read_transcripts(tmp_path / "absent.jsonl")
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(DataError, match="no dialogues"):
        read_transcripts(empty)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"dialogue_id": "\xe9"}\n')
    with pytest.raises(DataError, match="UTF-8"):
        read_transcripts(latin)


def test_other_label_field(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "s.jsonl",
        [
            {
                "dialogue_id": "a",
                "split": "train",
                "utterances": [
                    {"speaker": "s", "text": "t", "emotion": "joy", "sentiment": "positive"},
                    {"speaker": "s", "text": "u", "emotion": "anger", "sentiment": "negative"},
                    {"speaker": "s", "text": "v", "emotion": "neutral", "sentiment": "neutral"},
                ],
            }
        ],
    )
    dialogues = read_transcripts(path, label_field="sentiment")
    assert dialogues[0].labels == ("positive", "negative", "neutral")
    assert label_names_for(dialogues, "sentiment") == MELD_SENTIMENTS
    with pytest.raises(DataError, match="label field 'sentiment'"):
        label_names_for(dialogues, "emotion")


# --------------------------------------------------------------------------- label sets


def transcript(labels: list[str | None], dialogue_id: str = "d") -> TranscriptDialogue:
    n = len(labels)
    return TranscriptDialogue(
        dialogue_id, "train", ("s",) * n, ("t",) * n, tuple(labels), label_field="emotion"
    )


def test_label_names_any_set_by_frequency_then_name() -> None:
    dialogues = [
        transcript(["zeta", "alpha", None, "beta"]),
        transcript(["beta", "zeta", "gamma"], "e"),
    ]
    # beta 2, zeta 2, alpha 1, gamma 1: frequency descending, ties by name.
    assert label_names_for(dialogues) == ("beta", "zeta", "alpha", "gamma")


@pytest.mark.parametrize("order", [MELD_EMOTIONS, IEMOCAP_EMOTIONS, MELD_SENTIMENTS])
def test_label_names_paper_order(order: tuple[str, ...]) -> None:
    labels: list[str | None] = [name for i, name in enumerate(order) for _ in range(i + 1)]
    random.Random(3).shuffle(labels)
    # Frequencies chosen so that a frequency order would differ from the paper order.
    assert label_names_for([transcript(list(reversed(labels)))]) == order


def test_label_names_subset_is_not_paper_set() -> None:
    # Only part of MELD's set present: not recognised, ordered by frequency.
    got = label_names_for([transcript(["joy", "anger", "joy"])])
    assert got == ("joy", "anger")


def test_label_names_needs_a_label() -> None:
    with pytest.raises(DataError, match="no utterance"):
        label_names_for([transcript([None, None])])


# --------------------------------------------------------------------------- locations


def test_default_dirs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CFNESA_DATA_DIR", raising=False)
    monkeypatch.delenv("CFNESA_CACHE_DIR", raising=False)
    import model.data

    root = Path(model.data.__file__).resolve().parents[1]
    assert default_data_dir() == root.parent / "shared" / "data"
    assert default_cache_dir() == Path.home() / ".cache" / "cfnesa"
    monkeypatch.setenv("CFNESA_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("CFNESA_CACHE_DIR", str(tmp_path / "c"))
    assert default_data_dir() == tmp_path / "d"
    assert default_cache_dir() == tmp_path / "c"
