"""The CFN-ESA authors' feature pickles, read into a :class:`FeatureSet`.

With these files our code runs in the paper's setting (RoBERTa text 1024-d,
audio, visual). The tuple layouts, as the authors' ``dataloader.py`` unpacks
them (checked against github.com/lijfrank-open/CFN-ESA)::

    IEMOCAP, 12 items: videoIDs, videoSpeakers, videoLabels,
        videoText1, videoText2, videoText3, videoText4, videoAudio, videoVisual,
        videoSentence, trainVid, testVid
    MELD, 14 items: videoIDs, videoSpeakers, videoLabels, videoSentiments,
        videoText1, videoText2, videoText3, videoText4, videoAudio, videoVisual,
        videoSentence, trainVid, testVid, <extra>

Every ``video*`` item is a dict keyed by dialogue id. IEMOCAP speakers are
letters ("M", "F"); MELD speakers are one-hot vectors. The authors' code ignores
MELD's extra item; in the COSMIC files these derive from it is the official
validation ids, so it is used as the validation split when it looks like one.

Pickle executes code while loading: only files you trust may be opened, and
the caller has to say so (``trust_pickle=True``).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from model.data import (
    IEMOCAP_EMOTIONS,
    MELD_EMOTIONS,
    MELD_SENTIMENTS,
    Dialogue,
    FeatureSet,
)
from model.errors import CFNESAError, DataError, InputError

Dataset = Literal["meld", "iemocap"]

_LAYOUT_SIZES: dict[Dataset, int] = {"iemocap": 12, "meld": 14}
# Leading dict items (video* maps); trainVid and testVid follow them.
_N_MAPS: dict[Dataset, int] = {"iemocap": 10, "meld": 11}
_TEXT_FEATURES = ("mean", "textf1", "textf2", "textf3", "textf4")


class PickleNotTrustedError(CFNESAError):
    """An official feature pickle opened without ``trust_pickle=True``."""


def _fail(path: Path, message: str, dialogue_id: Any = None) -> DataError:
    where = f"{path}" if dialogue_id is None else f"{path}, dialogue {dialogue_id!r}"
    return DataError(f"{where}: {message}")


def _layout(path: Path, obj: Any, dataset: Dataset | None) -> Dataset:
    """Which layout ``obj`` has, from its size and value types."""
    expected = (
        "expected the authors' tuple: 12 items for IEMOCAP (videoIDs, videoSpeakers, "
        "videoLabels, videoText1..4, videoAudio, videoVisual, videoSentence, trainVid, "
        "testVid) or 14 for MELD (the same with videoSentiments after videoLabels and "
        "one extra item at the end)"
    )
    if not isinstance(obj, tuple | list):
        raise _fail(path, f"holds a {type(obj).__name__}; {expected}")
    by_size = {size: name for name, size in _LAYOUT_SIZES.items()}
    found = by_size.get(len(obj))
    if found is None:
        raise _fail(path, f"holds {len(obj)} items; {expected}")
    if dataset is not None and dataset != found:
        raise _fail(path, f"has the {found} layout ({len(obj)} items), not {dataset}")
    n_maps = _N_MAPS[found]
    for i in range(n_maps):
        if not isinstance(obj[i], Mapping):
            raise _fail(path, f"item {i} is a {type(obj[i]).__name__}, not a dict; {expected}")
    for i in (n_maps, n_maps + 1):
        if isinstance(obj[i], Mapping | str | bytes) or not isinstance(obj[i], Iterable):
            raise _fail(path, f"item {i} (train/test ids) is a {type(obj[i]).__name__}")
    return found


def _ordered_ids(ids: Iterable[Any]) -> list[Any]:
    """Ids in a deterministic order: as given for sequences, sorted for sets."""
    if isinstance(ids, Sequence | np.ndarray):
        return [i.item() if isinstance(i, np.generic) else i for i in ids]
    items = [i.item() if isinstance(i, np.generic) else i for i in ids]
    try:
        return sorted(items)
    except TypeError:
        return sorted(items, key=repr)


def _speaker_name(path: Path, vid: Any, value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if isinstance(value, str):
        return value
    if isinstance(value, int | np.integer):
        return f"spk{int(value)}"
    vector = np.asarray(value, dtype=np.float64)
    if vector.ndim != 1 or vector.size == 0 or vector.max() <= 0:
        raise _fail(path, f"speaker {value!r} is neither a name nor a one-hot vector", vid)
    return f"spk{int(vector.argmax())}"


def _matrix(path: Path, vid: Any, name: str, value: Any, length: int) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise _fail(path, f"{name} is not a numeric matrix: {exc}", vid) from exc
    if array.ndim != 2 or array.shape[0] != length or array.shape[1] == 0:
        raise _fail(path, f"{name} has shape {array.shape}, expected ({length}, D)", vid)
    return array


def _split_ids(
    path: Path,
    obj: Sequence[Any],
    layout: Dataset,
    known: Mapping[Any, Any],
    valid_fraction: float,
    seed: int,
    use_file_valid: bool,
) -> list[tuple[str, list[Any]]]:
    n_maps = _N_MAPS[layout]
    train = _ordered_ids(obj[n_maps])
    test = _ordered_ids(obj[n_maps + 1])
    for name, ids in (("train", train), ("test", test)):
        missing = [i for i in ids if i not in known]
        if missing:
            raise _fail(path, f"{name} ids without labels: {missing[:5]}")
        if len(set(ids)) != len(ids):
            raise _fail(path, f"{name} ids repeat")
    overlap = set(train) & set(test)
    if overlap:
        raise _fail(path, f"dialogues in both train and test: {sorted(overlap, key=repr)[:5]}")

    valid: list[Any] = []
    extra = obj[-1] if layout == "meld" else None
    if use_file_valid and extra is not None and _looks_like_ids(extra, known):
        valid = _ordered_ids(extra)
        if set(valid) & set(test):
            raise _fail(path, "the extra item's validation ids overlap the test ids")
        # Whether trainVid already excludes them or not, a dialogue is in one split.
        held_out = set(valid)
        train = [i for i in train if i not in held_out]
    elif valid_fraction > 0:
        # Whole dialogues, never positions inside one: the authors' code draws
        # validation utterances from inside training dialogues.
        shuffled = [train[i] for i in np.random.default_rng(seed).permutation(len(train))]
        n_valid = round(valid_fraction * len(train))
        # At least one dialogue held out, at least one left to train on.
        n_valid = min(max(n_valid, 1), len(train) - 1) if len(train) >= 2 else 0
        held_out = set(shuffled[len(shuffled) - n_valid :])
        valid = [i for i in train if i in held_out]
        train = [i for i in train if i not in held_out]
    return [("train", train), ("valid", valid), ("test", test)]


def _looks_like_ids(extra: Any, known: Mapping[Any, Any]) -> bool:
    """True when MELD's extra item is a non-empty collection of known dialogue ids."""
    if extra is None or isinstance(extra, Mapping | str | bytes) or not isinstance(extra, Iterable):
        return False
    ids = _ordered_ids(extra)
    return bool(ids) and all(isinstance(i, Hashable) and i in known for i in ids)


def load_official_features(
    path: str | os.PathLike[str],
    dataset: Dataset | None = None,
    *,
    trust_pickle: bool = False,
    text_feature: str = "mean",
    label_field: str = "emotion",
    valid_fraction: float = 0.1,
    seed: int = 0,
    use_file_valid: bool = True,
) -> FeatureSet:
    """Read one of the authors' feature pickles.

    Args:
        path: The ``.pkl`` file.
        dataset: "meld" or "iemocap" to insist on a layout; None to identify it
            from the number of items and their types.
        trust_pickle: Must be True: unpickling runs code the file names, so
            only files from a source you trust may be loaded.
        text_feature: "mean" (the average of the four text maps, as the
            authors feed them) or one of "textf1".."textf4".
        label_field: "emotion", or "sentiment" (MELD only).
        valid_fraction: Share of the training dialogues held out as "valid"
            when the file has no validation ids (always for IEMOCAP).
        seed: Seed of that draw.
        use_file_valid: Use MELD's extra item as the validation split when it
            is a collection of known dialogue ids (the COSMIC validation ids).

    Returns:
        A FeatureSet with text, audio and visual features, splits train /
        valid / test, labels in the paper's class order, speakers as "spk<i>"
        (one-hot) or the file's letters, and the sentences as ``texts``.

    Raises:
        PickleNotTrustedError: ``trust_pickle`` is not True (nothing is read).
        InputError: An argument is invalid.
        DataError: The file is not one of the two layouts, or is inconsistent.
    """
    source = Path(path)
    if trust_pickle is not True:
        # Checked before the file is even opened: refusing after reading would
        # already have run whatever the pickle carries.
        raise PickleNotTrustedError(
            f"refusing to unpickle {source}: loading a pickle runs any code it names. "
            "Pass trust_pickle=True only for files from a source you trust "
            "(e.g. the CFN-ESA authors' release, checked)."
        )
    if dataset not in (None, "meld", "iemocap"):
        raise InputError(f"dataset must be 'meld', 'iemocap' or None, got {dataset!r}")
    if text_feature not in _TEXT_FEATURES:
        raise InputError(f"text_feature must be one of {_TEXT_FEATURES}, got {text_feature!r}")
    if label_field not in ("emotion", "sentiment"):
        raise InputError(f"label_field must be 'emotion' or 'sentiment', got {label_field!r}")
    if not 0.0 <= valid_fraction < 1.0:
        raise InputError(f"valid_fraction must be in [0, 1), got {valid_fraction}")

    try:
        with source.open("rb") as handle:
            # latin1: the IEMOCAP file was written by Python 2; it is also how
            # the authors load it, and it leaves Python 3 pickles unchanged.
            obj = pickle.load(handle, encoding="latin1")  # noqa: S301 (caller vouched: trust_pickle)
    except OSError as exc:
        raise DataError(f"{source}: cannot read: {exc}") from exc
    except Exception as exc:  # unpickling can raise nearly anything on a bad file
        raise DataError(f"{source}: not a readable pickle: {exc!r}") from exc

    layout = _layout(source, obj, dataset)
    offset = 1 if layout == "meld" else 0  # MELD's videoSentiments shifts the rest
    speakers_map, emotions_map = obj[1], obj[2]
    if label_field == "sentiment":
        if layout != "meld":
            raise InputError("the IEMOCAP layout has no sentiment labels")
        labels_map = obj[3]
        label_names = MELD_SENTIMENTS
    else:
        labels_map = emotions_map
        label_names = MELD_EMOTIONS if layout == "meld" else IEMOCAP_EMOTIONS
    text_maps = obj[3 + offset : 7 + offset]
    audio_map, visual_map, sentence_map = obj[7 + offset], obj[8 + offset], obj[9 + offset]

    splits = _split_ids(source, obj, layout, labels_map, valid_fraction, seed, use_file_valid)
    dialogues: list[Dialogue] = []
    for split, ids in splits:
        for vid in ids:
            dialogues.append(
                _dialogue(
                    source,
                    vid,
                    split,
                    speakers_map,
                    labels_map,
                    text_maps,
                    audio_map,
                    visual_map,
                    sentence_map,
                    text_feature,
                    len(label_names),
                )
            )
    if not dialogues:
        raise _fail(source, "no dialogues in train or test")

    first = dialogues[0]
    dims = {m: int(first.modality(m).shape[1]) for m in ("text", "audio", "visual")}  # type: ignore[union-attr]
    suffix = "" if text_feature == "mean" else f"f{text_feature[-1]}"
    spec = (
        f"official-{layout}-roberta{dims['text']}{suffix}"
        f"+audio{dims['audio']}+visual{dims['visual']}"
    )
    try:
        return FeatureSet(
            dialogues=tuple(dialogues),
            label_names=label_names,
            feature_spec=spec,
            dims=dims,
            source=source.name,
            label_field=label_field,
        )
    except InputError as exc:
        raise DataError(f"{source}: {exc}") from exc


def _dialogue(
    path: Path,
    vid: Any,
    split: str,
    speakers_map: Mapping[Any, Any],
    labels_map: Mapping[Any, Any],
    text_maps: Sequence[Mapping[Any, Any]],
    audio_map: Mapping[Any, Any],
    visual_map: Mapping[Any, Any],
    sentence_map: Mapping[Any, Any],
    text_feature: str,
    num_classes: int,
) -> Dialogue:
    try:
        labels = np.asarray(labels_map[vid])
        if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
            raise _fail(path, f"labels must be a non-empty list of ints, got {labels!r}", vid)
        labels = labels.astype(np.int64)
        if labels.min() < -1 or labels.max() >= num_classes:
            raise _fail(path, f"labels outside [-1, {num_classes})", vid)
        length = labels.shape[0]
        textfs = [
            _matrix(path, vid, f"videoText{k + 1}", m[vid], length) for k, m in enumerate(text_maps)
        ]
        if len({t.shape[1] for t in textfs}) != 1:
            raise _fail(path, "the four text feature maps differ in width", vid)
        if text_feature == "mean":
            # float64 accumulation, float32 result: the same average whatever the order.
            text = np.stack(textfs).mean(axis=0, dtype=np.float64).astype(np.float32)
        else:
            text = textfs[int(text_feature[-1]) - 1]
        audio = _matrix(path, vid, "videoAudio", audio_map[vid], length)
        visual = _matrix(path, vid, "videoVisual", visual_map[vid], length)
        raw_speakers = list(speakers_map[vid])
        if len(raw_speakers) != length:
            raise _fail(path, f"{len(raw_speakers)} speakers for {length} labels", vid)
        speakers = tuple(_speaker_name(path, vid, s) for s in raw_speakers)
        texts = None
        if vid in sentence_map:
            sentences = [
                s.decode("latin-1") if isinstance(s, bytes) else s for s in sentence_map[vid]
            ]
            if len(sentences) != length or not all(isinstance(s, str) for s in sentences):
                raise _fail(path, f"videoSentence does not hold {length} strings", vid)
            texts = tuple(sentences)
    except KeyError as exc:
        raise _fail(path, f"missing from a feature map ({exc})", vid) from exc
    try:
        return Dialogue(
            dialogue_id=str(vid),
            split=split,
            speakers=speakers,
            labels=labels,
            text=text,
            audio=audio,
            visual=visual,
            texts=texts,
        )
    except InputError as exc:
        raise _fail(path, str(exc), vid) from exc
