"""FLOPs of the pieces of a transformer with exits (FLOPs = 2 x multiply-adds), shared by the encoder count
(:mod:`consistentee.evaluation.flops`, per example) and the decoder's (:mod:`consistentee.generation.benchmark`,
per generated token).

Biases, norms, softmax, activations, residual adds and dropout are not counted (all O(tokens * width)). Every
function takes plain numbers (integers stay exact integers) or numpy arrays of token counts alike, so each caller
keeps its own number type; with the sizes of real models every count is an integer below 2**53, exact in float64.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "attention_projection_flops",
    "attention_score_flops",
    "linear_flops",
    "mlp_flops",
    "policy_flops",
]


def linear_flops(fan_in: Any, fan_out: Any, tokens: Any = 1) -> Any:
    """A dense ``fan_in -> fan_out`` map of ``tokens`` vectors: ``2 * tokens * fan_in * fan_out``."""
    return 2 * tokens * fan_in * fan_out


def attention_projection_flops(hidden: Any, q_dim: Any, kv_dim: Any, tokens: Any = 1) -> Any:
    """The query and output projections (``hidden <-> q_dim``) and the key and value ones (``hidden -> kv_dim``;
    ``kv_dim < q_dim`` with grouped-query attention): ``2 * tokens * hidden * (2 * q_dim + 2 * kv_dim)``."""
    return 2 * tokens * hidden * (2 * q_dim + 2 * kv_dim)


def attention_score_flops(q_dim: Any, context: Any, tokens: Any = 1) -> Any:
    """Scores ``Q K^T`` and the weighted sum ``A V`` of ``tokens`` queries over ``context`` keys, summed over heads
    (the head count does not change it): ``4 * tokens * context * q_dim``."""
    return 4 * tokens * context * q_dim


def mlp_flops(hidden: Any, intermediate: Any, matrices: int = 2, tokens: Any = 1) -> Any:
    """A feed-forward block of ``matrices`` ``hidden x intermediate`` matrices (2: up and down; 3: gated, as in
    Llama's SwiGLU): ``2 * tokens * hidden * intermediate * matrices``."""
    return 2 * tokens * hidden * intermediate * matrices


def policy_flops(inputs: Any, width: Any) -> Any:
    """One exit policy, the MLP ``inputs -> width -> 1``: ``2 * (inputs * width + width)``."""
    return 2 * (inputs * width + width)
