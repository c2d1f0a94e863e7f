"""Checkpoints: a directory of safetensors weights, config JSON and a model card.

    <dir>/model.safetensors   weights (no pickle; fp16 or fp32)
    <dir>/config.json         ModelConfig
    <dir>/card.json           data set, splits, feature_spec, labels, scores,
                              seeds, training time, fingerprint

The fingerprint names the exact model (config + weights as stored): states and
events carry it, so a state written by one model is never fed to another.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from model.config import ModelConfig
from model.errors import CheckpointError, ConfigError
from model.network import CFNESA

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CARD = "card.json"
SHIPPED = Path(__file__).resolve().parent / "checkpoints"
DEFAULT_CHECKPOINT = SHIPPED / "streaming-meld-minilm"
# the shipped pairs (encoder adapter + model), selectable by name
NAMED = {
    "meld": SHIPPED / "streaming-meld-minilm",
    "iemocap": SHIPPED / "streaming-iemocap-minilm",
}


def resolve_checkpoint(path: str | Path | None) -> Path:
    """A checkpoint folder, or the name of a shipped one ("meld", "iemocap")."""
    if path is None:
        return DEFAULT_CHECKPOINT
    if str(path) in NAMED and not Path(path).is_dir():
        return NAMED[str(path)]
    return Path(path)


def fingerprint(config: ModelConfig, state_dict: dict[str, torch.Tensor]) -> str:
    """A short, stable hash of the config and the weights (16 hex digits)."""
    h = hashlib.sha256(config.to_json().encode())
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


@dataclass
class Checkpoint:
    model: CFNESA
    config: ModelConfig
    card: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""
    path: Path | None = None

    @property
    def model_id(self) -> str:
        """What events carry in their ``model`` field: name@fingerprint."""
        return f"{self.config.name}@{self.fingerprint}"


def save_checkpoint(
    path: str | Path,
    model: CFNESA,
    card: dict[str, Any] | None = None,
    *,
    half: bool = False,
) -> str:
    """Write a checkpoint directory; returns the fingerprint.

    With ``half`` the weights are stored as float16 (half the size); the
    fingerprint is taken of the weights as stored, and loading casts them back
    to float32, so the served model is exactly the stored one.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    fp = fingerprint(model.config, state)
    save_file(state, str(path / WEIGHTS), metadata={"fingerprint": fp})
    (path / CONFIG).write_text(model.config.to_json() + "\n")
    full_card = dict(card or {})
    full_card["fingerprint"] = fp
    full_card["model"] = f"{model.config.name}@{fp}"
    full_card["weights_dtype"] = "float16" if half else "float32"
    full_card["parameters"] = sum(p.numel() for p in model.parameters())
    (path / CARD).write_text(json.dumps(full_card, indent=2, sort_keys=True, default=str) + "\n")
    return fp


def load_checkpoint(path: str | Path | None = None) -> Checkpoint:
    """Load a checkpoint directory or a shipped one by name (default: the MELD model)."""
    path = resolve_checkpoint(path)
    for name in (WEIGHTS, CONFIG):
        if not (path / name).is_file():
            raise CheckpointError(f"{path} is not a checkpoint: {name} is missing")
    try:
        config = ModelConfig.from_json((path / CONFIG).read_text())
    except ConfigError as exc:
        raise CheckpointError(f"{path / CONFIG}: {exc}") from exc
    state = load_file(str(path / WEIGHTS))
    fp = fingerprint(config, state)
    model = CFNESA(config)
    try:
        model.load_state_dict(
            {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        )
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the config: {exc}") from exc
    card: dict[str, Any] = {}
    if (path / CARD).is_file():
        card = json.loads((path / CARD).read_text())
        if card.get("fingerprint") not in (None, fp):
            raise CheckpointError(
                f"{path}: card fingerprint {card['fingerprint']} != weights' {fp} (files mixed?)"
            )
    model.eval()
    return Checkpoint(model=model, config=config, card=card, fingerprint=fp, path=path)
