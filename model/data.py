"""Dialogues, feature sets and the transcript files they come from.

Two kinds of object live here:

- ``TranscriptDialogue``: what a JSONL transcript line holds (speakers, texts,
  label strings), read strictly by :func:`read_transcripts`.
- ``Dialogue`` / ``FeatureSet``: per-utterance feature matrices with integer
  labels, ready for training, saved to and loaded from ONE ``.npz`` file.

The module is numpy only: no torch, so data tooling and the streaming side can
import it cheaply.

The ``.npz`` layout (``FORMAT_VERSION`` 1), all arrays plain (no object arrays,
so loading runs with ``allow_pickle=False``)::

    meta      uint8 (B,)        UTF-8 JSON: version, label names, spec, dims,
                                source, label field, per-dialogue id, split,
                                speakers, texts (or null)
    offsets   int64 (N + 1,)    utterance offsets of the N dialogues
    labels    int64 (U,)        every utterance's label, -1 = unlabelled
    text      float32 (U, D_t)  only when dims["text"] > 0; same for audio, visual
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from model.config import IEMOCAP_EMOTIONS, MELD_EMOTIONS, MELD_SENTIMENTS
from model.errors import DataError, DimensionError, InputError, NonFiniteError

FORMAT_VERSION = 1
MODALITIES: tuple[str, ...] = ("text", "audio", "visual")
UNLABELLED = -1

# Paper class orders: kept so that numbers and confusion matrices compare with
# the literature (shared/data/README.md).
PAPER_LABEL_ORDERS: tuple[tuple[str, ...], ...] = (MELD_EMOTIONS, IEMOCAP_EMOTIONS, MELD_SENTIMENTS)

# Splits listed first, in this order, by FeatureSet.splits(); others follow sorted.
_CANONICAL_SPLITS = ("train", "valid", "test")


def default_data_dir() -> Path:
    """Where the transcript files live.

    Returns:
        ``$CFNESA_DATA_DIR`` when set, else ``shared/data`` beside the project
        root (the development and CI layout: ``<root>/../shared/data``).
    """
    env = os.environ.get("CFNESA_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def default_cache_dir() -> Path:
    """Where computed features are cached: ``$CFNESA_CACHE_DIR`` or ``~/.cache/cfnesa``."""
    env = os.environ.get("CFNESA_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "cfnesa"


# --------------------------------------------------------------------------- features


def _as_matrix(name: str, value: Any, length: int, dialogue_id: str) -> np.ndarray | None:
    if value is None:
        return None
    array = np.ascontiguousarray(value, dtype=np.float32)
    if array.ndim != 2 or array.shape[0] != length:
        raise DimensionError(
            f"{name} features must have shape ({length}, D), got {array.shape}",
            conversation_id=dialogue_id,
        )
    if not np.isfinite(array).all():
        raise NonFiniteError(f"{name} features hold NaN or Inf", conversation_id=dialogue_id)
    return array


@dataclass(frozen=True, eq=False)
class Dialogue:
    """One conversation: per-utterance features and labels.

    Arrays are coerced on construction (labels to int64, features to float32)
    and checked for shape and finiteness. ``eq=False``: equality of numpy
    fields is ambiguous, so dialogues compare by identity.

    Attributes:
        dialogue_id: Unique id within its feature set.
        split: "train", "valid", "test" or any other split name.
        speakers: One speaker name per utterance (any string).
        labels: int64 (L,), class indices into the set's label names; -1 = unlabelled.
        text: float32 (L, D_t), or None when the modality is absent.
        audio: float32 (L, D_a), or None.
        visual: float32 (L, D_v), or None.
        texts: The transcript strings, one per utterance, or None.
    """

    dialogue_id: str
    split: str
    speakers: tuple[str, ...]
    labels: np.ndarray
    text: np.ndarray | None = None
    audio: np.ndarray | None = None
    visual: np.ndarray | None = None
    texts: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        did = self.dialogue_id
        if not isinstance(did, str) or not did:
            raise InputError(f"dialogue_id must be a non-empty string, got {did!r}")
        if not isinstance(self.split, str) or not self.split:
            raise InputError(f"split must be a non-empty string, got {self.split!r}")
        labels = np.asarray(self.labels)
        if labels.ndim != 1 or labels.shape[0] == 0:
            raise DimensionError(
                f"labels must be a non-empty 1-D array, got shape {labels.shape}",
                conversation_id=did,
            )
        if not np.issubdtype(labels.dtype, np.integer):
            raise InputError(f"labels must be integers, got {labels.dtype}", conversation_id=did)
        labels = labels.astype(np.int64, copy=False)
        if (labels < UNLABELLED).any():
            raise InputError("labels below -1", conversation_id=did)
        length = labels.shape[0]
        # Frozen dataclass: the coerced values are stored once, here, and never again.
        object.__setattr__(self, "labels", labels)
        speakers = tuple(self.speakers)
        if len(speakers) != length or not all(isinstance(s, str) for s in speakers):
            raise InputError(
                f"need {length} speaker strings, got {speakers!r}", conversation_id=did
            )
        object.__setattr__(self, "speakers", speakers)
        for name in MODALITIES:
            object.__setattr__(self, name, _as_matrix(name, getattr(self, name), length, did))
        if self.texts is not None:
            texts = tuple(self.texts)
            if len(texts) != length or not all(isinstance(t, str) for t in texts):
                raise InputError(f"need {length} text strings", conversation_id=did)
            object.__setattr__(self, "texts", texts)

    @property
    def length(self) -> int:
        """Number of utterances."""
        return int(self.labels.shape[0])

    def modality(self, name: str) -> np.ndarray | None:
        """The feature matrix of modality ``name`` ("text", "audio" or "visual")."""
        if name not in MODALITIES:
            raise InputError(f"unknown modality {name!r}; expected one of {MODALITIES}")
        value: np.ndarray | None = getattr(self, name)
        return value


@dataclass(frozen=True, eq=False)
class FeatureSet:
    """A data set of dialogues with the same features and label set.

    Invariant (checked): for each modality, either every dialogue has a matrix
    of width ``dims[m]`` or none has one and ``dims[m] == 0``; every label is
    -1 or an index into ``label_names``; dialogue ids are unique.

    Attributes:
        dialogues: The dialogues, in a stable order (train, valid, test for the
            builders in this package).
        label_names: Class names; label ``i`` means ``label_names[i]``.
        feature_spec: What produced the features (e.g. "minilm-l6-v2"); models
            record it and refuse features of another spec.
        dims: Feature width per modality ("text", "audio", "visual"); 0 = absent.
        source: Where the data came from (a file name, with a content hash for caches).
        label_field: Which transcript field the labels are ("emotion", "sentiment").
    """

    dialogues: tuple[Dialogue, ...]
    label_names: tuple[str, ...]
    feature_spec: str
    dims: dict[str, int] = field(default_factory=dict)
    source: str = ""
    label_field: str = "emotion"

    def __post_init__(self) -> None:
        dialogues = tuple(self.dialogues)
        label_names = tuple(self.label_names)
        if not label_names or len(set(label_names)) != len(label_names):
            raise InputError(f"label_names must be non-empty and unique, got {label_names!r}")
        unknown = set(self.dims) - set(MODALITIES)
        if unknown:
            raise InputError(f"unknown modalities in dims: {sorted(unknown)}")
        dims = {m: int(self.dims.get(m, 0)) for m in MODALITIES}
        seen: set[str] = set()
        for d in dialogues:
            if d.dialogue_id in seen:
                raise InputError(f"duplicate dialogue id {d.dialogue_id!r}")
            seen.add(d.dialogue_id)
            if d.labels.max() >= len(label_names):
                raise InputError(
                    f"label {int(d.labels.max())} outside the {len(label_names)} label names",
                    conversation_id=d.dialogue_id,
                )
            for m in MODALITIES:
                matrix = d.modality(m)
                width = 0 if matrix is None else matrix.shape[1]
                if width != dims[m] or (matrix is not None and width == 0):
                    raise DimensionError(
                        f"{m} features of width {width}, the set declares {dims[m]}",
                        conversation_id=d.dialogue_id,
                    )
        object.__setattr__(self, "dialogues", dialogues)
        object.__setattr__(self, "label_names", label_names)
        object.__setattr__(self, "dims", dims)

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.label_names)

    def splits(self) -> list[str]:
        """Split names present: train, valid, test first (when present), then others sorted."""
        present = {d.split for d in self.dialogues}
        head = [s for s in _CANONICAL_SPLITS if s in present]
        return head + sorted(present - set(head))

    def split(self, name: str) -> list[Dialogue]:
        """The dialogues of split ``name``, in set order.

        Raises:
            InputError: No dialogue is in that split.
        """
        chosen = [d for d in self.dialogues if d.split == name]
        if not chosen:
            raise InputError(f"no split {name!r} in {self.source or 'this set'}: {self.splits()}")
        return chosen

    def hold_out(self, folds: int, fold: int, seed: int = 0) -> FeatureSet:
        """This set with fold ``fold`` of ``folds`` of the train dialogues moved
        to a ``heldout`` split (cross-fitting: a model trained on the rest gives
        honest outputs on them). Folds are a seeded shuffle of the train
        dialogues dealt round-robin, so they depend only on the ids and seed."""
        if folds < 2 or not 0 <= fold < folds:
            raise InputError(f"need folds >= 2 and 0 <= fold < folds, got {fold}/{folds}")
        train_ids = sorted(d.dialogue_id for d in self.dialogues if d.split == "train")
        order = np.random.default_rng(seed).permutation(len(train_ids))
        held = {train_ids[i] for k, i in enumerate(order) if k % folds == fold}
        moved = tuple(
            dataclasses.replace(d, split="heldout") if d.dialogue_id in held else d
            for d in self.dialogues
        )
        return dataclasses.replace(self, dialogues=moved)

    def class_counts(self, split: str) -> np.ndarray:
        """Labelled utterances per class in ``split``: int64 (C,)."""
        labels = np.concatenate([d.labels for d in self.split(split)])
        return np.bincount(labels[labels >= 0], minlength=self.num_classes).astype(np.int64)

    def summary(self) -> str:
        """A few human-readable lines: source, spec, dims, split sizes, class counts."""
        dims = ", ".join(f"{m}={self.dims[m]}" for m in MODALITIES)
        lines = [
            f"{self.source or '<memory>'}: {self.feature_spec} ({dims}), "
            f"{self.label_field} labels: {', '.join(self.label_names)}"
        ]
        for name in self.splits():
            part = self.split(name)
            utterances = sum(d.length for d in part)
            unlabelled = sum(int((d.labels < 0).sum()) for d in part)
            counts = " ".join(str(int(c)) for c in self.class_counts(name))
            lines.append(
                f"  {name}: {len(part)} dialogues, {utterances} utterances"
                f" ({unlabelled} unlabelled), per class [{counts}]"
            )
        return "\n".join(lines)

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the set to one ``.npz`` file, atomically.

        Uncompressed on purpose: float features barely compress and
        ``savez_compressed`` is several times slower to write and read.

        Args:
            path: Target file; written as given (no ``.npz`` suffix is added).

        Returns:
            The path written.
        """
        target = Path(path)
        meta = {
            "format_version": FORMAT_VERSION,
            "label_names": list(self.label_names),
            "feature_spec": self.feature_spec,
            "dims": self.dims,
            "source": self.source,
            "label_field": self.label_field,
            "dialogues": [
                {
                    "id": d.dialogue_id,
                    "split": d.split,
                    "speakers": list(d.speakers),
                    "texts": None if d.texts is None else list(d.texts),
                }
                for d in self.dialogues
            ],
        }
        lengths = np.array([d.length for d in self.dialogues], dtype=np.int64)
        arrays: dict[str, np.ndarray] = {
            # ensure_ascii=False keeps non-ASCII speakers and texts compact; JSON
            # in a uint8 array avoids object arrays (and so pickle) on load.
            "meta": np.frombuffer(json.dumps(meta, ensure_ascii=False).encode("utf-8"), np.uint8),
            "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            # The empty pieces keep concatenate defined for a set of no dialogues.
            "labels": np.concatenate([np.zeros(0, np.int64)] + [d.labels for d in self.dialogues]),
        }
        for m in MODALITIES:
            if self.dims[m] > 0:
                pieces = [np.zeros((0, self.dims[m]), np.float32)]
                pieces += [matrix for d in self.dialogues if (matrix := d.modality(m)) is not None]
                arrays[m] = np.concatenate(pieces)
        target.parent.mkdir(parents=True, exist_ok=True)
        # Write beside the target, then rename: a reader (or a second writer of
        # the same cache entry) never sees a half-written file.
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                np.savez(handle, **arrays)  # type: ignore[arg-type]
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FeatureSet:
        """Read a set written by :meth:`save`.

        Raises:
            DataError: The file is missing, not an ``.npz``, of another format
                version, or inconsistent.
        """
        source = Path(path)
        try:
            with np.load(source, allow_pickle=False) as npz:
                arrays = {key: npz[key] for key in npz.files}
        except (OSError, ValueError, EOFError) as exc:
            raise DataError(f"{source}: not a readable feature file: {exc}") from exc
        try:
            meta = json.loads(arrays["meta"].tobytes().decode("utf-8"))
            version = meta.get("format_version")
            if version != FORMAT_VERSION:
                raise DataError(
                    f"{source}: feature file format {version!r}, this code reads {FORMAT_VERSION}"
                )
            offsets = arrays["offsets"]
            labels = arrays["labels"]
            entries = meta["dialogues"]
            if offsets.shape != (len(entries) + 1,) or offsets[-1] != labels.shape[0]:
                raise DataError(f"{source}: offsets do not match the dialogues and labels")
            dims = {m: int(meta["dims"][m]) for m in MODALITIES}
            matrices = {m: arrays[m] for m in MODALITIES if dims[m] > 0}
            dialogues = []
            for i, entry in enumerate(entries):
                lo, hi = int(offsets[i]), int(offsets[i + 1])
                texts = entry["texts"]
                dialogues.append(
                    Dialogue(
                        dialogue_id=entry["id"],
                        split=entry["split"],
                        speakers=tuple(entry["speakers"]),
                        labels=labels[lo:hi],
                        text=matrices["text"][lo:hi] if "text" in matrices else None,
                        audio=matrices["audio"][lo:hi] if "audio" in matrices else None,
                        visual=matrices["visual"][lo:hi] if "visual" in matrices else None,
                        texts=None if texts is None else tuple(texts),
                    )
                )
            return cls(
                dialogues=tuple(dialogues),
                label_names=tuple(meta["label_names"]),
                feature_spec=meta["feature_spec"],
                dims=dims,
                source=meta["source"],
                label_field=meta["label_field"],
            )
        except DataError:
            raise
        except (KeyError, TypeError, ValueError, UnicodeDecodeError) as exc:
            # InputError is a ValueError: a dialogue that fails its own checks
            # lands here too and is reported against the file.
            raise DataError(f"{source}: inconsistent feature file: {exc}") from exc


# --------------------------------------------------------------------------- transcripts


@dataclass(frozen=True)
class TranscriptDialogue:
    """One line of a transcript file.

    Attributes:
        dialogue_id: The line's ``dialogue_id``.
        split: The line's ``split``.
        speakers: Speaker of each utterance.
        texts: Text of each utterance.
        labels: Label string of each utterance (the ``label_field``), None = unlabelled.
        label_field: Which utterance field ``labels`` was read from.
    """

    dialogue_id: str
    split: str
    speakers: tuple[str, ...]
    texts: tuple[str, ...]
    labels: tuple[str | None, ...]
    label_field: str = "emotion"

    @property
    def length(self) -> int:
        """Number of utterances."""
        return len(self.texts)

    def label_indices(self, label_names: Sequence[str]) -> np.ndarray:
        """Labels as int64 (L,) indices into ``label_names``; -1 where unlabelled.

        Raises:
            DataError: A label is not in ``label_names``.
        """
        index = {name: i for i, name in enumerate(label_names)}
        out = np.full(self.length, UNLABELLED, dtype=np.int64)
        for i, label in enumerate(self.labels):
            if label is None:
                continue
            if label not in index:
                raise DataError(
                    f"{self.label_field} {label!r} is not one of {list(label_names)}",
                    conversation_id=self.dialogue_id,
                )
            out[i] = index[label]
        return out

    def to_dialogue(
        self,
        label_names: Sequence[str],
        *,
        text: np.ndarray | None = None,
        audio: np.ndarray | None = None,
        visual: np.ndarray | None = None,
        keep_texts: bool = True,
    ) -> Dialogue:
        """Attach features to this transcript.

        Args:
            label_names: The set's class order.
            text: float32 (L, D_t) or None; likewise ``audio`` and ``visual``.
            audio: Audio features or None.
            visual: Visual features or None.
            keep_texts: Carry the transcript strings along.
        """
        return Dialogue(
            dialogue_id=self.dialogue_id,
            split=self.split,
            speakers=self.speakers,
            labels=self.label_indices(label_names),
            text=text,
            audio=audio,
            visual=visual,
            texts=self.texts if keep_texts else None,
        )


def _require(
    obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, what: str
) -> Any:
    if key not in obj:
        raise DataError(f"{where}: {what} has no {key!r}")
    value = obj[key]
    # bool is an int subclass; no field here takes either, so reject both plainly.
    if not isinstance(value, kind) or isinstance(value, bool):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise DataError(f"{where}: {what} {key!r} must be {names}, got {type(value).__name__}")
    return value


def _parse_line(line: str, where: str, label_field: str) -> TranscriptDialogue:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    dialogue_id = _require(obj, "dialogue_id", str, where, "dialogue")
    split = _require(obj, "split", str, where, "dialogue")
    if not dialogue_id or not split:
        raise DataError(f"{where}: empty dialogue_id or split")
    utterances = _require(obj, "utterances", list, where, "dialogue")
    if not utterances:
        raise DataError(f"{where}: dialogue {dialogue_id!r} has no utterances")
    speakers: list[str] = []
    texts: list[str] = []
    labels: list[str | None] = []
    for i, utt in enumerate(utterances):
        what = f"utterance {i} of {dialogue_id!r}"
        if not isinstance(utt, dict):
            raise DataError(f"{where}: {what} must be an object, got {type(utt).__name__}")
        speakers.append(_require(utt, "speaker", str, where, what))
        texts.append(_require(utt, "text", str, where, what))
        # A missing or null label is allowed: the utterance is unlabelled (-1).
        label = utt.get(label_field)
        if label is not None and (not isinstance(label, str) or not label):
            raise DataError(f"{where}: {what} {label_field!r} must be a non-empty string or null")
        labels.append(label)
    return TranscriptDialogue(
        dialogue_id=dialogue_id,
        split=split,
        speakers=tuple(speakers),
        texts=tuple(texts),
        labels=tuple(labels),
        label_field=label_field,
    )


def read_transcripts(
    path: str | os.PathLike[str], label_field: str = "emotion"
) -> list[TranscriptDialogue]:
    """Read a JSONL transcript file (one dialogue per line), strictly.

    Line format: ``{"dialogue_id": str, "split": str, "utterances": [{"speaker":
    str, "text": str, "<label_field>": str | null, ...}, ...]}``. Blank lines are
    skipped; extra keys are ignored.

    Args:
        path: The ``.jsonl`` file.
        label_field: The utterance field holding the label ("emotion", "sentiment", ...).

    Returns:
        The dialogues in file order.

    Raises:
        DataError: The file cannot be read, a line is not JSON, a key is missing
            or of the wrong type, a dialogue is empty, an id repeats, or the file
            holds no dialogue. The message names the file and line.
    """
    source = Path(path)
    dialogues: list[TranscriptDialogue] = []
    first_line: dict[str, int] = {}
    try:
        with source.open("r", encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                where = f"{source}:{lineno}"
                dialogue = _parse_line(line, where, label_field)
                if dialogue.dialogue_id in first_line:
                    raise DataError(
                        f"{where}: dialogue_id {dialogue.dialogue_id!r} repeats line "
                        f"{first_line[dialogue.dialogue_id]}"
                    )
                first_line[dialogue.dialogue_id] = lineno
                dialogues.append(dialogue)
    except UnicodeDecodeError as exc:
        raise DataError(f"{source}: not UTF-8 text: {exc}") from exc
    except OSError as exc:
        raise DataError(f"{source}: cannot read transcripts: {exc}") from exc
    if not dialogues:
        raise DataError(f"{source}: no dialogues")
    return dialogues


def label_names_for(
    dialogues: Iterable[TranscriptDialogue], label_field: str = "emotion"
) -> tuple[str, ...]:
    """The label set of some transcripts, in a stable class order.

    A set equal to MELD's emotions, IEMOCAP's emotions or MELD's sentiments
    gets the paper's class order; any other set is ordered by frequency
    (descending), ties by name, so that the order never depends on file order.

    Args:
        dialogues: Transcripts read with ``label_field``.
        label_field: The field the labels were read from (checked).

    Raises:
        DataError: No labelled utterance, or dialogues read with another field.
    """
    counts: Counter[str] = Counter()
    for d in dialogues:
        if d.label_field != label_field:
            raise DataError(
                f"dialogue read with label field {d.label_field!r}, asked for {label_field!r}",
                conversation_id=d.dialogue_id,
            )
        counts.update(label for label in d.labels if label is not None)
    if not counts:
        raise DataError(f"no utterance has a {label_field!r} label")
    found = set(counts)
    for order in PAPER_LABEL_ORDERS:
        if found == set(order):
            return order
    return tuple(sorted(found, key=lambda name: (-counts[name], name)))
