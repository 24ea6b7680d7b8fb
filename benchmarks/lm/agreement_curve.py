"""Per-exit agreement with full depth against stage-1 steps: does longer exit training approach what lossless
drafting needs? (issue 14, point 1)

For each exits directory (e.g. the ``stage1-step<N>`` snapshots of ``train-lm --stage1-snapshots``), on XSum
articles that are neither training articles nor the 100 of ``benchmark-lm`` (test pool positions
``--first-article`` onwards): the same model (its own LoRA merged) writes a greedy full-depth summary; one pass
over prompt + summary then gives, at every summary position, each exit's argmax with the full head and with the
reduced draft head, against the full model's. That share is the per-token acceptance a drafter at that exit can
expect (the tokens lossless mode verifies), unlike prompt positions, which are the article's text.

    python benchmarks/lm/agreement_curve.py --untrained 6,12,18,24,30 \\
        --exits-dirs runs/lm-xsum-long/stage1-step300,... --out benchmarks/lm/results/smollm2-135m-xsum-long/agreement_curve.json

Points already in ``--out`` (same settings) are kept, so the command can be re-run as snapshots appear.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch

from consistentee.generation.data import XSUM_TEST_POOL, xsum_examples, xsum_prompt
from consistentee.generation.decoder import EarlyExitLM, ExitsConfig
from consistentee.generation.generate import _eos_ids, apply_draft_vocab, encode, format_prompts
from consistentee.generation.loading import load_causal_lm
from consistentee.generation.training import run_with_exits
from consistentee.utils.io import write_json


def _step(directory: Path) -> int:
    meta = json.loads((directory / "exits_config.json").read_text(encoding="utf-8"))
    if "stage1_step" in meta:
        return int(meta["stage1_step"])
    match = re.search(r"step(\d+)", directory.name)
    return int(match.group(1)) if match else int(meta.get("train", {}).get("stage1_steps", -1))


@torch.no_grad()
def summary_agreement(model: EarlyExitLM, tokenizer, articles: list[str], article_tokens: int,
                      max_new_tokens: int, draft_vocab: int) -> dict:
    """Per-exit agreement (full head, draft head) with the full model's argmax over its own greedy summaries."""
    eos = sorted(_eos_ids(tokenizer))
    hits = {"full_head": {layer: 0 for layer in model.exit_layers},
            "draft_head": {layer: 0 for layer in model.exit_layers}}
    total = 0
    for article in articles:
        prompt = format_prompts(tokenizer, [xsum_prompt(tokenizer, article, article_tokens)])[0]
        ids, mask = encode(tokenizer, [prompt], model.device)
        out = model.base.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                  eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
        states, _ = run_with_exits(model, out)
        pos = torch.arange(ids.shape[1] - 1, out.shape[1] - 1)  # positions that predict the summary's tokens
        final = model.head_logits(model.num_layers, states[model.num_layers][0, pos]).argmax(-1)
        for head, n in (("full_head", 0), ("draft_head", draft_vocab)):
            apply_draft_vocab(model, tokenizer, n)
            for layer in model.exit_layers:
                guess = model.to_full_vocab(model.exit_logits(layer, states[layer][0, pos])).argmax(-1)
                hits[head][layer] += int((guess == final).sum())
        total += int(pos.numel())
    return {"tokens": total, **{head: {str(k): v / total for k, v in h.items()} for head, h in hits.items()}}


def plot(curve: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    layers = [k for k in curve[0]["draft_head"] if int(k) < max(int(x) for x in curve[0]["draft_head"])]
    steps = [c["step"] for c in curve]
    for i, layer in enumerate(layers):
        color = f"C{i}"
        ax.plot(steps, [100 * c["draft_head"][layer] for c in curve], "o-", color=color, label=f"layer {layer}")
        ax.plot(steps, [100 * c["full_head"][layer] for c in curve], "x--", color=color, alpha=0.6)
    ax.set_xlabel("stage-1 steps (4 x 128 tokens each)")
    ax.set_ylabel("agreement with full depth on its summaries (%)")
    ax.set_title("per-exit agreement: draft head (solid), full head (dashed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--exits-dirs", required=True, help="comma-separated trained exits directories")
    parser.add_argument("--untrained", default=None, metavar="LAYERS",
                        help="also the pretrained model with fresh exits at these layers (step 0), e.g. 6,12,18,24,30")
    parser.add_argument("--articles", type=int, default=40)
    parser.add_argument("--first-article", type=int, default=100,
                        help="test-pool position of the first article (benchmark-lm uses the first 100)")
    parser.add_argument("--article-tokens", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--draft-vocab", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True, help="JSON file; the PNG is written beside it")
    args = parser.parse_args()
    if args.first_article < 0 or args.articles < 1 or args.first_article + args.articles > XSUM_TEST_POOL:
        parser.error(f"--first-article + --articles must stay within the {XSUM_TEST_POOL} test-pool articles")
    torch.set_num_threads(args.threads)
    articles = [ex.article for ex in xsum_examples(args.first_article + args.articles)][args.first_article:]
    out = Path(args.out)
    settings = {"model": args.model, "articles": args.articles, "first_article": args.first_article,
                "article_tokens": args.article_tokens, "max_new_tokens": args.max_new_tokens,
                "draft_vocab": args.draft_vocab}
    curve = []
    if out.is_file():  # points measured before with the same settings are kept, not measured again
        old = json.loads(out.read_text(encoding="utf-8"))
        if {k: old.get(k) for k in settings} == settings:
            curve = old["curve"]
    done = {c["exits"] for c in curve}
    sources = ([None] if args.untrained else []) + [Path(d) for d in args.exits_dirs.split(",") if d]
    for directory in sources:
        if str(directory or "untrained") in done:
            continue
        start = time.perf_counter()
        base, tok = load_causal_lm(args.model)  # fresh weights: each directory merges its own LoRA
        if directory is None:
            layers = [int(x) for x in args.untrained.split(",")]
            model = EarlyExitLM(base, ExitsConfig(exit_layers=layers)).eval()
        else:
            model = EarlyExitLM.load_exits(directory, base, merge=True).eval()
        point = {"exits": str(directory or "untrained"), "step": 0 if directory is None else _step(directory),
                 **summary_agreement(model, tok, articles, args.article_tokens, args.max_new_tokens,
                                     args.draft_vocab)}
        curve.append(point)
        print(f"{directory} (step {point['step']}, {point['tokens']} tokens, {time.perf_counter() - start:.0f} s): "
              + ", ".join(f"{k}: {100 * v:.1f}% / {100 * point['full_head'][k]:.1f}%"
                          for k, v in point["draft_head"].items()), "(draft / full head)", flush=True)
    curve.sort(key=lambda c: c["step"])
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, {**settings, "curve": curve})
    plot(curve, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
