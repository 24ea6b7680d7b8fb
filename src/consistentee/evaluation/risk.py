"""Learn-then-Test (Angelopoulos et al. 2021): pick knobs whose expected loss is below a budget with
probability at least ``1 - delta``.

Each candidate knob ``k`` is a null hypothesis ``H_k: E[loss_k] > alpha``. A valid p-value per
candidate comes from a concentration bound on its per-example losses on a calibration split; the
family-wise error is controlled by **fixed-sequence testing**: candidates are tested in an order fixed
before the data is seen (from conservative to aggressive), and testing stops at the first p-value above
``delta``. Several independent sequences (one per ConsistentEE model, one per PCEE patience) split
``delta`` evenly (Bonferroni). Every rejected hypothesis is a certified knob; among them the fastest one
is chosen (any choice among certified knobs keeps the guarantee, since they hold simultaneously).

P-values:

* :func:`hoeffding_bentkus_pvalue` for losses in ``{0, 1}`` (or ``[0, 1]``), from the mean alone;
* :func:`wsr_pvalue` (Waudby-Smith & Ramdas betting) for any loss in ``[0, 1]``; it adapts to the
  variance, which matters for the accuracy drop: most examples have loss 0 after the shift below.

The accuracy drop against full depth, per example ``full_correct - exit_correct``, lies in
``{-1, 0, 1}``; it is mapped to ``[0, 1]`` by ``(x + 1) / 2`` with the budget mapped alike
(:func:`shift_to_unit`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy.stats import binom

__all__ = [
    "fixed_sequence_rejections",
    "hoeffding_bentkus_pvalue",
    "learn_then_test",
    "shift_to_unit",
    "wsr_pvalue",
]


def _h1(a: np.ndarray, b: float) -> np.ndarray:
    """KL divergence between Bernoulli(a) and Bernoulli(b), with 0 log 0 = 0."""
    a = np.clip(a, 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        left = np.where(a > 0, a * np.log(a / b), 0.0)
        right = np.where(a < 1, (1 - a) * np.log((1 - a) / (1 - b)), 0.0)
    return left + right


def hoeffding_bentkus_pvalue(risk_hat: float | np.ndarray, n: int, alpha: float) -> np.ndarray:
    """``min(exp(-n h1(min(R, alpha), alpha)), e * P(Binomial(n, alpha) <= ceil(n R)))`` for H: risk > alpha.

    ``risk_hat`` is the mean of ``n`` losses in [0, 1]. Returns an array (a 0-d one for a scalar input).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    r = np.asarray(risk_hat, dtype=np.float64)
    hoeffding = np.exp(-n * _h1(np.minimum(r, alpha), alpha))
    bentkus = math.e * binom.cdf(np.ceil(n * r - 1e-9), n, alpha)
    return np.minimum(np.minimum(hoeffding, bentkus), 1.0)


def wsr_pvalue(losses: np.ndarray, alpha: float, delta: float) -> np.ndarray:
    """Waudby-Smith--Ramdas betting p-value of H: E[loss] > alpha, for losses in [0, 1].

    ``losses`` is ``[n]`` or ``[K, n]`` (one row per candidate, the same example order in every row);
    the result is 1 / the running maximum of the wealth ``prod_i (1 - nu_i (loss_i - alpha))``, with the
    predictable bet ``nu_i = min(1, sqrt(2 log(1/delta) / (n sigma^2_{i-1})))`` of the LTT paper. The
    wealth is a nonnegative supermartingale under H, so Ville's inequality makes the p-value valid. It
    depends on the order of the examples: shuffle them once, with a seed, before calling.
    """
    x = np.atleast_2d(np.asarray(losses, dtype=np.float64))
    if x.size and (x.min() < -1e-12 or x.max() > 1 + 1e-12):
        raise ValueError("wsr_pvalue needs losses in [0, 1]")
    if not 0.0 < alpha < 1.0 or not 0.0 < delta < 1.0:
        raise ValueError(f"alpha and delta must lie in (0, 1), got {alpha}, {delta}")
    k, n = x.shape
    if n == 0:
        return np.ones(k) if np.ndim(losses) == 2 else np.float64(1.0)
    counts = np.arange(1, n + 1, dtype=np.float64)
    mu = (0.5 + np.cumsum(x, axis=1)) / (counts + 1)
    sigma2 = (0.25 + np.cumsum((x - mu) ** 2, axis=1)) / (counts + 1)
    sigma2_prev = np.concatenate([np.full((k, 1), 0.25), sigma2[:, :-1]], axis=1)
    nu = np.minimum(1.0, np.sqrt(2.0 * math.log(1.0 / delta) / (n * sigma2_prev)))
    log_wealth = np.cumsum(np.log1p(-nu * (x - alpha)), axis=1)
    p = np.minimum(1.0, np.exp(-np.max(log_wealth, axis=1)))
    return p if np.ndim(losses) == 2 else p[0]


def shift_to_unit(loss: np.ndarray, alpha: float, low: float = -1.0, high: float = 1.0) -> tuple[np.ndarray, float]:
    """Map losses in ``[low, high]`` and their budget to ``[0, 1]`` (an affine map keeps H and its test)."""
    span = high - low
    return (np.asarray(loss, dtype=np.float64) - low) / span, (alpha - low) / span


def fixed_sequence_rejections(pvalues: Sequence[float], delta: float) -> int:
    """How many hypotheses, from the start of the sequence, are rejected at level ``delta``."""
    count = 0
    for p in pvalues:
        if not p <= delta:
            break
        count += 1
    return count


def learn_then_test(pvalues: np.ndarray | Callable[[list[int]], np.ndarray], sequences: Sequence[Sequence[int]],
                    delta: float, *, chunk: int = 32) -> list[int]:
    """Indices certified by fixed-sequence testing within each sequence, at ``delta / len(sequences)``.

    ``sequences`` lists candidate indices from conservative to aggressive; the order must not depend on
    the calibration losses. ``pvalues`` is an array indexed by candidate, or a function returning the
    p-values of a list of candidates: it is then called on ``chunk`` candidates at a time and each
    sequence stops at its first failure, so aggressive candidates are never computed. Returns the
    certified indices (possibly empty).
    """
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    sequences = [list(s) for s in sequences if len(s)]
    if not sequences:
        return []
    level = delta / len(sequences)
    if callable(pvalues):
        p_of = pvalues
    else:
        table = np.asarray(pvalues)

        def p_of(indices: list[int]) -> np.ndarray:
            return table[indices]

    certified: list[int] = []
    for seq in sequences:
        for start in range(0, len(seq), chunk):
            part = seq[start:start + chunk]
            passed = fixed_sequence_rejections([float(p) for p in p_of(part)], level)
            certified.extend(part[:passed])
            if passed < len(part):
                break
    return certified
