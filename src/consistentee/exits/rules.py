"""Exit rules: when should a row stop after layer ``l``?

Every rule implements the same small interface (:class:`ExitRule`) so that one batched engine and
one offline simulator (:func:`simulate_exits`) can drive all of them identically:

* ``state = rule.init_state(batch_size, device)`` -- per-row state, a dict of **batch-first**
  tensors (possibly empty);
* at each layer ``l = 1, 2, ...`` the driver calls ``exit, state = rule.decide(l, signals, state)``
  with the :class:`LayerSignals` of the rows still running, in the order of ``state``'s rows;
* the driver then drops the exited rows from the batch and gathers the state of the others with
  :func:`select_state` (``index_select`` on dim 0 of every tensor).

The last layer ``L`` is always an exit. That is enforced by the driver, which does **not** call
``decide`` at layer ``L`` (there is no ConsistentEE policy at the last layer), not by each rule.

Rules (``RULES``):

=============  =================================================================  ================
name           exits at layer ``l`` when                                          knob
=============  =================================================================  ================
entropy        ``H(probs_l) < S`` (natural log; DeeBERT)                           ``S >= 0``
confidence     ``max(probs_l) >= tau`` (Schwartz et al.; CALM softmax_max)         ``tau in [0,1]``
patience       exits ``l-t+1 .. l`` all predict the same class (PABEE)             ``t >= 1`` int
pcee           exits ``l-t+1 .. l`` all have ``H(probs) < S`` (PCEE-BERT)          ``(t, S)``
learned        ``learned_score_l >= tau`` (BERxiT learning-to-exit head)           ``tau in [0,1]``
static         ``l >= k``                                                          ``k >= 1`` int
consistentee   ``policy_prob_l > threshold`` (this project; default 0.5)           ``threshold in [0,1]``
oracle         ``argmax(probs_l) == label`` (upper bound; full depth if never)     none
=============  =================================================================  ================

Patience, precisely: the state keeps the previous layer's argmax and ``count`` = the number of
consecutive layers, ending at the current one, whose argmax equals the current argmax (``count = 1``
at layer 1 or after a change). The row exits when ``count >= t``. So ``t = 1`` exits at layer 1 and
``t = 2`` exits at the first layer whose prediction equals the previous layer's. PABEE's own
"patience" ``p`` counts *unchanged* predictions after the first one, i.e. PABEE ``p`` == ``t = p + 1``
here. ``pcee`` uses the same counter on "this exit is confident" (``H < S``) instead of "same argmax".
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

__all__ = [
    "RULES",
    "ConfidenceRule",
    "ConsistentEERule",
    "EntropyRule",
    "ExitResult",
    "ExitRule",
    "LayerSignals",
    "LearnedRule",
    "OracleRule",
    "PCEERule",
    "PatienceRule",
    "StaticRule",
    "entropy",
    "make_rule",
    "select_state",
    "simulate_exits",
]

SIGNAL_NAMES = ("probs", "policy_prob", "learned_score", "labels")


@dataclass
class LayerSignals:
    """What a rule may look at after one layer, for the rows still running (batch-first).

    ``probs`` [B, C]: softmax of this layer's exit classifier. ``policy_prob`` [B]: ConsistentEE
    policy p_l. ``learned_score`` [B]: score of a learned-exit head. ``labels`` [B]: gold labels
    (only the oracle reads them).
    """

    probs: Tensor
    policy_prob: Tensor | None = None
    learned_score: Tensor | None = None
    labels: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.probs.shape[0]


def entropy(probs: Tensor) -> Tensor:
    """Shannon entropy (nats) over the last dim; ``0 * log 0`` counts as 0."""
    return torch.special.entr(probs.float()).sum(dim=-1)


def select_state(state: dict[str, Tensor], rows: Tensor) -> dict[str, Tensor]:
    """Keep only ``rows`` (a LongTensor of indices) of every batch-first state tensor."""
    return {k: v.index_select(0, rows) for k, v in state.items()}


def _is_int(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, numbers.Integral):
        return True
    return isinstance(value, numbers.Real) and float(value).is_integer()


def _check_real(name: str, knob_name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(float(value)):
        raise ValueError(f"rule {name!r}: knob {knob_name!r} must be a real number, got {value!r}")
    return float(value)


def _check_unit(name: str, knob_name: str, value: Any) -> float:
    v = _check_real(name, knob_name, value)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"rule {name!r}: threshold {knob_name!r} must lie in [0, 1], got {value!r}")
    return v


def _check_nonneg(name: str, knob_name: str, value: Any) -> float:
    v = _check_real(name, knob_name, value)
    if v < 0.0:
        raise ValueError(f"rule {name!r}: {knob_name!r} must be >= 0, got {value!r}")
    return v


def _check_pos_int(name: str, knob_name: str, value: Any) -> int:
    if not _is_int(value) or int(value) < 1:
        raise ValueError(f"rule {name!r}: {knob_name!r} must be an integer >= 1, got {value!r}")
    return int(value)


def _grid(values: Iterable[float]) -> list[float]:
    return sorted({round(float(v), 6) for v in values})


class ExitRule(ABC):
    """Base class of all exit rules. See the module docstring for the protocol."""

    name: ClassVar[str]
    knob_name: ClassVar[str]
    needs: ClassVar[frozenset[str]] = frozenset({"probs"})
    #: knob used when ``knob is None``; ``None`` here means the rule requires an explicit knob.
    default_knob: ClassVar[Any] = None
    #: whether the rule has a knob at all (only the oracle has none).
    has_knob: ClassVar[bool] = True

    def __init__(self, knob: Any = None) -> None:
        if self.has_knob:
            if knob is None:
                knob = self.default_knob
            if knob is None:
                raise ValueError(f"rule {self.name!r} needs a value for its knob {self.knob_name!r}")
        elif knob is not None:
            raise ValueError(f"rule {self.name!r} has no knob, got {knob!r}")
        self.knob = self.validate_knob(knob) if self.has_knob else None

    @classmethod
    def validate_knob(cls, knob: Any) -> Any:
        """Return the normalised knob or raise ``ValueError``."""
        return knob

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> dict[str, Tensor]:
        """Per-row state (batch-first tensors); stateless rules return ``{}``."""
        return {}

    @abstractmethod
    def decide(
        self, layer: int, signals: LayerSignals, state: dict[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Decide for every row after ``layer`` (1-based): returns (exit BoolTensor [B], new state).

        The new state covers all B rows (exited ones included); the driver gathers the survivors.
        """

    @classmethod
    @abstractmethod
    def default_grid(cls, *, num_classes: int = 2, num_layers: int = 12) -> list:
        """A sweep grid for the knob. ``num_classes``/``num_layers`` scale it where that matters."""

    @classmethod
    def aggressiveness(cls, knob: Any) -> float:
        """A number that grows as ``knob`` makes rows exit earlier (calibration tests knobs in this order)."""
        raise NotImplementedError(f"rule {cls.name!r} has no knob order")

    @classmethod
    def sequence_key(cls, knob: Any) -> Any:
        """Knobs with the same key are ordered along one calibration sequence (PCEE: one per patience)."""
        return None

    @classmethod
    def knob_scores(
        cls, probs: Tensor, policy_probs: Tensor | None = None, learned_scores: Tensor | None = None
    ) -> Tensor | None:
        """The per-layer score the knob thresholds, ``[N, L-1]`` (None: the knob is not a threshold)."""
        return None

    @classmethod
    def data_grid(
        cls, probs: Tensor, policy_probs: Tensor | None = None, learned_scores: Tensor | None = None,
        *, points: int = 100,
    ) -> list:
        """Knob candidates at ``points`` quantiles of the rule's own score on a split (layers 1..L-1), with
        the default grid added, so a curve is traced finely where the rows actually are."""
        num_classes, num_layers = probs.shape[2], probs.shape[1]
        default = cls.default_grid(num_classes=num_classes, num_layers=num_layers)
        scores = cls.knob_scores(probs, policy_probs, learned_scores)
        if scores is None or scores.numel() == 0 or points < 2:
            return default
        levels = torch.linspace(0.0, 1.0, points, dtype=torch.float64)
        values = torch.quantile(scores.reshape(-1).double(), levels).tolist()
        return _grid([*values, *default])

    def check_signals(self, signals: LayerSignals) -> None:
        for need in self.needs:
            if getattr(signals, need) is None:
                raise ValueError(f"rule {self.name!r} needs the signal {need!r}, which is missing")

    def __repr__(self) -> str:
        if not self.has_knob:
            return f"{type(self).__name__}()"
        return f"{type(self).__name__}({self.knob_name}={self.knob!r})"


class EntropyRule(ExitRule):
    name = "entropy"
    knob_name = "S"
    default_knob = 0.3

    @classmethod
    def validate_knob(cls, knob: Any) -> float:
        return _check_nonneg(cls.name, cls.knob_name, knob)

    def decide(self, layer, signals, state):
        self.check_signals(signals)
        return entropy(signals.probs) < self.knob, state

    @classmethod
    def aggressiveness(cls, knob):
        return float(knob)

    @classmethod
    def knob_scores(cls, probs, policy_probs=None, learned_scores=None):
        return entropy(probs[:, :-1])

    @classmethod
    def default_grid(cls, *, num_classes: int = 2, num_layers: int = 12) -> list[float]:
        fractions = [0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
        return _grid(f * math.log(max(num_classes, 2)) for f in fractions)


class ConfidenceRule(ExitRule):
    name = "confidence"
    knob_name = "tau"
    default_knob = 0.9

    @classmethod
    def validate_knob(cls, knob: Any) -> float:
        return _check_unit(cls.name, cls.knob_name, knob)

    def decide(self, layer, signals, state):
        self.check_signals(signals)
        return signals.probs.max(dim=-1).values >= self.knob, state

    @classmethod
    def aggressiveness(cls, knob):
        return -float(knob)

    @classmethod
    def knob_scores(cls, probs, policy_probs=None, learned_scores=None):
        return probs[:, :-1].max(dim=-1).values

    @classmethod
    def default_grid(cls, *, num_classes: int = 2, num_layers: int = 12) -> list[float]:
        chance = 1.0 / max(num_classes, 2)
        fractions = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999]
        return _grid(chance + f * (1.0 - chance) for f in fractions)


class PatienceRule(ExitRule):
    name = "patience"
    knob_name = "t"
    default_knob = 3

    @classmethod
    def validate_knob(cls, knob: Any) -> int:
        return _check_pos_int(cls.name, cls.knob_name, knob)

    def init_state(self, batch_size, device=None):
        return {
            "prev": torch.full((batch_size,), -1, dtype=torch.long, device=device),
            "count": torch.zeros(batch_size, dtype=torch.long, device=device),
        }

    def decide(self, layer, signals, state):
        self.check_signals(signals)
        pred = signals.probs.argmax(dim=-1)
        same = pred == state["prev"]
        count = torch.where(same, state["count"] + 1, torch.ones_like(state["count"]))
        return count >= self.knob, {"prev": pred, "count": count}

    @classmethod
    def aggressiveness(cls, knob):
        return -float(knob)

    @classmethod
    def default_grid(cls, *, num_classes: int = 2, num_layers: int = 12) -> list[int]:
        return list(range(1, num_layers + 1))


class PCEERule(ExitRule):
    name = "pcee"
    knob_name = "t,S"
    default_knob = (2, 0.3)

    @classmethod
    def validate_knob(cls, knob: Any) -> tuple[int, float]:
        if not isinstance(knob, tuple | list) or len(knob) != 2:
            raise ValueError(f"rule {cls.name!r}: knob must be a pair (t, S), got {knob!r}")
        return _check_pos_int(cls.name, "t", knob[0]), _check_nonneg(cls.name, "S", knob[1])

    def init_state(self, batch_size, device=None):
        return {"count": torch.zeros(batch_size, dtype=torch.long, device=device)}

    def decide(self, layer, signals, state):
        self.check_signals(signals)
        t, s = self.knob
        confident = entropy(signals.probs) < s
        count = torch.where(confident, state["count"] + 1, torch.zeros_like(state["count"]))
        return count >= t, {"count": count}

    @classmethod
    def aggressiveness(cls, knob):
        return float(knob[1])

    @classmethod
    def sequence_key(cls, knob):
        return int(knob[0])

    @classmethod
    def knob_scores(cls, probs, policy_probs=None, learned_scores=None):
        return entropy(probs[:, :-1])

    @classmethod
    def data_grid(cls, probs, policy_probs=None, learned_scores=None, *, points=100):
        thresholds = EntropyRule.data_grid(probs, points=points)
        return [(t, s) for t in (1, 2, 3, 4) if t <= probs.shape[1] for s in thresholds]

    @classmethod
    def default_grid(cls, *, num_classes: int = 2, num_layers: int = 12) -> list[tuple[int, float]]:
        ln_c = math.log(max(num_classes, 2))
        thresholds = _grid(f * ln_c for f in (0.05, 0.1, 0.2, 0.3, 0.5, 0.7))
        return [(t, s) for t in (1, 2, 3, 4) if t <= num_layers for s in thresholds]


class LearnedRule(ExitRule):
    name = "learned"
    knob_name = "tau"
    needs = frozenset({"learned_score"})
    default_knob = 0.5

    @classmethod
    def validate_knob(cls, knob: Any) -> float:
        return _check_unit(cls.name, cls.knob_name, knob)

    def decide(self, layer, signals, state):
        self.check_signals(signals)
        return signals.learned_score >= self.knob, state

    @classmethod
    def aggressiveness(cls, knob):
        return -float(knob)

    @classmethod
    def knob_scores(cls, probs, policy_probs=None, learned_scores=None):
        return None if learned_scores is None else learned_scores[:, : probs.shape[1] - 1]

    @classmethod
    def default_grid(cls, *, num_classes: int = 2, num_layers: int = 12) -> list[float]:
        return _grid([i / 20 for i in range(21)] + [0.97, 0.99])


class StaticRule(ExitRule):
    name = "static"
    knob_name = "k"
    needs = frozenset()
    default_knob = None  # the exit layer depends on the model: always explicit

    @classmethod
    def validate_knob(cls, knob: Any) -> int:
        return _check_pos_int(cls.name, cls.knob_name, knob)

    def decide(self, layer, signals, state):
        exit_ = torch.full(
            (signals.batch_size,), layer >= self.knob, dtype=torch.bool, device=signals.probs.device
        )
        return exit_, state

    @classmethod
    def aggressiveness(cls, knob):
        return -float(knob)

    @classmethod
    def default_grid(cls, *, num_classes: int = 2, num_layers: int = 12) -> list[int]:
        return list(range(1, num_layers + 1))


class ConsistentEERule(ExitRule):
    name = "consistentee"
    knob_name = "threshold"
    needs = frozenset({"policy_prob"})
    default_knob = 0.5

    @classmethod
    def validate_knob(cls, knob: Any) -> float:
        return _check_unit(cls.name, cls.knob_name, knob)

    def decide(self, layer, signals, state):
        self.check_signals(signals)
        return signals.policy_prob > self.knob, state

    @classmethod
    def aggressiveness(cls, knob):
        return -float(knob)

    @classmethod
    def knob_scores(cls, probs, policy_probs=None, learned_scores=None):
        return None if policy_probs is None else policy_probs[:, : probs.shape[1] - 1]

    @classmethod
    def default_grid(cls, *, num_classes: int = 2, num_layers: int = 12) -> list[float]:
        return _grid([i / 20 for i in range(20)] + [0.97, 0.99])


class OracleRule(ExitRule):
    name = "oracle"
    knob_name = ""
    needs = frozenset({"probs", "labels"})
    has_knob = False

    def decide(self, layer, signals, state):
        self.check_signals(signals)
        return signals.probs.argmax(dim=-1) == signals.labels.to(signals.probs.device), state

    @classmethod
    def default_grid(cls, *, num_classes: int = 2, num_layers: int = 12) -> list[None]:
        return [None]


RULES: dict[str, type[ExitRule]] = {
    cls.name: cls
    for cls in (
        EntropyRule,
        ConfidenceRule,
        PatienceRule,
        PCEERule,
        LearnedRule,
        StaticRule,
        ConsistentEERule,
        OracleRule,
    )
}


def make_rule(name: str, knob: Any = None) -> ExitRule:
    """Build rule ``name`` with ``knob`` (``None``: the rule's default knob, if it has one)."""
    try:
        cls = RULES[name]
    except KeyError:
        raise ValueError(f"unknown exit rule {name!r}; known rules: {', '.join(sorted(RULES))}") from None
    return cls(knob)


@dataclass
class ExitResult:
    """Outcome of :func:`simulate_exits`: 1-based exit layer and the argmax at that exit, per row."""

    exit_layer: Tensor
    predictions: Tensor


def _column(table: Tensor | None, name: str, n: int, num_layers: int) -> Tensor | None:
    if table is None:
        return None
    if table.dim() != 2 or table.shape[0] != n or table.shape[1] not in (num_layers, num_layers - 1):
        raise ValueError(
            f"{name} must have shape [N, L] or [N, L-1] = [{n}, {num_layers}], got {tuple(table.shape)}"
        )
    return table


def simulate_exits(
    rule: ExitRule,
    probs: Tensor,
    policy_probs: Tensor | None = None,
    learned_scores: Tensor | None = None,
    labels: Tensor | None = None,
) -> ExitResult:
    """Run ``rule`` over full per-layer tables, exactly as the batched engine does.

    ``probs`` [N, L, C]; ``policy_probs`` / ``learned_scores`` [N, L] (or [N, L-1]: the last layer
    never needs them); ``labels`` [N]. Layer by layer, only the rows still running are gathered and
    shown to ``rule.decide``; their state is gathered with :func:`select_state` after each layer.
    Every row still running at layer L exits there (``decide`` is not called at L).
    """
    if probs.dim() != 3:
        raise ValueError(f"probs must have shape [N, L, C], got {tuple(probs.shape)}")
    n, num_layers, _ = probs.shape
    if num_layers < 1:
        raise ValueError("probs must have at least one layer")
    policy_probs = _column(policy_probs, "policy_probs", n, num_layers)
    learned_scores = _column(learned_scores, "learned_scores", n, num_layers)
    if labels is not None:
        labels = torch.as_tensor(labels, device=probs.device)
        if labels.shape != (n,):
            raise ValueError(f"labels must have shape [N] = [{n}], got {tuple(labels.shape)}")
    provided = {
        "probs": probs,
        "policy_prob": policy_probs,
        "learned_score": learned_scores,
        "labels": labels,
    }
    missing = sorted(k for k in rule.needs if provided[k] is None)
    if missing and num_layers > 1:
        raise ValueError(f"rule {rule.name!r} needs {missing}, which were not given")

    device = probs.device
    exit_layer = torch.full((n,), num_layers, dtype=torch.long, device=device)
    predictions = probs[:, -1].argmax(dim=-1) if n else torch.zeros(0, dtype=torch.long, device=device)
    active = torch.arange(n, device=device)
    state = rule.init_state(n, device)
    for layer in range(1, num_layers):
        if active.numel() == 0:
            break
        signals = LayerSignals(
            probs=probs[active, layer - 1],
            policy_prob=None if policy_probs is None else policy_probs[active, layer - 1],
            learned_score=None if learned_scores is None else learned_scores[active, layer - 1],
            labels=None if labels is None else labels[active],
        )
        exit_, state = rule.decide(layer, signals, state)
        exit_ = exit_.to(torch.bool)
        if exit_.shape != active.shape:
            raise RuntimeError(
                f"rule {rule.name!r} returned {tuple(exit_.shape)} decisions for {active.numel()} rows"
            )
        done = active[exit_]
        exit_layer[done] = layer
        predictions[done] = signals.probs[exit_].argmax(dim=-1)
        keep = torch.nonzero(~exit_, as_tuple=False).squeeze(1)
        active = active.index_select(0, keep)
        state = select_state(state, keep)
    return ExitResult(exit_layer=exit_layer, predictions=predictions)
