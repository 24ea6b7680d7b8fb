"""``consistentee calibrate``: the fastest exit knob that keeps an accuracy budget, with a guarantee.

Runs the model over a held-out labelled split (dev by default), tries the rule's knobs from conservative to
aggressive and certifies each with Learn-then-Test: the chosen knob's accuracy loss against the model's own
full depth is at most --max-loss points with probability at least 1 - --delta, for inputs like that split.
The choice is written to MODEL/operating_point.json; predict, serve and EarlyExitPredictor.from_pretrained
use it when no --rule/--knob is given. When no knob can be certified (too small a split, too tight a budget)
the model is set to run at full depth, and the command says so.
"""

from __future__ import annotations

import argparse
import json
import sys

from consistentee.cli.predict import add_verb
from consistentee.exits.rules import CALIBRATION_RULES

SPLITS = ("dev", "test")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a saved model folder (config.json, model.safetensors)")
    parser.add_argument("--dataset", required=True,
                        help="built-in name (rt-snippets, trec6, sms-spam, vitaminc), a CSV/TSV/JSON/JSONL/Parquet "
                             "file, or hf:NAME_OR_PATH")
    parser.add_argument("--split", default="dev", choices=SPLITS,
                        help="held-out labelled split to calibrate on (never the one the model trained on)")
    parser.add_argument("--max-loss", type=float, default=1.0, help="accuracy budget: points below full depth")
    parser.add_argument("--delta", type=float, default=0.1, help="the budget holds with probability >= 1 - delta")
    parser.add_argument("--rule", default="auto",
                        choices=("auto", *CALIBRATION_RULES),
                        help="exit rule (auto: confidence, on ConsistentEE models too: it certifies a faster point "
                             "than their policy; consistentee: the policy)")
    parser.add_argument("--loss", default="accuracy_drop", choices=("accuracy_drop", "disagreement"),
                        help="what is controlled: the accuracy drop, or disagreement with full depth (label-free, "
                             "stricter)")
    parser.add_argument("--guarantee", default="expected+unseen", choices=("expected+unseen", "expected", "unseen"),
                        help="expected: the expected loss is within budget (finite-sample); unseen: the mean loss "
                             "on --unseen-rows new inputs is (normal approximation); expected+unseen: both")
    parser.add_argument("--unseen-rows", type=int, default=None,
                        help="number of new inputs the budget must hold on (default: the calibration split's size)")
    parser.add_argument("--grid-points", type=int, default=200, help="knob candidates at quantiles of the rule's score")
    parser.add_argument("--calibration-order", default="train", choices=("train", "knobs"),
                        help="a rule whose knobs form several sequences (pcee's patiences): train tests one chain at "
                             "the whole delta, ordered and pruned on --order-examples rows of the training split "
                             "(never the calibration split); knobs splits delta among the sequences")
    parser.add_argument("--order-examples", type=int, default=2000,
                        help="training rows (a seeded subset) that order that chain")
    data = parser.add_argument_group("data (as in training)")
    data.add_argument("--text-column", default="text", help="column with the text (files and hf:)")
    data.add_argument("--text-pair-column", default=None, help="second text column for sentence pairs")
    data.add_argument("--label-column", default="label", help="column with the label")
    data.add_argument("--id-column", default=None, help="column with stable example ids")
    data.add_argument("--dev-file", default=None, help="separate dev file (else carved from the data)")
    data.add_argument("--test-file", default=None, help="separate test file (else carved from the data)")
    data.add_argument("--max-length", type=int, default=64, help="tokens per example (use the value predict will use)")
    data.add_argument("--data-seed", type=int, default=0, help="seed of the dev/test carving (as in training)")
    parser.add_argument("--batch-size", type=int, default=128, help="batch size of the pass over the split")
    parser.add_argument("--dry-run", action="store_true", help="report the choice without writing it")


def run(args: argparse.Namespace) -> int:
    import numpy as np
    from transformers import AutoTokenizer

    from consistentee.data.labels import LabelList
    from consistentee.model.modeling import EarlyExitForSequenceClassification
    from consistentee.pipeline.calibrate import (
        CalibrationConfig,
        calibrate_model,
        model_folder,
        tables_for_split,
    )
    from consistentee.training.run import DataConfig, prepare_data, train_subset
    from consistentee.utils.runtime import resolve_device

    cfg = CalibrationConfig(max_loss=args.max_loss, delta=args.delta, rule=args.rule, loss=args.loss,
                            grid_points=args.grid_points, guarantee=args.guarantee, unseen_rows=args.unseen_rows,
                            order=args.calibration_order, order_examples=args.order_examples)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    folder = model_folder(args.model)
    data_cfg = DataConfig(dataset=args.dataset, text_column=args.text_column, text_pair_column=args.text_pair_column,
                          label_column=args.label_column, id_column=args.id_column, dev_file=args.dev_file,
                          test_file=args.test_file, max_length=args.max_length, data_seed=args.data_seed)
    device = resolve_device(args.device)
    model = EarlyExitForSequenceClassification.from_pretrained(folder, device=device)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    data = prepare_data(data_cfg, tokenizer, LabelList(tuple(model.config.label_names)))
    tables = tables_for_split(model, data.encoded[args.split], data.collate, batch_size=args.batch_size,
                              device=device, progress=args.progress)
    source = {"dataset": args.dataset, "split": args.split, "max_length": args.max_length,
              "data_seed": args.data_seed}

    def order_tables():
        """Tables of a seeded subset of the training split: what orders a chain through several sequences."""
        train = data.encoded["train"]
        rows = np.random.default_rng(cfg.seed).permutation(len(train))[: cfg.order_examples]
        return tables_for_split(model, train_subset(data, sorted(int(i) for i in rows)), data.collate,
                                batch_size=args.batch_size, device=device, progress=args.progress)

    point, summary = calibrate_model(model, folder, tables, cfg, source=source, write=not args.dry_run,
                                     order_tables=order_tables if len(data.encoded["train"]) else None)
    measured = summary["calibration_split"]
    print(f"operating point: {point.describe()}", file=sys.stderr)
    print(f"on the {summary['calibration_examples']} {args.split} examples: accuracy "
          f"{100 * measured['accuracy']:.2f}% against {100 * measured['full_depth_accuracy']:.2f}% at full depth, "
          f"{measured['layer_speedup']:.2f}x layer speed-up; {summary['certified']} of {summary['candidates']} "
          f"{summary['rule_searched']} knobs certified"
          + (f" (one chain ordered on {summary['order_rows']} training rows)" if summary["order_rows"] else ""),
          file=sys.stderr)
    if summary.get("note"):
        print(f"consistentee: warning: {summary['note']}", file=sys.stderr)
    print(json.dumps(point.to_json()))
    if not args.dry_run:
        print(f"written to {folder / 'operating_point.json'}", file=sys.stderr)
    return 0


def add_parser(verbs) -> argparse.ArgumentParser:
    return add_verb(verbs, "calibrate", "choose the fastest exit knob that keeps an accuracy budget (with a guarantee)",
                    __doc__, configure)
