"""The data options the training, evaluation and alert commands share (``--data``,
``--features``, ``--adapter``, ``--official``) and the features they name. Its own
module so that the command modules (cli.py, cli_alerts.py) need not import each other.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def _transcript_path(data: str) -> Path:
    from model.data import default_data_dir

    path = Path(data)
    if path.is_file():
        return path
    candidate = default_data_dir() / f"{data}.jsonl"
    if candidate.is_file():
        return candidate
    raise SystemExit(f"cfnesa: no transcript file {data!r} (nor {candidate})")


def _load_features(args: argparse.Namespace) -> Any:
    from model.data import FeatureSet

    if getattr(args, "official", None):
        from model.official import load_official_features

        return load_official_features(
            args.official, dataset=args.official_dataset, trust_pickle=args.trust_pickle
        )
    if getattr(args, "features", None):
        return FeatureSet.load(args.features)
    from model.encoder import encode_transcripts

    return encode_transcripts(
        _transcript_path(args.data), label_field=args.label_field, adapter=_adapter(args)
    )


def _adapter(args: argparse.Namespace) -> Any:
    """--adapter: a folder, "none" (plain MiniLM), or unset (the shipped adapter)."""
    from model.encoder import DEFAULT

    value = getattr(args, "adapter", None)
    if value is None:
        return DEFAULT
    return None if value == "none" else value


def _checkpoint_features(args: argparse.Namespace, ckpt: Any) -> Any:
    """The --data features made by the encoder the checkpoint was trained on."""
    if getattr(args, "adapter", None) is None and not (
        getattr(args, "features", None) or getattr(args, "official", None)
    ):
        from model.encoder import adapter_for_spec

        # the encoder the model was trained on (plain MiniLM or an installed adapter)
        found = adapter_for_spec(ckpt.config.feature_spec)
        args.adapter = "none" if found is None else str(found)
    features = _load_features(args)
    if features.feature_spec != ckpt.config.feature_spec:
        raise SystemExit(
            f"cfnesa: features are {features.feature_spec!r}, the model was trained on "
            f"{ckpt.config.feature_spec!r}"
        )
    return features


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data", default="meld", help="transcript JSONL path, or a name in the data folder"
    )
    p.add_argument("--label-field", default="emotion", help="utterance field holding the labels")
    p.add_argument(
        "--features", help="a feature file written by `cfnesa features` instead of --data"
    )
    p.add_argument(
        "--adapter", help='encoder adapter folder, or "none" for plain MiniLM (default: shipped)'
    )
    p.add_argument("--official", help="the authors' official feature pickle instead of --data")
    p.add_argument("--official-dataset", choices=["meld", "iemocap"], default=None)
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow loading --official (pickle runs code: only files you trust)",
    )
