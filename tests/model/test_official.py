"""Tests for model.official: the authors' feature pickles, built here from random data."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from model.data import IEMOCAP_EMOTIONS, MELD_EMOTIONS, MELD_SENTIMENTS
from model.errors import CFNESAError, DataError, InputError
from model.official import PickleNotTrustedError, load_official_features

TEXT_DIM, MELD_AUDIO, MELD_VISUAL, IEMOCAP_AUDIO = 8, 5, 6, 7


def _maps(ids: list[Any], lengths: list[int], audio_dim: int, visual_dim: int, seed: int):
    rng = np.random.default_rng(seed)
    textfs: list[dict[Any, Any]] = [{}, {}, {}, {}]
    audio, visual, sentences, utt_ids = {}, {}, {}, {}
    for vid, n in zip(ids, lengths, strict=True):
        for tf in textfs:
            # Lists of vectors, as in the released files, not one array.
            tf[vid] = [rng.standard_normal(TEXT_DIM).astype(np.float32) for _ in range(n)]
        audio[vid] = rng.standard_normal((n, audio_dim)).astype(np.float32)
        visual[vid] = rng.standard_normal((n, visual_dim)).astype(np.float32)
        sentences[vid] = [f"synthetic {vid} {i}" for i in range(n)]
        utt_ids[vid] = [f"{vid}_{i}" for i in range(n)]
    return utt_ids, textfs, audio, visual, sentences


def iemocap_tuple(seed: int = 0) -> tuple[Any, ...]:
    ids = ["Ses01_a", "Ses01_b", "Ses02_c", "Ses05_d"]
    lengths = [3, 2, 4, 2]
    utt_ids, textfs, audio, visual, sentences = _maps(ids, lengths, IEMOCAP_AUDIO, 6, seed)
    rng = np.random.default_rng(seed + 1)
    speakers = {
        vid: ["M" if i % 2 else "F" for i in range(n)] for vid, n in zip(ids, lengths, strict=True)
    }
    labels = {vid: rng.integers(0, 6, size=n).tolist() for vid, n in zip(ids, lengths, strict=True)}
    train, test = {"Ses01_b", "Ses01_a", "Ses02_c"}, ["Ses05_d"]  # a set, as in some files
    return (utt_ids, speakers, labels, *textfs, audio, visual, sentences, train, test)


def meld_tuple(seed: int = 0, extra: Any = None) -> tuple[Any, ...]:
    ids = [0, 1, 2, 3]
    lengths = [2, 3, 1, 2]
    utt_ids, textfs, audio, visual, sentences = _maps(ids, lengths, MELD_AUDIO, MELD_VISUAL, seed)
    rng = np.random.default_rng(seed + 1)
    speakers = {
        vid: [np.eye(9)[(vid + i) % 9].tolist() for i in range(n)]
        for vid, n in zip(ids, lengths, strict=True)
    }
    labels = {vid: rng.integers(0, 7, size=n).tolist() for vid, n in zip(ids, lengths, strict=True)}
    sentiments = {
        vid: rng.integers(0, 3, size=n).tolist() for vid, n in zip(ids, lengths, strict=True)
    }
    train, test = [0, 1, 2], [3]
    return (
        utt_ids,
        speakers,
        labels,
        sentiments,
        *textfs,
        audio,
        visual,
        sentences,
        train,
        test,
        extra,
    )


def dump(path: Path, obj: Any) -> Path:
    with path.open("wb") as handle:
        pickle.dump(obj, handle, protocol=2)
    return path


def test_iemocap_layout(tmp_path: Path) -> None:
    raw = iemocap_tuple()
    path = dump(tmp_path / "iemocap.pkl", raw)
    fs = load_official_features(path, "iemocap", trust_pickle=True, valid_fraction=0.34, seed=1)
    assert fs.dims == {"text": TEXT_DIM, "audio": IEMOCAP_AUDIO, "visual": 6}
    assert fs.label_names == IEMOCAP_EMOTIONS
    assert fs.feature_spec == f"official-iemocap-roberta{TEXT_DIM}+audio{IEMOCAP_AUDIO}+visual6"
    assert fs.source == "iemocap.pkl"
    assert fs.splits() == ["train", "valid", "test"]
    # One whole training dialogue is held out; train and valid cover the file's train set.
    train = {d.dialogue_id for d in fs.split("train")}
    valid = {d.dialogue_id for d in fs.split("valid")}
    assert len(valid) == 1 and not train & valid
    assert train | valid == {"Ses01_a", "Ses01_b", "Ses02_c"}
    assert [d.dialogue_id for d in fs.split("test")] == ["Ses05_d"]
    _, speakers, labels, *textfs = raw[:7]
    for d in fs.dialogues:
        vid = d.dialogue_id
        assert d.speakers == tuple(speakers[vid])
        assert d.labels.tolist() == labels[vid]
        expected = np.mean([np.asarray(tf[vid]) for tf in textfs], axis=0)
        np.testing.assert_allclose(d.text, expected, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(d.audio, raw[7][vid])
        np.testing.assert_array_equal(d.visual, raw[8][vid])
        assert d.texts == tuple(raw[9][vid])


def test_validation_draw_is_seeded_and_whole_dialogues(tmp_path: Path) -> None:
    path = dump(tmp_path / "iemocap.pkl", iemocap_tuple())
    picks = set()
    for seed in range(12):
        a = load_official_features(path, trust_pickle=True, valid_fraction=0.34, seed=seed)
        b = load_official_features(path, trust_pickle=True, valid_fraction=0.34, seed=seed)
        valid = [d.dialogue_id for d in a.split("valid")]
        assert valid == [d.dialogue_id for d in b.split("valid")]
        picks.add(tuple(valid))
    assert len(picks) > 1  # the seed matters
    none = load_official_features(path, trust_pickle=True, valid_fraction=0.0)
    assert none.splits() == ["train", "test"]


def test_meld_layout_one_hot_speakers_and_chosen_textf(tmp_path: Path) -> None:
    raw = meld_tuple()
    path = dump(tmp_path / "meld.pkl", raw)
    fs = load_official_features(path, trust_pickle=True, text_feature="textf2", valid_fraction=0.0)
    assert fs.label_names == MELD_EMOTIONS
    assert fs.dims == {"text": TEXT_DIM, "audio": MELD_AUDIO, "visual": MELD_VISUAL}
    assert fs.feature_spec == f"official-meld-roberta{TEXT_DIM}f2+audio{MELD_AUDIO}+visual6"
    assert [d.dialogue_id for d in fs.split("train")] == ["0", "1", "2"]
    d1 = fs.dialogues[1]
    assert d1.speakers == ("spk1", "spk2", "spk3")
    assert d1.labels.tolist() == raw[2][1]
    np.testing.assert_array_equal(d1.text, np.asarray(raw[5][1]))

    sentiment = load_official_features(path, "meld", trust_pickle=True, label_field="sentiment")
    assert sentiment.label_names == MELD_SENTIMENTS
    assert sentiment.label_field == "sentiment"
    assert {d.dialogue_id: d.labels.tolist() for d in sentiment.dialogues} == {
        str(k): v for k, v in raw[3].items()
    }


def test_meld_extra_item_as_validation_ids(tmp_path: Path) -> None:
    path = dump(tmp_path / "meld.pkl", meld_tuple(extra=[2]))
    fs = load_official_features(path, trust_pickle=True)
    assert [d.dialogue_id for d in fs.split("valid")] == ["2"]
    assert [d.dialogue_id for d in fs.split("train")] == ["0", "1"]
    drawn = load_official_features(path, trust_pickle=True, use_file_valid=False, seed=0)
    assert len(drawn.split("valid")) == 1
    # An extra item that is not ids (here: unknown keys) is ignored, not trusted.
    other = dump(tmp_path / "meld-other.pkl", meld_tuple(extra=["nope"]))
    fs_other = load_official_features(other, trust_pickle=True, valid_fraction=0.0)
    assert fs_other.splits() == ["train", "test"]


class Marker:
    """Pickles into a call that creates a file: proof of whether unpickling ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


def test_refuses_untrusted_pickle_without_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = dump(tmp_path / "evil.pkl", Marker(marker))
    with pytest.raises(PickleNotTrustedError, match="runs any code"):
        load_official_features(path)
    with pytest.raises(PickleNotTrustedError):
        load_official_features(path, "meld", trust_pickle="yes")  # type: ignore[arg-type]
    assert not marker.exists()
    assert issubclass(PickleNotTrustedError, CFNESAError)


def test_layout_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="holds a dict"):
        load_official_features(dump(tmp_path / "a.pkl", {"x": 1}), trust_pickle=True)
    with pytest.raises(DataError, match="holds 3 items"):
        load_official_features(dump(tmp_path / "b.pkl", (1, 2, 3)), trust_pickle=True)
    with pytest.raises(DataError, match="iemocap layout"):
        load_official_features(dump(tmp_path / "c.pkl", iemocap_tuple()), "meld", trust_pickle=True)
    broken = list(meld_tuple())
    broken[4] = [1, 2]  # videoText1 is not a dict
    with pytest.raises(DataError, match="item 4"):
        load_official_features(dump(tmp_path / "d.pkl", tuple(broken)), trust_pickle=True)
    short = list(iemocap_tuple())
    short[7] = dict(short[7])
    short[7]["Ses01_a"] = short[7]["Ses01_a"][:2]  # audio one row short
    with pytest.raises(DataError, match="videoAudio"):
        load_official_features(dump(tmp_path / "e.pkl", tuple(short)), trust_pickle=True)
    overlap = list(iemocap_tuple())
    overlap[11] = ["Ses01_a"]
    with pytest.raises(DataError, match="both train and test"):
        load_official_features(dump(tmp_path / "f.pkl", tuple(overlap)), trust_pickle=True)
    bad_label = list(meld_tuple())
    bad_label[2] = dict(bad_label[2])
    bad_label[2][0] = [0, 7]
    with pytest.raises(DataError, match="labels outside"):
        load_official_features(dump(tmp_path / "g.pkl", tuple(bad_label)), trust_pickle=True)
    (tmp_path / "h.pkl").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="not a readable pickle"):
        load_official_features(tmp_path / "h.pkl", trust_pickle=True)


def test_argument_errors(tmp_path: Path) -> None:
    path = dump(tmp_path / "i.pkl", iemocap_tuple())
    with pytest.raises(InputError, match="text_feature"):
        load_official_features(path, trust_pickle=True, text_feature="textf5")
    with pytest.raises(InputError, match="no sentiment"):
        load_official_features(path, trust_pickle=True, label_field="sentiment")
    with pytest.raises(InputError, match="valid_fraction"):
        load_official_features(path, trust_pickle=True, valid_fraction=1.0)
