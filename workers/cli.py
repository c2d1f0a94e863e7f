"""The `cfnesa` command line.

    cfnesa finetune-encoder --data meld --out DIR fine-tune MiniLM as a LoRA adapter
    cfnesa features  --data meld                  encode a transcript file (cached)
    cfnesa train     --data meld --out runs/x     train, choose the epoch on valid, report test
    cfnesa eval      --checkpoint DIR --data meld score a checkpoint (and its calibration)
    cfnesa calibrate --checkpoint DIR --out DIR   fit the heads' temperatures on valid
    cfnesa eval-alerts --checkpoint meld          alerts vs the gold negative episodes of a split
    cfnesa fit-alerts  --crossfit F0 .. F4        learn the alert head from cross-fitted runs
    cfnesa services                               embedded Kafka (Tansu) + redis-server
    cfnesa worker                                 an emotion worker (settings: CFNESA_*)
    cfnesa demo                                   the whole pipeline on embedded services
    cfnesa gateway / token                        WebSocket gateway + dashboard, its tokens

``--data`` takes a path to a JSONL transcript file or the name of one in the
data folder (``$CFNESA_DATA_DIR``, default ``../shared/data``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from workers.cli_data import (
    _adapter,
    _add_data_args,
    _checkpoint_features,
    _load_features,
    _transcript_path,
)


def _given(**values: Any) -> dict[str, Any]:
    """The options the user gave (argparse leaves the others None)."""
    return {k: v for k, v in values.items() if v is not None}


def cmd_features(args: argparse.Namespace) -> int:
    from model.encoder import encode_transcripts

    out = Path(args.out) if args.out else None
    fs = encode_transcripts(
        _transcript_path(args.data),
        out_path=out,
        label_field=args.label_field,
        adapter=_adapter(args),
    )
    print(fs.summary())
    return 0


def cmd_finetune_encoder(args: argparse.Namespace) -> int:
    from model.finetune import FinetuneConfig, finetune_encoder

    overrides = _given(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        rank=args.rank,
        seed=args.seed,
        context=args.context,
        context_tokens=args.context_tokens,
    )
    result = finetune_encoder(
        _transcript_path(args.data),
        args.out,
        FinetuneConfig(**overrides),
        label_field=args.label_field,
        threads=args.threads,
        progress=not args.quiet,
    )
    print(
        f"adapter {result.feature_spec} in {result.out_dir}: best epoch {result.best_epoch + 1}, "
        f"valid wF1 {result.valid.weighted_f1:.2f}"
        + (f", test wF1 {result.test.weighted_f1:.2f}" if result.test else "")
        + " (linear head on the sentence vectors"
        + (f", {result.context} previous utterances)" if result.context else ", no context)")
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from model.config import ModelConfig, preset
    from model.train import train, train_preset

    features = _load_features(args)
    if args.fold is not None:
        # cross-fitting: train without one fold of the train split; the card names it
        features = features.hold_out(args.folds, args.fold)
    print(features.summary())
    overrides = _given(
        mode=args.mode,
        d_model=args.d_model,
        acme_layers=args.acme_layers,
        rume_layers=args.rume_layers,
        heads=args.heads,
        window_utterances=args.window,
        rume_dropout=args.rume_dropout,
        acme_dropout=args.acme_dropout,
        name=args.name,
    )
    model_config = preset(args.preset, **overrides) if args.preset else ModelConfig(**overrides)
    train_overrides = _given(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        emotion_loss=args.loss,
        shift_lambda=args.shift_lambda,
        patience=args.patience,
        modality_dropout=args.modality_dropout,
        lesm_second_pass=None if args.second_pass is None else args.second_pass == "on",  # noqa: S105
    )
    train_config = train_preset(args.train_preset, **train_overrides)
    result = train(
        features,
        model_config,
        train_config,
        args.out,
        progress=not args.quiet,
        half_weights=args.half,
    )
    print(f"best epoch {result.best_epoch}: valid wF1 {result.valid.weighted_f1:.2f}")
    if result.test is not None:
        print(
            f"test at the best-validation epoch: acc {result.test.accuracy:.2f} "
            f"wF1 {result.test.weighted_f1:.2f}   (max test wF1 over epochs, for reference only: "
            f"{result.max_test_weighted_f1:.2f})"
        )
    print(f"checkpoint: {result.checkpoint}  fingerprint {result.fingerprint}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from model import calibration
    from model.checkpoint import load_checkpoint
    from model.train import evaluate

    ckpt = load_checkpoint(args.checkpoint)
    features = _checkpoint_features(args, ckpt)
    dialogues = features.split(args.split)
    scores = evaluate(ckpt.model, dialogues)
    report = {
        "checkpoint": str(ckpt.path),
        "model": ckpt.model_id,
        "split": args.split,
        **scores.to_dict(),
        # before = the raw heads (T = 1), after = the checkpoint's temperatures
        "calibration": calibration.report(ckpt.model, dialogues),
    }
    if args.reliability:
        calibration.reliability_diagram(
            ckpt.model, dialogues, args.reliability, f"{ckpt.model_id}, {args.split} split"
        )
        report["reliability_diagram"] = args.reliability
    print(json.dumps(report, indent=2))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Fit the two temperatures on the validation split; write a new checkpoint."""
    from model import calibration
    from model.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(args.checkpoint)
    features = _checkpoint_features(args, ckpt)
    valid = features.split("valid")
    t_emotion, t_shift = calibration.fit(ckpt.model, valid)
    ckpt.model.config = ckpt.config.replace(
        emotion_temperature=t_emotion, shift_temperature=t_shift
    )
    card = dict(ckpt.card)
    card["calibration"] = {
        "fitted_on": "valid",
        "valid": calibration.report(ckpt.model, valid),
        "test": calibration.report(ckpt.model, features.split("test"))
        if "test" in features.splits()
        else None,
    }
    card["calibrated_from"] = ckpt.model_id
    half = card.get("weights_dtype") == "float16"
    fp = save_checkpoint(args.out, ckpt.model, card, half=half)
    if ckpt.path is not None and (ckpt.path / "alert_head.json").is_file():
        # the head read the old probabilities: it is not copied, refit it (docs/alerts.md)
        print("note: alert_head.json not copied; refit it with `cfnesa fit-alerts`")
    after = card["calibration"]["valid"]["after"]
    before = card["calibration"]["valid"]["before"]
    print(
        f"{args.out}: {ckpt.config.name}@{fp}  emotion T={t_emotion:g} (valid ECE "
        f"{before['emotion']['ece']:.4f} -> {after['emotion']['ece']:.4f}), shift T={t_shift:g} "
        f"(valid ECE {before['shift']['ece']:.4f} -> {after['shift']['ece']:.4f})"
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The whole pipeline on embedded services; Ctrl-C stops it (workers/demo.py)."""
    import asyncio
    import signal

    from workers.demo import run_demo

    async def main() -> dict[str, Any]:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await run_demo(
            data=_transcript_path(args.data),
            split=args.split,
            calls=args.calls,
            rate=args.rate,
            limit=args.limit,
            checkpoint=Path(args.checkpoint) if args.checkpoint else None,
            stop=stop,
            gateway_port=args.gateway_port,
            analyze_roles=args.analyze_roles,
        )

    counts = asyncio.run(main())
    return 0 if counts.get("emotion") or args.limit is None else 1


def cmd_services(args: argparse.Namespace) -> int:
    """Embedded Tansu + redis-server until Ctrl-C, with the settings to reach them."""
    import signal
    import threading

    from streaming.embedded import Services
    from streaming.settings import Settings

    base = Settings()
    topics = {
        base.input_topic: args.partitions,
        base.output_topic: args.partitions,
        base.dlq_topic: 1,
        base.text_topic: args.partitions,
        f"{base.text_topic}.dlq": 1,
    }
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    with Services(topics=topics) as services:
        print(
            f"kafka (tansu, in memory): {services.bootstrap}\n"
            f"redis:                    {services.redis_url}\n\n"
            "in another terminal:\n"
            f"  export CFNESA_KAFKA_BOOTSTRAP={services.bootstrap}\n"
            f"  export CFNESA_REDIS_URL={services.redis_url}\n"
            "  cfnesa worker & cfnesa featurize & cfnesa tail\n"
            "  cfnesa replay --mode text --calls 8\n\n"
            "Ctrl-C stops both.",
            flush=True,
        )
        done.wait()
    print("services stopped", flush=True)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    import signal

    # stopped while still starting (importing torch, loading the model): nothing to finish
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    import asyncio
    import logging

    from streaming.settings import WorkerSettings
    from workers.worker import serve

    overrides = {
        k: v
        for k, v in {
            "kafka_bootstrap": args.bootstrap,
            "redis_url": args.redis,
            "checkpoint": args.checkpoint,
            "metrics_port": args.metrics_port,
            "alert_rules": args.alert_rules,
        }.items()
        if v is not None
    }
    settings = WorkerSettings(**overrides)
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return asyncio.run(serve(settings))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cfnesa", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "finetune-encoder", help="fine-tune MiniLM on labelled transcripts as a LoRA adapter"
    )
    p.add_argument(
        "--data", default="meld", help="transcript JSONL path, or a name in the data folder"
    )
    p.add_argument("--label-field", default="emotion", help="utterance field holding the labels")
    p.add_argument("--out", required=True, help="adapter folder (resumes an interrupted run)")
    p.add_argument("--epochs", type=int, help="default 3; the epoch is chosen on valid")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="LoRA learning rate (default 1e-3)")
    p.add_argument("--rank", type=int, help="LoRA rank (default 16)")
    p.add_argument(
        "--context",
        type=int,
        help="previous utterances of the call read with each one (default 0: none; causal)",
    )
    p.add_argument("--context-tokens", type=int, help="token budget of that context (default 64)")
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_finetune_encoder)

    p = sub.add_parser("features", help="encode a transcript file with MiniLM (cached)")
    p.add_argument("--data", default="meld")
    p.add_argument("--label-field", default="emotion")
    p.add_argument("--out", help="feature file path (default: the cache folder)")
    p.add_argument(
        "--adapter", help='encoder adapter folder, or "none" for plain MiniLM (default: shipped)'
    )
    p.set_defaults(func=cmd_features)

    p = sub.add_parser("train", help="train CFN-ESA; epoch chosen on valid, test reported there")
    _add_data_args(p)
    p.add_argument("--out", required=True, help="run folder (resumes when it holds a run)")
    p.add_argument("--preset", choices=["meld", "iemocap", "streaming"], help="model preset")
    p.add_argument("--train-preset", choices=["meld", "iemocap", "streaming"], default="streaming")
    p.add_argument("--mode", choices=["causal", "paper"])
    p.add_argument("--d-model", type=int)
    p.add_argument("--acme-layers", type=int)
    p.add_argument("--rume-layers", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--window", type=int, help="causal attention window W (utterances)")
    p.add_argument("--rume-dropout", type=float)
    p.add_argument("--acme-dropout", type=float)
    p.add_argument("--name", help="model name carried by events")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--loss", choices=["focal", "weighted_nll", "nll"])
    p.add_argument("--shift-lambda", type=float)
    p.add_argument("--second-pass", choices=["on", "off"], help="LESM second ACME pass")
    p.add_argument("--patience", type=int)
    p.add_argument("--modality-dropout", type=float)
    p.add_argument("--half", action="store_true", help="store the weights as float16")
    p.add_argument(
        "--fold",
        type=int,
        help="cross-fitting: hold out this fold of the train dialogues (see --folds)",
    )
    p.add_argument("--folds", type=int, default=5, help="number of folds for --fold")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="score a checkpoint on a split")
    _add_data_args(p)
    p.add_argument("--checkpoint", help="checkpoint folder (default: the shipped model)")
    p.add_argument("--split", default="test")
    p.add_argument("--reliability", help="write a reliability diagram (PNG) of both heads here")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "calibrate", help="fit the heads' temperatures on valid; write a calibrated checkpoint"
    )
    _add_data_args(p)
    p.add_argument("--checkpoint", help="checkpoint folder (default: the shipped model)")
    p.add_argument("--out", required=True, help="folder of the calibrated checkpoint")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("worker", help="run an emotion worker (settings from CFNESA_* variables)")
    p.add_argument("--bootstrap", help="Kafka bootstrap servers (CFNESA_KAFKA_BOOTSTRAP)")
    p.add_argument("--redis", help="Redis URL (CFNESA_REDIS_URL)")
    p.add_argument("--checkpoint", help="model folder (default: the shipped one)")
    p.add_argument("--alert-rules", help="alert rules TOML (default: built in)")
    p.add_argument("--metrics-port", type=int, help="Prometheus /metrics port, 0: none")
    p.set_defaults(func=cmd_worker)

    from workers.cli_alerts import register as register_alerts
    from workers.cli_gateway import register as register_gateway
    from workers.cli_pipeline import register

    register(sub)
    register_gateway(sub)
    register_alerts(sub)

    p = sub.add_parser("services", help="embedded Kafka (Tansu) and redis-server until Ctrl-C")
    p.add_argument("--partitions", type=int, default=4, help="partitions of the main topics")
    p.set_defaults(func=cmd_services)

    p = sub.add_parser(
        "demo", help="the whole pipeline on embedded services, live emotions and alerts"
    )
    p.add_argument("--data", default="meld", help="transcript file or name in the data folder")
    p.add_argument("--split", default="test")
    p.add_argument("--checkpoint", help="model folder (default: the shipped model)")
    p.add_argument("--calls", type=int, default=6, help="concurrent calls")
    p.add_argument("--rate", type=float, default=6.0, help="utterances per second, all calls")
    p.add_argument("--limit", type=int, help="stop after this many conversations ended")
    p.add_argument("--gateway-port", type=int, help="dashboard port (default: a free one)")
    p.add_argument(
        "--analyze-roles",
        help="roles whose emotions are inferred, e.g. customer (default: all; the replayed "
        "calls' first speaker is the agent)",
    )
    p.set_defaults(func=cmd_demo)
    return parser


def _describe(exc: Any) -> str:
    """A pydantic ValidationError as one line per problem, without the input values
    (they may hold passwords)."""
    lines = []
    for error in exc.errors(include_url=False, include_input=False):
        where = ".".join(str(part) for part in error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        lines.append(f"{where}: {message}" if where else message)
    return "; ".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pydantic import ValidationError

    from model.errors import CFNESAError
    from streaming.alerts import AlertRulesError
    from streaming.errors import FatalError

    try:
        return int(args.func(args))
    except CFNESAError as exc:
        print(f"cfnesa: {exc}", file=sys.stderr)
        return 1
    except FatalError as exc:
        # a wrong password, an untrusted certificate, a missing topic, a refused
        # request: waiting will not fix it, the orchestrator should see the failure
        print(f"cfnesa: {exc}", file=sys.stderr)
        return 1
    except ValidationError as exc:  # CFNESA_* settings that cannot work
        print(f"cfnesa: invalid settings: {_describe(exc)}", file=sys.stderr)
        return 2
    except AlertRulesError as exc:  # the rules file names what is wrong
        print(f"cfnesa: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cfnesa: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
