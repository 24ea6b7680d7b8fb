"""``consistentee benchmark-lm``: every token-level exit rule on one trained early-exit LM, in one run.

:func:`run_benchmark`, step by step (the measurements themselves are in :mod:`consistentee.generation.benchmark`):

1. Exits: loaded from ``--exits-dir``, or trained into ``RUN_DIR/exits`` (stages 1-3,
   :mod:`consistentee.generation.training`).
2. Perplexity on the first ``ppl_tokens`` tokens of WikiText-2 test: one full-depth pass collects every exit's
   log-probability and every rule's features, and each rule/knob picks its exit per token offline (``full``
   K/V semantics: the deep states of exited tokens are those of the full model; labelled so in the report).
3. XSum subset: greedy summaries under every rule/knob with the ``--kv`` strategy, the full-depth path of our
   decoder, the lossless mode, and Hugging Face ``generate`` (full depth, KV cache), interleaved per example
   (same prefilled prompt: the prompt minus its last token, so that all timings are decode-only). The clock
   holds the decoding loop only, for every row alike: stop ids, prefill, cache copies and detokenisation are
   outside it. ROUGE-1/2/L against the references, agreement with the full-depth output, mean exit layer,
   tokens/s, and the paired bootstrap 95% interval of each row's ROUGE-L difference to full depth.
4. Speed-up three ways: layer (L / mean layers), FLOPs (analytic, counting propagate K/V, policy MLPs,
   exit-head projections on the reduced vocabulary when one is set; the lossless row from the work it did,
   verification included; attention-score FLOPs excluded) and measured tokens/s against our full depth and HF.
5. The cost model: measured time of one decoder layer, the full head, the reduced head and a policy check, in
   layer-equivalents (:func:`~consistentee.generation.benchmark.measure_costs`).
6. report.json, report.md, quality_vs_speed.png, exit_layers_by_position.png.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from consistentee.generation.benchmark import (
    bootstrap_diff,
    clock,
    exit_agreement,
    measure_costs,
    model_flops,
    offline_perplexity,
    perplexity_features,
    timed_hf_generate,
    token_flops,
    work_flops,
)
from consistentee.generation.data import perplexity_windows, xsum_examples, xsum_prompt
from consistentee.generation.decoder import EarlyExitLM, ExitsConfig
from consistentee.generation.generate import (
    GenerationConfig,
    _eos_ids,
    apply_draft_vocab,
    encode,
    format_prompts,
    generate_ids,
    prefill,
)
from consistentee.generation.loading import load_causal_lm
from consistentee.generation.rules import RULES, make_rule, parse_check_layers
from consistentee.generation.training import LMTrainConfig, train_exits
from consistentee.utils.io import write_json, write_text
from consistentee.utils.runtime import resolve_device, set_seed

__all__ = ["BenchmarkLMConfig", "rule_grid", "run_benchmark"]


@dataclass
class BenchmarkLMConfig:
    model: str = field(default="smollm2-135m", metadata={"help": "built-in name, local directory or hub id"})
    exits_dir: str | None = field(default=None, metadata={"help": "trained exits directory (default: train into RUN_DIR/exits)"})
    exit_every: int = field(default=2, metadata={"help": "an exit after every k-th layer (and the last)"})
    adapter_rank: int = field(default=8, metadata={"help": "rank of the exit heads' adapters"})
    xsum_examples: int = field(default=100, metadata={"help": "XSum test examples (fixed seeded subset, <= 300)"})
    max_article_tokens: int = field(default=256, metadata={"advanced": True,
        "help": "articles are cut to this many tokens"})
    max_new_tokens: int = field(default=48, metadata={"help": "most tokens per summary"})
    ppl_tokens: int = field(default=8192, metadata={"help": "WikiText-2 test tokens for perplexity"})
    ppl_seq_len: int = field(default=256, metadata={"advanced": True, "help": "perplexity window"})
    kv: str = field(default="propagate", metadata={"help": "K/V strategy during generation",
                                                   "choices": ("propagate", "recompute", "full")})
    consistentee_knobs: str = field(default="0.3,0.5,0.7", metadata={"advanced": True,
        "help": "policy thresholds"})
    static_knobs: str = field(default="12,18,24", metadata={"advanced": True, "help": "static exit layers"})
    maxprob_knobs: str = field(default="0.5,0.7,0.9", metadata={"advanced": True,
        "help": "CALM max-prob lambdas"})
    gap_knobs: str = field(default="0.3,0.6", metadata={"advanced": True, "help": "CALM top-2 gap lambdas"})
    saturation_knobs: str = field(default="0.95,0.98", metadata={"advanced": True,
        "help": "CALM saturation (cosine) lambdas"})
    lossless_rule: str = field(default="static", metadata={"advanced": True,
        "help": "drafter of the lossless row: a static exit layer, the ConsistentEE policy, or a CALM rule",
        "choices": tuple(RULES)})
    lossless_knob: float = field(default=12, metadata={"advanced": True,
        "help": "the drafter's knob (static: layer; consistentee: policy threshold; CALM: lambda)"})
    lossless_check_layers: str = field(default="", metadata={"advanced": True,
        "help": "exit layers the drafter is asked at (comma-separated; empty: every exit): a token not drafted "
                "there runs to full depth unchecked"})
    draft_tokens: int = field(default=4, metadata={"advanced": True,
        "help": "lossless: tokens drafted per verification"})
    draft_vocab: int = field(default=0, metadata={"advanced": True,
        "help": "exit checks and drafts on the N most frequent training tokens (0: full vocabulary)"})
    bootstrap: int = field(default=1000, metadata={"advanced": True,
        "help": "bootstrap resamples of the ROUGE-L differences"})
    clock: str = field(default="wall", metadata={
        "help": "wall: elapsed time; cpu: the thread's CPU time (use with --threads 1 on a shared machine: other "
                "jobs do not inflate it)", "choices": ("wall", "cpu")})
    repeats: int = field(default=1, metadata={"help": "timing repeats of the interleaved loop (median reported)"})
    threads: int = field(default=2, metadata={"help": "torch threads"})
    seed: int = field(default=0, metadata={"advanced": True, "help": "random seed"})


def _knobs(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"knob lists are comma-separated numbers, got {text!r}") from None


def rule_grid(cfg: BenchmarkLMConfig) -> list[tuple[str, float]]:
    grid = []
    for name, text in (("consistentee", cfg.consistentee_knobs), ("static", cfg.static_knobs),
                       ("confidence-maxprob", cfg.maxprob_knobs), ("confidence-gap", cfg.gap_knobs),
                       ("saturation", cfg.saturation_knobs)):
        grid += [(name, k) for k in _knobs(text)]
    return grid


def _rouge(scorer, prediction: str, reference: str) -> dict[str, float]:
    scores = scorer.score(reference, prediction)
    return {k: 100 * v.fmeasure for k, v in scores.items()}


def run_benchmark(run_dir: str | Path, cfg: BenchmarkLMConfig, train_cfg: LMTrainConfig, device: str = "auto",
                  progress: bool = True) -> dict:
    """Load or train the exits, measure every rule (perplexity, XSum quality and speed), write the report."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed)
    dev = resolve_device(device)
    examples = xsum_examples(cfg.xsum_examples, cfg.seed)  # fail early when the sdist is missing
    model, base, tok = _load_or_train_exits(run_dir, cfg, train_cfg, dev, progress)
    flops = model_flops(model)
    grid = rule_grid(cfg)
    runs = _xsum_runs(cfg, grid, model.exit_layers)  # a bad drafter setting stops here, before any decoding
    report: dict = {"config": asdict(cfg), "train": asdict(train_cfg), "num_layers": model.num_layers,
                    "exit_layers": model.exit_layers, "threads": cfg.threads,
                    "num_test_examples": len(examples)}
    report["cost_model"] = measure_costs(model, vocab_sizes=(cfg.draft_vocab,) if cfg.draft_vocab else (4096, 8192),
                                         clock_kind=cfg.clock)
    report["perplexity"] = _perplexity_of_every_rule(model, tok, cfg, grid, progress)
    rows = _decode_xsum(model, base, tok, examples, runs, cfg, flops, dev, progress)
    results = _xsum_results(rows, runs, examples, cfg, model.num_layers, flops)
    report["xsum"] = {"examples": len(examples), "kv": cfg.kv, "results": results,
                      "outputs": {n: rows[n]["outputs"] for n, _ in runs.configs[:3]}}
    report["goal"] = _goal(results)
    report["lossless"] = _lossless_summary(results[-1])
    _write_lm_report(run_dir, report, results, rows, model)
    return report


# --------------------------------------------------------------------------- the steps of run_benchmark, in order


def _load_or_train_exits(run_dir: Path, cfg: BenchmarkLMConfig, train_cfg: LMTrainConfig, device: torch.device,
                         progress: bool) -> tuple[EarlyExitLM, Any, Any]:
    """Step 1: the base model with its exits from ``cfg.exits_dir``, or trained into ``run_dir/exits`` (merged
    LoRA); in eval mode with the draft vocabulary applied. Returns (model, base model, tokenizer)."""
    base, tok = load_causal_lm(cfg.model, device)
    num_layers = base.config.num_hidden_layers
    exits_cfg = ExitsConfig(exit_layers=list(range(cfg.exit_every, num_layers + 1, cfg.exit_every)),
                            adapter_rank=cfg.adapter_rank)
    if cfg.exits_dir:
        model = EarlyExitLM.load_exits(cfg.exits_dir, base, merge=True)
    else:
        model = EarlyExitLM(base, exits_cfg)
        train_start = time.perf_counter()
        train_exits(model, tok, run_dir / "exits", train_cfg, progress)
        model.merge_lora()  # full depth is the same fine-tuned model; no adapter cost when decoding
        if progress:
            print(f"training: {time.perf_counter() - train_start:.0f} s", flush=True)
    model.eval()
    apply_draft_vocab(model, tok, cfg.draft_vocab)
    return model, base, tok


def _perplexity_of_every_rule(model: EarlyExitLM, tok, cfg: BenchmarkLMConfig, grid: list[tuple[str, float]],
                              progress: bool) -> dict[str, Any]:
    """Step 2: perplexity at full depth, under every rule/knob (offline, full K/V semantics) and per exit."""
    windows = perplexity_windows(tok, cfg.ppl_seq_len, cfg.ppl_tokens)
    feats = perplexity_features(model, windows)
    ppl = {"full": dict(zip(("perplexity", "mean_exit_layer"), offline_perplexity(feats, model.exit_layers, None),
                            strict=True))}
    for name, knob in grid:
        rule = make_rule(name, knob)
        ppl[rule.label] = dict(zip(("perplexity", "mean_exit_layer"),
                                   offline_perplexity(feats, model.exit_layers, rule), strict=True))
    ppl["per_exit"] = {str(layer): float(torch.exp(-feats["logq"][:, j].mean()))
                       for j, layer in enumerate(model.exit_layers)}
    agreement = {"full_head": exit_agreement(feats, model.exit_layers)}
    if model.draft_vocab is not None:
        agreement["draft_head"] = exit_agreement(feats, model.exit_layers, "draft_top")
    if progress:
        print(f"perplexity at full depth {ppl['full']['perplexity']:.2f} on {feats['logq'].shape[0]} tokens", flush=True)
    return {"tokens": int(feats["logq"].shape[0]), "results": ppl, "per_exit_agreement": agreement}


@dataclass
class _XSumRuns:
    """What step 3 decodes: ``(row name, spec)`` pairs (spec: None = full depth or HF, ``(rule, knob)``,
    ``("lossless", knob)``), and the lossless row's drafter."""

    configs: list[tuple[str, tuple[str, float] | None]]
    drafter: Any


def _xsum_runs(cfg: BenchmarkLMConfig, grid: list[tuple[str, float]], exit_layers: list[int]) -> _XSumRuns:
    drafter = make_rule(cfg.lossless_rule, cfg.lossless_knob, parse_check_layers(cfg.lossless_check_layers,
                                                                                 exit_layers))
    configs = [("hf-generate", None), ("full", None)] + [(make_rule(n, k).label, (n, k)) for n, k in grid] + \
        [(f"lossless({drafter.label}, k={cfg.draft_tokens})", ("lossless", cfg.lossless_knob))]
    return _XSumRuns(configs, drafter)


def _decode_xsum(model: EarlyExitLM, base, tok, examples, runs: _XSumRuns, cfg: BenchmarkLMConfig,
                 flops: dict[str, float], device: torch.device, progress: bool) -> dict[str, dict]:
    """Step 3: greedy summaries of every example under every row, interleaved per example, decode-only timing
    (``repeats`` rounds); per row its outputs, token ids, exit layers, FLOPs per token and seconds."""
    from transformers import DynamicCache

    now = clock(cfg.clock)
    rows: dict[str, dict] = {name: {"outputs": [], "seconds": [], "tokens": [], "exits": [], "flops": [],
                                    "ids": [], "accepted": 0, "drafted": 0, "token_layers": 0, "work": 0.0}
                                  for name, _ in runs.configs}
    gen_cfg = GenerationConfig(max_new_tokens=cfg.max_new_tokens, kv=cfg.kv, chat=True)
    lossless_cfg = GenerationConfig(max_new_tokens=cfg.max_new_tokens, lossless=True, draft_tokens=cfg.draft_tokens)
    eos = _eos_ids(tok)  # once, outside every clock
    for ei, ex in enumerate(examples):
        prompt = format_prompts(tok, [xsum_prompt(tok, ex.article, cfg.max_article_tokens)], True)[0]
        ids, mask = encode(tok, [prompt], device)
        with torch.no_grad():
            ours_cache, last = prefill(model, ids, mask)
            hf_cache = DynamicCache(config=base.config)
            base(input_ids=ids[:, :-1], cache=hf_cache, use_cache=True)
        for _rep in range(cfg.repeats):
            for name, spec in runs.configs:
                rec = rows[name]
                if name == "hf-generate":
                    new, secs = timed_hf_generate(base, ids, mask, hf_cache, cfg.max_new_tokens, tok.pad_token_id,
                                                  eos, now)
                    text, n_tok, exits = (tok.decode(new, skip_special_tokens=True), max(len(new), 1),
                                          [model.num_layers] * len(new))
                    acc = dra = 0
                    res = None
                else:
                    if spec is None:
                        rule, rcfg = None, gen_cfg
                    elif spec[0] == "lossless":
                        rule, rcfg = runs.drafter, lossless_cfg
                    else:
                        rule, rcfg = make_rule(*spec), gen_cfg
                    res = generate_ids(model, tok, ids, mask, rcfg, rule,
                                       prefilled=(ours_cache.clone(), last), eos=eos)
                    secs = res.seconds if cfg.clock == "wall" else res.cpu_seconds
                    text, new = res.texts[0], res.token_ids[0]
                    n_tok, exits = max(len(res.token_ids[0]), 1), res.exit_layers[0]
                    acc, dra = res.accepted, res.drafted
                if _rep == 0:
                    rec["outputs"].append(text)
                    rec["ids"].append(new)
                    rec["exits"].append(exits)
                    rec["accepted"] += acc
                    rec["drafted"] += dra
                    rec["token_layers"] += res.token_layers if res is not None else 0
                    rec["work"] += _work(res, spec, cfg, flops)
                    rec["flops"].append(_flops_per_token(model, spec, res, new, exits, cfg, flops))
                    rec["tokens"].append(n_tok)
                    rec["seconds"].append([secs])
                else:
                    rec["seconds"][ei].append(secs)
        if progress:
            print(f"XSum example {ei + 1}/{len(examples)} done", flush=True)
    return rows


def _work(res, spec, cfg: BenchmarkLMConfig, flops: dict[str, float]) -> float:
    """FLOPs of the work a generation counted (0 for Hugging Face's rows, which count none)."""
    if res is None:
        return 0.0
    lossless = spec is not None and spec[0] == "lossless"
    return work_flops(res, flops, lossless and RULES[cfg.lossless_rule].needs_policy)


def _flops_per_token(model: EarlyExitLM, spec, res, new: list[int], exits: list[int], cfg: BenchmarkLMConfig,
                     flops: dict[str, float]) -> list[float]:
    """The analytic FLOPs of every token of one output; the lossless row's from the work it did."""
    if spec is not None and spec[0] == "lossless":
        per = _work(res, spec, cfg, flops) / max(len(new), 1)
        return [per] * len(new)
    rule_name = "full" if spec is None else spec[0]
    return [token_flops(e, model, rule_name, cfg.kv if spec else "full", flops) for e in exits]


def _tokens_per_s(rec: dict) -> float:
    return sum(rec["tokens"]) / sum(statistics.median(s) for s in rec["seconds"])


def _xsum_results(rows: dict[str, dict], runs: _XSumRuns, examples, cfg: BenchmarkLMConfig, num_layers: int,
                  flops: dict[str, float]) -> list[dict]:
    """Step 4: one result row per decoded row: ROUGE, agreement with full depth, speed-ups three ways."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    full_flops = num_layers * flops["layer"] + flops["head"]
    full_outputs = rows["full"]["outputs"]
    hf_tps, full_tps = _tokens_per_s(rows["hf-generate"]), _tokens_per_s(rows["full"])
    full_rl = [_rouge(scorer, o, ex.summary)["rougeL"] for o, ex in zip(full_outputs, examples, strict=True)]
    results = []
    for name, spec in runs.configs:
        rec = rows[name]
        tps = _tokens_per_s(rec)
        rouge = [_rouge(scorer, o, ex.summary) for o, ex in zip(rec["outputs"], examples, strict=True)]
        agree = [_rouge(scorer, o, fo)["rougeL"] for o, fo in zip(rec["outputs"], full_outputs, strict=True)]
        all_exits = [e for ex in rec["exits"] for e in ex]
        all_flops = [x for fl in rec["flops"] for x in fl]
        mean_exit = statistics.fmean(all_exits) if all_exits else float(num_layers)
        row = {"name": name, "rule": "hf" if name == "hf-generate" else ("full" if spec is None else spec[0]),
               "knob": None if spec is None else spec[1],
               "rouge1": statistics.fmean(r["rouge1"] for r in rouge),
               "rouge2": statistics.fmean(r["rouge2"] for r in rouge),
               "rougeL": statistics.fmean(r["rougeL"] for r in rouge),
               "agreement_rougeL": statistics.fmean(agree),
               "mean_exit_layer": mean_exit, "layer_speedup": num_layers / mean_exit,
               "flops_ratio": full_flops / statistics.fmean(all_flops) if all_flops else 1.0,
               "tokens_per_s": tps, "wallclock_speedup_vs_hf": tps / hf_tps, "speedup_vs_full": tps / full_tps,
               "rougeL_diff_vs_full": bootstrap_diff([r["rougeL"] for r in rouge], full_rl, cfg.bootstrap, cfg.seed),
               "identical_to_full": rec["ids"] == rows["full"]["ids"],
               "tokens": sum(rec["tokens"])}
        if spec is not None and spec[0] == "lossless":
            row["acceptance"] = rec["accepted"] / max(rec["drafted"], 1)
            # Every layer it ran and every head row it projected (drafts and verification, draft layers reused)
            # against what full depth ran on the same texts, counted the same way: both pass over the slot that
            # yields the end of text, which a per-emitted-token count would charge to the lossless row alone.
            row["layer_speedup"] = rows["full"]["token_layers"] / max(rec["token_layers"], 1)
            row["flops_ratio"] = rows["full"]["work"] / rec["work"] if rec["work"] else 1.0
            row["note"] = ("mean exit layer of drafted tokens; layer x and FLOPs x count every layer and head row "
                           "run, drafting and verification, against full depth's on the same texts")
        results.append(row)
    return results


def _lossless_summary(lossless: dict) -> dict:
    return {"config": lossless["name"], "speedup_vs_full": lossless["speedup_vs_full"],
            "identical_outputs": lossless["identical_to_full"], "acceptance": lossless["acceptance"],
            "flops_ratio": lossless["flops_ratio"]}


def _write_lm_report(run_dir: Path, report: dict, results: list[dict], rows: dict[str, dict],
                     model: EarlyExitLM) -> None:
    """Step 6: report.json, report.md and the two plots."""
    write_json(run_dir / "report.json", report)
    write_text(run_dir / "report.md", _markdown(report))
    _plots(run_dir, results, rows, model)


def _goal(results: list[dict]) -> dict:
    """The fastest ConsistentEE point within 1 ROUGE-L of full depth (same model), against our full depth."""
    full = next(r for r in results if r["name"] == "full")
    ok = [r for r in results if r["rule"] == "consistentee" and full["rougeL"] - r["rougeL"] <= 1.0]
    best = max(ok, key=lambda r: r["speedup_vs_full"], default=None)
    out = {"full_rougeL": full["rougeL"],
           "speedup_vs_full": None if best is None else best["speedup_vs_full"],
           "rougeL_loss": None if best is None else full["rougeL"] - best["rougeL"],
           "config": None if best is None else best["name"],
           "target_met": bool(best and best["speedup_vs_full"] >= 1.5)}
    comparisons = []
    for c in (r for r in results if r["rule"] == "consistentee"):
        for rule in ("confidence-maxprob", "confidence-gap", "saturation", "static"):
            peers = [r for r in results if r["rule"] == rule and r["speedup_vs_full"] >= c["speedup_vs_full"]]
            best_peer = max(peers, key=lambda r: r["rougeL"], default=None)
            comparisons.append({"consistentee": c["name"], "speedup": c["speedup_vs_full"],
                                "rougeL": c["rougeL"], "peer_rule": rule,
                                "peer_best_rougeL_at_least_this_fast": None if best_peer is None else best_peer["rougeL"]})
    out["at_equal_speed"] = comparisons
    return out


def _markdown(report: dict) -> str:
    lines = ["# benchmark-lm report", "",
             f"Model layers: {report['num_layers']}; exits at {report['exit_layers']}; threads {report['threads']}; "
             f"K/V strategy in generation: {report['xsum']['kv']}.", "",
             f"## XSum ({report['xsum']['examples']} examples, greedy, decode-only timing, interleaved)", "",
             "R-L diff: against our full depth, mean and paired-bootstrap 95% interval.", "",
             "| config | R-1 | R-2 | R-L | R-L diff [95% CI] | agreement R-L | mean exit | layer x | FLOPs x | "
             "tok/s | vs full | vs HF |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["xsum"]["results"]:
        d = r["rougeL_diff_vs_full"]
        lines.append(f"| {r['name']} | {r['rouge1']:.2f} | {r['rouge2']:.2f} | {r['rougeL']:.2f} | "
                     f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}] | "
                     f"{r['agreement_rougeL']:.1f} | {r['mean_exit_layer']:.2f} | {r['layer_speedup']:.2f} | "
                     f"{r['flops_ratio']:.2f} | {r['tokens_per_s']:.1f} | {r['speedup_vs_full']:.2f} | "
                     f"{r['wallclock_speedup_vs_hf']:.2f} |")
    lo = report["lossless"]
    lines += ["", f"Lossless: {lo['config']}: {lo['speedup_vs_full']:.2f}x tokens/s against full depth, identical "
                  f"outputs: {lo['identical_outputs']}, acceptance {lo['acceptance']:.2f}, FLOPs x "
                  f"{lo['flops_ratio']:.2f} (verification counted).", "",
              "Cost model (median, batch 1, layer-equivalents): " + ", ".join(
                  f"{k} {v:.2f}" for k, v in report["cost_model"]["layer_equivalents"].items())]
    lines += ["", f"## Perplexity (WikiText-2 test, {report['perplexity']['tokens']} tokens; rules applied "
                  "offline on one full-depth pass, i.e. `full` K/V semantics)", "",
              "| config | perplexity | mean exit |", "|---|---|---|"]
    for name, r in report["perplexity"]["results"].items():
        if name != "per_exit":
            lines.append(f"| {name} | {r['perplexity']:.2f} | {r['mean_exit_layer']:.2f} |")
    lines += ["", "Per-exit perplexity: " + ", ".join(f"{k}: {v:.1f}" for k, v in
                                                       report["perplexity"]["results"]["per_exit"].items()), ""]
    for head, shares in report["perplexity"].get("per_exit_agreement", {}).items():
        lines += [f"Per-exit agreement with the full model's greedy token ({head.replace('_', ' ')}): " + ", ".join(
            f"{k}: {100 * v:.1f}%" for k, v in shares.items()), ""]
    g = report["goal"]
    lines += ["## Goal", "", f"Target (>= 1.5x tokens/s vs full depth at <= 1.0 ROUGE-L loss): "
                             f"{'met' if g['target_met'] else 'NOT met'}; fastest ConsistentEE point within 1 ROUGE-L: "
                             f"{g['config']} ({g['speedup_vs_full']}x, loss {g['rougeL_loss']})", ""]
    return "\n".join(lines) + "\n"


def _plots(run_dir: Path, results: list[dict], rows: dict, model: EarlyExitLM) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    by_rule: dict[str, list[dict]] = {}
    for r in results:
        by_rule.setdefault(r["rule"], []).append(r)
    for rule, rs in by_rule.items():
        rs = sorted(rs, key=lambda r: r["tokens_per_s"])
        ax.plot([r["tokens_per_s"] for r in rs], [r["rougeL"] for r in rs], "o-", label=rule)
    ax.set_xlabel("measured tokens/s (decode)")
    ax.set_ylabel("ROUGE-L (XSum)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "quality_vs_speed.png", dpi=120)
    plt.close(fig)
    cee = [r for r in results if r["rule"] == "consistentee"]
    if cee:
        name = cee[len(cee) // 2]["name"]
        exits = rows[name]["exits"]
        maxpos = max((len(e) for e in exits), default=1)
        grid = torch.zeros(len(model.exit_layers), max(maxpos, 1))
        for seq in exits:
            for p, e in enumerate(seq):
                grid[model.exit_layers.index(e), p] += 1
        grid = grid / grid.sum(0, keepdim=True).clamp(min=1)
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.imshow(grid.numpy(), aspect="auto", origin="lower", cmap="viridis")
        ax.set_yticks(range(len(model.exit_layers)), [str(x) for x in model.exit_layers], fontsize=6)
        ax.set_xlabel("generated token position")
        ax.set_ylabel("exit layer")
        ax.set_title(f"exit-layer distribution by position: {name}")
        fig.tight_layout()
        fig.savefig(run_dir / "exit_layers_by_position.png", dpi=120)
        plt.close(fig)
