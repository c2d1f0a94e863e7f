"""Padding dialogues into batches for the network (training, evaluation, calibration)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from model.config import ModelConfig
from model.data import Dialogue
from model.errors import DataError


@dataclass
class Batch:
    """Padded dialogues. Shapes: (B, L, ...)."""

    features: dict[str, Tensor]
    present: Tensor  # (B, L, M) bool
    valid: Tensor  # (B, L) bool
    labels: Tensor  # (B, L) int64, -1 = padding or unlabelled
    prev_index: Tensor  # (B, L)
    speaker_prev_index: Tensor  # (B, L)


def make_batch(
    dialogues: Sequence[Dialogue],
    config: ModelConfig,
    *,
    modality_dropout: float = 0.0,
    rng: np.random.Generator | None = None,
) -> Batch:
    """Pad dialogues into a Batch for the model's modalities.

    With ``modality_dropout`` (training), each non-text modality of each
    utterance is dropped with that probability, and text too at half of it
    where another modality stays, so that text-only, text+audio and all-three
    inputs all work.
    """
    b, seq = len(dialogues), max(d.length for d in dialogues)
    mods = config.modalities
    feats = {m: np.zeros((b, seq, config.dim(m)), np.float32) for m in mods}
    present = np.zeros((b, seq, len(mods)), bool)
    valid = np.zeros((b, seq), bool)
    labels = np.full((b, seq), -1, np.int64)
    prev = np.full((b, seq), -1, np.int64)
    spk_prev = np.full((b, seq), -1, np.int64)
    for i, d in enumerate(dialogues):
        n = d.length
        valid[i, :n] = True
        labels[i, :n] = d.labels
        for k, m in enumerate(mods):
            x = d.modality(m)
            if x is None:
                continue
            if x.shape[1] != config.dim(m):
                raise DataError(
                    f"dialogue {d.dialogue_id}: {m} features are {x.shape[1]}-d, "
                    f"the model takes {config.dim(m)}"
                )
            feats[m][i, :n] = x
            present[i, :n, k] = True
        prev[i, 1:n] = np.arange(n - 1)
        last: dict[str, int] = {}
        for t, s in enumerate(d.speakers):
            spk_prev[i, t] = last.get(s, -1)
            last[s] = t
    if modality_dropout > 0 and rng is not None and len(mods) > 1:
        drop = rng.random(present.shape) < modality_dropout
        drop[..., 0] = rng.random(present.shape[:2]) < modality_dropout / 2
        kept = present & ~drop
        # never drop every modality of an utterance
        nothing = ~kept.any(-1) & present.any(-1)
        kept[nothing] = present[nothing]
        present = kept
    return Batch(
        features={
            m: torch.from_numpy(feats[m]) for k, m in enumerate(mods) if present[..., k].any()
        },
        present=torch.from_numpy(present),
        valid=torch.from_numpy(valid),
        labels=torch.from_numpy(labels),
        prev_index=torch.from_numpy(prev),
        speaker_prev_index=torch.from_numpy(spk_prev),
    )


def batches(
    dialogues: Sequence[Dialogue], size: int, rng: np.random.Generator | None
) -> Iterator[list[Dialogue]]:
    """Dialogues in batches; shuffled when an rng is given."""
    order = np.arange(len(dialogues))
    if rng is not None:
        rng.shuffle(order)
    for start in range(0, len(order), size):
        yield [dialogues[i] for i in order[start : start + size]]
