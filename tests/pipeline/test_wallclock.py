"""Wall-clock figures that can be trusted: a disturbed full-depth reference is caught, re-timed, and marked
invalid when it stays implausible."""

from __future__ import annotations

import itertools

import pytest

from consistentee.pipeline.wallclock import checked_wall_clock, measure_wall_clock, suspect_points


class FakeClock:
    """A timer that advances by what the called function says it cost."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def work(self, seconds) -> callable:
        costs = iter(seconds) if not isinstance(seconds, float) else itertools.repeat(seconds)

        def fn():
            self.now += next(costs)

        return fn


def test_a_steady_machine_passes_the_check():
    t = FakeClock()
    clock = measure_wall_clock(t.work(1.0), {"half": t.work(0.5)}, repeats=5, warmup=0, timer=t)
    assert clock.speedup("half") == 2.0
    assert suspect_points(clock, {"half": 2.1}) == {}


def test_a_wall_speedup_far_above_the_flops_bound_is_suspect():
    t = FakeClock()
    # a busy neighbour slowed every full-depth round: 1.8 s instead of 1.0 s
    clock = measure_wall_clock(t.work(1.8), {"p": t.work(1.0)}, repeats=5, warmup=0, timer=t)
    reasons = suspect_points(clock, {"p": 1.0})
    assert "above FLOPs" in reasons["p"]


def test_a_noisy_reference_makes_every_point_suspect():
    t = FakeClock()
    full = t.work([1.0, 1.6, 1.0, 2.2, 1.3])  # the middle rounds disagree: IQR 0.6 s on a 1.3 s median
    clock = measure_wall_clock(full, {"p": t.work(0.9)}, repeats=5, warmup=0, timer=t)
    assert "noisy full-depth reference" in suspect_points(clock, {"p": 1.2})["p"]


def test_one_slow_round_does_not_void_the_medians():
    t = FakeClock()
    full = t.work([1.0, 1.0, 3.0, 1.0, 1.0])  # one round slowed by another process; the median is 1.0 s
    clock = measure_wall_clock(full, {"p": t.work(0.9)}, repeats=5, warmup=0, timer=t)
    assert suspect_points(clock, {"p": 1.2}) == {}
    assert clock.speedups()["p"] == pytest.approx(1.0 / 0.9)


def test_suspect_points_are_retimed_and_kept_when_the_retime_is_sound():
    t = FakeClock()
    # first measurement: the reference is disturbed (5.9x wall for a 3.5x FLOPs point); the re-time is quiet
    full = t.work([5.9] * 5 + [3.5] * 5)
    point = t.work(1.0)
    timing = checked_wall_clock(full, {"p": point}, {"p": 3.5}, repeats=5, warmup=0, timer=t)
    assert timing.retimed == 1 and timing.suspects == {}
    assert timing.speedups["p"] == 3.5


def test_points_that_stay_implausible_are_reported_invalid():
    t = FakeClock()
    timing = checked_wall_clock(t.work(1.87), {"patience": t.work(1.0)}, {"patience": 1.0}, repeats=3, warmup=0,
                                timer=t)
    assert timing.retimed == 1 and "patience" in timing.suspects
