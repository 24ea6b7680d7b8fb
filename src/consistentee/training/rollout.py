"""Batched policy rollouts: K copies of every example walk the layers, and a row that exits stops.

This is the training-time twin of the inference engine: after each layer the rows whose sampled action
was "exit" are gathered out of the batch, so deeper layers only run on rows that continue and training
gets cheaper as the policy learns to exit early (issue "ConsistentEE training", item 3). The exited
row's state is exactly the state it would have at inference, so training and inference agree.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from consistentee.training.rl import clamp_probs, exit_distribution, sample_exit_actions


@dataclass
class Rollout:
    """One sampled trajectory per row (rows = examples x K, each example's K copies consecutive)."""

    #: [R] log pi(trajectory): sum of log(1-p) over continued layers + log p at the exit (no term at L).
    log_prob: torch.Tensor
    #: [R] exit layer, 1-based.
    exit_layer: torch.Tensor
    #: [R] log q_e(y | x) of the exit taken (graph kept when the backbone/classifiers are trained).
    log_q_exit: torch.Tensor
    #: [R] whether the exit taken predicts the gold label.
    correct: torch.Tensor
    #: [R] summed Bernoulli entropy of the decisions faced, and their number (for logging).
    entropy_sum: torch.Tensor
    decisions: torch.Tensor
    #: Low-variance stage-3 option: sum_l P(exit at l) * CE_l per row (full depth for every row), else None.
    expected_ce: torch.Tensor | None = None
    #: With ``every_exit``: [R, L] P(exit at l) (graph to the policies), and each exit's correctness and
    #: log q_l(y|x) (detached): what the expected-reward policy loss needs. None otherwise.
    exit_probs: torch.Tensor | None = None
    layer_correct: torch.Tensor | None = None
    layer_log_q: torch.Tensor | None = None


def repeat_batch(batch: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Every row k times, copies consecutive (the layout group baselines expect)."""
    return {name: value.repeat_interleave(k, dim=0) for name, value in batch.items()}


@dataclass
class ActionNoise:
    """Uniform noise behind every sampled action of a batch: ``[rows, L-1]`` each (rows = examples x K).

    Drawing it for a whole global step on every process and handing each process its rows makes the sampled
    actions of an example independent of how examples are split over processes."""

    #: action = u < p
    u: torch.Tensor
    #: epsilon-greedy: explore when explore < epsilon, then exit when coin < 0.5 (None when epsilon = 0)
    explore: torch.Tensor | None = None
    coin: torch.Tensor | None = None

    @classmethod
    def draw(cls, rows: int, num_layers: int, generator: torch.Generator | None, epsilon: float,
             device: torch.device | str = "cpu") -> ActionNoise:
        shape = (rows, max(num_layers - 1, 0))
        u = torch.rand(shape, generator=generator, device=device)
        if epsilon > 0:
            return cls(u, torch.rand(shape, generator=generator, device=device),
                       torch.rand(shape, generator=generator, device=device))
        return cls(u)

    def rows(self, start: int, stop: int) -> ActionNoise:
        pick = (lambda t: None if t is None else t[start:stop])  # noqa: E731
        return ActionNoise(self.u[start:stop], pick(self.explore), pick(self.coin))

    def actions(self, layer: int, rows: torch.Tensor, p: torch.Tensor, epsilon: float) -> torch.Tensor:
        action = self.u[rows, layer] < p.detach().float()
        if epsilon > 0:
            if self.explore is None or self.coin is None:
                raise ValueError("epsilon > 0 needs noise drawn with epsilon > 0")
            action = torch.where(self.explore[rows, layer] < epsilon, self.coin[rows, layer] < 0.5, action)
        return action


def rollout(
    model,
    batch: dict[str, torch.Tensor],
    *,
    train_backbone: bool,
    train_exits: bool | None = None,
    generator: torch.Generator | None = None,
    epsilon: float = 0.0,
    expected_ce: bool = False,
    every_exit: bool = False,
    trim: bool = True,
    noise: ActionNoise | None = None,
) -> Rollout:
    """Sample exits for every row of ``batch`` (already repeated K times) through ``model``.

    With ``train_backbone=False`` (stage 2) the backbone and classifiers run without a graph and only the
    policies get gradients; ``train_exits`` (default: ``train_backbone``) gives the classifiers a graph on their
    own, over the backbone's detached states. ``expected_ce=True`` keeps every row to full depth (the expected-CE
    loss needs every exit's CE), so nothing is gathered out in that mode; so does ``every_exit=True``, which also
    returns every exit's outcome and the exit distribution (the expected-reward policy loss). ``noise`` (one row per
    batch row) replaces drawing from ``generator`` layer by layer.
    """
    labels = batch["labels"]
    rows = labels.shape[0]
    device = labels.device
    num_layers = model.num_layers
    grad_ctx = nullcontext if train_backbone else torch.no_grad
    exit_ctx = nullcontext if (train_backbone if train_exits is None else train_exits) else torch.no_grad

    with grad_ctx():
        state = model.embed(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
    active = torch.arange(rows, device=device)
    exit_layer = torch.full((rows,), num_layers, dtype=torch.long, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    lp_rows, lp_terms, q_rows, q_terms, correct_rows, correct_vals = [], [], [], [], [], []
    entropy_sum = torch.zeros(rows, device=device)
    decisions = torch.zeros(rows, device=device)
    policy_probs, layer_ce, layer_correct, layer_log_q = [], [], [], []
    dense = expected_ce or every_exit  # every row runs to full depth
    path = None  # what "path" policies read of the exits already passed

    for i in range(num_layers):
        with grad_ctx():
            state, pooled = model.run_layer(i, state)
        y = labels.index_select(0, active)
        last = i == num_layers - 1
        if last:
            exits = torch.ones(len(active), dtype=torch.bool, device=device)
        else:
            p = clamp_probs(torch.sigmoid(model.policy_logits(i, pooled, path).float()))
            if model.policies_read_path:
                path = model.advance_path(i, pooled, path)
            if noise is not None:
                exits = noise.actions(i, active, p, epsilon)
            else:
                exits = sample_exit_actions(p.detach(), generator=generator, epsilon=epsilon)
            if dense:
                exits = exits & done.index_select(0, active).logical_not()
                policy_probs.append(p)
            # Only rows still on their trajectory contribute a decision at this layer.
            live = ~done.index_select(0, active)
            lp_rows.append(active[live])
            lp_terms.append(torch.where(exits, p.log(), (1 - p).log())[live])
            ent = -(p * p.log() + (1 - p) * (1 - p).log()).detach()
            entropy_sum.index_add_(0, active[live], ent[live])
            decisions.index_add_(0, active[live], torch.ones_like(ent[live]))
        if dense:
            with exit_ctx():
                logits_all = model.exit_logits(i, pooled).float()
            ce_all = F.cross_entropy(logits_all, y, reduction="none")
            layer_ce.append(ce_all)
            layer_correct.append(logits_all.detach().argmax(-1) == y)
            layer_log_q.append(-ce_all.detach())
        newly = exits & ~done.index_select(0, active)
        if newly.any():
            if dense:  # every row's exit logits are already there
                logits = logits_all[newly]
            else:
                with exit_ctx():
                    logits = model.exit_logits(i, pooled[newly]).float()
            log_q = logits.log_softmax(-1).gather(1, y[newly].unsqueeze(1)).squeeze(1)
            exited_rows = active[newly]
            q_rows.append(exited_rows)
            q_terms.append(log_q)
            correct_rows.append(exited_rows)
            correct_vals.append(logits.argmax(-1) == y[newly])
            exit_layer[exited_rows] = i + 1
            done[exited_rows] = True
        if last or dense:
            continue
        keep = ~exits
        if not keep.any():
            break
        active = active[keep]
        state = state.select(keep.nonzero().squeeze(1))
        if path is not None:
            path = path.select(keep)
        if trim:
            state = state.trim()

    log_prob = torch.zeros(rows, device=device).index_add(0, torch.cat(lp_rows), torch.cat(lp_terms)) \
        if lp_rows else torch.zeros(rows, device=device)
    log_q_exit = torch.zeros(rows, device=device).index_add(0, torch.cat(q_rows), torch.cat(q_terms))
    correct = torch.zeros(rows, dtype=torch.bool, device=device)
    correct[torch.cat(correct_rows)] = torch.cat(correct_vals)
    expected = dist = None
    if dense:
        dist = exit_distribution(torch.stack(policy_probs, dim=1)) if policy_probs \
            else torch.ones(rows, 1, device=device)
    if expected_ce:
        expected = (dist.detach() * torch.stack(layer_ce, dim=1)).sum(1)
    outcomes = (dist, torch.stack(layer_correct, dim=1), torch.stack(layer_log_q, dim=1)) if every_exit \
        else (None, None, None)
    return Rollout(log_prob, exit_layer, log_q_exit, correct, entropy_sum, decisions, expected, *outcomes)
