"""How far can an exit decision that reads the exits' outputs (with ``--state``, the input too) get past one
confidence threshold, on the same weights?

    python benchmarks/decision_ceiling.py RUN_DIR [--beta BETA] [--fit dev|holdout] [--state] [--out DIR]

ConsistentEE's policy decides from what the exits say (``--policy-features confidence`` or ``path``). This script
asks what the best such decision could gain, with the exits fixed: on the stage-1 model of RUN_DIR (or on the
ConsistentEE model of ``--beta``), it fits richer decisions on rows the exits were not trained on and compares them
with a single confidence threshold on the test split:

- ``confidence``: exit at the first layer whose max probability reaches t (one knob, t swept);
- ``per-layer thresholds``: a threshold per layer, fitted for each depth cost lambda by coordinate ascent on
  accuracy - lambda * (mean layers / L): the best that a policy reading one exit's confidence can learn;
- ``path, calibrated``: per layer, a logistic regression from the path so far (this exit's max probability,
  entropy and margin, the agreement run, every earlier exit's max probability and whether it agrees) to "this exit
  is right"; exit when it reaches t;
- ``path, gain``: the same features, a second regression for "the last exit is right"; exit when the expected
  gain of going to full depth is below lambda * (remaining layers / L);
- ``path + state, calibrated`` (with ``--state``): the path features and the input itself, as the leading principal
  components of the layer's L2-normalised pooled state (what a ``state`` policy reads); the number of components
  (8 or 32) and the regularisation (C 0.1 or 1) are chosen per layer by 3-fold cross-validated log-loss on the
  fitting rows, never on test.

Fitting rows: the policy hold-out when the run has one (``--fit holdout``, the default then), else the dev split.
Printed and written (``--out``): the best test accuracy at each layer speed-up, the best speed-up within 0.5 and 1
point of full depth, and for each richer decision its paired bootstrap difference from confidence (test rows
resampled, 95% percentile interval).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.compose import ColumnTransformer
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline

from consistentee.evaluation.curves import best_speedup_within
from consistentee.exits.tables import collect_exit_tables
from consistentee.model.modeling import EarlyExitForSequenceClassification
from consistentee.training.policy import policy_model_dir
from consistentee.training.run import (
    load_run_model,
    load_run_settings,
    policy_rows,
    train_subset,
)
from consistentee.utils.io import write_json, write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, for common.py
import common  # noqa: E402

SPEEDUPS = (1.5, 1.75, 2.0, 2.5, 3.0)
BUDGETS = (0.5, 1.0)
LAMBDAS = np.linspace(0.0, 0.4, 41)
GAIN_GRID = np.concatenate([np.linspace(-0.6, 0.0, 31)[:-1], np.linspace(0.0, 1.5, 76)])
RESAMPLES = 400


def path_features(probs: np.ndarray) -> list[np.ndarray]:
    """Per layer l, [N, F]: exit l's max probability, normalised entropy, top-2 margin and agreement run (/ L),
    then for every earlier exit its max probability and whether it agrees with exit l (zeros past l)."""
    n, num_layers, classes = probs.shape
    top = np.sort(probs, -1)
    max_prob, margin = top[..., -1], top[..., -1] - top[..., -2]
    entropy = -(probs * np.log(probs + 1e-12)).sum(-1) / np.log(classes)
    pred = probs.argmax(-1)
    run = np.ones((n, num_layers))
    for layer in range(1, num_layers):
        run[:, layer] = np.where(pred[:, layer] == pred[:, layer - 1], run[:, layer - 1] + 1, 1)
    out = []
    for layer in range(num_layers):
        cols = [max_prob[:, layer], entropy[:, layer], margin[:, layer], run[:, layer] / num_layers]
        for k in range(num_layers - 1):
            seen = k < layer
            cols += [max_prob[:, k] * seen, (pred[:, k] == pred[:, layer]) * seen]
        out.append(np.stack(cols, 1).astype(np.float64))
    return out


def first_exit(exit_now: np.ndarray) -> np.ndarray:
    """[N] 0-based exit layer: the first True of each row, the last layer when there is none."""
    exit_now = exit_now.copy()
    exit_now[:, -1] = True
    return exit_now.argmax(1)


def point(layers: np.ndarray, correct: np.ndarray, rows: np.ndarray | None = None) -> tuple[float, float]:
    """(accuracy %, layer speed-up) of exits ``layers`` [N] given per-layer correctness [N, L]."""
    if rows is not None:
        layers, correct = layers[rows], correct[rows]
    right = correct[np.arange(len(layers)), layers]
    return 100 * float(right.mean()), correct.shape[1] / float((layers + 1).mean())


def best_accuracy(points: list[tuple[float, float]], speedup: float) -> float:
    return max((acc for acc, s in points if s >= speedup - 1e-9), default=float("nan"))


def best_speedup(points: list[tuple[float, float]], full: float, budget: float) -> float:
    """The largest speed-up within ``budget`` points of ``full`` (%); full depth (1x) when no point is."""
    return best_speedup_within([(s, acc / 100) for acc, s in points], full / 100, budget) or 1.0


def fit_regressions(features: list[np.ndarray], target: np.ndarray) -> list[LogisticRegression | float]:
    """One logistic regression per layer but the last (a constant where the target has one class)."""
    models: list[LogisticRegression | float] = []
    for layer in range(len(features) - 1):
        y = target[:, layer] if target.ndim == 2 else target
        if y.min() == y.max():
            models.append(float(y[0]))
        else:
            models.append(LogisticRegression(C=1.0, max_iter=5000).fit(features[layer], y))
    return models


def fit_state_regressions(features: list[np.ndarray], states: np.ndarray, target: np.ndarray,
                          seed: int = 0) -> list[Pipeline | float]:
    """Per layer but the last: a logistic regression on the path features and the leading principal components of
    the pooled state [N, L, d], its size and strength chosen by cross-validation on these rows alone."""
    models: list[Pipeline | float] = []
    for layer in range(len(features) - 1):
        y = target[:, layer]
        if y.min() == y.max():
            models.append(float(y[0]))
            continue
        path_width = features[layer].shape[1]
        pipe = Pipeline([
            ("columns", ColumnTransformer([("path", "passthrough", slice(0, path_width)),
                                           ("state", PCA(random_state=seed), slice(path_width, None))])),
            ("regression", LogisticRegression(max_iter=5000))])
        components = [k for k in (8, 32) if k < min(len(y) * 2 // 3, states.shape[-1])] or [1]
        search = GridSearchCV(pipe, {"columns__state__n_components": components, "regression__C": [0.1, 1.0]},
                              scoring="neg_log_loss", cv=3)
        models.append(search.fit(state_inputs(features, states, layer), y).best_estimator_)
    return models


def state_inputs(features: list[np.ndarray], states: np.ndarray, layer: int) -> np.ndarray:
    """[N, F + d]: the path features of ``layer`` and its L2-normalised pooled state."""
    state = states[:, layer]
    return np.concatenate([features[layer], state / np.maximum(np.linalg.norm(state, axis=-1, keepdims=True), 1e-12)], 1)


def predict(models: list[LogisticRegression | Pipeline | float], features: list[np.ndarray]) -> np.ndarray:
    n = features[0].shape[0]
    cols = [np.full(n, m) if isinstance(m, float) else m.predict_proba(features[i])[:, 1]
            for i, m in enumerate(models)]
    return np.stack(cols + [np.ones(n)], 1)


def confidence_grid(classes: int, points: int = 101) -> np.ndarray:
    """Max-probability thresholds from chance (every row exits at layer 1) to 1."""
    return np.linspace(1.0 / classes, 1.0, points)


def per_layer_thresholds(max_prob: np.ndarray, correct: np.ndarray, lam: float, classes: int = 2) -> np.ndarray:
    """Thresholds [L] maximising accuracy - lam * mean layers / L on the fitting rows (coordinate ascent)."""
    num_layers = max_prob.shape[1]
    grid = np.append(confidence_grid(classes, 51), 1.001)
    th = np.full(num_layers, 1.001)

    def score(candidate: np.ndarray) -> float:
        acc, speedup = point(first_exit(max_prob >= candidate), correct)
        return acc / 100 - lam / speedup

    for _ in range(3):
        for layer in range(num_layers - 1):
            trials = [np.concatenate([th[:layer], [t], th[layer + 1:]]) for t in grid]
            th = trials[int(np.argmax([score(t) for t in trials]))]
    return th


def decisions(fit: dict, test: dict) -> dict[str, list[np.ndarray]]:
    """For each decision, the test exit layers [N] of every knob."""
    classes = test["classes"]
    out = {"confidence": [first_exit(test["max_prob"] >= t) for t in confidence_grid(classes)]}
    out["per-layer thresholds"] = [
        first_exit(test["max_prob"] >= per_layer_thresholds(fit["max_prob"], fit["correct"], lam, classes))
        for lam in LAMBDAS]
    right_here = predict(fit_regressions(fit["features"], fit["correct"]), test["features"])
    out["path, calibrated"] = [first_exit(right_here >= t) for t in np.linspace(0.3, 1.0, 141)]
    right_last = predict(fit_regressions(fit["features"], fit["correct"][:, -1]), test["features"])
    num_layers = test["correct"].shape[1]
    remaining = (num_layers - 1 - np.arange(num_layers)) / num_layers
    out["path, gain"] = [first_exit(right_here >= right_last - lam * remaining) for lam in GAIN_GRID]
    if fit.get("states") is not None:
        models = fit_state_regressions(fit["features"], fit["states"], fit["correct"])
        inputs = [state_inputs(test["features"], test["states"], layer) for layer in range(num_layers)]
        right_state = predict(models, inputs)
        out["path + state, calibrated"] = [first_exit(right_state >= t) for t in np.linspace(0.3, 1.0, 141)]
    return out


def split_view(tables) -> dict:
    probs = tables.probs.float().numpy()
    labels = tables.labels.numpy()
    pooled = getattr(tables, "pooled", None)
    return {"max_prob": probs.max(-1), "correct": (probs.argmax(-1) == labels[:, None]).astype(np.float64),
            "features": path_features(probs), "classes": probs.shape[-1],
            "states": None if pooled is None else pooled.float().numpy().astype(np.float64)}


def summarise(exits: dict[str, list[np.ndarray]], correct: np.ndarray, seed: int = 0) -> dict:
    full = 100 * float(correct[:, -1].mean())
    rows_all = np.arange(len(correct))
    curves = {name: [point(layers, correct) for layers in knobs] for name, knobs in exits.items()}
    result = {"full_depth": full, "rules": {}}
    for name, points in curves.items():
        result["rules"][name] = {
            "accuracy_at": {f"{s:g}": best_accuracy(points, s) for s in SPEEDUPS},
            "best_speedup_within": {f"{b:g}": best_speedup(points, full, b) for b in BUDGETS}}
    rng = np.random.default_rng(seed)
    diffs: dict[str, dict[str, list[float]]] = {name: {f"{s:g}": [] for s in SPEEDUPS} for name in exits}
    for _ in range(RESAMPLES):
        rows = rng.choice(rows_all, size=len(rows_all), replace=True)
        base = [point(layers, correct, rows) for layers in exits["confidence"]]
        for name, knobs in exits.items():
            if name == "confidence":
                continue
            mine = [point(layers, correct, rows) for layers in knobs]
            for s in SPEEDUPS:  # nan where either rule cannot reach the speed-up on this draw
                diffs[name][f"{s:g}"].append(best_accuracy(mine, s) - best_accuracy(base, s))
    for name in exits:
        if name == "confidence":
            continue
        result["rules"][name]["difference_vs_confidence"] = {key: _interval(v) for key, v in diffs[name].items()}
    return result


def _interval(values: list[float]) -> dict[str, float] | None:
    """Mean and 95% percentile interval of the draws where both rules reach the speed-up (None: under half do)."""
    finite = np.asarray(values)[np.isfinite(values)]
    if len(finite) < len(values) / 2:
        return None
    return {"mean": float(finite.mean()), "low": float(np.percentile(finite, 2.5)),
            "high": float(np.percentile(finite, 97.5))}


def markdown(result: dict, header: str) -> str:
    lines = [header, "", f"Test split, full depth {result['full_depth']:.2f}%. Cells: best test accuracy (%) at a "
             "layer speed-up of at least x; for the richer decisions, the paired bootstrap difference from "
             f"confidence ({RESAMPLES} resamples of the test rows, 95% interval).", "",
             "| decision | " + " | ".join(f"{s:g}x" for s in SPEEDUPS) + " | best x @0.5pt | best x @1pt |",
             "| :--- | " + " | ".join("---:" for _ in SPEEDUPS) + " | ---: | ---: |"]
    for name, rule in result["rules"].items():
        cells = []
        for s in SPEEDUPS:
            accuracy = rule["accuracy_at"][f"{s:g}"]
            cell = "—" if np.isnan(accuracy) else f"{accuracy:.1f}"
            d = rule.get("difference_vs_confidence", {}).get(f"{s:g}")
            if d is not None:
                cell += f" ({d['mean']:+.1f}; {d['low']:+.1f} to {d['high']:+.1f})"
            cells.append(cell)
        within = rule["best_speedup_within"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {within['0.5']:.2f}x | {within['1']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(run_dir: str, beta: float | None, fit_rows: str | None, out: str | None, state: bool = False) -> int:
    torch.manual_seed(0)
    model, data = load_run_model(run_dir, device="cpu")
    data_cfg, _ = load_run_settings(run_dir)
    if beta is not None:
        model = EarlyExitForSequenceClassification.from_pretrained(policy_model_dir(run_dir, beta), device="cpu")
    fit_rows = fit_rows or ("holdout" if data_cfg.policy_holdout > 0 else "dev")
    if fit_rows == "holdout":
        if data_cfg.policy_holdout <= 0:
            print(f"decision_ceiling: error: {run_dir} has no policy hold-out; use --fit dev", file=sys.stderr)
            return 2
        fit_set = train_subset(data, policy_rows(data, data_cfg))
    else:
        fit_set = data.encoded["dev"]
    fit = split_view(collect_exit_tables(model, fit_set, data.collate, progress=False, return_pooled=state))
    test = split_view(collect_exit_tables(model, data.encoded["test"], data.collate, progress=False,
                                          return_pooled=state))
    exits = decisions(fit, test)
    result = summarise(exits, test["correct"])
    model_name = "stage-1 model" if beta is None else f"ConsistentEE model beta {beta:g}"
    command = "python benchmarks/decision_ceiling.py " + " ".join(sys.argv[1:])
    result.update({"run_dir": run_dir, "model": model_name, "fit_rows": fit_rows,
                   "fit_examples": int(len(fit["correct"])), "test_examples": int(len(test["correct"])),
                   "command": command})
    text = markdown(result, f"# Exit decisions on the same weights: {run_dir}, {model_name}\n\n`{command}`\n\n"
                            f"Richer decisions fitted on {result['fit_examples']} {fit_rows} rows.")
    print(text)
    if out is not None:
        write_json(Path(out) / "decision_ceiling.json", result)
        write_text(Path(out) / "decision_ceiling.md", text)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--beta", type=float, help="the ConsistentEE model of this beta (default: stage 1)")
    parser.add_argument("--fit", choices=("dev", "holdout"), help="rows the richer decisions are fitted on")
    parser.add_argument("--state", action="store_true",
                        help="also fit a decision that reads the pooled state (the input itself)")
    parser.add_argument("--out", help="folder that gets decision_ceiling.json and .md")
    args = parser.parse_args()
    sys.exit(common.exit_on_bad_input("decision_ceiling.py", main, args.run_dir, args.beta, args.fit, args.out,
                                      args.state))
