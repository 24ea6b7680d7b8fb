"""Generation with token-level early exit.

``generate(model, tokenizer, prompts, config)``: greedy or sampling (temperature, top-p), stop strings,
max new tokens, streaming callback, batches with per-row exits (left padding), the tokenizer's chat template
when it has one, and a lossless self-speculative mode (greedy only): the early-exit path drafts
``draft_tokens`` tokens, one full-depth pass verifies them all, and the output equals the full model's.

The prompt minus its last token is prefilled at full depth; every new token (the first included) comes from a
decoding step under the exit rule.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from consistentee.generation.decoder import EarlyExitLM, LayerCache
from consistentee.generation.kv import KV_STRATEGIES, make_kv_strategy
from consistentee.generation.rules import RULES, TokenExitRule, make_rule

RULE_CHOICES = ("full", *RULES)


@dataclass
class GenerationConfig:
    max_new_tokens: int = field(default=64, metadata={"help": "most new tokens per prompt"})
    do_sample: bool = field(default=False, metadata={"help": "sample (temperature, top-p) instead of greedy"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (> 0)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling: smallest set of tokens with this mass"})
    rule: str = field(default="consistentee", metadata={"help": "exit rule ('full': no early exit)",
                                                        "choices": RULE_CHOICES})
    knob: float | None = field(default=None, metadata={
        "help": "the rule's knob (consistentee: policy threshold; static: layer; confidence/saturation: "
                "lambda); omitted: the rule's default"})
    kv: str = field(default="propagate", metadata={"help": "K/V for the skipped layers of an exited token",
                                                   "choices": tuple(KV_STRATEGIES)})
    lossless: bool = field(default=False, metadata={
        "help": "self-speculative: early exits draft, full depth verifies (greedy output equals the full model)"})
    draft_tokens: int = field(default=4, metadata={"help": "tokens drafted per verification in --lossless"})
    chat: bool = field(default=True, metadata={"help": "wrap prompts in the tokenizer's chat template if it has one"})
    seed: int = field(default=0, metadata={"help": "seed of the sampling generator"})

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.lossless and self.do_sample:
            raise ValueError("lossless mode is greedy only (drop --do-sample)")
        if self.draft_tokens < 1:
            raise ValueError(f"draft_tokens must be >= 1, got {self.draft_tokens}")
        make_kv_strategy(self.kv)


@dataclass
class GenerationResult:
    texts: list[str]
    token_ids: list[list[int]]
    exit_layers: list[list[int]]  # per generated token (drafted tokens' exits in lossless mode)
    seconds: float
    layers_run: int = 0  # sum over steps of layers the batch executed
    steps: int = 0
    head_calls: int = 0
    accepted: int = 0  # lossless: drafted tokens accepted
    drafted: int = 0


def format_prompts(tokenizer, prompts: Sequence[str], chat: bool = True) -> list[str]:
    if chat and getattr(tokenizer, "chat_template", None):
        return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                              add_generation_prompt=True) for p in prompts]
    return list(prompts)


def encode(tokenizer, texts: Sequence[str], device) -> tuple[Tensor, Tensor]:
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    enc = tokenizer(list(texts), return_tensors="pt", padding=True, add_special_tokens=False)
    if enc["input_ids"].shape[1] == 0:
        raise ValueError("empty prompt")
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def choose_tokens(logits: Tensor, cfg: GenerationConfig, generator: torch.Generator | None) -> Tensor:
    if not cfg.do_sample:
        return logits.argmax(-1)
    scores = logits.float() / cfg.temperature
    if cfg.top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(-1)
        drop = probs.cumsum(-1) - probs > cfg.top_p  # keep the smallest prefix reaching top_p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
    probs = scores.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def prefill(model: EarlyExitLM, ids: Tensor, mask: Tensor) -> tuple[LayerCache, Tensor]:
    """Cache holding the prompt minus its last token (full depth) and the last token [B, 1]."""
    cache = model.new_cache(ids.shape[0], capacity=ids.shape[1] + 64)
    if ids.shape[1] > 1:
        model.forward_tokens(cache, ids[:, :-1], mask[:, :-1])
    return cache, ids[:, -1:]


def _eos_ids(tokenizer) -> set[int]:
    ids = set()
    eos = tokenizer.eos_token_id
    if isinstance(eos, int):
        ids.add(eos)
    elif eos is not None:
        ids.update(eos)
    for tok in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
        tid = tokenizer.convert_tokens_to_ids(tok) if tok in tokenizer.get_vocab() else None
        if tid is not None:
            ids.add(tid)
    return ids


class _Rows:
    """Per-row bookkeeping: tokens, exits, eos / stop strings, streaming."""

    def __init__(self, tokenizer, batch: int, eos: set[int], stop: Sequence[str], max_new: int,
                 on_text: Callable[[int, str], None] | None):
        self.tok, self.eos, self.stop, self.max_new, self.on_text = tokenizer, eos, list(stop), max_new, on_text
        self.ids: list[list[int]] = [[] for _ in range(batch)]
        self.exits: list[list[int]] = [[] for _ in range(batch)]
        self.done = [False] * batch
        self.text = [""] * batch
        self.streamed = [0] * batch

    def add(self, row: int, token: int, exit_layer: int) -> None:
        if self.done[row]:
            return
        if token in self.eos:
            self.done[row] = True
            return
        self.ids[row].append(token)
        self.exits[row].append(exit_layer)
        if self.stop or self.on_text:
            self.text[row] = self.tok.decode(self.ids[row], skip_special_tokens=True)
            cut = min((self.text[row].find(s) for s in self.stop if s in self.text[row]), default=-1)
            if cut >= 0:
                self.text[row] = self.text[row][:cut]
                self.done[row] = True
            self._stream(row, final=self.done[row])
        if len(self.ids[row]) >= self.max_new:
            self.done[row] = True

    def _stream(self, row: int, final: bool) -> None:
        if self.on_text is None:
            return
        text = self.text[row]
        if not final and text.endswith("\ufffd"):
            return  # an incomplete multi-byte character: wait for the rest
        if self.stop and not final:  # hold back what could be the start of a stop string
            hold = max((len(s) - 1 for s in self.stop), default=0)
            text = text[: max(len(text) - hold, self.streamed[row])]
        if len(text) > self.streamed[row]:
            self.on_text(row, text[self.streamed[row]:])
            self.streamed[row] = len(text)

    def finish(self) -> list[str]:
        out = []
        for row in range(len(self.ids)):
            if not self.stop and not self.on_text:
                self.text[row] = self.tok.decode(self.ids[row], skip_special_tokens=True)
            self._stream(row, final=True)
            out.append(self.text[row])
        return out


@torch.no_grad()
def generate(model: EarlyExitLM, tokenizer, prompts: str | Sequence[str], cfg: GenerationConfig | None = None,
             stop: Sequence[str] = (), on_text: Callable[[int, str], None] | None = None,
             rule: TokenExitRule | None | str = "from-config") -> GenerationResult:
    cfg = cfg or GenerationConfig()
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("no prompts")
    if rule == "from-config":
        rule = make_rule(cfg.rule, cfg.knob)
    ids, mask = encode(tokenizer, format_prompts(tokenizer, prompts, cfg.chat), model.device)
    return generate_ids(model, tokenizer, ids, mask, cfg, rule, stop=stop, on_text=on_text)


@torch.no_grad()
def generate_ids(model: EarlyExitLM, tokenizer, ids: Tensor, mask: Tensor, cfg: GenerationConfig,
                 rule: TokenExitRule | None, stop: Sequence[str] = (),
                 on_text: Callable[[int, str], None] | None = None,
                 prefilled: tuple[LayerCache, Tensor] | None = None) -> GenerationResult:
    """Generate from token ids (left-padded); ``prefilled`` = (cache, last token) skips the prefill."""
    start = time.perf_counter()
    cache, last = prefilled if prefilled is not None else prefill(model, ids, mask)
    rows = _Rows(tokenizer, ids.shape[0], _eos_ids(tokenizer), stop, cfg.max_new_tokens, on_text)
    if cfg.lossless:
        result = _lossless(model, cache, last, cfg, rule, rows)
    else:
        result = _decode(model, cache, last, cfg, rule, rows)
    result.texts = rows.finish()
    result.token_ids, result.exit_layers = rows.ids, rows.exits
    result.seconds = time.perf_counter() - start
    return result


def _decode(model, cache, last, cfg, rule, rows: _Rows) -> GenerationResult:
    kv = make_kv_strategy(cfg.kv)
    generator = torch.Generator(device=model.device).manual_seed(cfg.seed) if cfg.do_sample else None
    res = GenerationResult([], [], [], 0.0)
    eos_fill = next(iter(rows.eos)) if rows.eos else 0
    for _ in range(cfg.max_new_tokens):
        out = model.step(cache, last, rule, kv)
        tokens = choose_tokens(out.logits, cfg, generator)
        res.steps += 1
        res.layers_run += out.layers_run
        res.head_calls += out.head_calls
        for row, (tok, e) in enumerate(zip(tokens.tolist(), out.exit_layer.tolist(), strict=True)):
            rows.add(row, tok, e)
        if all(rows.done):
            break
        done = torch.tensor(rows.done, device=tokens.device)
        last = torch.where(done, torch.full_like(tokens, eos_fill), tokens).unsqueeze(1)
    return res


def _lossless(model, cache, last, cfg, rule, rows: _Rows) -> GenerationResult:
    if last.shape[0] != 1:
        raise ValueError("lossless mode supports batch size 1 (one prompt at a time)")
    kv = make_kv_strategy(cfg.kv)
    res = GenerationResult([], [], [], 0.0)
    L = model.num_layers
    x = last
    while not rows.done[0]:
        committed = cache.t
        drafts: list[int] = []
        draft_exits: list[int] = []
        tok = x
        room = cfg.max_new_tokens - len(rows.ids[0])
        for _ in range(min(cfg.draft_tokens, max(room - 1, 0))):
            out = model.step(cache, tok, rule, kv)
            res.layers_run += out.layers_run
            res.head_calls += out.head_calls
            d = int(out.logits.argmax(-1))
            drafts.append(d)
            draft_exits.append(int(out.exit_layer[0]))
            if d in rows.eos:
                break
            tok = torch.tensor([[d]], device=x.device)
        cache.truncate(committed)
        verify = torch.cat([x, torch.tensor([drafts], dtype=x.dtype, device=x.device)], dim=1) if drafts else x
        h = model.forward_tokens(cache, verify)
        greedy = model.head_logits(L, h[0]).argmax(-1).tolist()
        res.layers_run += L
        res.steps += 1
        a = 0
        while a < len(drafts) and drafts[a] == greedy[a]:
            a += 1
        res.accepted += a
        res.drafted += len(drafts)
        new = drafts[:a] + [greedy[a]]
        exits = draft_exits[:a] + [L]
        cache.truncate(committed + a + 1)
        for t, e in zip(new, exits, strict=True):
            rows.add(0, t, e)
            if rows.done[0]:
                break
        x = torch.tensor([[new[-1]]], device=x.device)
    return res
