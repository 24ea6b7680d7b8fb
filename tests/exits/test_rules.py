import math

import numpy as np
import pytest
import torch

from consistentee.exits import (
    RULES,
    ConfidenceRule,
    ConsistentEERule,
    ExitRule,
    LayerSignals,
    entropy,
    make_rule,
    round_knob,
    select_state,
    simulate_exits,
)

# ---------------------------------------------------------------------------------------------
# Hand-made table: N=5 rows, L=4 layers, C=2 classes. Each row lists P(class 1) per layer.
#   row  P(class 1)                  argmax      max prob              entropy (nats)
#   r0   .90  .95  .99  .99          1 1 1 1     .90 .95 .99 .99       .325 .199 .056 .056
#   r1   .60  .40  .30  .02          1 0 0 0     .60 .60 .70 .98       .673 .673 .611 .098
#   r2   .55  .45  .60  .70          1 0 1 1     .55 .55 .60 .70       .688 .688 .673 .611
#   r3   .52  .48  .51  .49          1 0 1 0     .52 .52 .51 .51       .692 .692 .693 .693
#   r4   .90  .60  .90  .95          1 1 1 1     .90 .60 .90 .95       .325 .673 .325 .199
# ---------------------------------------------------------------------------------------------
P1 = [
    [0.90, 0.95, 0.99, 0.99],
    [0.60, 0.40, 0.30, 0.02],
    [0.55, 0.45, 0.60, 0.70],
    [0.52, 0.48, 0.51, 0.49],
    [0.90, 0.60, 0.90, 0.95],
]
PROBS = torch.stack([1 - torch.tensor(P1), torch.tensor(P1)], dim=-1)  # [5, 4, 2]
ARGMAX = [[1, 1, 1, 1], [1, 0, 0, 0], [1, 0, 1, 1], [1, 0, 1, 0], [1, 1, 1, 1]]
POLICY = torch.tensor(
    [
        [0.70, 0.10, 0.10, 0.10],
        [0.20, 0.50, 0.60, 0.00],
        [0.10, 0.10, 0.10, 0.90],
        [0.49, 0.51, 0.00, 0.00],
        [0.00, 0.00, 0.00, 0.00],
    ]
)
LABELS = torch.tensor([0, 0, 0, 1, 0])


def run(name, knob=None, **kw):
    rule = make_rule(name, knob)
    res = simulate_exits(rule, PROBS, **kw)
    return res.exit_layer.tolist(), res.predictions.tolist()


def expected_predictions(layers):
    return [ARGMAX[i][e - 1] for i, e in enumerate(layers)]


def test_entropy_helper_matches_hand_values():
    h = entropy(PROBS[:, 0])
    assert h[0].item() == pytest.approx(-(0.9 * math.log(0.9) + 0.1 * math.log(0.1)), abs=1e-6)
    assert h[3].item() == pytest.approx(0.6923, abs=1e-4)
    # 0 * log 0 counts as 0, not NaN
    assert entropy(torch.tensor([[1.0, 0.0]])).item() == 0.0


@pytest.mark.parametrize(
    "knob, expected",
    [
        (0.62, [1, 3, 4, 4, 1]),
        (0.30, [2, 4, 4, 4, 4]),
        (0.0, [4, 4, 4, 4, 4]),  # nothing is < 0: every row is forced out at L
    ],
)
def test_entropy_rule(knob, expected):
    layers, preds = run("entropy", knob)
    assert layers == expected
    assert preds == expected_predictions(expected)


@pytest.mark.parametrize(
    "knob, expected",
    [
        (0.65, [1, 3, 4, 4, 1]),
        (0.92, [2, 4, 4, 4, 4]),
        (0.60, [1, 1, 3, 4, 1]),  # >= : a max prob of exactly .60 exits
    ],
)
def test_confidence_rule(knob, expected):
    layers, preds = run("confidence", knob)
    assert layers == expected
    assert preds == expected_predictions(expected)


@pytest.mark.parametrize(
    "t, expected",
    [
        (1, [1, 1, 1, 1, 1]),
        (2, [2, 3, 4, 4, 2]),
        (3, [3, 4, 4, 4, 3]),
    ],
)
def test_patience_rule(t, expected):
    layers, preds = run("patience", t)
    assert layers == expected
    assert preds == expected_predictions(expected)


def test_patience_counts_consecutive_agreement_only():
    # argmax 0 0 1 0 0 0 (L=6): agreement at layers 2, 5, 6 -> t=3 exits at 6, not at 5
    p1 = torch.tensor([[0.1, 0.2, 0.8, 0.3, 0.1, 0.1]])
    probs = torch.stack([1 - p1, p1], -1)
    assert simulate_exits(make_rule("patience", 3), probs).exit_layer.tolist() == [6]
    p1 = torch.tensor([[0.1, 0.2, 0.8, 0.3, 0.1, 0.1, 0.1]])
    probs = torch.stack([1 - p1, p1], -1)
    assert simulate_exits(make_rule("patience", 3), probs).exit_layer.tolist() == [6]


def test_patience_three_classes():
    # C=3, argmax per layer: r0 0 1 2 2, r1 2 2 0 0, r2 1 1 1 1
    probs = torch.tensor(
        [
            [[0.5, 0.3, 0.2], [0.2, 0.5, 0.3], [0.2, 0.3, 0.5], [0.1, 0.1, 0.8]],
            [[0.2, 0.3, 0.5], [0.3, 0.2, 0.5], [0.6, 0.2, 0.2], [0.7, 0.2, 0.1]],
            [[0.3, 0.4, 0.3], [0.1, 0.8, 0.1], [0.1, 0.8, 0.1], [0.1, 0.8, 0.1]],
        ]
    )
    res = simulate_exits(make_rule("patience", 2), probs)
    assert res.exit_layer.tolist() == [4, 2, 2]
    assert res.predictions.tolist() == [2, 2, 1]
    res = simulate_exits(make_rule("confidence", 0.55), probs)
    assert res.exit_layer.tolist() == [4, 3, 2]
    assert res.predictions.tolist() == [2, 0, 1]


@pytest.mark.parametrize(
    "knob, expected",
    [
        ((1, 0.62), [1, 3, 4, 4, 1]),  # t=1 is the plain entropy rule
        ((2, 0.62), [2, 4, 4, 4, 4]),  # r4 is confident at 1, 3, 4: the streak restarts at 3
        ((2, 0.35), [2, 4, 4, 4, 4]),
        ((3, 0.62), [3, 4, 4, 4, 4]),
    ],
)
def test_pcee_rule(knob, expected):
    layers, preds = run("pcee", knob)
    assert layers == expected
    assert preds == expected_predictions(expected)


def test_pcee_streak_resets_on_unconfident_layer():
    # confident (H < .62) at layers 1, 3, 4, 5 of L=6: t=3 needs 3..5 -> exits at 5, not at 4
    p1 = torch.tensor([[0.95, 0.6, 0.95, 0.95, 0.95, 0.95]])
    probs = torch.stack([1 - p1, p1], -1)
    assert simulate_exits(make_rule("pcee", (3, 0.62)), probs).exit_layer.tolist() == [5]


def test_learned_rule_uses_ge():
    layers, preds = run("learned", 0.5, learned_scores=POLICY)
    assert layers == [1, 2, 4, 2, 4]
    assert preds == expected_predictions(layers)


def test_consistentee_rule_uses_strict_gt():
    layers, preds = run("consistentee", 0.5, policy_probs=POLICY)
    assert layers == [1, 3, 4, 2, 4]
    assert preds == expected_predictions(layers)
    # default threshold is 0.5
    assert make_rule("consistentee").knob == 0.5
    # threshold 0 exits every row whose p > 0 at once
    layers, _ = run("consistentee", 0.0, policy_probs=POLICY)
    assert layers == [1, 1, 1, 1, 4]


def test_policy_table_without_last_layer_column():
    layers, _ = run("consistentee", 0.5, policy_probs=POLICY[:, :3])
    assert layers == [1, 3, 4, 2, 4]


@pytest.mark.parametrize("k, expected", [(1, [1] * 5), (2, [2] * 5), (4, [4] * 5), (10, [4] * 5)])
def test_static_rule(k, expected):
    layers, preds = run("static", k)
    assert layers == expected
    assert preds == expected_predictions(expected)


def test_oracle_rule_with_never_correct_rows():
    layers, preds = run("oracle", labels=LABELS)
    # r0 and r4 always predict 1 but are labelled 0: never correct -> L
    assert layers == [4, 2, 2, 1, 4]
    assert preds == [1, 0, 0, 1, 1]


def test_last_layer_is_forced_and_decide_not_called_there():
    class Never(ExitRule):
        name = "never"
        knob_name = "x"
        default_knob = 0
        seen: list

        def decide(self, layer, signals, state):
            self.seen.append(layer)
            return torch.zeros(signals.batch_size, dtype=torch.bool), state

        @classmethod
        def default_grid(cls, **kw):
            return [0]

    rule = Never()
    rule.seen = []
    res = simulate_exits(rule, PROBS)
    assert res.exit_layer.tolist() == [4] * 5
    assert res.predictions.tolist() == [row[-1] for row in ARGMAX]
    assert rule.seen == [1, 2, 3]


def test_rows_leave_the_batch_and_state_is_gathered():
    """Drive a stateful rule like the engine: only rows still running are shown."""
    rule = make_rule("patience", 2)
    state = rule.init_state(5, "cpu")
    assert all(v.shape[0] == 5 for v in state.values())
    active = torch.arange(5)
    batches = []
    exits = {}
    for layer in (1, 2, 3):
        exit_, state = rule.decide(layer, LayerSignals(probs=PROBS[active, layer - 1]), state)
        batches.append(active.tolist())
        for i in active[exit_].tolist():
            exits[i] = layer
        keep = torch.nonzero(~exit_).squeeze(1)
        active = active[keep]
        state = select_state(state, keep)
    assert batches == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4], [1, 2, 3]]
    assert exits == {0: 2, 4: 2, 1: 3}
    assert state["prev"].tolist() == [1, 1]  # rows 2, 3 at layer 3


def test_missing_signal_is_a_clear_error():
    with pytest.raises(ValueError, match="policy"):
        simulate_exits(make_rule("consistentee"), PROBS)
    with pytest.raises(ValueError, match="labels"):
        simulate_exits(make_rule("oracle"), PROBS)
    with pytest.raises(ValueError, match="learned_score"):
        make_rule("learned").decide(1, LayerSignals(probs=PROBS[:, 0]), {})


@pytest.mark.parametrize(
    "name, knob",
    [
        ("nope", None),
        ("confidence", 1.5),
        ("confidence", -0.1),
        ("consistentee", 1.01),
        ("learned", -0.5),
        ("entropy", -0.1),
        ("entropy", float("nan")),
        ("entropy", "0.3"),
        ("patience", 0),
        ("patience", 1.5),
        ("patience", True),
        ("static", 0),
        ("static", None),
        ("pcee", (0, 0.3)),
        ("pcee", (2, -0.3)),
        ("pcee", 2),
        ("pcee", (1, 2, 3)),
        ("oracle", 0.5),
    ],
)
def test_invalid_rule_or_knob(name, knob):
    with pytest.raises(ValueError):
        make_rule(name, knob)


def test_registry_and_grids():
    assert set(RULES) == {
        "entropy",
        "confidence",
        "patience",
        "pcee",
        "learned",
        "static",
        "consistentee",
        "oracle",
    }
    for name, cls in RULES.items():
        assert cls.name == name
        grid = cls.default_grid(num_classes=3, num_layers=6)
        assert len(grid) >= 1
        for knob in grid:
            make_rule(name, knob)  # every grid value is valid
    ent = RULES["entropy"].default_grid(num_classes=3)
    assert min(ent) == 0.0 and max(ent) == pytest.approx(math.log(3), abs=1e-6)
    conf = RULES["confidence"].default_grid(num_classes=4)
    assert min(conf) == pytest.approx(0.25) and max(conf) < 1.0
    assert RULES["static"].default_grid(num_layers=6) == [1, 2, 3, 4, 5, 6]
    assert RULES["patience"].default_grid(num_layers=6) == [1, 2, 3, 4, 5, 6]
    assert all(t <= 2 for t, _ in RULES["pcee"].default_grid(num_layers=2))
    assert RULES["oracle"].default_grid() == [None]


# ------------------------------ simulate_exits == naive loop ----------------------------------


def naive_exit_layer(name, knob, probs, policy, learned, label):
    """Per-example reference written straight from each rule's definition (numpy, float64)."""
    num_layers = probs.shape[0]
    p = probs.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(p > 0, p * np.log(p), 0.0).sum(-1)
    am = p.argmax(-1)
    for layer in range(1, num_layers):
        i = layer - 1
        if name == "entropy":
            hit = ent[i] < knob
        elif name == "confidence":
            hit = p[i].max() >= knob
        elif name == "patience":
            hit = layer >= knob and len(set(am[layer - knob : layer].tolist())) == 1
        elif name == "pcee":
            t, s = knob
            hit = layer >= t and bool((ent[layer - t : layer] < s).all())
        elif name == "learned":
            hit = learned[i] >= knob
        elif name == "static":
            hit = layer >= knob
        elif name == "consistentee":
            hit = policy[i] > knob
        elif name == "oracle":
            hit = am[i] == label
        else:
            raise AssertionError(name)
        if hit:
            return layer
    return num_layers


def random_tables(seed, n, num_layers, c):
    g = torch.Generator().manual_seed(seed)
    # a random walk of logits keeps predictions sticky across layers, so patience rules bite
    steps = torch.randn(n, num_layers, c, generator=g) * 1.5
    temps = torch.rand(n, 1, 1, generator=g) * 3 + 0.2
    probs = torch.softmax(steps.cumsum(1) * temps, dim=-1)
    policy = torch.rand(n, num_layers, generator=g)
    learned = torch.rand(n, num_layers, generator=g)
    labels = torch.randint(0, c, (n,), generator=g)
    return probs, policy, learned, labels


@pytest.mark.parametrize(
    "seed, n, num_layers, c", [(0, 40, 4, 2), (1, 40, 6, 3), (2, 25, 12, 5), (3, 7, 1, 2)]
)
def test_simulate_matches_naive_loop(seed, n, num_layers, c):
    probs, policy, learned, labels = random_tables(seed, n, num_layers, c)
    for name, cls in RULES.items():
        for knob in cls.default_grid(num_classes=c, num_layers=num_layers):
            rule = make_rule(name, knob)
            res = simulate_exits(rule, probs, policy_probs=policy, learned_scores=learned, labels=labels)
            expected = [
                naive_exit_layer(
                    name, rule.knob, probs[j].numpy(), policy[j].numpy(), learned[j].numpy(), int(labels[j])
                )
                for j in range(n)
            ]
            assert res.exit_layer.tolist() == expected, (name, knob)
            want_pred = probs[torch.arange(n), res.exit_layer - 1].argmax(-1)
            assert torch.equal(res.predictions, want_pred), (name, knob)


def test_simulate_empty_table():
    res = simulate_exits(make_rule("patience", 2), torch.zeros(0, 4, 2))
    assert res.exit_layer.numel() == 0 and res.predictions.numel() == 0


def test_entropy_threshold_is_strict():
    # a one-hot row has entropy exactly 0: S=0 must not exit (0 < 0 is false)
    probs = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]])
    assert simulate_exits(make_rule("entropy", 0.0), probs).exit_layer.tolist() == [3]
    assert simulate_exits(make_rule("pcee", (1, 0.0)), probs).exit_layer.tolist() == [3]
    assert simulate_exits(make_rule("entropy", 1e-9), probs).exit_layer.tolist() == [1]


def test_round_knob_keeps_saturated_thresholds_apart():
    # six decimals for reading, but a policy's 1 - 2e-8 must not become 1.0 (which sends every row to full depth)
    assert round_knob(0.12345678) == 0.123457
    assert round_knob(1 - 2.345678e-8) < 1.0
    assert round_knob(1 - 2.345678e-8) != round_knob(1 - 3e-9)
    assert abs(round_knob(1 - 2.3456789e-8) - (1 - 2.34568e-8)) < 1e-15
    assert 0.0 < round_knob(3.2e-9) < 1e-8
    assert round_knob(1.0) == 1.0 and round_knob(0.0) == 0.0
    assert ConsistentEERule.knob_to_json(1 - 2e-8, model_key=0.05)["threshold"] < 1.0
    assert ConfidenceRule.knob_to_json(1 - 2e-8) < 1.0
