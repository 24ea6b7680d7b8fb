"""What the deeper layers get as keys/values for a token that exited early (docs/method.md section 7).

Three named, swappable strategies behind one interface (:class:`KVStrategy`):

* ``propagate`` (CALM, the authors): the exited hidden state is frozen and projected through each skipped
  layer's **input norm** (the authors' code forgot it) and K/V projections (+ RoPE). Cheap: 2 thin matmuls
  per skipped layer.
* ``recompute`` (EE-LLM): the skipped layers' K/V are left missing; the next token that goes deeper runs the
  missing layers for the pending tokens together with itself (one wider query block per layer).
* ``full`` (reference): every layer always runs; the exit only chooses the token. No saving at all.

In a batch, layers run until the last row has exited. ``propagate`` freezes exited rows (their deeper K/V come
from the exit state, exactly as after the last exit); ``recompute`` and ``full`` let them keep computing (the
work is done anyway, and gives the true deep state).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from consistentee.generation.decoder import EarlyExitLM, LayerCache


class KVStrategy:
    name = "base"
    #: exited rows' hidden states stop changing (their K/V in later layers come from the exit state)
    freeze_exited = False
    #: layers after the last row's exit are skipped
    stops_early = True

    def after_exit(self, model: EarlyExitLM, cache: LayerCache, layers_done: int, h: Tensor, slot: int) -> None:
        """Called when a decode step stopped after ``layers_done`` < L layers; ``h`` [B, 1, d] is each row's
        state (the exit state for frozen rows)."""
        raise NotImplementedError


class FullKV(KVStrategy):
    name = "full"
    freeze_exited = False
    stops_early = False

    def after_exit(self, model, cache, layers_done, h, slot):  # never called: all layers always run
        raise AssertionError("the full strategy never stops early")


class PropagateKV(KVStrategy):
    name = "propagate"
    freeze_exited = True
    stops_early = True

    def after_exit(self, model, cache, layers_done, h, slot):
        cos, sin = model.rope(h, cache.pos[:, slot:slot + 1])
        for i in range(layers_done, model.num_layers):
            k, v = model.project_kv(i, h, cos, sin)
            cache.write(i, slot, k, v)


class RecomputeKV(KVStrategy):
    name = "recompute"
    freeze_exited = False
    stops_early = True

    def after_exit(self, model, cache, layers_done, h, slot):
        cache.defer(slot, h)  # layers layers_done+1..L stay missing for this slot until a deeper token


KV_STRATEGIES: dict[str, type[KVStrategy]] = {"propagate": PropagateKV, "recompute": RecomputeKV, "full": FullKV}


def make_kv_strategy(name: str | KVStrategy) -> KVStrategy:
    if isinstance(name, KVStrategy):
        return name
    if name not in KV_STRATEGIES:
        raise ValueError(f"unknown KV strategy {name!r}; choose one of {', '.join(KV_STRATEGIES)}")
    return KV_STRATEGIES[name]()
