"""Specification tests for the ConsistentEE RL math (docs/method.md sections 3-5)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from consistentee.training.rl import (
    HARDNESS,
    REWARDS,
    EpsilonSchedule,
    accuracy_only_reward,
    clamp_probs,
    cost_only_reward,
    decisions_reached,
    exit_distribution,
    expected_exit_ce,
    expected_reward_loss,
    group_baseline_advantage,
    hardness_guided_reward,
    log_exit_distribution,
    loss_hardness_weight,
    make_reward,
    masked_trajectory_log_prob,
    memorized_hardness_weight,
    policy_entropy,
    policy_gradient_loss,
    sample_exit_actions,
    sample_exit_layers,
    trajectory_log_prob,
)


def _rand_p(n: int, num_layers: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.05 + 0.9 * torch.rand(n, num_layers - 1, generator=g, dtype=torch.float64)


# --------------------------------------------------------------------------- distribution


@pytest.mark.parametrize("num_layers", [1, 2, 3, 6, 12])
def test_exit_distribution_sums_to_one(num_layers: int) -> None:
    p = _rand_p(7, num_layers, seed=num_layers)
    dist = exit_distribution(p)
    assert dist.shape == (7, num_layers)
    assert torch.all(dist >= 0)
    torch.testing.assert_close(dist.sum(dim=1), torch.ones(7, dtype=dist.dtype))


def test_exit_distribution_hand_computed_three_layers() -> None:
    p = torch.tensor([[0.2, 0.5]], dtype=torch.float64)
    expected = torch.tensor([[0.2, 0.8 * 0.5, 0.8 * 0.5]], dtype=torch.float64)
    torch.testing.assert_close(exit_distribution(p), expected)


def test_exit_distribution_is_differentiable() -> None:
    p = _rand_p(4, 4).requires_grad_(True)
    exit_distribution(p)[:, 0].sum().backward()
    # P(exit at 1) = p_1: gradient is 1 w.r.t. p_1 and 0 w.r.t. deeper policies.
    torch.testing.assert_close(p.grad[:, 0], torch.ones(4, dtype=p.dtype))
    torch.testing.assert_close(p.grad[:, 1:], torch.zeros(4, 2, dtype=p.dtype))


# --------------------------------------------------------------------------- trajectory log-prob


def _brute_force(p_row: list[float], num_layers: int) -> tuple[dict[int, float], dict[int, float]]:
    """Two independent enumerations of P(exit at e).

    direct[e]: product over the explicit truncated action sequence (continue^(e-1), exit | forced).
    marginal[e]: sum over *all* 2^(L-1) full action vectors (actions drawn at every layer), grouped by
    the first exit action.
    """
    direct: dict[int, float] = {}
    for e in range(1, num_layers + 1):
        prob = 1.0
        for j in range(1, e):
            prob *= 1.0 - p_row[j - 1]
        if e < num_layers:
            prob *= p_row[e - 1]
        direct[e] = prob
    marginal = {e: 0.0 for e in range(1, num_layers + 1)}
    for actions in itertools.product([0, 1], repeat=num_layers - 1):
        prob = math.prod(p if a else 1.0 - p for p, a in zip(p_row, actions, strict=True))
        e = next((j + 1 for j, a in enumerate(actions) if a), num_layers)
        marginal[e] += prob
    return direct, marginal


@pytest.mark.parametrize("num_layers", [3, 4])
def test_trajectory_log_prob_matches_brute_force(num_layers: int) -> None:
    p = _rand_p(5, num_layers, seed=10 + num_layers)
    dist = exit_distribution(p)
    for e in range(1, num_layers + 1):
        exit_layer = torch.full((5,), e, dtype=torch.long)
        lp = trajectory_log_prob(p, exit_layer)
        lp_masked = masked_trajectory_log_prob(p, exit_layer)
        for i in range(5):
            direct, marginal = _brute_force(p[i].tolist(), num_layers)
            assert lp[i].item() == pytest.approx(math.log(direct[e]), rel=1e-9)
            assert lp[i].item() == pytest.approx(math.log(marginal[e]), rel=1e-9)
            assert lp_masked[i].item() == pytest.approx(math.log(direct[e]), rel=1e-9)
            assert lp[i].item() == pytest.approx(math.log(dist[i, e - 1].item()), rel=1e-9)


@pytest.mark.parametrize("num_layers", [2, 3, 5])
def test_trajectory_probabilities_sum_to_one(num_layers: int) -> None:
    p = _rand_p(6, num_layers, seed=num_layers)
    total = torch.zeros(6, dtype=torch.float64)
    for e in range(1, num_layers + 1):
        total += trajectory_log_prob(p, torch.full((6,), e, dtype=torch.long)).exp()
    torch.testing.assert_close(total, torch.ones(6, dtype=torch.float64))
    torch.testing.assert_close(log_exit_distribution(p).exp(), exit_distribution(p))


def test_trajectory_log_prob_is_deterministic_and_starts_from_zero() -> None:
    # L = 1: no decisions at all, forced exit at 1 -> log-prob exactly 0 (no garbage accumulator).
    p = torch.empty(3, 0)
    torch.testing.assert_close(trajectory_log_prob(p, torch.ones(3, dtype=torch.long)), torch.zeros(3))
    torch.testing.assert_close(masked_trajectory_log_prob(p, torch.ones(3, dtype=torch.long)), torch.zeros(3))
    q = _rand_p(4, 5)
    e = torch.tensor([1, 2, 3, 5])
    assert torch.equal(trajectory_log_prob(q, e), trajectory_log_prob(q, e))


def test_no_policy_term_at_forced_last_layer() -> None:
    num_layers = 4
    p = _rand_p(3, num_layers).requires_grad_(True)
    e = torch.full((3,), num_layers, dtype=torch.long)
    lp = trajectory_log_prob(p, e)
    torch.testing.assert_close(lp, torch.log1p(-p.detach()).sum(dim=1))
    lp.sum().backward()
    # depends on p_1..p_{L-1} only through log(1 - p_j): d/dp_j = -1/(1 - p_j), no log p term anywhere
    torch.testing.assert_close(p.grad, -1.0 / (1.0 - p.detach()))
    with pytest.raises(ValueError):
        trajectory_log_prob(p.detach(), torch.full((3,), num_layers + 1, dtype=torch.long))
    with pytest.raises(ValueError):
        trajectory_log_prob(p.detach(), torch.zeros(3, dtype=torch.long))


def test_clamping_keeps_extreme_probabilities_finite() -> None:
    p = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    for e in range(1, 5):
        exit_layer = torch.full((2,), e, dtype=torch.long)
        assert torch.isfinite(trajectory_log_prob(p, exit_layer)).all()
        assert torch.isfinite(masked_trajectory_log_prob(p, exit_layer)).all()
    # half precision: 1 - 1e-6 rounds to 1, the math must still be done in float32
    ph = p.to(torch.bfloat16)
    assert torch.isfinite(trajectory_log_prob(ph, torch.tensor([4, 4]))).all()
    c = clamp_probs(torch.tensor([0.0, 0.5, 1.0]))
    assert c[0] > 0 and c[2] < 1 and c[1] == 0.5


def test_masked_variant_ignores_nan_beyond_exit_and_gradient_is_clean() -> None:
    num_layers = 5
    clean = _rand_p(4, num_layers, seed=3)
    exit_layer = torch.tensor([1, 2, 4, 5])
    garbage = clean.clone()
    reached = decisions_reached(exit_layer, num_layers)
    garbage[~reached] = float("nan")
    assert torch.isnan(garbage).any()
    garbage.requires_grad_(True)
    lp = masked_trajectory_log_prob(garbage, exit_layer)
    torch.testing.assert_close(lp, trajectory_log_prob(clean, exit_layer))
    lp.sum().backward()
    assert not torch.isnan(garbage.grad).any()
    assert torch.all(garbage.grad[~reached] == 0)
    # zeros as filler behave the same (no log(0) leaking)
    zeros = clean.clone()
    zeros[~reached] = 0.0
    torch.testing.assert_close(masked_trajectory_log_prob(zeros, exit_layer), lp.detach())


def test_decisions_reached_mask() -> None:
    mask = decisions_reached(torch.tensor([1, 3, 4]), 4)
    expected = torch.tensor([[True, False, False], [True, True, True], [True, True, True]])
    assert torch.equal(mask, expected)


# --------------------------------------------------------------------------- sampling


def test_sampling_extremes() -> None:
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_exit_layers(torch.ones(50, 5), g), torch.ones(50, dtype=torch.long))
    assert torch.equal(sample_exit_layers(torch.zeros(50, 5), g), torch.full((50,), 6, dtype=torch.long))
    out = sample_exit_layers(torch.rand(10, 3, generator=g), g)
    assert out.dtype == torch.long and out.shape == (10,)
    assert out.min() >= 1 and out.max() <= 4


def test_sampling_frequencies_match_exit_distribution() -> None:
    g = torch.Generator().manual_seed(1234)
    row = torch.tensor([0.3, 0.1, 0.5, 0.6])
    n = 40_000
    exits = sample_exit_layers(row.expand(n, -1), g)
    freq = torch.bincount(exits, minlength=6)[1:].float() / n
    torch.testing.assert_close(freq, exit_distribution(row[None])[0], atol=0.01, rtol=0)


def test_epsilon_greedy_fully_random_is_uniform_coin() -> None:
    g = torch.Generator().manual_seed(7)
    n = 40_000
    exits = sample_exit_layers(torch.ones(n, 3), g, epsilon=1.0)  # policy ignored entirely
    freq = torch.bincount(exits, minlength=5)[1:].float() / n
    torch.testing.assert_close(freq, exit_distribution(torch.full((1, 3), 0.5))[0], atol=0.01, rtol=0)
    with pytest.raises(ValueError):
        sample_exit_layers(torch.ones(2, 3), g, epsilon=1.5)


def test_sample_exit_actions_stepwise() -> None:
    g = torch.Generator().manual_seed(0)
    a = sample_exit_actions(torch.tensor([0.0, 1.0, 0.0, 1.0]), g)
    assert a.dtype == torch.bool
    assert a.tolist() == [False, True, False, True]
    n = 40_000
    frac = sample_exit_actions(torch.full((n,), 0.3), g).float().mean().item()
    assert frac == pytest.approx(0.3, abs=0.01)
    # epsilon 0.5 on p=0: half the actions are coin flips -> P(exit) = 0.25
    frac = sample_exit_actions(torch.zeros(n), g, epsilon=0.5).float().mean().item()
    assert frac == pytest.approx(0.25, abs=0.01)


def test_sampling_is_reproducible_with_generator() -> None:
    p = torch.rand(100, 6, generator=torch.Generator().manual_seed(0))
    a = sample_exit_layers(p, torch.Generator().manual_seed(5), epsilon=0.1)
    b = sample_exit_layers(p, torch.Generator().manual_seed(5), epsilon=0.1)
    assert torch.equal(a, b)


def test_epsilon_schedule() -> None:
    s = EpsilonSchedule(start=0.2, end=0.0, decay_steps=100)
    assert s.value(0) == pytest.approx(0.2)
    assert s.value(50) == pytest.approx(0.1)
    assert s.value(100) == pytest.approx(0.0)
    assert s.value(10_000) == pytest.approx(0.0)
    assert EpsilonSchedule(0.3, 0.1, 0).value(0) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        EpsilonSchedule(1.5, 0.0, 10)
    with pytest.raises(ValueError):
        EpsilonSchedule(0.1, 0.0, -1)


# --------------------------------------------------------------------------- rewards and hardness


def test_beta_zero_rewards_equal_log_q() -> None:
    log_q = torch.tensor([-0.1, -2.0, -0.5])
    e = torch.tensor([1, 3, 6])
    w = torch.tensor([0.9, 0.5, 0.0])
    for name in ("hardness", "cost", "accuracy"):
        torch.testing.assert_close(make_reward(name, 0.0)(log_q, e, w, 6), log_q)
    torch.testing.assert_close(accuracy_only_reward()(log_q, e, w, 6), log_q)


def test_hardness_weight_and_reward_formula() -> None:
    num_layers = 6
    m = torch.tensor([1, 3, 6])
    w = memorized_hardness_weight(m, num_layers)
    torch.testing.assert_close(w, torch.tensor([5 / 6, 0.5, 0.0]))
    log_q = torch.tensor([-0.2, -0.2, -0.2])
    e = torch.tensor([4, 4, 4])
    r = hardness_guided_reward(0.05)(log_q, e, w, num_layers)
    torch.testing.assert_close(r, log_q - 0.05 * w * 4)
    assert r[2] == log_q[2]  # hardest example (m = L): the depth cost vanishes
    torch.testing.assert_close(cost_only_reward(0.05)(log_q, e, None, num_layers), log_q - 0.2)
    with pytest.raises(ValueError):
        memorized_hardness_weight(torch.tensor([0]), num_layers)
    with pytest.raises(ValueError):
        memorized_hardness_weight(torch.tensor([7]), num_layers)


def test_reward_decreases_with_depth_for_easy_examples() -> None:
    num_layers = 6
    e = torch.arange(1, num_layers + 1)
    log_q = torch.full((num_layers,), -0.3)
    w = memorized_hardness_weight(torch.ones(num_layers, dtype=torch.long), num_layers)
    for reward in (make_reward("hardness", 0.05), make_reward("cost", 0.05)):
        r = reward(log_q, e, w, num_layers)
        assert torch.all(r[1:] < r[:-1])


def test_rewards_are_detached() -> None:
    log_q = torch.tensor([-0.3, -1.0], requires_grad=True)
    w = torch.tensor([0.5, 0.2], requires_grad=True)
    for name in REWARDS:
        r = make_reward(name, 0.1)(log_q, torch.tensor([1, 2]), w, 3)
        assert not r.requires_grad


def test_make_reward_validation() -> None:
    with pytest.raises(ValueError):
        make_reward("hardness", -0.01)
    with pytest.raises(ValueError):
        make_reward("nope", 0.1)
    with pytest.raises(ValueError):
        hardness_guided_reward(-1.0)
    with pytest.raises(ValueError):
        hardness_guided_reward(0.1)(torch.zeros(2), torch.ones(2, dtype=torch.long), None, 3)
    assert set(REWARDS) == {"hardness", "cost", "accuracy"}
    assert set(HARDNESS) == {"memorized", "loss"}


@pytest.mark.parametrize("normalization", ["exp", "minmax"])
def test_loss_hardness_weight_is_monotone_decreasing(normalization: str) -> None:
    loss = torch.tensor([0.0, 0.05, 0.3, 1.2, 4.0, 9.0])
    w = loss_hardness_weight(loss, normalization)
    assert torch.all((w >= 0) & (w <= 1))
    assert torch.all(w[1:] < w[:-1])
    assert w[0] == pytest.approx(1.0)
    # order of rows does not matter
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    torch.testing.assert_close(loss_hardness_weight(loss[perm], normalization), w[perm])


def test_loss_hardness_weight_details() -> None:
    # "exp" is per example: q_L(y|x), independent of the rest of the batch
    torch.testing.assert_close(loss_hardness_weight(torch.tensor([0.7])), torch.tensor([math.exp(-0.7)]))
    torch.testing.assert_close(
        loss_hardness_weight(torch.tensor([0.7, 3.0]))[0], loss_hardness_weight(torch.tensor([0.7, 0.1]))[0]
    )
    torch.testing.assert_close(
        loss_hardness_weight(torch.tensor([2.0, 2.0]), "minmax"), torch.tensor([0.5, 0.5])
    )
    assert not loss_hardness_weight(torch.tensor([0.5], requires_grad=True)).requires_grad
    with pytest.raises(ValueError):
        loss_hardness_weight(torch.tensor([0.5]), "bogus")


# --------------------------------------------------------------------------- estimator


def test_group_baseline_sums_to_zero_per_group() -> None:
    rewards = torch.randn(5 * 8, generator=torch.Generator().manual_seed(0))
    adv = group_baseline_advantage(rewards, 8)
    assert adv.shape == rewards.shape
    torch.testing.assert_close(adv.view(5, 8).sum(dim=1), torch.zeros(5), atol=1e-6, rtol=0)
    # groups are consecutive rows: the first group's baseline is the mean of rows 0..7
    torch.testing.assert_close(adv[:8], rewards[:8] - rewards[:8].mean())
    with pytest.raises(ValueError):
        group_baseline_advantage(torch.zeros(10), 4)
    with pytest.raises(ValueError):
        group_baseline_advantage(torch.zeros(10), 1)


def test_constant_rewards_give_zero_policy_gradient() -> None:
    logits = torch.randn(3 * 4, 3, requires_grad=True)
    p = torch.sigmoid(logits)
    e = torch.tensor([1, 2, 3, 4] * 3)
    lp = trajectory_log_prob(p, e)
    adv = group_baseline_advantage(torch.full((12,), -1.7), 4)
    loss = policy_gradient_loss(lp, adv)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.all(logits.grad == 0)


def test_policy_gradient_loss_value_and_detached_advantage() -> None:
    lp = torch.tensor([-1.0, -2.0], requires_grad=True)
    adv = torch.tensor([1.0, -1.0], requires_grad=True)
    loss = policy_gradient_loss(lp, adv)
    assert loss.item() == pytest.approx(-((1.0 * -1.0) + (-1.0 * -2.0)) / 2)
    loss.backward()
    assert adv.grad is None
    torch.testing.assert_close(lp.grad, torch.tensor([-0.5, 0.5]))


def test_expected_exit_ce() -> None:
    p = torch.tensor([[0.5, 0.5]], requires_grad=True)
    dist = exit_distribution(p)  # [0.5, 0.25, 0.25]
    ce = torch.tensor([[1.0, 2.0, 4.0]], requires_grad=True)
    loss = expected_exit_ce(dist, ce)
    assert loss.item() == pytest.approx(0.5 + 0.5 + 1.0)
    loss.backward()
    assert p.grad is None  # the exit probabilities are detached inside
    torch.testing.assert_close(ce.grad, torch.tensor([[0.5, 0.25, 0.25]]))


def test_policy_entropy() -> None:
    p = torch.tensor([[0.5, float("nan")], [0.5, 0.5]], requires_grad=True)
    mask = torch.tensor([[True, False], [True, True]])
    h = policy_entropy(p, mask)
    assert h.item() == pytest.approx(math.log(2))
    h.backward()
    assert not torch.isnan(p.grad).any()
    confident = policy_entropy(torch.tensor([[1.0, 0.0]]), torch.ones(1, 2, dtype=torch.bool))
    assert 0.0 <= confident.item() < 1e-4
    assert policy_entropy(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.bool)).item() == 0.0


def test_reinforce_learns_to_exit_early() -> None:
    """One learnable logit per layer (L=3), reward -e: REINFORCE with a group baseline exits at layer 1."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    num_layers, n, k = 3, 16, 8
    logits = torch.zeros(num_layers - 1, requires_grad=True)
    opt = torch.optim.SGD([logits], lr=0.5)
    reward_fn = cost_only_reward(1.0)
    for _ in range(300):
        p = torch.sigmoid(logits).expand(n * k, -1)
        exits = sample_exit_layers(p, g)
        rewards = reward_fn(torch.zeros(n * k), exits, None, num_layers)
        loss = policy_gradient_loss(trajectory_log_prob(p, exits), group_baseline_advantage(rewards, k))
        opt.zero_grad()
        loss.backward()
        opt.step()
    p_exit_1 = exit_distribution(torch.sigmoid(logits)[None])[0, 0].item()
    assert p_exit_1 > 0.9


def test_group_std_normalisation_gives_every_group_the_same_scale():
    from consistentee.training.rl import group_baseline_advantage

    rewards = torch.tensor([0.0, -0.3, -0.6, -0.3, 0.0, -8.0, -8.0, 0.0])  # an easy and a hard example, K=4
    plain = group_baseline_advantage(rewards, 4)
    normed = group_baseline_advantage(rewards, 4, normalize="group_std", eps=0.0)
    assert plain.view(2, 4).abs().max(1).values[1] > 10 * plain.view(2, 4).abs().max(1).values[0]
    assert torch.allclose(normed.view(2, 4).std(1), torch.ones(2))
    assert torch.allclose(normed.view(2, 4).sum(1), torch.zeros(2), atol=1e-6)
    assert torch.equal(group_baseline_advantage(torch.full((4,), -2.0), 4, normalize="group_std"), torch.zeros(4))
    with pytest.raises(ValueError, match="normalisation"):
        group_baseline_advantage(rewards, 4, normalize="zscore")


def test_batch_std_normalisation_keeps_the_ratio_between_groups():
    """A group whose rollouts differ only by the depth cost keeps small advantages next to a group where exiting
    early changes the answer (0/1 quality): one scale for the whole batch, not one per group."""
    from consistentee.training.rl import batch_rms, group_baseline_advantage

    cost_only = [1.0 - 0.01 * e for e in (1, 2, 3, 4)]  # always right; deeper costs a little
    decisive = [0.0, 0.98, 0.97, 0.0]  # wrong when it exits too early or at the wrong place
    rewards = torch.tensor(cost_only + decisive)
    plain = group_baseline_advantage(rewards, 4)
    batch = group_baseline_advantage(rewards, 4, normalize="batch_std", eps=0.0)
    per_group = group_baseline_advantage(rewards, 4, normalize="group_std", eps=0.0)
    ratio = lambda a: a.view(2, 4).abs().max(1).values  # noqa: E731
    assert torch.allclose(ratio(batch)[0] / ratio(batch)[1], ratio(plain)[0] / ratio(plain)[1])
    assert ratio(per_group)[0] / ratio(per_group)[1] > 0.5  # group_std blows the cost-only group up
    assert torch.allclose(batch.pow(2).mean().sqrt(), torch.tensor(1.0))
    # across processes: rows with weight 0 (fillers) are left out, and the reduced sums set the scale
    values, weight = torch.tensor([3.0, 4.0, 100.0]), torch.tensor([1.0, 1.0, 0.0])
    assert torch.isclose(batch_rms(values, weight), torch.tensor(12.5).sqrt())
    doubled = batch_rms(values, weight, total=lambda sums: sums + torch.tensor([0.0, 2.0]))  # 2 more zero rows
    assert torch.isclose(doubled, torch.tensor(25.0 / 4).sqrt())


def test_expected_reward_loss_is_the_objective_the_policy_gradient_estimates():
    # Three rows, four layers: the exact gradient of -E[R] equals the mean policy-gradient estimate over many
    # sampled exits (REINFORCE with the reward of the exit taken), up to Monte-Carlo noise.
    p = _rand_p(3, 4, seed=5).requires_grad_(True)
    reward = torch.tensor([[1.0, 0.0, 0.5, 0.2], [0.0, 1.0, 1.0, 0.9], [0.3, 0.3, 0.3, 1.0]], dtype=torch.float64)
    expected_reward_loss(exit_distribution(p), reward).sum().backward()
    exact = p.grad.clone()
    assert torch.allclose(expected_reward_loss(exit_distribution(p), reward),
                          -(exit_distribution(p) * reward).sum(1))

    n = 200_000
    q = p.detach().repeat_interleave(n, 0).requires_grad_(True)
    e = sample_exit_layers(q.detach(), generator=torch.Generator().manual_seed(0))
    r = reward.repeat_interleave(n, 0).gather(1, (e - 1).unsqueeze(1)).squeeze(1)
    (-(r * trajectory_log_prob(q, e)).sum() / n).backward()
    estimate = q.grad.view(3, n, 3).sum(1)
    assert torch.allclose(estimate, exact, atol=0.02), (estimate, exact)
    assert exact.abs().max() > 0.1  # not trivially zero


def test_expected_reward_loss_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="both be"):
        expected_reward_loss(torch.ones(2, 3), torch.ones(2, 4))
