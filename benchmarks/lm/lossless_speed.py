"""Lossless self-speculative decoding against full depth on SmolLM2, without the XSum archive (issue 14, point 4).

Prompts: the summarisation instruction of benchmark-lm over WikiText-2 test paragraphs (offline), chat-formatted,
cut to ``--article-tokens``. For each prompt, interleaved: our decoder at full depth, Hugging Face ``generate``,
and the lossless mode for each static drafter layer and draft length; same prefilled cache, decode-only clock
(:mod:`consistentee.generation.benchmark`), median over ``--repeats``. Also: per-exit greedy agreement with the
full model over the prompts' positions (what a drafter at that layer can hope to get accepted), and the cost of
one layer for q = 1..k+1 tokens at once (what makes batched verification cheaper than decoding).

Exits: ``--exits-dir`` (trained), else untrained heads (final norm + LM head on the layer's state, the
"logit lens" of the pretrained model).

    nice -n 19 python benchmarks/lm/lossless_speed.py --out benchmarks/lm/results/smollm2-135m/lossless.json
"""

from __future__ import annotations

import argparse
import statistics

import torch

from consistentee.generation.benchmark import clock, timed_hf_generate
from consistentee.generation.data import wikitext_text, xsum_prompt
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
from consistentee.generation.rules import make_rule
from consistentee.utils.io import write_json


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def articles(n: int, min_chars: int = 600) -> list[str]:
    paras = [p.strip() for p in wikitext_text("test").split("\n") if len(p.strip()) >= min_chars and "=" not in p[:3]]
    return paras[:n]


@torch.no_grad()
def layer_agreement(model: EarlyExitLM, ids_list: list[torch.Tensor]) -> dict[str, float]:
    """Share of positions where each exit's argmax equals the full model's (prompt positions, one pass)."""
    from consistentee.generation.training import run_with_exits

    hits = {layer: 0 for layer in model.exit_layers}
    total = 0
    for ids in ids_list:
        states, _ = run_with_exits(model, ids)
        final = model.head_logits(model.num_layers, states[model.num_layers]).argmax(-1)
        for layer in model.exit_layers:
            guess = model.to_full_vocab(model.exit_logits(layer, states[layer])).argmax(-1)
            hits[layer] += int((guess == final).sum())
        total += final.numel()
    return {str(k): v / total for k, v in hits.items()}


@torch.no_grad()
def layer_cost_by_width(model: EarlyExitLM, widths: list[int], context: int, repeats: int, kind: str) -> dict:
    """Median time of one decoder layer for q new tokens at once over a K/V cache of ``context`` tokens."""
    now = clock(kind)
    cache = model.new_cache(1, capacity=context + max(widths) + 8)
    model.forward_tokens(cache, torch.randint(3, 1000, (1, context)))
    out = {}
    for q in widths:
        x = torch.randn(1, q, model.config.hidden_size)
        cos, sin = model.rope(x, torch.arange(context, context + q).unsqueeze(0))
        times = []
        for _ in range(repeats):
            slot = cache.append(torch.ones(1, q, dtype=torch.bool))
            mask = cache.mask(slot, slot + q)
            start = now()
            model.layer(0, x, cos, sin, mask, cache, slot)
            times.append(now() - start)
            cache.truncate(context)
        out[str(q)] = statistics.median(times)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--exits-dir", default=None)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--article-tokens", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--layers", default="15,21,24,27", help="static drafter layers")
    parser.add_argument("--draft-tokens", default="2,4", help="draft lengths k")
    parser.add_argument("--draft-vocab", type=int, default=0, help="reduced exit vocabulary (0: full)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", default="cpu", choices=("wall", "cpu"))
    parser.add_argument("--agreement-only", action="store_true", help="only the per-exit greedy agreement")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    now = clock(args.clock)
    base, tok = load_causal_lm(args.model)
    L = base.config.num_hidden_layers
    layers, ks = _ints(args.layers), _ints(args.draft_tokens)
    if args.exits_dir:
        model = EarlyExitLM.load_exits(args.exits_dir, base, merge=True)
    else:
        model = EarlyExitLM(base, ExitsConfig(exit_layers=sorted(set(layers) | set(range(3, L, 3))), adapter_rank=0))
    model.eval()
    apply_draft_vocab(model, tok, args.draft_vocab)
    eos = _eos_ids(tok)
    prompts = [format_prompts(tok, [xsum_prompt(tok, a, args.article_tokens)])[0] for a in articles(args.prompts)]
    encoded = [encode(tok, [p], model.device) for p in prompts]
    agreement = layer_agreement(model, [ids for ids, _ in encoded])
    print("per-exit greedy agreement with full depth (prompt positions):",
          ", ".join(f"{k}: {v:.2f}" for k, v in agreement.items()), flush=True)
    if args.agreement_only:
        if args.out:
            write_json(args.out, {"model": args.model, "exits": args.exits_dir or "untrained (logit lens)",
                                  "prompts": len(encoded), "agreement": agreement})
        return
    widths = layer_cost_by_width(model, sorted({1, *[k + 1 for k in ks]}), 320, 30, args.clock)
    print("one layer, q tokens at once (s):", widths, flush=True)

    from transformers import DynamicCache

    configs = [("full", None), ("hf-generate", None)] + [(f"lossless(static={d}, k={k})", (d, k))
                                                         for d in layers for k in ks]
    rec = {name: {"seconds": [], "tokens": [], "ids": [], "accepted": 0, "drafted": 0, "token_layers": 0}
           for name, _ in configs}
    for pi, (ids, mask) in enumerate(encoded):
        with torch.no_grad():
            cache, last = prefill(model, ids, mask)
            hf_cache = DynamicCache(config=base.config)
            base(input_ids=ids[:, :-1], cache=hf_cache, use_cache=True)
        for rep in range(args.repeats):
            for name, spec in configs:
                r = rec[name]
                if name == "hf-generate":
                    new, secs = timed_hf_generate(base, ids, mask, hf_cache, args.max_new_tokens, tok.pad_token_id,
                                                  eos, now)
                    res = None
                else:
                    gcfg = GenerationConfig(max_new_tokens=args.max_new_tokens, lossless=spec is not None,
                                            draft_tokens=spec[1] if spec else 1)
                    rule = make_rule("static", spec[0]) if spec else None
                    res = generate_ids(model, tok, ids, mask, gcfg, rule, prefilled=(cache.clone(), last), eos=eos)
                    secs = res.seconds if args.clock == "wall" else res.cpu_seconds
                    new = res.token_ids[0]
                if rep == 0:
                    r["seconds"].append([secs])
                    r["tokens"].append(max(len(new), 1))
                    r["ids"].append(new)
                    if res is not None:
                        r["accepted"] += res.accepted
                        r["drafted"] += res.drafted
                        r["token_layers"] += res.token_layers
                else:
                    r["seconds"][pi].append(secs)
        print(f"prompt {pi + 1}/{len(encoded)} done", flush=True)

    def tps(r: dict) -> float:
        return sum(r["tokens"]) / sum(statistics.median(s) for s in r["seconds"])

    full = tps(rec["full"])
    rows = []
    for name, spec in configs:
        r = rec[name]
        rows.append({"name": name, "tokens_per_s": tps(r), "speedup_vs_full": tps(r) / full,
                     "identical_to_full": r["ids"] == rec["full"]["ids"],
                     "acceptance": r["accepted"] / r["drafted"] if r["drafted"] else None,
                     "token_layers_per_token": r["token_layers"] / sum(r["tokens"]) if spec or name == "full"
                     else None})
        print(f"{name:28s} {rows[-1]['tokens_per_s']:7.2f} tok/s  {rows[-1]['speedup_vs_full']:.2f}x  identical "
              f"{rows[-1]['identical_to_full']}  acceptance {rows[-1]['acceptance']}", flush=True)
    result = {"model": args.model, "exits": args.exits_dir or "untrained (logit lens)", "threads": args.threads,
              "clock": args.clock, "prompts": len(encoded), "max_new_tokens": args.max_new_tokens,
              "draft_vocab": args.draft_vocab, "repeats": args.repeats, "agreement": agreement,
              "layer_seconds_by_width": widths, "results": rows}
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
