"""What the benchmark scripts share: their model and data options, the machine they ran on, percentiles and
writing ``results.json`` / ``results.md``.

The scripts run as files (``python benchmarks/engine/run.py``), so they put this folder on ``sys.path``
and import this module as ``common``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
from pathlib import Path


def offline() -> None:
    """No hub downloads and no tokenizer threads competing with the timed work (unless the caller says so)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """The model, its exit rule and the labelled split the texts come from."""
    parser.add_argument("--model", required=True, help="model directory or run directory")
    parser.add_argument("--policy-model-dir", default=None, help="model directory inside the run directory")
    parser.add_argument("--learned-heads", default=None, help="learned exit heads directory (rule 'learned')")
    parser.add_argument("--rule", default="entropy", help="exit rule")
    parser.add_argument("--knob", default=None, help="the rule's knob (default: the rule's default)")
    parser.add_argument("--dataset", default="rt-snippets", help="built-in dataset or data file")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the dataset's splits")
    parser.add_argument("--split", default="test", choices=("train", "dev", "test"))


def load_split(args: argparse.Namespace):
    """The ``--split`` of ``--dataset`` (a :class:`~consistentee.data.TextSplit`)."""
    from consistentee.data import load_splits

    return getattr(load_splits(args.dataset, seed=args.data_seed), args.split)


def load_predictor(args: argparse.Namespace, **options):
    """The predictor of ``--model``/``--rule``/``--knob`` on ``--device``, after applying ``--threads``."""
    from consistentee.inference import EarlyExitPredictor, parse_knob

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return EarlyExitPredictor.from_pretrained(
        args.model, rule=args.rule, knob=parse_knob(args.rule, args.knob), device=args.device,
        learned_heads_dir=args.learned_heads, policy_model_dir=args.policy_model_dir, **options,
    )


def environment() -> dict:
    """The machine and the command line (the load average is read now: call it when the timing starts)."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
    }


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between ranks; NaN for no values."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def write_results(out: str | os.PathLike, report: dict, markdown: str) -> None:
    """``out/results.json`` and ``out/results.md``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    (out / "results.md").write_text(markdown, encoding="utf-8")
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")


def exit_on_bad_input(prog: str, main, *args) -> int:
    """``main(*args)``, with a missing or malformed run directory, model or file as one line and status 2 instead
    of a traceback (the scripts write their outputs atomically, so nothing is left half-written)."""
    try:
        return main(*args)
    except (OSError, ValueError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
