"""Model configuration: a frozen, validated dataclass, importable without torch.

Saved as JSON beside the weights of every checkpoint, so a checkpoint always
says what network it holds.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from model.errors import ConfigError

MODALITIES: tuple[str, ...] = ("text", "audio", "visual")
Mode = Literal["causal", "paper"]

# Paper class orders, kept so numbers and confusion matrices compare with the
# literature (shared/data/README.md).
MELD_EMOTIONS: tuple[str, ...] = (
    "neutral",
    "surprise",
    "fear",
    "sadness",
    "joy",
    "disgust",
    "anger",
)
IEMOCAP_EMOTIONS: tuple[str, ...] = ("happy", "sad", "neutral", "angry", "excited", "frustrated")
MELD_SENTIMENTS: tuple[str, ...] = ("neutral", "positive", "negative")


@dataclass(frozen=True)
class ModelConfig:
    """The network's shape and its two modes.

    Attributes:
        mode: ``causal`` (unidirectional GRU, attention over the last
            ``window_utterances`` utterances; the streaming model) or ``paper``
            (bidirectional GRU, full attention over the dialogue, as published).
        text_dim, audio_dim, visual_dim: input feature sizes; 0 means the model
            has no branch for that modality at all. Text is required (ACME is
            text-centred).
        d_model: the common width d.
        rume_layers, acme_layers, heads: depth of RUME and ACME, heads per attention.
        window_utterances: W, how many utterances (the new one included) the
            causal attention sees; older context reaches the model through the GRU.
        label_names: the emotion classes, in output order.
        lesm_hidden: the LESM shift classifier's hidden width.
        rume_dropout, acme_dropout, lesm_dropout: dropout rates (training only).
        max_speakers: speakers remembered per conversation for the same-speaker
            shift comparison; the least recently heard is forgotten beyond this.
        feature_spec: the feature extractor the model was trained on; inputs
            carrying another spec are refused upstream.
        emotion_temperature, shift_temperature: temperature scaling of the
            emotion logits and of LESM's shift logits (logits / T), fitted on
            the validation split after training (model/calibration.py); 1.0 =
            uncalibrated. Part of the config, so part of the fingerprint, and
            applied inside the network: the step and the whole-dialogue forward
            give the same calibrated numbers.
    """

    mode: Mode = "causal"
    text_dim: int = 384
    audio_dim: int = 0
    visual_dim: int = 0
    d_model: int = 384
    rume_layers: int = 2
    acme_layers: int = 3
    heads: int = 8
    window_utterances: int = 8
    label_names: tuple[str, ...] = MELD_EMOTIONS
    lesm_hidden: int = 128
    rume_dropout: float = 0.15
    acme_dropout: float = 0.3
    lesm_dropout: float = 0.05
    max_speakers: int = 16
    feature_spec: str = "minilm-l6-v2"
    name: str = "cfnesa"
    emotion_temperature: float = 1.0
    shift_temperature: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.mode not in ("causal", "paper"):
            raise ConfigError(f"mode must be 'causal' or 'paper', got {self.mode!r}")
        if self.text_dim <= 0:
            raise ConfigError("text_dim must be positive: ACME is text-centred")
        for name in ("audio_dim", "visual_dim"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 (0 = no such modality)")
        for name in ("d_model", "rume_layers", "acme_layers", "heads", "lesm_hidden"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.heads:
            raise ConfigError(f"d_model ({self.d_model}) must be divisible by heads ({self.heads})")
        if self.window_utterances < 1:
            raise ConfigError("window_utterances must be >= 1")
        if len(self.label_names) < 2:
            raise ConfigError("at least two emotion classes are needed")
        if len(set(self.label_names)) != len(self.label_names):
            raise ConfigError(f"duplicate label names: {self.label_names}")
        for name in ("rume_dropout", "acme_dropout", "lesm_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1)")
        if self.max_speakers < 1:
            raise ConfigError("max_speakers must be >= 1")
        for name in ("emotion_temperature", "shift_temperature"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0.0 < value < 1e3):
                raise ConfigError(f"{name} must be a positive number below 1000, got {value!r}")
        if not self.feature_spec:
            raise ConfigError("feature_spec must be a non-empty string")
        # label_names may arrive as a list from JSON
        object.__setattr__(self, "label_names", tuple(self.label_names))

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modalities this model has a branch for, text first."""
        return tuple(m for m in MODALITIES if self.dim(m) > 0)

    def dim(self, modality: str) -> int:
        """Input feature size of one modality (0 if the model lacks it)."""
        if modality not in MODALITIES:
            raise ConfigError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
        return int(getattr(self, f"{modality}_dim"))

    @property
    def causal(self) -> bool:
        return self.mode == "causal"

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["label_names"] = list(self.label_names)
        # added later: left out at their neutral value, so the config (and the
        # fingerprint) of every uncalibrated checkpoint stays what it was
        for name in ("emotion_temperature", "shift_temperature"):
            if d[name] == 1.0:
                del d[name]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown config keys: {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError("config JSON must be an object")
        return cls.from_dict(data)


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The paper's settings, with its feature sizes (official features).

    ``meld``: d=384, 3 ACME layers; ``iemocap``: d=512, 5 ACME layers. Both in
    ``paper`` mode unless overridden. ``streaming``: our default causal,
    text-only model on MiniLM features.
    """
    presets: dict[str, dict[str, Any]] = {
        "meld": dict(
            mode="paper",
            text_dim=1024,
            audio_dim=300,
            visual_dim=342,
            d_model=384,
            acme_layers=3,
            rume_dropout=0.15,
            acme_dropout=0.3,
            label_names=MELD_EMOTIONS,
            feature_spec="official-meld",
            name="cfnesa-meld",
        ),
        "iemocap": dict(
            mode="paper",
            text_dim=1024,
            audio_dim=1582,
            visual_dim=342,
            d_model=512,
            acme_layers=5,
            rume_dropout=0.2,
            acme_dropout=0.4,
            label_names=IEMOCAP_EMOTIONS,
            feature_spec="official-iemocap",
            name="cfnesa-iemocap",
        ),
        "streaming": dict(mode="causal", name="cfnesa-meld-minilm"),
    }
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; expected one of {sorted(presets)}")
    return ModelConfig(**{**presets[name], **overrides})
