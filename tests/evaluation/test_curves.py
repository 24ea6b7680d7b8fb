import pytest

from consistentee.evaluation import (
    auc_saved_fraction,
    best_speedup_within,
    pareto_frontier,
    saved_fraction_from_speedup,
    select_on_dev,
)


def test_pareto_frontier_by_hand():
    points = [(1.0, 0.90), (1.5, 0.89), (1.2, 0.88), (2.0, 0.80), (1.5, 0.85), (2.0, 0.80), (1.1, 0.90)]
    # (1.0,.90) is dominated by (1.1,.90); (1.2,.88) and (1.5,.85) by (1.5,.89); duplicate (2.0,.80) kept once
    assert pareto_frontier(points) == [(1.1, 0.90), (1.5, 0.89), (2.0, 0.80)]
    assert pareto_frontier([]) == []
    assert pareto_frontier([(1.0, 0.5)]) == [(1.0, 0.5)]


# saved fraction, accuracy; (0.2, 0.80) is dominated by (0.3, 0.85)
POINTS = [(0.1, 0.90), (0.3, 0.85), (0.5, 0.70), (0.2, 0.80)]


def test_auc_step_function_by_hand():
    # f = .90 on [0, .1], .85 on (.1, .3], .70 on (.3, .5], 0 on (.5, .6]
    area = 0.1 * 0.90 + 0.2 * 0.85 + 0.2 * 0.70 + 0.1 * 0.0
    assert auc_saved_fraction(POINTS, (0.0, 0.6)) == pytest.approx(area / 0.6)
    assert auc_saved_fraction(POINTS, (0.0, 0.6), fill_right=0.5) == pytest.approx((area + 0.05) / 0.6)
    # a sub-range: (.2, .3] at .85 and (.3, .4] at .70
    assert auc_saved_fraction(POINTS, (0.2, 0.4)) == pytest.approx((0.1 * 0.85 + 0.1 * 0.70) / 0.2)
    # flat to the left of the only point
    assert auc_saved_fraction([(0.25, 0.8)], (0.0, 0.5)) == pytest.approx(0.25 * 0.8 / 0.5)
    # inside the frontier's reach only: the range is entirely at the left flat part
    assert auc_saved_fraction(POINTS, (0.0, 0.1)) == pytest.approx(0.90)


def test_auc_ignores_dominated_points_and_rewards_dominance():
    base = auc_saved_fraction(POINTS, (0.0, 0.5))
    assert auc_saved_fraction(POINTS + [(0.05, 0.5), (0.4, 0.7)], (0.0, 0.5)) == pytest.approx(base)
    better = [(s, a + 0.01) for s, a in POINTS]
    assert auc_saved_fraction(better, (0.0, 0.5)) == pytest.approx(base + 0.01)


def test_auc_bad_input():
    with pytest.raises(ValueError):
        auc_saved_fraction(POINTS, (0.5, 0.5))
    with pytest.raises(ValueError):
        auc_saved_fraction([], (0.0, 0.5))


def test_saved_fraction_from_speedup():
    assert saved_fraction_from_speedup(2.0) == 0.5
    assert saved_fraction_from_speedup(1.0) == 0.0


SPEED_ACC = [(1.0, 0.900), (1.4, 0.897), (1.8, 0.890), (2.2, 0.880)]


@pytest.mark.parametrize(
    "full, loss, expected",
    [(0.9, 0.5, 1.4), (0.9, 1.0, 1.8), (0.9, 0.0, 1.0), (0.9, 2.0, 2.2), (0.95, 0.1, None)],
)
def test_best_speedup_within(full, loss, expected):
    assert best_speedup_within(SPEED_ACC, full, loss) == expected


def test_select_on_dev_mapping_with_tie():
    dev = {0.1: (1.2, 0.900), 0.2: (1.6, 0.896), 0.3: (1.6, 0.898), 0.4: (2.0, 0.850)}
    assert select_on_dev(dev, 0.9, 0.5) == 0.3  # 1.6x tie -> the more accurate knob
    assert select_on_dev(dev, 0.9, 10.0) == 0.4
    assert select_on_dev(dev, 0.9, 0.0) == 0.1
    assert select_on_dev(dev, 0.95, 0.1) is None


def test_select_on_dev_triples_with_tuple_knobs():
    dev = [((1, 0.1), 1.3, 0.91), ((2, 0.1), 1.1, 0.92), ((1, 0.3), 1.9, 0.85)]
    assert select_on_dev(dev, 0.92, 1.0) == (1, 0.1)
    assert select_on_dev(dev, 0.92, 0.5) == (2, 0.1)
