"""`cfnesa eval-alerts` and `cfnesa fit-alerts`: alerts against labelled calls."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _setup(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """The engine, its data's features (the encoder it was trained on) and the rules."""
    from model.checkpoint import load_checkpoint
    from model.engine import StreamingEngine
    from streaming.alerts import AlertRules
    from workers.alert_eval import load_head
    from workers.cli_data import _checkpoint_features

    ckpt = load_checkpoint(args.checkpoint)
    engine = StreamingEngine(ckpt.model, ckpt.fingerprint)
    engine.path = ckpt.path
    features = _checkpoint_features(args, ckpt)
    rules = AlertRules.load(args.rules, head=load_head(ckpt.path), labels=ckpt.config.label_names)
    return engine, features, rules


def _negative(args: argparse.Namespace) -> frozenset[str] | None:
    if not args.negative:
        return None
    return frozenset(x.strip() for x in args.negative.split(",") if x.strip())


def cmd_eval_alerts(args: argparse.Namespace) -> int:
    from workers.alert_eval import evaluate_alerts, plot_curve

    engine, features, rules = _setup(args)
    gold_negative = _negative(args)
    unknown = (gold_negative or frozenset()) - set(features.label_names)
    if unknown:
        raise SystemExit(
            f"cfnesa: --negative names {sorted(unknown)}, not labels of the data "
            f"({', '.join(features.label_names)})"
        )
    dialogues = features.split(args.split)
    print(
        f"eval-alerts: {engine.config.name}@{engine.fingerprint} on {len(dialogues)} "
        f"{args.split} calls, rules {args.rules or 'built in'}",
        flush=True,
    )
    report = evaluate_alerts(
        engine,
        rules,
        dialogues,
        features.label_names,
        gold_negative=gold_negative,
        slack=args.slack,
        seed=args.seed,
        roles=args.roles,
    )
    report = {
        "model": f"{engine.config.name}@{engine.fingerprint}",
        "data": features.source,
        "split": args.split,
        "rules": str(args.rules) if args.rules else "built in",
        **report,
    }
    _print_report(report)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"written: {args.json}")
    if args.plot:
        plot_curve(report, args.plot, f"{report['model']}, {args.split}: alerts vs gold episodes")
        print(f"written: {args.plot}")
    return 0


def _print_report(r: dict[str, Any]) -> None:
    print(
        f"{r['episodes']} gold negative episodes in {r['utterances']} utterances "
        f"(negative: {', '.join(r['gold_negative'])}; slack {r['slack']})"
        + ("" if r.get("roles", "none") == "none" else f"; customers' only (roles {r['roles']})")
    )
    head = f"{'':22s} {'precision':>9s} {'recall':>7s} {'F1':>6s} {'per 100':>8s} {'redundant':>9s}"
    print(head)
    rows = [("product (all rules)", r["product"])]
    rows += [(f"  {k}", v) for k, v in r["per_rule"].items()]
    rows += [("naive rule", r["naive"]), ("random, same rate", r["random"])]
    for name, f in rows:
        print(
            f"{name:22s} {f['precision']:9.1f} {f['recall']:7.1f} {f['f1']:6.1f} "
            f"{f['alerts_per_100_utterances']:8.1f} {f['redundant']:9d}"
            + (
                f"   median delay {f['median_delay_utterances']:g}"
                if f["median_delay_utterances"] is not None
                else ""
            )
        )
    print("precision at equal alert budgets (product vs naive):")
    for b, v in r["budgets"].items():
        short = (
            ""
            if v["product"].get("reached_budget", True)
            else f"   (the product cannot raise that many: {v['product']['alerts']} alerts at most)"
        )
        print(
            f"  {b:>2s} per 100 utterances: {v['product']['precision']:5.1f} vs "
            f"{v['naive']['precision']:5.1f}{short}"
        )


def cmd_fit_alerts(args: argparse.Namespace) -> int:
    from workers.alert_eval import HEAD_FILE, evaluate_alerts, stream
    from workers.alert_fit import fit_alerts, out_of_fold, package

    engine, features, rules = _setup(args)
    gold_negative = _negative(args)
    print("out-of-fold results of the cross-fitted models:", flush=True)
    train = out_of_fold(args.crossfit, features)
    found = fit_alerts(
        train, features.label_names, rules, slack=args.slack, gold_negative=gold_negative
    )
    # validation chooses among what train learned (the shipped model, the valid split)
    valid = features.split("valid")
    outs = stream(engine, valid)
    candidates = {"current rules": rules, **{n: c.rules(rules) for n, c in found.items()}}
    print("validation (the shipped model on the valid split) chooses:", flush=True)
    figures: dict[str, Any] = {}
    for name, r in candidates.items():
        rep = evaluate_alerts(
            engine,
            r,
            valid,
            features.label_names,
            results=outs,
            slack=args.slack,
            gold_negative=gold_negative,
        )
        figures[name] = {
            "product": rep["product"],
            "budgets": {b: v["product"]["precision"] for b, v in rep["budgets"].items()},
        }
        figures["naive rule"] = {
            "product": rep["naive"],
            "budgets": {b: v["naive"]["precision"] for b, v in rep["budgets"].items()},
        }
    for name, f in figures.items():
        p = f["product"]
        extra = f" (threshold {found[name].threshold:g})" if name in found else ""
        print(
            f"  {name + extra:38s} P {p['precision']:5.1f} R {p['recall']:5.1f} F1 {p['f1']:5.1f} "
            f"{p['alerts_per_100_utterances']:5.1f}/100   precision at 2/5/10 per 100: "
            + " / ".join(f"{v:.1f}" for v in f["budgets"].values())
        )
    # the targets, counted on validation; ties go to the higher F1
    naive = figures["naive rule"]

    def merit(name: str) -> tuple[int, float]:
        f = figures[name]
        met = int(f["product"]["f1"] >= naive["product"]["f1"] + 3)
        met += int(f["product"]["precision"] >= naive["product"]["precision"])
        met += sum(int(f["budgets"][b] > naive["budgets"][b]) for b in f["budgets"])
        return met, f["product"]["f1"]

    for name in found:
        print(f"  {name}: {merit(name)[0]} of 5 targets met on validation")
    chosen = max(found, key=merit)
    best_head = max((n for n in found if found[n].head is not None), key=merit)
    head = package(found[best_head], found["p_negative"])
    head = head.model_copy(
        update={
            "trained_on": {
                **head.trained_on,
                "valid": figures,
                "chosen_on_valid": chosen,
                "crossfit": [str(p) for p in args.crossfit],
            },
            "recommended": {
                "score": found[chosen].score,
                "rearm_after": found[chosen].rearm_after,
            },
        }
    )
    out = Path(args.out) if args.out else engine.path
    assert out is not None
    out.mkdir(parents=True, exist_ok=True)
    (out / HEAD_FILE).write_text(head.model_dump_json(indent=1) + "\n")
    c = found[chosen]
    print(f"written: {out / HEAD_FILE}  (head: {best_head})")
    print(
        f"validation chose {chosen}; in the rules file:\n  [negative_onset]\n  enabled = true\n"
        f'  score = "{c.score}"\n  rearm_after = {c.rearm_after}\n'
        f"  # no threshold: the best out-of-fold F1 ({c.threshold:g}); or min_score / "
        "alerts_per_100 / min_precision"
    )
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    from workers.cli_data import _add_data_args

    _add_data_args(p)
    p.add_argument(
        "--checkpoint", help='checkpoint folder or shipped name ("meld", "iemocap"; default meld)'
    )
    p.add_argument("--rules", help="alert rules TOML (default: built in)")
    p.add_argument(
        "--negative",
        help="gold labels that count as negative, comma-separated (default: the rules' "
        "negative_emotions)",
    )
    p.add_argument("--slack", type=int, default=2, help="call positions an alert may lag (2)")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "eval-alerts", help="score the alert rules against the gold labels of a split"
    )
    _common(p)
    p.add_argument("--split", default="test")
    p.add_argument("--seed", type=int, default=0, help="seed of the random baseline")
    p.add_argument(
        "--roles",
        choices=["none", "first-agent"],
        default="none",
        help="none: no roles (every speaker unknown); first-agent: each call's first speaker "
        "is the agent, the others customers, and only customers' episodes count",
    )
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--plot", help="write the precision-recall curve (PNG) here")
    p.set_defaults(func=cmd_eval_alerts)

    p = sub.add_parser(
        "fit-alerts",
        help="learn the alert head and rule settings from cross-fitted train results",
    )
    _common(p)
    p.add_argument(
        "--crossfit",
        nargs="+",
        required=True,
        help="checkpoints of `cfnesa train --fold k` runs, one per fold",
    )
    p.add_argument("--out", help="folder for alert_head.json (default: the checkpoint's)")
    p.set_defaults(func=cmd_fit_alerts)

    p = sub.add_parser(
        "eval-sentiment",
        help="score the sentiment score against gold sentiment labels (MELD)",
    )
    _add_sentiment_args(p)
    p.set_defaults(func=cmd_eval_sentiment)


def _add_sentiment_args(p: argparse.ArgumentParser) -> None:
    from workers.cli_data import _add_data_args

    _add_data_args(p)
    p.add_argument(
        "--checkpoint", help='checkpoint folder or shipped name ("meld", "iemocap"; default meld)'
    )
    p.add_argument("--rules", help="alert rules TOML with the label sets (default: built in)")
    p.add_argument("--json", help="write the figures here")


def cmd_eval_sentiment(args: argparse.Namespace) -> int:
    from model.data import read_transcripts
    from workers.cli_data import _transcript_path
    from workers.sentiment_eval import evaluate_sentiment

    engine, features, rules = _setup(args)
    path = _transcript_path(args.data)
    gold = {d.dialogue_id: d.labels for d in read_transcripts(path, label_field="sentiment")}
    if not any(x is not None for labels in gold.values() for x in labels):
        raise SystemExit(f"cfnesa: {path.name} has no sentiment labels to compare with")
    valid, test = features.split("valid"), features.split("test")
    print(
        f"eval-sentiment: {engine.config.name}@{engine.fingerprint}, positive "
        f"{sorted(rules.positive_emotions)}, negative {sorted(rules.negative_emotions)}; "
        f"cut points chosen on {len(valid)} valid dialogues, reported on {len(test)} test ones",
        flush=True,
    )
    report = {
        "model": f"{engine.config.name}@{engine.fingerprint}",
        "data": features.source,
        "rules": str(args.rules) if args.rules else "built in",
        **evaluate_sentiment(engine, rules, valid, test, gold),
    }
    for split in ("valid", "test"):
        r = report[split]
        means = ", ".join(f"{k} {v:+.2f}" for k, v in r["mean_by_gold"].items() if v is not None)
        print(
            f"{split:5}: AUROC negative {r['auroc_negative']:.1f}, positive "
            f"{r['auroc_positive']:.1f}; Spearman {r['spearman']:.3f}; mean score by gold: "
            f"{means}; labels (cuts {r['cuts']['low']:+.2f} / {r['cuts']['high']:+.2f}): "
            f"macro-F1 {r['macro_f1']:.1f}, accuracy {r['accuracy']:.1f} "
            f"(majority {r['majority_accuracy']:.1f})"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"written: {args.json}")
    return 0
