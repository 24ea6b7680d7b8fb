"""Generation with token-level early exit.

``generate(model, tokenizer, prompts, config)``: greedy or sampling (temperature, top-p), stop strings,
max new tokens, streaming callback, batches with per-row exits (left padding), the tokenizer's chat template
when it has one, and a lossless self-speculative mode (greedy only): the early-exit path drafts
``draft_tokens`` tokens, one pass verifies them all, and the output equals the full model's.

Lossless drafting keeps the K/V the drafts computed: a draft that exits at layer e leaves layers e+1..L missing
for its slot (``recompute``), and the verification pass runs, per layer, only the slots that still lack it
(the drafted ones above their exit, plus the last draft) as one block. With a static drafter at layer d,
verification of k drafts costs k+1 tokens through layers d+1..L plus the last draft's first d layers. When the last
draft ends the text, its slot is not run at all (nothing follows it; full-depth decoding stops there too): the
pass only completes the drafted slots (:meth:`EarlyExitLM.complete_pending`).

The prompt minus its last token is prefilled at full depth; every new token (the first included) comes from a
decoding step under the exit rule. ``GenerationResult.seconds`` times the decoding loop only (no prefill, no
tokenizer look-ups, no detokenisation), like the decode-only clock of the benchmark's other rows;
``cpu_seconds`` is the calling thread's CPU time over the same loop (with one torch thread, a clock that other
jobs on a shared machine do not inflate).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from consistentee.generation.decoder import EarlyExitLM, LayerCache
from consistentee.generation.kv import KV_STRATEGIES, make_kv_strategy
from consistentee.generation.rules import RULES, TokenExitRule, make_rule, parse_check_layers

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
        "help": "self-speculative: the rule's exits draft (their first layers' K/V kept), one pass verifies "
                "(greedy output equals the full model; --kv does not apply)"})
    draft_tokens: int = field(default=4, metadata={"help": "tokens drafted per verification in --lossless"})
    check_layers: str = field(default="", metadata={
        "help": "exit layers where the rule is asked, comma-separated (empty: every exit); elsewhere a token "
                "goes on unchecked, e.g. a lossless drafter that checks one shallow exit, else runs to full depth"})
    draft_vocab: int = field(default=0, metadata={
        "help": "exit checks and drafts project onto the N most frequent tokens of the training corpus "
                "(0: full vocabulary); the last layer always uses the full head"})
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
        if self.draft_vocab < 0:
            raise ValueError(f"draft_vocab must be >= 0, got {self.draft_vocab}")
        make_kv_strategy(self.kv)


@dataclass
class GenerationResult:
    texts: list[str]
    token_ids: list[list[int]]
    exit_layers: list[list[int]]  # per generated token (drafted tokens' exits in lossless mode)
    seconds: float  # the decoding loop only (wall clock)
    layers_run: int = 0  # sum over steps of layers the batch executed
    steps: int = 0
    head_calls: int = 0
    accepted: int = 0  # lossless: drafted tokens accepted
    drafted: int = 0
    token_layers: int = 0  # decoder layers run, summed over tokens (counts recomputed / verified slots)
    checks: int = 0  # exit-rule decisions (rows x layers)
    exit_head_rows: int = 0  # exit-head projections (reduced vocabulary when set)
    full_head_rows: int = 0  # full-head projections (tokens at layer L, lossless verification)
    cpu_seconds: float = 0.0  # CPU time of the calling thread in the loop (with 1 torch thread: all the work)

    def add_step(self, out) -> None:
        self.layers_run += out.layers_run
        self.head_calls += out.head_calls
        self.checks += out.checks
        self.exit_head_rows += out.exit_head_rows
        self.full_head_rows += out.full_head_rows


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
        rule = make_rule(cfg.rule, cfg.knob, parse_check_layers(cfg.check_layers, model.exit_layers))
    apply_draft_vocab(model, tokenizer, cfg.draft_vocab)
    ids, mask = encode(tokenizer, format_prompts(tokenizer, prompts, cfg.chat), model.device)
    return generate_ids(model, tokenizer, ids, mask, cfg, rule, stop=stop, on_text=on_text)


def apply_draft_vocab(model: EarlyExitLM, tokenizer, n: int) -> None:
    """Give the model the reduced exit vocabulary of ``n`` tokens (0: the full one), unless it has it."""
    if n == 0:
        model.set_draft_vocab(None)
    elif model.draft_vocab is None or model.draft_vocab.numel() != n:
        from consistentee.generation.data import top_tokens

        model.set_draft_vocab(top_tokens(tokenizer, n))


@torch.no_grad()
def generate_ids(model: EarlyExitLM, tokenizer, ids: Tensor, mask: Tensor, cfg: GenerationConfig,
                 rule: TokenExitRule | None, stop: Sequence[str] = (),
                 on_text: Callable[[int, str], None] | None = None,
                 prefilled: tuple[LayerCache, Tensor] | None = None,
                 eos: set[int] | None = None) -> GenerationResult:
    """Generate from token ids (left-padded); ``prefilled`` = (cache, last token) skips the prefill; ``eos``:
    the stop ids when the caller has them (the tokenizer look-up is slow). Only the loop is timed."""
    cache, last = prefilled if prefilled is not None else prefill(model, ids, mask)
    rows = _Rows(tokenizer, ids.shape[0], _eos_ids(tokenizer) if eos is None else eos, stop, cfg.max_new_tokens,
                 on_text)
    start, cpu = time.perf_counter(), time.thread_time()
    if cfg.lossless:
        result = _lossless(model, cache, last, cfg, rule, rows)
    else:
        result = _decode(model, cache, last, cfg, rule, rows)
    result.seconds, result.cpu_seconds = time.perf_counter() - start, time.thread_time() - cpu
    result.texts = rows.finish()
    result.token_ids, result.exit_layers = rows.ids, rows.exits
    return result


def _decode(model, cache, last, cfg, rule, rows: _Rows) -> GenerationResult:
    kv = make_kv_strategy(cfg.kv)
    generator = torch.Generator(device=model.device).manual_seed(cfg.seed) if cfg.do_sample else None
    res = GenerationResult([], [], [], 0.0)
    eos_fill = next(iter(rows.eos)) if rows.eos else 0
    work = cache.work
    for _ in range(cfg.max_new_tokens):
        out = model.step(cache, last, rule, kv)
        tokens = choose_tokens(out.logits, cfg, generator)
        res.steps += 1
        res.add_step(out)
        for row, (tok, e) in enumerate(zip(tokens.tolist(), out.exit_layer.tolist(), strict=True)):
            rows.add(row, tok, e)
        if all(rows.done):
            break
        done = torch.tensor(rows.done, device=tokens.device)
        last = torch.where(done, torch.full_like(tokens, eos_fill), tokens).unsqueeze(1)
    res.token_layers = cache.work - work
    return res


def _lossless(model: EarlyExitLM, cache: LayerCache, last: Tensor, cfg: GenerationConfig,
              rule: TokenExitRule | None, rows: _Rows) -> GenerationResult:
    """Self-speculative greedy decoding whose output is the full model's (module docstring)."""
    if last.shape[0] != 1:
        raise ValueError("lossless mode supports batch size 1 (one prompt at a time)")
    kv = make_kv_strategy("recompute")  # drafts leave their deep layers to the verification pass
    cache.keep_final()
    res = GenerationResult([], [], [], 0.0)
    L = model.num_layers
    work = cache.work
    x = last
    while not rows.done[0]:
        committed = cache.t  # every layer is complete up to here; slot `committed` is x's
        drafts: list[int] = []
        draft_exits: list[int] = []
        tok = x
        room = cfg.max_new_tokens - len(rows.ids[0])
        for _ in range(min(cfg.draft_tokens, max(room - 1, 0))):
            out = model.step(cache, tok, rule, kv)
            res.add_step(out)
            d = int(out.logits.argmax(-1))
            drafts.append(d)
            draft_exits.append(int(out.exit_layer[0]))
            tok = torch.tensor([[d]], device=x.device)
            if d in rows.eos:
                break
        k = len(drafts)
        ends = bool(drafts) and drafts[-1] in rows.eos
        # verification: the drafted slots go through the layers above their exits, one batched pass per layer
        # (their first layers' K/V are kept). The last draft's own slot goes too, for the token after it, unless
        # it ends the text: full-depth decoding stops there, so only the pending slots are completed.
        if ends:
            model.complete_pending(cache)
        else:
            model.forward_tokens(cache, tok)
        # a draft that went through every layer is already the full model's token for its prefix: the full head
        # is only needed for the shallow drafts and for the slot after the last draft
        verify = [i for i in range(k) if draft_exits[i] < L] + ([] if ends else [k])
        logits = model.head_logits(L, cache.final[0, [committed + i for i in verify]]) if verify else None
        greedy = dict(zip(verify, logits.argmax(-1).tolist(), strict=True)) if verify else {}
        res.full_head_rows += len(verify)
        res.steps += 1
        a = 0
        while a < k and (draft_exits[a] == L or drafts[a] == greedy[a]):
            a += 1
        # acceptance counts the shallow drafts only (a full-depth draft is the full model's token, not a guess)
        res.accepted += sum(1 for e in draft_exits[:a] if e < L)
        res.drafted += sum(1 for e in draft_exits if e < L)
        new, exits = drafts[:a], draft_exits[:a]
        if a < k or not ends:  # the full model's token after the accepted drafts (none after the end of text)
            new, exits = new + [greedy[a]], exits + [L]
        cache.truncate(committed + a + 1)
        for t, e in zip(new, exits, strict=True):
            rows.add(0, t, e)
            if rows.done[0]:
                break
        x = torch.tensor([[new[-1]]], device=x.device)
    res.token_layers = cache.work - work
    return res
