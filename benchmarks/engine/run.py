"""Wall-clock speed of the early-exit engine against the same weights at full depth.

For each batch size, the test split is cut into batches in file order (pre-tokenized and pre-padded, so
only model time is measured), then the engine and the full-depth baseline (``full_depth_logits``: the
plain Hugging Face forward of the backbone + pooling + last exit) run over all of them, interleaved
(engine/full, then full/engine, ...) for ``--repeats`` rounds after a warm-up. Reported per batch size:
throughput (examples/s, median over rounds), per-batch latency p50/p99 (median over rounds), the measured
wall-clock speed-up (median of the per-round ratios), the layer speed-up L / mean exit layer, and their
ratio (how much of the layer saving turns into time). Accuracy and agreement with full depth are
reported too. Results go to ``--out`` as results.json and results.md.

    python benchmarks/engine/run.py --model runs/rt-minilm --rule entropy --knob 0.2 \\
        --batch-sizes 1,8,32,128 --repeats 5 --out benchmarks/engine/results/rt-minilm-entropy
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common.py
import common  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def engine_environment(device: torch.device) -> dict:
    import transformers

    info = {**common.environment(), "torch": torch.__version__, "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def make_batches(predictor, features: list, batch_size: int) -> list[dict]:
    from consistentee.data.tokenize import collate

    batches = []
    for start in range(0, len(features), batch_size):
        chunk = [{**f, "index": start + i} for i, f in enumerate(features[start:start + batch_size])]
        batches.append(collate(chunk, predictor.tokenizer.pad_token_id))
    return batches


def run_engine(engine, batches, device) -> tuple[list[float], torch.Tensor, torch.Tensor]:
    latencies, predictions, layers = [], [], []
    for batch in batches:
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        types = batch["token_type_ids"].to(device) if "token_type_ids" in batch else None
        _sync(device)
        start = time.perf_counter()
        out = engine(ids, mask, types)
        _sync(device)
        latencies.append(time.perf_counter() - start)
        predictions.append(out.predictions)
        layers.append(out.exit_layers)
    return latencies, torch.cat(predictions), torch.cat(layers)


def run_full(model, batches, device, dtype) -> tuple[list[float], torch.Tensor]:
    from consistentee.inference import full_depth_logits

    latencies, predictions = [], []
    for batch in batches:
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        types = batch["token_type_ids"].to(device) if "token_type_ids" in batch else None
        _sync(device)
        start = time.perf_counter()
        logits = full_depth_logits(model, ids, mask, types, autocast_dtype=dtype)
        predicted = logits.argmax(-1).cpu()  # a user reads the answer: include the copy back, as the engine does
        _sync(device)
        latencies.append(time.perf_counter() - start)
        predictions.append(predicted)
    return latencies, torch.cat(predictions)


def benchmark(args: argparse.Namespace) -> dict:
    dtype = None if args.dtype == "none" else args.dtype
    predictor = common.load_predictor(args, trim=not args.no_trim, autocast_dtype=dtype)
    model, device = predictor.model, predictor.device
    split = common.load_split(args)
    if args.max_examples is not None and args.max_examples < len(split):
        split = split.select(list(range(args.max_examples)))
    items = list(zip(split.texts, split.text_pairs, strict=True)) if split.is_pair else list(split.texts)
    features = predictor.encode(items, max_length=args.max_length, truncation=True)
    names = predictor.label_names
    gold = torch.tensor([names.index(lab) if lab in names else -1 for lab in split.labels])
    engine = predictor.engine()
    num_layers = model.num_layers
    env = engine_environment(device)
    settings = {
        "model": str(args.model), "rule": repr(engine.rule), "dataset": args.dataset, "split": args.split,
        "examples": len(features), "max_length": args.max_length, "batch_sizes": args.batch_sizes,
        "repeats": args.repeats, "warmup_batches": args.warmup, "trim": not args.no_trim, "dtype": args.dtype,
        "num_layers": num_layers, "mean_tokens": statistics.mean(len(f["input_ids"]) for f in features),
    }
    print("how it was run:")
    for key, value in {**env, **settings}.items():
        print(f"  {key}: {value}")
    rows = []
    for batch_size in args.batch_sizes:
        batches = make_batches(predictor, features, batch_size)
        warm = batches[: max(args.warmup, 1)]
        run_engine(engine, warm, device)
        run_full(model, warm, device, dtype)
        rounds = []
        for r in range(args.repeats):
            order = ("engine", "full") if r % 2 == 0 else ("full", "engine")
            result = {}
            for mode in order:
                if mode == "engine":
                    lat, pred, layers = run_engine(engine, batches, device)
                    result["engine"] = {"latencies": lat, "pred": pred, "layers": layers}
                else:
                    lat, pred = run_full(model, batches, device, dtype)
                    result["full"] = {"latencies": lat, "pred": pred}
            rounds.append(result)
        n = len(features)
        per_round = []
        for result in rounds:
            t_engine, t_full = sum(result["engine"]["latencies"]), sum(result["full"]["latencies"])
            per_round.append({
                "engine_throughput": n / t_engine, "full_throughput": n / t_full, "speedup": t_full / t_engine,
                "engine_p50": common.percentile(result["engine"]["latencies"], 50),
                "engine_p99": common.percentile(result["engine"]["latencies"], 99),
                "full_p50": common.percentile(result["full"]["latencies"], 50),
                "full_p99": common.percentile(result["full"]["latencies"], 99),
            })
        med = {key: statistics.median(p[key] for p in per_round) for key in per_round[0]}
        layers = rounds[0]["engine"]["layers"]
        engine_pred, full_pred = rounds[0]["engine"]["pred"], rounds[0]["full"]["pred"]
        mean_exit = float(layers.float().mean())
        layer_speedup = num_layers / mean_exit
        labelled = gold >= 0
        row = {
            "batch_size": batch_size, "batches": len(batches), **{k: round(v, 6) for k, v in med.items()},
            "speedup_min": round(min(p["speedup"] for p in per_round), 4),
            "speedup_max": round(max(p["speedup"] for p in per_round), 4),
            "mean_exit_layer": round(mean_exit, 4), "layer_speedup": round(layer_speedup, 4),
            "wall_over_layer_speedup": round(med["speedup"] / layer_speedup, 4),
            "engine_accuracy": float((engine_pred[labelled] == gold[labelled]).float().mean()) if labelled.any() else None,
            "full_accuracy": float((full_pred[labelled] == gold[labelled]).float().mean()) if labelled.any() else None,
            "agreement_with_full": float((engine_pred == full_pred).float().mean()),
            "exit_layer_histogram": torch.bincount(layers, minlength=num_layers + 1)[1:].tolist(),
        }
        rows.append(row)
        print(f"batch {batch_size:>4}: engine {row['engine_throughput']:9.1f}/s  full {row['full_throughput']:9.1f}/s  "
              f"wall speed-up {row['speedup']:.2f}x (min {row['speedup_min']:.2f}, max {row['speedup_max']:.2f})  "
              f"layer speed-up {layer_speedup:.2f}x  ratio {row['wall_over_layer_speedup']:.2f}  "
              f"p50 {1000 * row['engine_p50']:.2f}/{1000 * row['full_p50']:.2f} ms  "
              f"p99 {1000 * row['engine_p99']:.2f}/{1000 * row['full_p99']:.2f} ms", flush=True)
    return {"environment": env, "settings": settings, "results": rows}


def to_markdown(report: dict) -> str:
    env, settings = report["environment"], report["settings"]
    lines = [
        "# Early-exit engine vs full depth", "",
        f"Command: `{env['command']}`", "",
        f"Machine: {env['platform']}, {env['processor']}, {env['cpu_count']} CPUs"
        + (f", GPU {env['gpu']}" if env.get("gpu") else "")
        + f"; device {env['device']}, torch {env['torch']} ({env['torch_threads']} threads), "
          f"transformers {env['transformers']}, Python {env['python']}; load average at start {env['load_average']}.",
        "",
        f"Model `{settings['model']}` ({settings['num_layers']} layers), rule {settings['rule']}, "
        f"{settings['dataset']} {settings['split']} ({settings['examples']} examples, max length "
        f"{settings['max_length']}, mean {settings['mean_tokens']:.1f} tokens), trim {settings['trim']}, "
        f"dtype {settings['dtype']}; {settings['repeats']} interleaved rounds per batch size (medians shown). "
        "Times are model time only (inputs pre-tokenized and pre-padded, batches in file order).", "",
        "| batch | engine ex/s | full ex/s | wall speed-up (min-max) | layer speed-up | wall / layer "
        "| p50 ms engine / full | p99 ms engine / full | acc engine / full | agree |",
        "|---:|---:|---:|---|---:|---:|---|---|---|---:|",
    ]
    for r in report["results"]:
        acc = (f"{100 * r['engine_accuracy']:.2f} / {100 * r['full_accuracy']:.2f}"
               if r["engine_accuracy"] is not None else "n/a")
        lines.append(
            f"| {r['batch_size']} | {r['engine_throughput']:.1f} | {r['full_throughput']:.1f} "
            f"| {r['speedup']:.2f}x ({r['speedup_min']:.2f}-{r['speedup_max']:.2f}) | {r['layer_speedup']:.2f}x "
            f"| {r['wall_over_layer_speedup']:.2f} | {1000 * r['engine_p50']:.2f} / {1000 * r['full_p50']:.2f} "
            f"| {1000 * r['engine_p99']:.2f} / {1000 * r['full_p99']:.2f} | {acc} | {100 * r['agreement_with_full']:.1f}% |"
        )
    hist = report["results"][0]["exit_layer_histogram"] if report["results"] else []
    lines += ["", f"Exit-layer histogram (layers 1..L): {hist}.", ""]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_options(parser)
    parser.add_argument("--max-examples", type=int, default=None, help="use the first N examples only")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per example (truncated)")
    parser.add_argument("--batch-sizes", default="1,8,32,128", help="comma-separated batch sizes")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds per batch size")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up batches per mode and batch size")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    parser.add_argument("--dtype", default="none", choices=("none", "fp16", "bf16"), help="autocast dtype (both modes)")
    parser.add_argument("--no-trim", action="store_true", help="do not trim padding as rows leave")
    parser.add_argument("--out", required=True, help="directory for results.json and results.md")
    args = parser.parse_args(argv)
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        parser.error(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}")
    if not args.batch_sizes or min(args.batch_sizes) < 1 or args.repeats < 1:
        parser.error("batch sizes and --repeats must be >= 1")
    return args


def main(argv=None) -> int:
    common.offline()
    args = parse_args(argv)
    report = benchmark(args)
    common.write_results(args.out, report, to_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
