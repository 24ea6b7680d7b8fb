"""Cost of the LM head against a decoder layer, full and reduced vocabulary (issue 14, point 3).

Times, batch 1, interleaved repeats, median (by default this thread's CPU time with one torch thread, which
other jobs on the machine do not inflate; ``--clock wall --threads 2`` on an idle machine): one decoder layer for one new token over a K/V cache, the full
LM head, reduced heads on the N most frequent WikiText-2 train tokens, a policy check
(:func:`consistentee.generation.benchmark.measure_costs`); and how many of the full model's greedy tokens on
WikiText-2 test fall inside each reduced vocabulary (the drafts and exit checks a reduced head can get right).

    python benchmarks/lm/head_cost.py --out benchmarks/lm/results/smollm2-135m/head_cost.json
"""

from __future__ import annotations

import argparse
import json

import torch

from consistentee.generation.benchmark import measure_costs
from consistentee.generation.data import perplexity_windows, top_tokens
from consistentee.generation.decoder import EarlyExitLM, ExitsConfig
from consistentee.generation.loading import load_causal_lm
from consistentee.utils.io import write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sizes", default="2048,4096,8192,16384", help="reduced vocabulary sizes")
    parser.add_argument("--context", type=int, default=320, help="K/V cache length of the timed layer")
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--coverage-tokens", type=int, default=4096, help="WikiText-2 test tokens for coverage")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", default="cpu", choices=("wall", "cpu"),
                        help="cpu: this thread's CPU time (with 1 thread, not inflated by other jobs)")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = tuple(int(x) for x in args.sizes.split(","))
    base, tok = load_causal_lm(args.model)
    model = EarlyExitLM(base, ExitsConfig(exit_layers=[base.config.num_hidden_layers // 2]))
    costs = measure_costs(model, args.context, args.repeats, sizes, args.clock)
    with torch.no_grad():
        greedy = base(perplexity_windows(tok, 256, args.coverage_tokens)).logits.argmax(-1).flatten()
    coverage = {str(n): float(torch.isin(greedy, top_tokens(tok, n)).float().mean()) for n in sizes}
    result = {"model": args.model, "threads": args.threads, "vocab_size": base.config.vocab_size, **costs,
              "greedy_token_coverage": coverage, "coverage_tokens": int(greedy.numel())}
    print(json.dumps(result, indent=2))
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
