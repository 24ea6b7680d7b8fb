"""The measurements of ``consistentee benchmark-lm`` (the recipe is :mod:`consistentee.pipeline.benchmark_lm`).

Analytic FLOPs of a decoded token (:func:`token_flops`, :func:`work_flops`), the clocks and a timed Hugging Face
``generate`` (:func:`timed_hf_generate`), the measured cost model in layer-equivalents (:func:`measure_costs`),
paired bootstrap intervals (:func:`bootstrap_diff`) and perplexity with exit rules applied offline on one
full-depth pass (:func:`perplexity_features`, :func:`offline_perplexity`).
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
import torch.nn.functional as F

from consistentee.generation.decoder import EarlyExitLM
from consistentee.generation.rules import RULES, confidence, first_exit
from consistentee.generation.training import shifted_targets
from consistentee.utils.flops import attention_projection_flops, linear_flops, mlp_flops, policy_flops

# --------------------------------------------------------------------------- FLOPs


def layer_flops(config, policy_hidden: int, exit_vocab: int | None = None) -> dict[str, int]:
    """FLOPs of one token's pieces (:mod:`consistentee.utils.flops`, exact integers): ``layer`` (the attention
    projections and the gated MLP; attention over the context is not counted), ``kv`` (the K/V projections of one
    skipped layer), ``head`` (the full LM head), ``exit_head`` (an exit head, on ``exit_vocab`` rows when a reduced
    vocabulary is set) and ``policy`` (one exit policy ``d -> policy_hidden -> 1``)."""
    d = config.hidden_size
    heads = config.num_attention_heads
    hd = getattr(config, "head_dim", None) or d // heads
    kvd = (getattr(config, "num_key_value_heads", None) or heads) * hd
    return {"layer": attention_projection_flops(d, heads * hd, kvd) + mlp_flops(d, config.intermediate_size, 3),
            "kv": 2 * linear_flops(d, kvd), "head": linear_flops(d, config.vocab_size),
            "exit_head": linear_flops(d, exit_vocab or config.vocab_size), "policy": policy_flops(d, policy_hidden)}


def model_flops(model: EarlyExitLM) -> dict[str, int]:
    """:func:`layer_flops` of ``model``: its policy width, its exit heads on its reduced vocabulary when one is set."""
    exit_vocab = None if model.draft_vocab is None else model.draft_vocab.numel()
    return layer_flops(model.config, model.exits_config.policy_hidden, exit_vocab)


def token_flops(exit_layer: int, model: EarlyExitLM, rule_name: str, kv: str, f: dict) -> float:
    """Analytic FLOPs of one decoded token (batch 1) that exited at ``exit_layer``; what a check costs is the rule's
    (``needs_policy``, ``needs_head``; ``full``: no rule)."""
    L = model.num_layers
    rule = RULES.get(rule_name)
    checks = sum(1 for e in model.exit_layers[:-1] if e <= exit_layer)
    total = (L if kv == "full" else exit_layer) * f["layer"] + (f["head"] if exit_layer == L else f["exit_head"])
    if kv == "propagate":
        total += (L - exit_layer) * f["kv"]
    if rule is not None and rule.needs_policy:
        total += checks * f["policy"]
    elif rule is not None and rule.needs_head:
        total += checks * f["exit_head"] - (f["exit_head"] if exit_layer < L else 0)  # exit's logits reused
    return total


def work_flops(res, f: dict, policy: bool) -> float:
    """FLOPs of a generation from the work it counted (lossless: drafting and verification)."""
    return (res.token_layers * f["layer"] + res.full_head_rows * f["head"] + res.exit_head_rows * f["exit_head"]
            + (res.checks * f["policy"] if policy else 0))


# --------------------------------------------------------------------------- measured cost model


def clock(kind: str):
    """The timer of a measurement: ``wall`` (perf_counter) or ``cpu`` (this thread's CPU time)."""
    if kind not in ("wall", "cpu"):
        raise ValueError(f"unknown clock {kind!r}; choose wall or cpu")
    return time.perf_counter if kind == "wall" else time.thread_time


@torch.no_grad()
def timed_hf_generate(base, ids: torch.Tensor, mask: torch.Tensor, prefix_cache, max_new_tokens: int,
                      pad_token_id: int | None, eos: set[int] | frozenset[int], now) -> tuple[list[int], float]:
    """Hugging Face ``generate`` (greedy) from a copy of the prefilled cache, under the same clock as our rows;
    returns the new token ids up to the first stop token, and the seconds."""
    cache = copy.deepcopy(prefix_cache)
    start = now()
    with torch.no_grad():
        out = base.generate(input_ids=ids, attention_mask=mask, cache=cache, do_sample=False,
                            max_new_tokens=max_new_tokens, pad_token_id=pad_token_id)
    seconds = now() - start
    new = out[0, ids.shape[1]:].tolist()
    return new[: next((i for i, t in enumerate(new) if t in eos), len(new))], seconds


def measure_costs(model: EarlyExitLM, context: int = 320, repeats: int = 200,
                  vocab_sizes: tuple[int, ...] = (4096, 8192, 16384), clock_kind: str = "wall") -> dict:
    """Median seconds, batch 1, interleaved repeats: one decoder layer for one new token (K/V cache of
    ``context`` tokens), the full LM head, a reduced head of N rows for each N of ``vocab_sizes`` (the cost
    depends on N only), a policy check; and each in layer-equivalents (time / the layer's)."""
    d = model.config.hidden_size
    cache = model.new_cache(1, capacity=context + repeats + 8)
    model.forward_tokens(cache, torch.randint(3, model.config.vocab_size, (1, context), device=model.device))
    h = torch.randn(1, d, dtype=model.dtype, device=model.device)
    policy_layer = model.exit_layers[0] if len(model.exit_layers) > 1 else None
    weights = {n: model.lm_head.weight[:n].contiguous() for n in vocab_sizes if n < model.config.vocab_size}
    cos, sin = model.rope(h[:, None], torch.full((1, 1), context, device=model.device))

    def one_layer() -> None:
        slot = cache.append(torch.ones(1, 1, dtype=torch.bool, device=model.device))
        model.layer(0, h[:, None], cos, sin, None, cache, slot)
        cache.truncate(context)

    ops = {"layer": one_layer, "full_head": lambda: model.head_logits(model.num_layers, h)}
    for n, w in weights.items():
        ops[f"head_{n}"] = lambda w=w: torch.nn.functional.linear(h, w)
    if policy_layer is not None:
        ops["policy"] = lambda: model.policy_prob(policy_layer, h)
    now = clock(clock_kind)
    times: dict[str, list[float]] = {k: [] for k in ops}
    for _ in range(repeats):
        for name, op in ops.items():
            start = now()
            op()
            times[name].append(now() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"seconds": med, "layer_equivalents": {k: v / med["layer"] for k, v in med.items()},
            "context": context, "repeats": repeats, "clock": clock_kind}


# --------------------------------------------------------------------------- statistics


def bootstrap_diff(a: list[float], b: list[float], reps: int = 1000, seed: int = 0) -> dict[str, float]:
    """Mean of the paired differences a - b and its 95% percentile-bootstrap interval (resampling examples)."""
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    if d.numel() == 0:
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan")}
    idx = torch.randint(d.numel(), (reps, d.numel()), generator=torch.Generator().manual_seed(seed))
    means = d[idx].mean(1)
    return {"mean": float(d.mean()), "low": float(means.quantile(0.025)), "high": float(means.quantile(0.975))}


# --------------------------------------------------------------------------- perplexity


@torch.no_grad()
def perplexity_features(model: EarlyExitLM, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token features at every exit (flattened over valid positions): log q, policy p, confidences, cosine,
    and each exit's greedy token (``top``: full head; ``draft_top``: the reduced head when one is set, as full ids)."""
    keys = ("logq", "pol", "mp", "gap", "cos", "top", "draft_top")
    out: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    for row in windows:
        ids = row.unsqueeze(0).to(model.device)
        mask = torch.ones_like(ids)
        targets, valid = shifted_targets(ids)
        h = model.embed(ids)
        c, s = model.rope(h, model.position_ids(mask))
        am = model.causal_mask(mask)
        per: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
        for i in range(model.num_layers):
            prev = h
            h = model.layer(i, h, c, s, am)
            layer = i + 1
            if layer not in model.exit_set:
                continue
            logits = model.head_logits(layer, h)[valid]
            per["logq"].append(F.log_softmax(logits.float(), -1).gather(-1, targets[valid].unsqueeze(-1)).squeeze(-1))
            per["top"].append(logits.argmax(-1))
            per["draft_top"].append(model.to_full_vocab(model.exit_logits(layer, h)[valid]).argmax(-1)
                                    if model.draft_vocab is not None else per["top"][-1])
            if layer < model.num_layers:
                per["pol"].append(model.policy_prob(layer, h)[valid])
                per["mp"].append(confidence(logits, "max_prob"))
                per["gap"].append(confidence(logits, "top2_gap"))
                per["cos"].append(F.cosine_similarity(h.float(), prev.float(), dim=-1)[valid])
        for k in keys:
            out[k].append(torch.stack(per[k], -1))
    names = {"logq": "logq", "pol": "policy", "mp": "max_prob", "gap": "top2_gap", "cos": "cosine", "top": "top",
             "draft_top": "draft_top"}
    return {names[k]: torch.cat(v) for k, v in out.items()}


def exit_agreement(features: dict[str, torch.Tensor], exit_layers: list[int], key: str = "top") -> dict[str, float]:
    """Share of tokens where each exit's greedy token equals the full model's: what a drafter or an exit check
    at that layer can hope to get right (``key="draft_top"``: with the reduced head)."""
    final = features["top"][:, -1]
    return {str(layer): float((features[key][:, j] == final).float().mean()) for j, layer in enumerate(exit_layers)}


def offline_perplexity(features: dict[str, torch.Tensor], exit_layers: list[int], rule) -> tuple[float, float]:
    if rule is None:
        exit_layer = torch.full((features["logq"].shape[0],), exit_layers[-1])
    else:
        exit_layer = first_exit(rule.offline_decisions(features, exit_layers), exit_layers)
    idx = torch.searchsorted(torch.tensor(exit_layers), exit_layer)
    lq = features["logq"].gather(1, idx.unsqueeze(1)).squeeze(1)
    return float(torch.exp(-lq.mean())), float(exit_layer.float().mean())
