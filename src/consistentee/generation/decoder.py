"""Layer-wise decoder for Llama-family causal LMs (Llama, Mistral, Qwen2/3, SmolLM) with early exits.

The pretrained model's own modules are reused (embeddings, each layer's norms / projections / MLP, final norm,
LM head); only the loop over layers, the attention call and the KV cache are ours, so that a token can stop
after any layer and the strategy for the skipped layers' K/V (:mod:`.kv`) is explicit.

Exit heads share the LM head and the final norm (docs/method.md section 7, DECISION): exit ``l`` is
``lm_head(norm_l(h) + adapter_l(norm_l(h)))`` with its own RMSNorm weight (initialised from the final norm)
and a zero-initialised low-rank adapter. The last layer's exit is the unchanged model. The policy of layer
``l`` is a d -> 32 -> 1 MLP on the parameter-free RMS-normalised hidden state: deciding costs no LM-head
projection (on SmolLM2-135M one LM-head projection costs as much as 8 layers).

An optional LoRA on the backbone's projections (:mod:`.lora`, peft, trained with the exit heads in stage 1) is
part of the saved exits: in peft's format in ``adapter/`` of the exits directory, its rank, alpha and targets in
the exits config; :meth:`EarlyExitLM.load_exits` re-creates the adapters and loads them, and merges them into
the weights for inference when asked.

A reduced vocabulary (:meth:`EarlyExitLM.set_draft_vocab`, FR-Spec) makes exit checks and drafts project onto
the N most frequent tokens only; the last layer (the full model, and the verification of lossless drafts)
always uses the full head.

Sliding-window attention (Mistral) is not applied: exact only for sequences shorter than the window.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from consistentee.generation.lora import LoRAConfig, add_lora, has_lora, load_lora_weights, save_lora
from consistentee.utils.io import atomic_directory

EXITS_CONFIG = "exits_config.json"
EXITS_WEIGHTS = "exits.safetensors"
LORA_DIR = "adapter"


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, H, Q, D]; cos/sin [B, Q, D]."""
    return x * cos.unsqueeze(1) + _rotate_half(x) * sin.unsqueeze(1)


def rms_normalize(h: Tensor, eps: float = 1e-6) -> Tensor:
    hf = h.float()
    return (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)


@dataclass
class ExitsConfig:
    exit_layers: list[int] | None = field(default=None, metadata={
        "help": "layers (1-based) with an exit; the last layer always has one; default: every layer"})
    adapter_rank: int = field(default=8, metadata={"help": "rank of each exit head's low-rank adapter (0: none)"})
    head_norm: bool = field(default=True, metadata={"help": "each exit head has its own RMSNorm weight"})
    policy_hidden: int = field(default=32, metadata={"help": "hidden width of each layer's exit policy MLP"})


class ExitHead(nn.Module):
    """norm_l(h), plus a low-rank adapter; the shared LM head is applied by the caller."""

    def __init__(self, hidden: int, rank: int, final_norm_weight: Tensor, eps: float, own_norm: bool):
        super().__init__()
        self.eps = eps
        self.own_norm = own_norm
        self.norm_weight = nn.Parameter(final_norm_weight.detach().clone()) if own_norm else None
        self.rank = rank
        if rank > 0:
            self.down = nn.Linear(hidden, rank, bias=False)
            self.up = nn.Linear(rank, hidden, bias=False)
            nn.init.normal_(self.down.weight, std=hidden ** -0.5)
            nn.init.zeros_(self.up.weight)

    def forward(self, h: Tensor, final_norm_weight: Tensor) -> Tensor:
        weight = self.norm_weight if self.own_norm else final_norm_weight
        z = rms_normalize(h, self.eps) * weight
        if self.rank > 0:
            z = z + self.up(self.down(z))
        return z


class ExitPolicy(nn.Module):
    """p_l = sigmoid(MLP(rms_normalize(h))): reads the hidden state only."""

    def __init__(self, hidden: int, width: int, init_p: float):
        super().__init__()
        self.fc1 = nn.Linear(hidden, width)
        self.fc2 = nn.Linear(width, 1)
        nn.init.normal_(self.fc2.weight, std=1e-3)
        p = min(max(init_p, 1e-3), 1 - 1e-3)
        nn.init.constant_(self.fc2.bias, math.log(p / (1 - p)))

    def logit(self, h: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(rms_normalize(h)))).squeeze(-1)

    def forward(self, h: Tensor) -> Tensor:
        return torch.sigmoid(self.logit(h))


class LayerCache:
    """Per-layer K/V with its own filled length per layer (``recompute`` leaves deep suffixes missing).

    Slots are shared by all rows of the batch (left padding); ``pad`` marks real tokens, ``pos`` holds each
    row's position ids (HF convention: cumulative count of real tokens minus one).
    """

    def __init__(self, model: EarlyExitLM, batch: int, capacity: int = 256):
        cfg = model.config
        self.batch, self.num_layers = batch, model.num_layers
        self.kv_heads, self.head_dim, self.hidden = model.kv_heads, model.head_dim, cfg.hidden_size
        self.dtype, self.device = model.dtype, model.device
        self.capacity = capacity
        shape = (batch, self.kv_heads, capacity, self.head_dim)
        self.k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        self.n = [0] * self.num_layers
        self.t = 0
        self.pad = torch.zeros(batch, capacity, dtype=torch.bool, device=self.device)
        self.pos = torch.zeros(batch, capacity, dtype=torch.long, device=self.device)
        self.pend: Tensor | None = None
        #: token-layers executed through this cache (honest compute accounting of recomputed slots)
        self.work = 0
        #: when set (:meth:`keep_final`), the last layer's output of every slot it processes
        self.final: Tensor | None = None

    # -- capacity
    def _grow(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        new = max(needed, 2 * self.capacity)

        def widen(x: Tensor, dim: int) -> Tensor:
            shape = list(x.shape)
            shape[dim] = new - self.capacity
            return torch.cat([x, torch.zeros(shape, dtype=x.dtype, device=x.device)], dim=dim)

        self.k = [widen(x, 2) for x in self.k]
        self.v = [widen(x, 2) for x in self.v]
        self.pad, self.pos = widen(self.pad, 1), widen(self.pos, 1)
        if self.pend is not None:
            self.pend = widen(self.pend, 1)
        if self.final is not None:
            self.final = widen(self.final, 1)
        self.capacity = new

    def keep_final(self) -> None:
        """Keep the last layer's output of every slot (lossless verification reads the states of slots that
        were completed together with a deeper token)."""
        if self.final is None:
            self.final = torch.zeros(self.batch, self.capacity, self.hidden, dtype=self.dtype, device=self.device)

    def append(self, pad_new: Tensor) -> int:
        """Reserve slots for ``pad_new.shape[1]`` new tokens; returns the first slot."""
        q = pad_new.shape[1]
        self._grow(self.t + q)
        start = self.t
        seen = self.pad[:, :start].sum(1, keepdim=True)
        pos = seen + pad_new.long().cumsum(1) - 1
        self.pad[:, start:start + q] = pad_new.bool()
        self.pos[:, start:start + q] = pos.clamp(min=0).masked_fill(~pad_new.bool(), 1)
        self.t += q
        return start

    def write(self, layer: int, start: int, k: Tensor, v: Tensor) -> None:
        q = k.shape[2]
        self.k[layer][:, :, start:start + q] = k
        self.v[layer][:, :, start:start + q] = v
        self.n[layer] = max(self.n[layer], start + q)

    def defer(self, slot: int, h: Tensor) -> None:
        """Keep the hidden state of ``slot`` for the layers whose K/V are still missing (``recompute``)."""
        if self.pend is None:
            self.pend = torch.zeros(self.batch, self.capacity, self.hidden, dtype=self.dtype, device=self.device)
        self.pend[:, slot:slot + 1] = h

    def mask(self, start: int, end: int) -> Tensor | None:
        """Bool [B, 1, Q, end] for queries at slots start..end-1 over keys 0..end-1; None if nothing to mask."""
        q = end - start
        pad = self.pad[:, :end]
        if q == 1 and bool(pad.all()):
            return None
        j = torch.arange(end, device=self.device)
        qi = torch.arange(start, end, device=self.device).unsqueeze(1)
        allowed = (j.unsqueeze(0) <= qi).unsqueeze(0) & pad.unsqueeze(1)
        allowed = allowed | (j.unsqueeze(0) == qi).unsqueeze(0)
        return allowed.unsqueeze(1)

    def truncate(self, length: int) -> None:
        self.t = min(self.t, length)
        self.n = [min(n, length) for n in self.n]

    def clone(self) -> LayerCache:
        other = object.__new__(LayerCache)
        other.__dict__.update(self.__dict__)
        other.k = [x.clone() for x in self.k]
        other.v = [x.clone() for x in self.v]
        other.n = list(self.n)
        other.pad, other.pos = self.pad.clone(), self.pos.clone()
        other.pend = None if self.pend is None else self.pend.clone()
        other.final = None if self.final is None else self.final.clone()
        return other

    def select_rows(self, rows: Tensor) -> LayerCache:
        other = self.clone()
        other.batch = int(rows.numel())
        other.k = [x[rows] for x in other.k]
        other.v = [x[rows] for x in other.v]
        other.pad, other.pos = other.pad[rows], other.pos[rows]
        other.pend = None if other.pend is None else other.pend[rows]
        other.final = None if other.final is None else other.final[rows]
        return other


@dataclass
class StepOutput:
    logits: Tensor  # [B, V] logits of the exit each row took
    exit_layer: Tensor  # [B] long, 1..L
    layers_run: int  # layers the batch executed (the last row's exit, L for `full`)
    head_calls: int = 0  # exit-head (LM-head) projections spent on deciding
    checks: int = 0  # rule decisions asked (batch rows x exit layers reached)
    exit_head_rows: int = 0  # rows projected by an exit head (reduced vocabulary when set): checks and exits
    full_head_rows: int = 0  # rows projected by the full model's head (tokens that reached layer L)


class EarlyExitLM(nn.Module):
    """A frozen causal LM (optionally with a LoRA, :meth:`add_lora`) plus exit heads and per-layer exit policies."""

    def __init__(self, base: nn.Module, exits: ExitsConfig | None = None):
        super().__init__()
        self.base = base
        self.exits_config = exits = exits or ExitsConfig()
        cfg = base.config
        self.config = cfg
        inner = base.model
        self.embed_tokens, self.layers, self.norm = inner.embed_tokens, inner.layers, inner.norm
        self.rotary_emb, self.lm_head = inner.rotary_emb, base.lm_head
        self.num_layers = L = cfg.num_hidden_layers
        self.num_heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        layers = sorted(set(exits.exit_layers or range(1, L + 1)) | {L})
        if layers[0] < 1 or layers[-1] > L:
            raise ValueError(f"exit layers must lie in 1..{L}, got {exits.exit_layers}")
        self.exit_layers: list[int] = layers
        self.exit_set = set(layers)
        eps = getattr(self.norm, "variance_epsilon", getattr(self.norm, "eps", 1e-6))
        d = cfg.hidden_size
        self.heads = nn.ModuleDict({str(layer): ExitHead(d, exits.adapter_rank, self.norm.weight, eps, exits.head_norm)
                                    for layer in layers[:-1]})
        n = len(layers)
        # initial P(exit) uniform over the exits: p_j = 1 / (n - j + 1) for the j-th exit
        self.policies = nn.ModuleDict({str(layer): ExitPolicy(d, exits.policy_hidden, 1.0 / (n - j))
                                       for j, layer in enumerate(layers[:-1])})
        self.heads.to(base.device, base.dtype)
        self.policies.to(base.device, base.dtype)
        self.lora: LoRAConfig | None = None
        self.lora_params: dict[str, nn.Parameter] = {}
        self.lora_merged = False
        object.__setattr__(self, "peft", None)  # the PeftModel wrapper (not a submodule: base holds the weights)
        self.draft_vocab: Tensor | None = None
        self._draft_weight: Tensor | None = None

    # -- properties
    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    def trainable_modules(self) -> nn.ModuleDict:
        """Exit heads and policies: what ``exits.safetensors`` holds (a LoRA is saved apart, in peft's format)."""
        return nn.ModuleDict({"heads": self.heads, "policies": self.policies})

    def add_lora(self, lora: LoRAConfig) -> list[nn.Parameter]:
        """Put a LoRA on the backbone (peft, :func:`.lora.add_lora`); returns its parameters, trainable.
        Asking again for the same LoRA returns the existing adapters."""
        if self.lora is not None:
            if self.lora != lora:
                raise ValueError(f"the model already has a LoRA {self.lora}, asked for {lora}")
            return list(self.lora_params.values())
        wrapper, self.lora_params = add_lora(self.base, lora)
        object.__setattr__(self, "peft", wrapper)
        self.lora = lora
        return list(self.lora_params.values())

    def merge_lora(self) -> None:
        """Fold the adapters into the backbone's weights (inference: no adapter cost per token). The model
        can no longer be trained or saved afterwards."""
        if self.peft is None or self.lora_merged:
            return
        self.peft.merge_and_unload()
        self.lora_params = {}
        self.lora_merged = True

    def set_draft_vocab(self, token_ids: Tensor | None) -> None:
        """Exit checks and drafts over these tokens only (None: the full vocabulary again)."""
        if token_ids is None:
            self.draft_vocab = self._draft_weight = None
            return
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=self.device).unique()
        self.draft_vocab = ids
        self._draft_weight = self.lm_head.weight.detach()[ids].contiguous()

    # -- building blocks
    def embed(self, ids: Tensor) -> Tensor:
        return self.embed_tokens(ids)

    def rope(self, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        return self.rotary_emb(x, position_ids)

    def _qkv(self, i: int, hn: Tensor, cos: Tensor, sin: Tensor, need_q: bool = True):
        attn = self.layers[i].self_attn
        b, q = hn.shape[:2]
        k = attn.k_proj(hn).view(b, q, -1, self.head_dim)
        v = attn.v_proj(hn).view(b, q, -1, self.head_dim).transpose(1, 2)
        if hasattr(attn, "k_norm"):
            k = attn.k_norm(k)
        k = apply_rope(k.transpose(1, 2), cos, sin)
        if not need_q:
            return None, k, v
        qs = attn.q_proj(hn).view(b, q, -1, self.head_dim)
        if hasattr(attn, "q_norm"):
            qs = attn.q_norm(qs)
        return apply_rope(qs.transpose(1, 2), cos, sin), k, v

    def project_kv(self, i: int, h: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """K/V that layer ``i`` (0-based) makes of the hidden state ``h`` entering it: input norm, then the
        K/V projections and RoPE. This is the ``propagate`` fill."""
        _, k, v = self._qkv(i, self.layers[i].input_layernorm(h), cos, sin, need_q=False)
        return k, v

    def layer(self, i: int, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
              cache: LayerCache | None = None, start: int = 0) -> Tensor:
        """Layer ``i`` (0-based) on x [B, Q, d] at slots start..start+Q-1 (writes the cache if given)."""
        layer = self.layers[i]
        attn = layer.self_attn
        q, k, v = self._qkv(i, layer.input_layernorm(x), cos, sin)
        if cache is not None:
            cache.write(i, start, k, v)
            end = start + x.shape[1]
            k, v = cache.k[i][:, :, :end], cache.v[i][:, :, :end]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling,
                                             enable_gqa=self.kv_heads != self.num_heads)
        out = attn.o_proj(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))
        x = x + out
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def head_logits(self, layer: int, h: Tensor) -> Tensor:
        """Logits of exit ``layer`` (1-based) over the full vocabulary; layer L is the unchanged model."""
        if layer == self.num_layers:
            return self.lm_head(self.norm(h))
        return self.lm_head(self.heads[str(layer)](h, self.norm.weight))

    def exit_logits(self, layer: int, h: Tensor) -> Tensor:
        """Logits for exit checks and drafts: over the reduced vocabulary when one is set (index j is token
        ``draft_vocab[j]``; map with :meth:`to_full_vocab`), else :meth:`head_logits`. Layer L: always full."""
        if self._draft_weight is None or layer == self.num_layers:
            return self.head_logits(layer, h)
        return F.linear(self.heads[str(layer)](h, self.norm.weight), self._draft_weight)

    def to_full_vocab(self, logits: Tensor) -> Tensor:
        """Logits of :meth:`exit_logits` as full-vocabulary logits (-inf for tokens outside the reduced set)."""
        if self.draft_vocab is None or logits.shape[-1] == self.lm_head.out_features:
            return logits
        full = logits.new_full((*logits.shape[:-1], self.lm_head.out_features), float("-inf"))
        return full.index_copy_(-1, self.draft_vocab, logits)

    def policy_prob(self, layer: int, h: Tensor) -> Tensor:
        return self.policies[str(layer)](h)

    # -- cached inference
    def new_cache(self, batch: int, capacity: int = 256) -> LayerCache:
        return LayerCache(self, batch, capacity)

    def _cached_layer(self, i: int, x: Tensor, cache: LayerCache, t0: int, cos_all: Tensor, sin_all: Tensor,
                      lo: int) -> Tensor:
        s = cache.n[i]
        q = x.shape[1]
        if s < t0:  # recompute: pending slots s..t0-1 go through this layer together with the new tokens
            assert cache.pend is not None
            x = torch.cat([cache.pend[:, s:t0], x], dim=1)
        cos, sin = cos_all[:, s - lo:t0 + q - lo], sin_all[:, s - lo:t0 + q - lo]
        out = self.layer(i, x, cos, sin, cache.mask(s, t0 + q), cache, s)
        cache.work += out.shape[1]
        if cache.final is not None and i == self.num_layers - 1:
            cache.final[:, s:t0 + q] = out
        if s < t0:
            cache.pend[:, s:t0] = out[:, : t0 - s]
            out = out[:, t0 - s:]
        return out

    @torch.no_grad()
    def forward_tokens(self, cache: LayerCache, ids: Tensor, pad: Tensor | None = None) -> Tensor:
        """Full-depth pass of new tokens ids [B, Q] (prefill, verification); returns final hidden [B, Q, d].
        Pending (``recompute``) slots are completed on the way."""
        pad = torch.ones_like(ids, dtype=torch.bool) if pad is None else pad.bool()
        t0 = cache.append(pad)
        h = self.embed(ids)
        lo = min(cache.n)
        cos_all, sin_all = self.rope(h, cache.pos[:, lo:cache.t])
        for i in range(self.num_layers):
            h = self._cached_layer(i, h, cache, t0, cos_all, sin_all, lo)
        return h

    @torch.no_grad()
    def complete_pending(self, cache: LayerCache) -> None:
        """Run the layers still missing for earlier slots (``recompute``) without adding a token: lossless
        mode verifies a text that ends inside its drafts this way, since nothing follows the end of the text."""
        t = cache.t
        lo = min(cache.n)
        if lo >= t:
            return
        none = torch.empty(cache.batch, 0, cache.hidden, dtype=self.dtype, device=self.device)
        cos_all, sin_all = self.rope(none, cache.pos[:, lo:t])
        for i in range(self.num_layers):
            if cache.n[i] < t:
                self._cached_layer(i, none, cache, t, cos_all, sin_all, lo)

    @torch.no_grad()
    def step(self, cache: LayerCache, ids: Tensor, rule=None, kv=None) -> StepOutput:
        """One decoding step for ids [B, 1] with per-row exits decided by ``rule`` (None: full depth)."""
        from consistentee.generation.kv import make_kv_strategy

        kv = make_kv_strategy(kv or "full")
        L = self.num_layers
        b = ids.shape[0]
        t0 = cache.append(torch.ones_like(ids, dtype=torch.bool))
        h = self.embed(ids)
        lo = min(cache.n)
        cos_all, sin_all = self.rope(h, cache.pos[:, lo:t0 + 1])
        exited = torch.zeros(b, dtype=torch.bool, device=ids.device)
        exit_layer = torch.full((b,), L, dtype=torch.long, device=ids.device)
        logits: Tensor | None = None
        prev = h
        layers_done = 0
        head_calls = checks = exit_rows = 0
        any_exited = False
        if rule is not None:
            rule.start_step(b)
        for i in range(L):
            if any_exited and kv.stops_early and bool(exited.all()):
                break
            out = self._cached_layer(i, h, cache, t0, cos_all, sin_all, lo)
            h = torch.where(exited.view(b, 1, 1), h, out) if (kv.freeze_exited and any_exited) else out
            layers_done = i + 1
            if rule is not None and layers_done < L and layers_done in self.exit_set and rule.checks_at(layers_done):
                decision, rule_logits = rule.decide(self, layers_done, h[:, 0], prev[:, 0])
                checks += b
                if rule_logits is not None:
                    head_calls += 1
                    exit_rows += b
                new = decision & ~exited
                if bool(new.any()):
                    any_exited = True
                    exit_layer[new] = layers_done
                    exited = exited | new
                    if rule_logits is None:
                        exit_rows += int(new.sum())
                    row_logits = rule_logits[new] if rule_logits is not None else \
                        self.exit_logits(layers_done, h[new][:, 0])
                    row_logits = self.to_full_vocab(row_logits)
                    if logits is None:
                        logits = torch.empty(b, row_logits.shape[-1], dtype=row_logits.dtype, device=ids.device)
                    logits[new] = row_logits
            prev = h
        full_rows = int((~exited).sum())
        if full_rows:
            final = self.head_logits(L, h[~exited][:, 0])
            if logits is None:
                logits = torch.empty(b, final.shape[-1], dtype=final.dtype, device=ids.device)
            logits[~exited] = final
        if layers_done < L:
            kv.after_exit(self, cache, layers_done, h, t0)
        return StepOutput(logits, exit_layer, layers_done, head_calls, checks, exit_rows, full_rows)

    # -- parallel (training / perplexity) pass
    def causal_mask(self, attention_mask: Tensor) -> Tensor:
        t = attention_mask.shape[1]
        j = torch.arange(t, device=attention_mask.device)
        causal = j.unsqueeze(0) <= j.unsqueeze(1)
        allowed = causal.unsqueeze(0) & attention_mask.bool().unsqueeze(1)
        return (allowed | torch.eye(t, dtype=torch.bool, device=attention_mask.device)).unsqueeze(1)

    def position_ids(self, attention_mask: Tensor) -> Tensor:
        return (attention_mask.long().cumsum(1) - 1).clamp(min=0)

    # -- persistence of the trainable parts
    def save_exits(self, directory: str | Path, extra: dict | None = None) -> None:
        if self.lora_merged:
            raise ValueError("the LoRA is merged into the weights: save the exits before merge_lora()")
        with atomic_directory(directory) as tmp:
            state = {k: v.detach().contiguous().cpu() for k, v in self.trainable_modules().state_dict().items()}
            save_file(state, str(tmp / EXITS_WEIGHTS))
            meta = {"exits": asdict(self.exits_config), "exit_layers": self.exit_layers,
                    "num_layers": self.num_layers, **(extra or {})}
            if self.lora is not None:
                meta["lora"] = self.lora.to_json()
                save_lora(self.peft, tmp / LORA_DIR)
            (tmp / EXITS_CONFIG).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load_exits(cls, directory: str | Path, base: nn.Module, merge: bool = False) -> EarlyExitLM:
        """The exits (and LoRA) saved in ``directory`` on ``base``; ``merge``: fold the LoRA into the weights."""
        directory = Path(directory)
        try:
            meta = json.loads((directory / EXITS_CONFIG).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{directory}: no {EXITS_CONFIG} (not a trained exits directory)") from None
        if meta["num_layers"] != base.config.num_hidden_layers:
            raise ValueError(f"{directory}: exits trained for {meta['num_layers']} layers, model has "
                             f"{base.config.num_hidden_layers}")
        model = cls(base, ExitsConfig(**meta["exits"]))
        if meta.get("lora"):
            model.add_lora(LoRAConfig(**meta["lora"]))
        elif has_lora(base):  # its adapters would silently stay active
            raise ValueError(f"{directory}: exits trained without LoRA, but the base model carries one")
        model.load_exit_weights(directory)
        if merge:
            model.merge_lora()
        return model

    def load_exit_weights(self, directory: str | Path) -> None:
        """Load a saved exits directory's weights into this model (same exits and LoRA configuration)."""
        state = load_file(str(Path(directory) / EXITS_WEIGHTS), device=str(self.device))
        self.trainable_modules().load_state_dict(state)
        if self.lora is not None:
            load_lora_weights(self.peft, Path(directory) / LORA_DIR)
