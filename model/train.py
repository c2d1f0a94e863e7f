"""Training and evaluation of CFN-ESA on a FeatureSet.

Protocol (docs/MODEL.md): the epoch is chosen on the VALIDATION split, and the
test score reported is the one at that epoch; the best test score over all
epochs is printed beside it, labelled as such, never instead of it.

Runs are resumable: after every epoch ``<out>/resume.pt`` holds the model,
the optimiser, the RNG states and the history, and a rerun with the same
output directory continues from there.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from model import calibration
from model.batching import batches, make_batch
from model.checkpoint import save_checkpoint
from model.config import ModelConfig
from model.data import Dialogue, FeatureSet
from model.errors import ConfigError, DataError
from model.metrics import Scores, score
from model.network import CFNESA

LossKind = Literal["focal", "weighted_nll", "nll"]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. The defaults suit the streaming model on MiniLM
    text features; ``train_preset`` gives the paper's."""

    epochs: int = 40
    batch_size: int = 32
    lr: float = 2e-4
    weight_decay: float = 1e-5
    emotion_loss: LossKind = "focal"
    focal_gamma: float = 2.5
    shift_lambda: float = 0.9
    lesm_second_pass: bool = True
    modality_dropout: float = 0.2
    patience: int = 8
    grad_clip: float = 1.0
    seed: int = 0
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("epochs and batch_size must be >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError("lr must be positive")
        if self.emotion_loss not in ("focal", "weighted_nll", "nll"):
            raise ConfigError(f"unknown emotion_loss {self.emotion_loss!r}")
        if not 0.0 <= self.modality_dropout < 1.0:
            raise ConfigError("modality_dropout must be in [0, 1)")
        if self.shift_lambda < 0:
            raise ConfigError("shift_lambda must be >= 0")


def train_preset(name: str, **overrides: Any) -> TrainConfig:
    """The official training settings (``meld``, ``iemocap``) or ours (``streaming``)."""
    presets: dict[str, dict[str, Any]] = {
        "meld": dict(epochs=60, batch_size=64, lr=1e-5, emotion_loss="focal", shift_lambda=0.9),
        "iemocap": dict(
            epochs=80, batch_size=32, lr=2e-5, emotion_loss="weighted_nll", shift_lambda=1.0
        ),
        "streaming": {},
    }
    if name not in presets:
        raise ConfigError(f"unknown training preset {name!r}; expected one of {sorted(presets)}")
    return TrainConfig(**{**presets[name], **overrides})


# ------------------------------------------------------------------ batches


# ------------------------------------------------------------------- losses


def focal_loss(logits: Tensor, target: Tensor, gamma: float) -> Tensor:
    """Standard focal loss on probabilities: mean of -(1 - p_t)^gamma log p_t."""
    logp = F.log_softmax(logits, dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return (-((1 - logp.exp()) ** gamma) * logp).mean()


def emotion_loss(
    logits: Tensor, labels: Tensor, train: TrainConfig, class_weights: Tensor
) -> Tensor:
    """Loss over the labelled, real utterances only. logits (B, L, C), labels (B, L)."""
    keep = labels >= 0
    lg, y = logits[keep], labels[keep]
    if train.emotion_loss == "focal":
        return focal_loss(lg, y, train.focal_gamma)
    weight = class_weights if train.emotion_loss == "weighted_nll" else None
    return F.cross_entropy(lg, y, weight=weight)


def shift_loss(pair_logits: Tensor, labels: Tensor, causal: bool, weights: Tensor) -> Tensor:
    """Class-weighted NLL over pairs (i, j) of labelled utterances: target 1 if
    their emotions differ. Causal models learn pairs with j < i only (the
    comparisons they serve); paper mode learns every pair i != j."""
    lab = labels >= 0
    seq = labels.shape[1]
    i = torch.arange(seq)
    order = (i.view(-1, 1) > i.view(1, -1)) if causal else (i.view(-1, 1) != i.view(1, -1))
    keep = lab.unsqueeze(2) & lab.unsqueeze(1) & order  # (B, L, L)
    target = (labels.unsqueeze(2) != labels.unsqueeze(1)).long()
    if not bool(keep.any()):
        return pair_logits.sum() * 0.0
    return F.cross_entropy(pair_logits[keep], target[keep], weight=weights)


def shift_weights(dialogues: Sequence[Dialogue], causal: bool) -> Tensor:
    """Inverse-frequency weights for (no shift, shift) over training pairs."""
    same = diff = 0
    for d in dialogues:
        y = d.labels[d.labels >= 0]
        eq = y[:, None] == y[None, :]
        pairs = np.tril(np.ones_like(eq), -1) if causal else ~np.eye(len(y), dtype=bool)
        same += int((eq & pairs.astype(bool)).sum())
        diff += int((~eq & pairs.astype(bool)).sum())
    total = max(same + diff, 1)
    w = torch.tensor([total / max(same, 1), total / max(diff, 1)], dtype=torch.float32)
    return w / w.sum()


def class_weights(counts: np.ndarray) -> Tensor:
    """Inverse class frequency, normalised to mean 1 over the classes seen."""
    c = counts.astype(np.float64)
    w = np.where(c > 0, c.sum() / np.maximum(c, 1), 0.0)
    seen = w > 0
    w[seen] /= w[seen].mean()
    return torch.tensor(w, dtype=torch.float32)


# --------------------------------------------------------------- evaluation


@torch.inference_mode()
def predict(model: CFNESA, dialogues: Sequence[Dialogue], batch_size: int = 64) -> np.ndarray:
    """Argmax predictions for every utterance, concatenated in dialogue order."""
    model.eval()
    preds = []
    for chunk in batches(dialogues, batch_size, None):
        b = make_batch(chunk, model.config)
        logits = model(b.features, b.present, b.valid, b.prev_index, b.speaker_prev_index).logits
        for i, d in enumerate(chunk):
            preds.append(logits[i, : d.length].argmax(-1).numpy())
    return np.concatenate(preds) if preds else np.zeros(0, np.int64)


def evaluate(model: CFNESA, dialogues: Sequence[Dialogue]) -> Scores:
    true = np.concatenate([d.labels for d in dialogues])
    return score(true, predict(model, dialogues), model.config.label_names)


# ----------------------------------------------------------------- training


@dataclass
class EpochRecord:
    epoch: int
    loss: float
    valid: dict[str, Any]
    test: dict[str, Any] | None
    seconds: float


@dataclass
class TrainResult:
    best_epoch: int
    valid: Scores
    test: Scores | None
    history: list[EpochRecord] = field(default_factory=list)
    checkpoint: Path | None = None
    fingerprint: str = ""

    @property
    def max_test_weighted_f1(self) -> float | None:
        scores = [r.test["weighted_f1"] for r in self.history if r.test]
        return max(scores) if scores else None


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(
    features: FeatureSet,
    model_config: ModelConfig,
    train_config: TrainConfig,
    out_dir: str | Path,
    *,
    progress: bool = True,
    half_weights: bool = False,
    log: Any = print,
) -> TrainResult:
    """Train on the ``train`` split, choose the epoch on ``valid``, report ``test``.

    Writes the best-validation checkpoint to ``out_dir/best`` (with a model
    card) and ``out_dir/history.json``; resumes from ``out_dir/resume.pt``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_set, valid_set = features.split("train"), features.split("valid")
    test_set = features.split("test") if "test" in features.splits() else []
    if not train_set or not valid_set:
        raise DataError(f"need 'train' and 'valid' splits, the feature set has {features.splits()}")
    if tuple(features.label_names) != model_config.label_names:
        model_config = model_config.replace(label_names=tuple(features.label_names))
    if model_config.feature_spec != features.feature_spec:
        model_config = model_config.replace(feature_spec=features.feature_spec)
    for m in ("text", "audio", "visual"):
        if features.dims.get(m, 0) != model_config.dim(m):
            model_config = model_config.replace(**{f"{m}_dim": features.dims.get(m, 0)})
    if train_config.threads:
        torch.set_num_threads(train_config.threads)

    _seed_everything(train_config.seed)
    model = CFNESA(model_config)
    optimiser = torch.optim.AdamW(
        model.parameters(), lr=train_config.lr, weight_decay=train_config.weight_decay, amsgrad=True
    )
    cw = class_weights(features.class_counts("train"))
    sw = shift_weights(train_set, model_config.causal)
    rng = np.random.default_rng(train_config.seed)
    history: list[EpochRecord] = []
    start_epoch, best_epoch, best_valid = 1, 0, -1.0
    elapsed = 0.0
    best_state: dict[str, Tensor] | None = None

    resume = out / "resume.pt"
    if resume.is_file():
        saved = torch.load(resume, weights_only=False)  # our own file, written below
        if saved["model_config"] != model_config.to_dict() or saved[
            "train_config"
        ] != dataclasses.asdict(train_config):
            raise ConfigError(f"{resume} was written with other settings; use another --out")
        model.load_state_dict(saved["model"])
        best_state = saved["best_model"]
        optimiser.load_state_dict(saved["optimiser"])
        rng.bit_generator.state = saved["rng"]
        torch.set_rng_state(saved["torch_rng"])
        history = [EpochRecord(**r) for r in saved["history"]]
        start_epoch, best_epoch, best_valid = (
            saved["epoch"] + 1,
            saved["best_epoch"],
            saved["best_valid"],
        )
        elapsed = saved["elapsed"]
        log(
            f"resuming from epoch {start_epoch} (best so far: epoch {best_epoch}, "
            f"valid wF1 {best_valid:.2f})"
        )

    n_utts = sum(d.length for d in train_set)
    for epoch in range(start_epoch, train_config.epochs + 1):
        if epoch - best_epoch > train_config.patience and best_epoch > 0:
            log(f"early stop: no validation gain for {train_config.patience} epochs")
            break
        t0 = time.perf_counter()
        model.train()
        running, seen = 0.0, 0
        bar = tqdm(
            total=n_utts,
            desc=f"epoch {epoch}/{train_config.epochs}",
            unit="utt",
            disable=not progress,
            leave=False,
            dynamic_ncols=True,
        )
        for chunk in batches(train_set, train_config.batch_size, rng):
            b = make_batch(
                chunk, model_config, modality_dropout=train_config.modality_dropout, rng=rng
            )
            use_pairs = train_config.shift_lambda > 0
            outputs = model(
                b.features,
                b.present,
                b.valid,
                b.prev_index,
                b.speaker_prev_index,
                all_pairs=use_pairs,
            )
            loss = emotion_loss(outputs.logits, b.labels, train_config, cw)
            if use_pairs:
                assert outputs.pair_logits is not None
                loss = loss + train_config.shift_lambda * shift_loss(
                    outputs.pair_logits, b.labels, model_config.causal, sw
                )
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            if train_config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), train_config.grad_clip)
            optimiser.step()
            n = int(b.valid.sum())
            running += float(loss.detach()) * n
            seen += n
            bar.update(n)
            bar.set_postfix(
                loss=f"{running / seen:.4f}", best_valid_wf1=f"{max(best_valid, 0):.2f}"
            )
        bar.close()
        valid_scores = evaluate(model, valid_set)
        test_scores = evaluate(model, test_set) if test_set else None
        seconds = time.perf_counter() - t0
        elapsed += seconds
        history.append(
            EpochRecord(
                epoch=epoch,
                loss=running / max(seen, 1),
                valid=valid_scores.to_dict(),
                test=test_scores.to_dict() if test_scores else None,
                seconds=round(seconds, 1),
            )
        )
        improved = valid_scores.weighted_f1 > best_valid
        if improved:
            best_valid, best_epoch = valid_scores.weighted_f1, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        # one file, replaced atomically: a crash leaves the previous epoch's
        # complete record, never a best model of an epoch it does not know
        tmp = resume.with_suffix(".tmp")
        torch.save(
            {
                "model": model.state_dict(),
                "best_model": best_state,
                "optimiser": optimiser.state_dict(),
                "rng": rng.bit_generator.state,
                "torch_rng": torch.get_rng_state(),
                "history": [dataclasses.asdict(r) for r in history],
                "epoch": epoch,
                "best_epoch": best_epoch,
                "best_valid": best_valid,
                "elapsed": elapsed,
                "model_config": model_config.to_dict(),
                "train_config": dataclasses.asdict(train_config),
            },
            tmp,
        )
        os.replace(tmp, resume)
        test_txt = f" test wF1 {test_scores.weighted_f1:.2f}" if test_scores else ""
        log(
            f"epoch {epoch:3d}  loss {running / max(seen, 1):.4f}  valid wF1 "
            f"{valid_scores.weighted_f1:.2f}{test_txt}  {seconds:.0f}s"
            + ("  *" if improved else "")
        )

    if best_state is None:
        raise DataError("no epoch was trained")
    best = best_state
    if half_weights:
        # score the model that is shipped: weights as stored in float16
        best = {k: v.half().float() if v.is_floating_point() else v for k, v in best.items()}
    model.load_state_dict(best)
    # temperature scaling fitted on valid (argmax unchanged: the scores below are too)
    t_emotion, t_shift = calibration.fit(model, valid_set)
    model_config = model_config.replace(emotion_temperature=t_emotion, shift_temperature=t_shift)
    model.config = model_config
    calibration_card = {
        "fitted_on": "valid",
        "valid": calibration.report(model, valid_set),
        "test": calibration.report(model, test_set) if test_set else None,
    }
    valid_scores = evaluate(model, valid_set)
    test_scores = evaluate(model, test_set) if test_set else None
    result = TrainResult(best_epoch, valid_scores, test_scores, history)
    card = {
        "data": {
            "source": features.source,
            "label_field": features.label_field,
            "splits": {s: len(features.split(s)) for s in features.splits()},
            "utterances": {
                s: int(sum(d.length for d in features.split(s))) for s in features.splits()
            },
        },
        "feature_spec": features.feature_spec,
        "heldout": [d.dialogue_id for d in features.dialogues if d.split == "heldout"],
        "label_names": list(model_config.label_names),
        "selection": "epoch with the best validation weighted-F1; test reported at that epoch",
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "valid": valid_scores.to_dict(),
        "test": test_scores.to_dict() if test_scores else None,
        "max_test_weighted_f1_over_epochs": result.max_test_weighted_f1,
        "train_config": dataclasses.asdict(train_config),
        "calibration": calibration_card,
        "seeds": [train_config.seed],
        "training_seconds": round(elapsed, 1),
        "torch": torch.__version__,
    }
    result.fingerprint = save_checkpoint(out / "best", model, card, half=half_weights)
    result.checkpoint = out / "best"
    (out / "history.json").write_text(
        json.dumps([dataclasses.asdict(r) for r in history], indent=1) + "\n"
    )
    return result
