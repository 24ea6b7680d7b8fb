"""Reinforcement-learning math of ConsistentEE policy training (docs/method.md sections 3-5).

Pure tensor functions, independent of any model, so that the estimator can be tested on its own. One
implementation for both trainers: the encoder's policy stages (:mod:`.policy`, one episode per example, tensors
``[N]``) and the decoder's per-token stage 2 (:mod:`consistentee.generation.training`, one episode per token,
tensors ``[N, T]``): the rewards (:data:`REWARDS`, :func:`reward_quality`), the hardness weights
(:data:`HARDNESS`, :func:`weight_from_hardness`) and the group-baseline advantage are elementwise or take flat
groups, so the same functions serve both.

Conventions
-----------
* ``L`` layers numbered ``1..L``. A policy exists for layers ``1..L-1``; the exit at ``L`` is forced.
* ``p`` is a float tensor ``[N, L-1]``: ``p[:, l-1]`` is P(exit at layer l | continued to l).
* Exit layers are ``LongTensor [N]`` with values in ``1..L``.

Defects of the authors' code that are deliberately *not* reproduced (docs/method.md section 8): actions are
sampled (not thresholded), the log-prob accumulator starts from zero, probabilities are clamped, there is
no policy term at the forced last layer, and the reward contains the hardness-guided depth cost.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

__all__ = [
    "ADVANTAGE_NORMS",
    "batch_rms",
    "HARDNESS",
    "REWARDS",
    "REWARD_QUALITIES",
    "EpsilonSchedule",
    "RewardFn",
    "accuracy_only_reward",
    "clamp_probs",
    "cost_only_reward",
    "decisions_reached",
    "depth_cost_reward",
    "exit_distribution",
    "expected_exit_ce",
    "expected_reward_loss",
    "group_baseline_advantage",
    "hardness_guided_reward",
    "log_exit_distribution",
    "loss_hardness_weight",
    "make_reward",
    "masked_trajectory_log_prob",
    "memorized_hardness_weight",
    "policy_entropy",
    "policy_gradient_loss",
    "reward_quality",
    "sample_exit_actions",
    "sample_exit_layers",
    "trajectory_log_prob",
    "weight_from_hardness",
]

DEFAULT_EPS = 1e-6


# --------------------------------------------------------------------------- helpers


def _work_dtype(p: Tensor) -> torch.dtype:
    """At least float32: 1 - 1e-6 rounds to 1 in half precision and log(1 - p) would be -inf."""
    return torch.promote_types(p.dtype, torch.float32)


def _check_p(p: Tensor) -> int:
    """Validate ``p`` as ``[N, L-1]`` and return ``L``."""
    if p.dim() != 2:
        raise ValueError(f"p must be [N, L-1], got shape {tuple(p.shape)}")
    if not p.is_floating_point():
        raise ValueError("p must be a floating-point tensor")
    return p.shape[1] + 1


def _check_exit_layer(exit_layer: Tensor, n: int, num_layers: int) -> None:
    if exit_layer.shape != (n,):
        raise ValueError(f"exit_layer must be [N]={n}, got shape {tuple(exit_layer.shape)}")
    if exit_layer.dtype in (torch.bool,) or exit_layer.is_floating_point():
        raise ValueError("exit_layer must be an integer tensor with values in 1..L")
    if n and (bool((exit_layer < 1).any()) or bool((exit_layer > num_layers).any())):
        raise ValueError(f"exit_layer values must lie in 1..{num_layers}")


def clamp_probs(p: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """Clamp probabilities to ``[eps, 1-eps]`` so that log p and log(1-p) stay finite."""
    if not 0.0 < eps < 0.5:
        raise ValueError(f"eps must lie in (0, 0.5), got {eps}")
    return p.clamp(eps, 1.0 - eps)


def decisions_reached(exit_layer: Tensor, num_layers: int) -> Tensor:
    """Bool ``[N, L-1]``: True at layer j iff the row faced the policy decision there (j <= exit layer).

    A row exiting at e faced decisions 1..e (1..L-1 when e = L); deeper policies were never evaluated.
    """
    j = torch.arange(1, num_layers, device=exit_layer.device)
    return j.unsqueeze(0) <= exit_layer.unsqueeze(1)


# --------------------------------------------------------------------------- distributions


def exit_distribution(p: Tensor) -> Tensor:
    """P(exit at e) for e = 1..L as ``[N, L]``; rows sum to 1 and are differentiable in ``p``.

    P(e) = p_e * prod_{j<e}(1-p_j) for e < L and P(L) = prod_{j<L}(1-p_j). ``p`` is not clamped here
    (the telescoping sum is exactly 1 for any p in [0, 1]); clamp before if you need strict positivity.
    """
    _check_p(p)
    q = p.to(_work_dtype(p))
    ones = torch.ones(q.shape[0], 1, dtype=q.dtype, device=q.device)
    # survival[:, e-1] = prod_{j<e}(1 - p_j): probability of reaching layer e.
    survival = torch.cat([ones, torch.cumprod(1.0 - q, dim=1)], dim=1)
    exit_now = torch.cat([q, ones], dim=1)  # forced exit at L
    return survival * exit_now


def log_exit_distribution(p: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """log P(exit at e) for every e = 1..L as ``[N, L]`` from clamped ``p`` (all of ``p`` must be valid)."""
    _check_p(p)
    q = clamp_probs(p.to(_work_dtype(p)), eps)
    zeros = torch.zeros(q.shape[0], 1, dtype=q.dtype, device=q.device)
    log_reach = torch.cat([zeros, torch.cumsum(torch.log1p(-q), dim=1)], dim=1)  # sum_{j<e} log(1-p_j)
    log_exit_now = torch.cat([torch.log(q), zeros], dim=1)  # no policy term at the forced layer L
    return log_reach + log_exit_now


def trajectory_log_prob(p: Tensor, exit_layer: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """log pi(trajectory) ``[N]`` for dense ``p`` (every entry a valid probability).

    sum_{j<e} log(1-p_j) + log p_e for e < L; sum_{j<L} log(1-p_j) for e = L. Starts from zero.
    Use :func:`masked_trajectory_log_prob` when ``p`` beyond the exit layer is undefined (NaN/garbage).
    """
    num_layers = _check_p(p)
    _check_exit_layer(exit_layer, p.shape[0], num_layers)
    table = log_exit_distribution(p, eps)
    return table.gather(1, (exit_layer.long() - 1).unsqueeze(1)).squeeze(1)


def masked_trajectory_log_prob(p: Tensor, exit_layer: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """Same value as :func:`trajectory_log_prob`, but entries of ``p`` past each row's exit are ignored.

    In a layer loop where rows leave the batch, deeper policies are never evaluated for them, so those
    slots hold arbitrary values (NaN, 0, ...). They are replaced with ``torch.where`` *before* any
    log is taken, so neither the value nor the gradient can become NaN (multiplying by a mask would give
    0 * NaN = NaN in the backward pass).
    """
    num_layers = _check_p(p)
    _check_exit_layer(exit_layer, p.shape[0], num_layers)
    q = p.to(_work_dtype(p))
    j = torch.arange(1, num_layers, device=p.device).unsqueeze(0)  # [1, L-1]
    e = exit_layer.long().unsqueeze(1)  # [N, 1]
    before, at = j < e, j == e
    safe = clamp_probs(torch.where(before | at, q, torch.full_like(q, 0.5)), eps)
    zero = torch.zeros_like(safe)
    terms = torch.where(before, torch.log1p(-safe), torch.where(at, torch.log(safe), zero))
    return terms.sum(dim=1)


# --------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class EpsilonSchedule:
    """Linear decay of the epsilon-greedy exploration rate from ``start`` to ``end`` over ``decay_steps``."""

    start: float = 0.0
    end: float = 0.0
    decay_steps: int = 0

    def __post_init__(self) -> None:
        for name in ("start", "end"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {v}")
        if self.decay_steps < 0:
            raise ValueError(f"decay_steps must be >= 0, got {self.decay_steps}")

    def value(self, step: int) -> float:
        """Epsilon at ``step`` (``start`` at 0, ``end`` from ``decay_steps`` on)."""
        if self.decay_steps == 0 or step >= self.decay_steps:
            return self.end
        frac = max(step, 0) / self.decay_steps
        return self.start + (self.end - self.start) * frac


def _check_epsilon(epsilon: float) -> None:
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must lie in [0, 1], got {epsilon}")


@torch.no_grad()
def sample_exit_actions(
    p_l: Tensor, generator: torch.Generator | None = None, epsilon: float = 0.0
) -> Tensor:
    """Sample exit actions ``a ~ Bernoulli(p_l)`` (Bool, True = exit); same shape as ``p_l``.

    With probability ``epsilon`` an action is replaced by a fair coin flip (exploration). Note that the
    REINFORCE log-prob is still that of ``p`` (the target policy), so epsilon > 0 adds a small off-policy
    bias; keep it small and decay it (:class:`EpsilonSchedule`).
    """
    _check_epsilon(epsilon)
    probs = p_l.detach().to(_work_dtype(p_l))
    u = torch.rand(probs.shape, generator=generator, device=probs.device, dtype=probs.dtype)
    action = u < probs
    if epsilon > 0.0:
        explore = torch.rand(probs.shape, generator=generator, device=probs.device) < epsilon
        coin = torch.rand(probs.shape, generator=generator, device=probs.device) < 0.5
        action = torch.where(explore, coin, action)
    return action


@torch.no_grad()
def sample_exit_layers(
    p: Tensor, generator: torch.Generator | None = None, epsilon: float = 0.0
) -> Tensor:
    """Sample one exit layer per row (``LongTensor [N]`` in 1..L): first exit action wins, forced at L.

    Equivalent to sampling layer by layer, because actions after the first exit are never used.
    """
    _check_p(p)
    actions = sample_exit_actions(p, generator, epsilon)  # [N, L-1]
    forced = torch.ones(p.shape[0], 1, dtype=torch.bool, device=p.device)
    actions = torch.cat([actions, forced], dim=1)
    # argmax returns the first maximal index, i.e. the first exit.
    return (actions.to(torch.uint8).argmax(dim=1) + 1).long()


# --------------------------------------------------------------------------- rewards


#: What the reward's quality term measures at the exit taken (``log_q_exit`` of a RewardFn): the log-probability
#: of the label, or 1/0 for a right/wrong argmax.
REWARD_QUALITIES = ("log_prob", "correct")


def reward_quality(kind: str, log_q_exit: Tensor, correct: Tensor) -> Tensor:
    """The quality term of the reward at the exit taken (detached, the dtype of ``log_q_exit``): ``log_prob``,
    log q_e(target), or ``correct``, 1 where the exit's argmax is the target and 0 elsewhere."""
    if kind == "log_prob":
        return log_q_exit.detach()
    if kind == "correct":
        return correct.to(log_q_exit.dtype)
    raise ValueError(f"reward quality must be one of {', '.join(REWARD_QUALITIES)}, got {kind!r}")


class RewardFn(Protocol):
    """Terminal reward of an episode; returns a detached ``[N]`` tensor. ``log_q_exit`` is the quality term at the
    exit taken: log q_e(y|x) by default, or the 0/1 correctness (``REWARD_QUALITIES``)."""

    def __call__(
        self, log_q_exit: Tensor, exit_layer: Tensor, hardness_weight: Tensor | None, num_layers: int
    ) -> Tensor: ...


def _check_beta(beta: float) -> None:
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")


def depth_cost_reward(quality: Tensor, exit_layer: Tensor, weight: Tensor | None, beta: float) -> Tensor:
    """R = quality - beta * w * e, detached (w = 1 when ``weight`` is None): the reward of every form but
    ``accuracy``. Elementwise: an episode per example (``[N]``) or per token (``[N, T]``)."""
    q = quality.detach()
    depth = exit_layer.to(q.dtype)
    if weight is None:
        return (q - beta * depth).detach()
    return (q - beta * weight.detach().to(q.dtype) * depth).detach()


def hardness_guided_reward(beta: float) -> RewardFn:
    """R = log q_e(y|x) - beta * w(x) * e (the project default, docs/method.md section 3).

    ``w`` is the hardness weight (1 - m/L for the memorized layer m): easy rows pay for depth, the
    hardest (w = 0) are free to go deep.
    """
    _check_beta(beta)

    def reward(
        log_q_exit: Tensor, exit_layer: Tensor, hardness_weight: Tensor | None, num_layers: int
    ) -> Tensor:
        if hardness_weight is None:
            raise ValueError("hardness_guided_reward needs a hardness_weight tensor")
        return depth_cost_reward(log_q_exit, exit_layer, hardness_weight, beta)

    return reward


def cost_only_reward(beta: float) -> RewardFn:
    """R = log q_e(y|x) - beta * e: ablation without hardness guidance (``hardness_weight`` ignored)."""
    _check_beta(beta)

    def reward(
        log_q_exit: Tensor, exit_layer: Tensor, hardness_weight: Tensor | None, num_layers: int
    ) -> Tensor:
        return depth_cost_reward(log_q_exit, exit_layer, None, beta)

    return reward


def accuracy_only_reward() -> RewardFn:
    """R = log q_e(y|x): no depth cost (what the authors' encoder code actually optimised)."""

    def reward(
        log_q_exit: Tensor, exit_layer: Tensor, hardness_weight: Tensor | None, num_layers: int
    ) -> Tensor:
        return log_q_exit.detach().clone()

    return reward


def _accuracy_factory(beta: float) -> RewardFn:
    _check_beta(beta)
    return accuracy_only_reward()


REWARDS: dict[str, Callable[[float], RewardFn]] = {
    "hardness": hardness_guided_reward,
    "cost": cost_only_reward,
    "accuracy": _accuracy_factory,  # beta is accepted for a uniform interface and ignored
}


def make_reward(name: str, beta: float) -> RewardFn:
    """Build a reward by registry name; ValueError for an unknown name or a negative beta."""
    _check_beta(beta)
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; choose from {sorted(REWARDS)}")
    return REWARDS[name](beta)


# --------------------------------------------------------------------------- hardness signals


def memorized_hardness_weight(memorized_layer: Tensor, num_layers: int) -> Tensor:
    """w = 1 - m/L (float ``[N]``): 0 for m = L (hardest), (L-1)/L for m = 1 (easiest)."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    m = memorized_layer
    if m.is_floating_point() or m.dtype == torch.bool:
        raise ValueError("memorized_layer must be an integer tensor with values in 1..L")
    if m.numel() and (bool((m < 1).any()) or bool((m > num_layers).any())):
        raise ValueError(f"memorized_layer values must lie in 1..{num_layers}")
    return 1.0 - m.to(torch.float32) / num_layers


def loss_hardness_weight(final_exit_loss: Tensor, normalization: str = "exp") -> Tensor:
    """Hardness weight in [0, 1] from the final exit's per-example loss; LOW loss -> HIGH weight (easy).

    ``"exp"`` (default): w = exp(-loss). For cross-entropy this is q_L(y|x), the final classifier's
    probability of the gold label. Strictly decreasing, per example, so it does not depend on which other
    examples share the batch (batches and K-fold rollouts change; a batch-relative weight would too).
    ``"minmax"``: w = 1 - (loss - min)/(max - min) over the batch (0.5 for all rows if all losses equal).
    The weight is detached: it is a fixed property of the example, not a training target.
    """
    loss = final_exit_loss.detach().to(_work_dtype(final_exit_loss))
    if normalization == "exp":
        return torch.exp(-loss.clamp(min=0.0))
    if normalization == "minmax":
        if loss.numel() == 0:
            return loss.clone()
        lo, hi = loss.min(), loss.max()
        span = hi - lo
        if float(span) <= 0.0:
            return torch.full_like(loss, 0.5)
        return 1.0 - (loss - lo) / span
    raise ValueError(f"unknown normalization {normalization!r}; choose 'exp' or 'minmax'")


HARDNESS: dict[str, Callable[..., Tensor]] = {
    "memorized": memorized_hardness_weight,  # (memorized_layer, num_layers)
    "loss": loss_hardness_weight,  # (final_exit_loss, normalization="exp")
}


def weight_from_hardness(kind: str, signal: Tensor, num_layers: int, floor: float = 0.0) -> Tensor:
    """The hardness weight w of every episode from its hardness signal (any shape): ``memorized`` (memorized
    layers, w = 1 - m/L) or ``loss`` (the final exit's loss, w = exp(-loss)); with a ``floor`` f > 0,
    f + (1 - f) * w, so that depth costs something for every input, the hardest least (f = 1: w = 1)."""
    if kind == "memorized":
        weight = memorized_hardness_weight(signal, num_layers)
    elif kind == "loss":
        weight = loss_hardness_weight(signal)
    else:
        raise ValueError(f"unknown hardness signal {kind!r}; choose one of {', '.join(HARDNESS)}")
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"the hardness floor must lie in [0, 1], got {floor}")
    return weight if floor == 0.0 else floor + (1.0 - floor) * weight


# --------------------------------------------------------------------------- estimators and losses


ADVANTAGE_NORMS = ("group_std", "batch_std", "none")


def group_baseline_advantage(rewards: Tensor, k: int, normalize: str = "none", eps: float = 1e-2,
                             weight: Tensor | None = None, total: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """A_ik = R_ik - mean_k R_ik for ``N`` groups of ``k`` *consecutive* rollouts (detached, ``[N*k]``).

    ``normalize="group_std"`` divides each group by (its reward std + ``eps``). DECISION: without it, inputs
    whose early exits are wrong (rewards spread over several nats) outweigh easy inputs (rewards spread by
    beta * w * e, a fraction of a nat) by an order of magnitude; the shared policy then learns "always
    continue" before it learns to tell inputs apart, and exploration dies with it. ``eps`` keeps groups
    whose rewards differ only by dropout noise from being blown up to unit scale.

    ``normalize="batch_std"`` divides all advantages by their root mean square over the batch: over the rows
    whose ``weight`` is > 0 (fillers and padding left out), summed across processes by ``total`` (see
    :func:`batch_rms`). Unlike ``group_std`` it keeps the ratio between inputs: a group whose
    rollouts differ only by the depth cost keeps its small advantages instead of being blown up to the scale of
    a group where exiting early changes the answer (with a 0/1 reward quality, group_std made every policy
    exit at the first layer).

    k = 1 is rejected: the baseline would equal the reward and silently zero the gradient.
    """
    if normalize not in ADVANTAGE_NORMS:
        raise ValueError(f"unknown advantage normalisation {normalize!r}; choose one of {', '.join(ADVANTAGE_NORMS)}")
    if k < 2:
        raise ValueError(f"k must be >= 2 for a group baseline, got {k}")
    if rewards.dim() != 1 or rewards.numel() % k:
        raise ValueError(f"rewards must be [N*k] with k={k}, got shape {tuple(rewards.shape)}")
    r = rewards.detach().view(-1, k)
    advantage = r - r.mean(dim=1, keepdim=True)
    if normalize == "group_std":
        advantage = advantage / (r.std(dim=1, keepdim=True) + eps)
    elif normalize == "batch_std":
        advantage = advantage / (batch_rms(advantage, weight, total) + eps)
    return advantage.reshape(-1)


def batch_rms(values: Tensor, weight: Tensor | None = None, total: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Root mean square of ``values`` over the rows with ``weight`` > 0; ``total`` sums ``[sum, count]`` over
    processes (e.g. ``accelerator.reduce``) so that every process scales by the same global figure."""
    v = values.detach().float().reshape(-1)
    mask = torch.ones_like(v) if weight is None else (weight.reshape(-1) > 0).float()
    sums = torch.stack([(v.pow(2) * mask).sum(), mask.sum()])
    if total is not None:
        sums = total(sums)
    return (sums[0] / sums[1].clamp(min=1)).sqrt()


def policy_gradient_loss(log_prob: Tensor, advantage: Tensor) -> Tensor:
    """REINFORCE surrogate -mean(A * log pi); its gradient is the policy-gradient estimate."""
    if log_prob.shape != advantage.shape:
        raise ValueError(f"shape mismatch: log_prob {tuple(log_prob.shape)} vs advantage {tuple(advantage.shape)}")
    return -(advantage.detach().to(log_prob.dtype) * log_prob).mean()


def expected_exit_ce(exit_probs: Tensor, ce_per_exit: Tensor) -> Tensor:
    """Low-variance stage-3 loss: mean_i sum_l P(exit at l).detach() * CE_l.

    Equals the expectation of the CE at a sampled exit, without sampling noise; the policy is not trained
    through it (that is the job of the policy-gradient term).
    """
    if exit_probs.shape != ce_per_exit.shape or exit_probs.dim() != 2:
        raise ValueError(
            f"exit_probs and ce_per_exit must both be [N, L], got {tuple(exit_probs.shape)} and {tuple(ce_per_exit.shape)}"
        )
    return (exit_probs.detach().to(ce_per_exit.dtype) * ce_per_exit).sum(dim=1).mean()


def expected_reward_loss(exit_probs: Tensor, reward_per_exit: Tensor) -> Tensor:
    """Per row, -E[R] = -sum_l P(exit at l) * R_l, differentiable in the exit distribution (the policies).

    When every exit's reward is known (each row run to full depth), this is the exact objective whose gradient
    the policy-gradient term estimates from sampled exits, without the sampling noise; ``reward_per_exit`` is
    detached.
    """
    if exit_probs.shape != reward_per_exit.shape or exit_probs.dim() != 2:
        raise ValueError(f"exit_probs and reward_per_exit must both be [N, L], got {tuple(exit_probs.shape)} and "
                         f"{tuple(reward_per_exit.shape)}")
    return -(exit_probs * reward_per_exit.detach().to(exit_probs.dtype)).sum(dim=1)


def policy_entropy(p: Tensor, reached_mask: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """Mean Bernoulli entropy (nats) over decisions actually faced (``reached_mask`` True); 0 if none.

    Unreached slots may hold garbage/NaN; they are excluded with ``torch.where``. Useful for logging
    policy collapse (entropy -> 0) or as an entropy bonus.
    """
    _check_p(p)
    if reached_mask.shape != p.shape:
        raise ValueError(f"reached_mask must match p {tuple(p.shape)}, got {tuple(reached_mask.shape)}")
    mask = reached_mask.to(torch.bool)
    q = p.to(_work_dtype(p))
    q = clamp_probs(torch.where(mask, q, torch.full_like(q, 0.5)), eps)
    h = -(q * torch.log(q) + (1.0 - q) * torch.log1p(-q))
    h = torch.where(mask, h, torch.zeros_like(h))
    return h.sum() / mask.sum().clamp(min=1).to(h.dtype)
