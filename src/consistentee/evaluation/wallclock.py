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

import torch
from tqdm.auto import tqdm

from consistentee.data.dataset import seeded_order
from consistentee.evaluation.summary import select_wall_points
from consistentee.evaluation.sweep import PointResult, knob_from_json
from consistentee.exits.rules import make_rule
from consistentee.inference.engine import EarlyExitEngine, full_depth_logits
from consistentee.model.modeling import EarlyExitForSequenceClassification

__all__ = ["ENGINE_NAME", "WallClock", "measure_wall_clock", "synchronize", "time_operating_points", "timing_batches"]

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
                                     learned_heads=heads if name == "learned" else None, trim=True,
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
    clock = measure_wall_clock(full_job, jobs, repeats=repeats, warmup=0, progress=progress)
    for (name, index), speed in clock.speedups().items():
        p = points[name][index]
        p.wall_speedup = speed
        p.wall = {"median_seconds": clock.median((name, index)), "engine_exit_agreement": agreement[(name, index)]}
        for sel in summaries[name]["dev_selected"].values():
            if sel["index"] == index:
                sel["test_wall_speedup"] = speed
    info: dict[str, Any] = {"examples": examples}
    if clock.full_median < 0.2:
        info["warning"] = (f"a full-depth round took only {clock.full_median * 1000:.0f} ms: wall-clock ratios "
                           "this short are dominated by noise; time more examples (wall_examples)")
        log(f"warning: {info['warning']}")
    info["full_depth_median_seconds"] = clock.full_median
    info["full_depth_seconds"] = clock.full_seconds
    info["examples_per_second_full_depth"] = examples / clock.full_median
    info["timed_points"] = len(jobs)
    info["engine_exit_agreement_min"] = min(agreement.values()) if agreement else None
    return info
