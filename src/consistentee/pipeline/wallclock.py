"""Wall-clock speed-up: the batched early-exit engine against the same backbone at full depth.

:func:`measure_wall_clock` is the timer (interleaved rounds, ratios of medians), testable with stand-in
callables; :func:`time_operating_points` times chosen simulated points with
:class:`~consistentee.inference.engine.EarlyExitEngine` on the same batches as the full-depth baseline.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from consistentee.data.dataset import seeded_order
from consistentee.evaluation.summary import select_wall_points
from consistentee.evaluation.sweep import PointResult, knob_from_json
from consistentee.exits.rules import RULES, make_rule
from consistentee.inference.engine import EarlyExitEngine, full_depth_logits
from consistentee.model.modeling import EarlyExitForSequenceClassification

__all__ = ["ENGINE_NAME", "CheckedTiming", "WallClock", "checked_wall_clock", "measure_wall_clock", "reference_spread", "suspect_points",
           "synchronize", "time_operating_points", "timing_batches"]

#: what ``report.json`` names as the timed engine.
ENGINE_NAME = "consistentee.inference.engine.EarlyExitEngine"


@dataclass
class WallClock:
    """Seconds per round of the full-depth baseline and of every timed callable; speed-ups of medians."""

    full_seconds: list[float]
    seconds: dict[Any, list[float]]

    @property
    def full_median(self) -> float:
        return statistics.median(self.full_seconds)

    def median(self, key: Any) -> float:
        return statistics.median(self.seconds[key])

    def speedup(self, key: Any) -> float:
        """``median(full) / median(key)`` (> 1: the early-exit run is faster)."""
        return self.full_median / self.median(key)

    def speedups(self) -> dict[Any, float]:
        return {k: self.speedup(k) for k in self.seconds}


def measure_wall_clock(
    full_fn: Callable[[], Any],
    fns: Mapping[Any, Callable[[], Any]],
    *,
    repeats: int = 5,
    warmup: int = 1,
    timer: Callable[[], float] = time.perf_counter,
    progress: bool = False,
    desc: str = "wall clock",
) -> WallClock:
    """Time ``full_fn`` (the full-depth baseline) and every ``fns[key]`` on the same work, interleaved.

    Each callable does one complete unit of work (e.g. every timed batch). After ``warmup`` untimed calls
    of each, ``repeats`` rounds run; a round times the baseline and every callable once, in an order
    rotated by one each round, so drifts of the machine (other jobs, thermal) hit all of them alike.
    Speed-ups are ratios of medians (:class:`WallClock`).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    full_key = object()
    order = [full_key, *fns]
    calls = {full_key: full_fn, **fns}
    for _ in range(max(warmup, 0)):
        for key in order:
            calls[key]()
    times: dict[Any, list[float]] = {key: [] for key in order}
    bar = tqdm(total=repeats * len(order), desc=desc, unit="run", disable=not progress, leave=False)
    for r in range(repeats):
        shift = r % len(order)
        for key in order[shift:] + order[:shift]:
            t0 = timer()
            calls[key]()
            times[key].append(timer() - t0)
            bar.update(1)
    bar.close()
    full = times.pop(full_key)
    return WallClock(full_seconds=full, seconds=times)


#: a wall-clock speed-up may exceed the point's FLOPs speed-up by this much before it is suspect.
WALL_OVER_FLOPS_TOLERANCE = 0.10
#: the full-depth reference is noisy when the interquartile range / median of its rounds exceeds this.
REFERENCE_SPREAD_LIMIT = 0.25


def reference_spread(clock: WallClock) -> float:
    """Interquartile range / median of the full-depth rounds: how steady the reference was.

    Quartiles, not max - min: every figure is a median of rounds, which one slow round (another process
    woke up) does not move, so one such round must not void the run either; a reference whose middle rounds
    disagree does."""
    full = clock.full_seconds
    if not full:
        return 0.0
    q1, q3 = np.percentile(np.asarray(full, dtype=np.float64), [25, 75])
    return float(q3 - q1) / clock.full_median


def suspect_points(clock: WallClock, flops_speedups: Mapping[Any, float | None], *,
                   tolerance: float = WALL_OVER_FLOPS_TOLERANCE,
                   spread_limit: float = REFERENCE_SPREAD_LIMIT) -> dict[Any, str]:
    """Timed points whose figure cannot be trusted, with the reason.

    Skipping layers cannot save more time than it saves work, so a wall-clock speed-up more than
    ``tolerance`` above the FLOPs speed-up means the timing, not the method, moved (typically another
    process slowed the full-depth rounds). A noisy reference makes every point suspect.
    """
    spread = reference_spread(clock)
    out: dict[Any, str] = {}
    for key, speed in clock.speedups().items():
        flops = flops_speedups.get(key)
        if spread > spread_limit:
            out[key] = f"noisy full-depth reference (spread {100 * spread:.0f}% of its median)"
        elif flops is not None and speed > (1.0 + tolerance) * flops:
            out[key] = f"wall {speed:.2f}x above FLOPs {flops:.2f}x by more than {100 * tolerance:.0f}%"
    return out


@dataclass
class CheckedTiming:
    """Speed-ups that passed :func:`suspect_points`, possibly after re-timing, and those that did not."""

    clock: WallClock
    speedups: dict[Any, float]
    median_seconds: dict[Any, float]
    suspects: dict[Any, str]
    retimed: int


def checked_wall_clock(full_fn: Callable[[], Any], fns: Mapping[Any, Callable[[], Any]],
                       flops_speedups: Mapping[Any, float | None], *, repeats: int, retries: int = 1,
                       progress: bool = False, **kwargs: Any) -> CheckedTiming:
    """:func:`measure_wall_clock`, then the suspect points (:func:`suspect_points`) re-timed up to ``retries``
    times, each time against a fresh full-depth reference; a point keeps the speed-up of its latest timing.
    Points still suspect after the retries are returned with the reason."""
    clock = measure_wall_clock(full_fn, fns, repeats=repeats, progress=progress, **kwargs)
    speedups = clock.speedups()
    medians = {k: clock.median(k) for k in fns}
    suspects = suspect_points(clock, flops_speedups)
    retimed = 0
    for _ in range(retries):
        if not suspects:
            break
        retimed += len(suspects)
        again = measure_wall_clock(full_fn, {k: fns[k] for k in suspects}, repeats=repeats, progress=progress,
                                   desc="re-timing suspect points", **kwargs)
        speedups.update(again.speedups())
        medians.update({k: again.median(k) for k in suspects})
        suspects = suspect_points(again, flops_speedups)
    return CheckedTiming(clock, speedups, medians, suspects, retimed)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a timed call ends when its kernels end."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timing_batches(dataset, collate, examples: int | None, batch_size: int, seed: int,
                   device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Batches of ``examples`` rows of ``dataset`` (a seeded subset by id, in dataset order; None: all), on ``device``."""
    rows = list(range(len(dataset)))
    if examples is not None and examples < len(rows):
        rows = sorted(seeded_order(list(dataset.ids), seed)[:examples])
    batches = [collate([dataset[i] for i in rows[s:s + batch_size]]) for s in range(0, len(rows), batch_size)]
    return [{k: v.to(device) for k, v in batch.items()} for batch in batches]


def time_operating_points(
    model,
    points: Mapping[str, Sequence[PointResult]],
    summaries: Mapping[str, Mapping[str, Any]],
    batches: list[dict[str, torch.Tensor]],
    *,
    policy_dirs: Mapping[float, Path],
    heads=None,
    frontier_points: int,
    repeats: int,
    autocast: str | None,
    device: torch.device,
    progress: bool = True,
    log=print,
) -> dict[str, Any]:
    """Time each rule's dev-selected points and ``frontier_points`` test-frontier points against full depth.

    Fills ``wall_speedup`` and ``wall`` of the timed points and ``test_wall_speedup`` of the dev-selected
    entries of ``summaries``; returns what the report's ``settings.wall_clock`` adds about the run. Each
    engine runs once untimed first: that warms it up and checks its exit layers against the simulation
    (``engine_exit_agreement``).
    """
    timed_rows = torch.cat([b["index"].cpu() for b in batches])
    policy_models = {beta: EarlyExitForSequenceClassification.from_pretrained(path, device=device)
                     for beta, path in policy_dirs.items()}
    jobs: dict[tuple[str, int], Callable[[], Any]] = {}
    agreement: dict[tuple[str, int], float] = {}
    for name, pts in points.items():
        for index in select_wall_points(pts, summaries[name], frontier_points):
            p = pts[index]
            engine = EarlyExitEngine(model if p.model_key is None else policy_models[p.model_key],
                                     make_rule(name, knob_from_json(name, p.knob)),
                                     learned_heads=heads if "learned_score" in RULES[name].needs else None, trim=True,
                                     autocast_dtype=autocast)

            def job(engine=engine):
                with torch.inference_mode():
                    out = [engine(b["input_ids"], b["attention_mask"], b.get("token_type_ids")) for b in batches]
                synchronize(device)
                return out

            layers = torch.cat([o.exit_layers.cpu() for o in job()])
            agreement[(name, index)] = float((layers == p.test_exit_layers[timed_rows]).float().mean())
            jobs[(name, index)] = job

    def full_job():
        with torch.inference_mode():
            out = [full_depth_logits(model, b["input_ids"], b["attention_mask"], b.get("token_type_ids"),
                                     autocast_dtype=autocast) for b in batches]
        synchronize(device)
        return out

    full_job()
    examples = int(timed_rows.numel())
    log(f"timing {len(jobs)} operating points against full depth on {examples} test examples, "
        f"batch {len(batches[0]['index'])}, {repeats} interleaved rounds, {torch.get_num_threads()} threads")
    flops = {key: points[key[0]][key[1]].test["flops_speedup"] for key in jobs}
    timing = checked_wall_clock(full_job, jobs, flops, repeats=repeats, warmup=0, progress=progress)
    clock, suspects, retimed = timing.clock, timing.suspects, timing.retimed
    for (name, index), speed in timing.speedups.items():
        p = points[name][index]
        reason = suspects.get((name, index))
        p.wall_speedup = None if reason else speed
        p.wall = {"median_seconds": timing.median_seconds[(name, index)],
                  "engine_exit_agreement": agreement[(name, index)]}
        if reason:
            p.wall.update({"invalid": reason, "measured_speedup": speed})
        for part in ("dev_selected", "calibrated"):
            for sel in summaries[name].get(part, {}).values():
                if sel["index"] == index:
                    sel["test_wall_speedup"] = p.wall_speedup
    info: dict[str, Any] = {"examples": examples, "retimed_points": retimed, "invalid_points": len(suspects),
                            "reference_spread": reference_spread(clock),
                            "validity_check": f"a point is re-timed, then marked invalid (wall_speedup null), when its "
                                              f"wall speed-up exceeds its FLOPs speed-up by more than "
                                              f"{100 * WALL_OVER_FLOPS_TOLERANCE:.0f}% or the interquartile range of the "
                                              f"full-depth rounds exceeds {100 * REFERENCE_SPREAD_LIMIT:.0f}% of "
                                              "their median"}
    if suspects:
        info["warning"] = (f"{len(suspects)} timed point(s) stayed implausible after re-timing and are reported as "
                           "invalid (the machine was busy?): " + "; ".join(
                               f"{n} #{i}: {r}" for (n, i), r in sorted(suspects.items())))
        log(f"warning: {info['warning']}")
    if clock.full_median < 0.2:
        info["warning"] = (info.get("warning", "") + " " if info.get("warning") else "") + (f"a full-depth round took only {clock.full_median * 1000:.0f} ms: wall-clock ratios "
                           "this short are dominated by noise; time more examples (wall_examples)")
        log(f"warning: {info['warning']}")
    info["full_depth_median_seconds"] = clock.full_median
    info["full_depth_seconds"] = clock.full_seconds
    info["examples_per_second_full_depth"] = examples / clock.full_median
    info["timed_points"] = len(jobs)
    info["engine_exit_agreement_min"] = min(agreement.values()) if agreement else None
    return info
