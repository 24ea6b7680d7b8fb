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

A rule is one class, and the class is the only place that knows it (:class:`ExitRule`): its decision, the
signals it reads (``needs``), its knob as CLI text (:meth:`~ExitRule.parse_knob`), as JSON
(:meth:`~ExitRule.knob_to_json` / :meth:`~ExitRule.knob_from_json`), the layers a knob names
(:meth:`~ExitRule.knob_layers`), what deciding costs beyond the layers (:meth:`~ExitRule.cost`, for the
analytic FLOPs), its sweep grid and calibration order. :func:`register_rule` enters it in ``RULES``, the only
list of rules: the benchmark's rule list, the CLI choices and the sweep are all read off it.

Importing this module does not import torch (the command line validates ``--rule``/``--knob`` before it loads
anything, well under a second); torch is imported where a decision is computed.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch
    from torch import Tensor

__all__ = [
    "CALIBRATION_RULES",
    "PREDICT_RULES",
    "RULES",
    "ConfidenceRule",
    "ConsistentEERule",
    "EntropyRule",
    "ExitCost",
    "ExitResult",
    "ExitRule",
    "LayerSignals",
    "LearnedRule",
    "OracleRule",
    "PCEERule",
    "PatienceRule",
    "StaticRule",
    "ThresholdRule",
    "check_knob_for_depth",
    "decision_dtype",
    "entropy",
    "exit_probability",
    "exit_softmax",
    "make_rule",
    "parse_knob",
    "register_rule",
    "round_knob",
    "rule_class",
    "rule_names",
    "select_state",
    "simulate_exits",
    "unregister_rule",
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


@dataclass(frozen=True)
class ExitCost:
    """What deciding costs besides the layers themselves, at every executed layer (the analytic FLOPs).

    ``every_classifier``: the rule reads every exit's softmax, so every exit classifier runs (else only the
    exit taken runs its classifier); ``policy``: a ConsistentEE policy is evaluated (not at the last layer);
    ``learned_head``: a learned exit head is evaluated; ``pooled_every_layer``: the decision reads the pooled
    state although no classifier runs (the pooler, when it is the pooling, runs at every layer).
    """

    every_classifier: bool
    policy: bool = False
    learned_head: bool = False
    pooled_every_layer: bool = False


def entropy(probs: Tensor) -> Tensor:
    """Shannon entropy (nats) over the last dim; ``0 * log 0`` counts as 0."""
    import torch

    return torch.special.entr(probs.float()).sum(dim=-1)


def decision_dtype(device: torch.device | str) -> torch.dtype:
    """float64 for the signals rules threshold (float32 on MPS, which has no float64).

    A sure policy gives logits above 17 and a sure classifier softmax gaps as wide, where float32's sigmoid and
    softmax are exactly 1: a threshold could no longer order those rows, and a rule's curve would jump from its
    last point to full depth. float64 keeps them apart up to logits of about 36."""
    import torch

    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def exit_softmax(logits: Tensor) -> Tensor:
    """Softmax over the last dim at :func:`decision_dtype`: the ``probs`` signal of every driver alike."""
    return logits.to(decision_dtype(logits.device)).softmax(dim=-1)


def exit_probability(logits: Tensor) -> Tensor:
    """Sigmoid at :func:`decision_dtype`: the ``policy_prob`` and ``learned_score`` signals of every driver."""
    return logits.to(decision_dtype(logits.device)).sigmoid()


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


def round_knob(value: float) -> float:
    """Six decimals for reading; within 1e-4 of 0 or 1, six significant digits of the distance to it.

    Saturated signals differ only there (a policy's 1 - 2e-8 against 1 - 3e-9): a threshold rounded to 1.0 would
    send all of those rows to full depth at once."""
    value = float(value)
    for end in (0.0, 1.0):
        gap = value - end
        if 0.0 < abs(gap) < 1e-4:
            return end + float(f"{gap:.6g}")
    return round(value, 6)


def _grid(values: Iterable[float]) -> list[float]:
    return sorted({round_knob(v) for v in values})


class _KnobText(ValueError):
    """The text of a knob is not what its rule reads (turned into the rule's message by :func:`parse_knob`)."""


def _finite_text(rule: str, text: str, value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(f"rule {rule!r}: knob {text!r} must be a finite number")
    return value


def _int_text(text: str) -> int:
    number = float(text)
    if not math.isfinite(number) or not number.is_integer():
        raise _KnobText
    return int(number)


class ExitRule(ABC):
    """Base class of all exit rules. See the module docstring for the protocol."""

    name: ClassVar[str]
    knob_name: ClassVar[str]
    needs: ClassVar[frozenset[str]] = frozenset({"probs"})
    #: knob used when ``knob is None``; ``None`` here means the rule requires an explicit knob.
    default_knob: ClassVar[Any] = None
    #: whether the rule has a knob at all (only the oracle has none).
    has_knob: ClassVar[bool] = True
    #: what :meth:`knob_from_text` reads, for its error message.
    knob_text: ClassVar[str] = "a real number"
    #: the knob is a whole number (its JSON form is an integer).
    integer_knob: ClassVar[bool] = False
    #: what a layer-count knob means (:meth:`knob_layers`), for the message of :func:`check_knob_for_depth`.
    knob_layers_meaning: ClassVar[str] = ""
    #: the signals come from one trained model per key (ConsistentEE: one policy model per beta): a sweep
    #: crosses every model's tables with the knob grid, and the JSON knob names the key.
    model_keyed: ClassVar[bool] = False

    def __init__(self, knob: Any = None) -> None:
        if self.has_knob:
            if knob is None:
                knob = self.default_knob
            if knob is None:
                raise ValueError(f"rule {self.name!r} needs a value for its knob {self.knob_name!r}")
        elif knob is not None:
            raise ValueError(f"rule {self.name!r} has no knob, got {knob!r}")
        self.knob = self.validate_knob(knob) if self.has_knob else None

    # -- the knob ---------------------------------------------------------------------------------

    @classmethod
    def validate_knob(cls, knob: Any) -> Any:
        """Return the normalised knob or raise ``ValueError``."""
        return knob

    @classmethod
    def knob_from_text(cls, text: str) -> Any:
        """The knob written as text (CLI, config files), before range checks (:func:`parse_knob` adds them).

        Raise ``ValueError`` for text that is not a knob of this rule. Default: a finite real number."""
        return _finite_text(cls.name, text, float(text))

    @classmethod
    def knob_to_json(cls, knob: Any, model_key: Any = None) -> Any:
        """The JSON form of a knob in reports: a number (an integer for whole-number knobs), None without knob."""
        if knob is None:
            return None
        if isinstance(knob, numbers.Integral) or (isinstance(knob, float) and cls.integer_knob):
            return int(knob)
        return round_knob(knob)

    @classmethod
    def knob_from_json(cls, value: Any) -> Any:
        """The ``make_rule`` knob of a JSON knob (a report's, or an operating point's): inverse of
        :meth:`knob_to_json`."""
        return value

    @classmethod
    def knob_layers(cls, knob: Any) -> int | None:
        """The number of layers a knob names (an exit layer, a patience), or None when it names none."""
        return None

    def check_depth(self, num_layers: int) -> None:
        """Refuse a knob beyond the model's depth (see :func:`check_knob_for_depth`)."""
        _check_depth(type(self), self.knob, num_layers)

    # -- what deciding reads and costs ------------------------------------------------------------

    @classmethod
    def cost(cls) -> ExitCost:
        """What deciding costs at every executed layer, read off ``needs`` (see :class:`ExitCost`)."""
        policy, learned = "policy_prob" in cls.needs, "learned_score" in cls.needs
        every = "probs" in cls.needs
        return ExitCost(every_classifier=every, policy=policy, learned_head=learned,
                        pooled_every_layer=(policy or learned) and not every)

    def check_signals(self, signals: LayerSignals) -> None:
        for need in self.needs:
            if getattr(signals, need) is None:
                raise ValueError(f"rule {self.name!r} needs the signal {need!r}, which is missing")

    # -- deciding ---------------------------------------------------------------------------------

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

    # -- sweeps and calibration -------------------------------------------------------------------

    @classmethod
    @abstractmethod
    def default_grid(cls, *, num_classes: int = 2, num_layers: int = 12) -> list:
        """A sweep grid for the knob. ``num_classes``/``num_layers`` scale it where that matters."""

    @classmethod
    def in_sweep(cls, knob: Any, num_layers: int) -> bool:
        """Whether a grid knob is swept on a model of ``num_layers`` layers (all by default)."""
        return True

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
        import torch

        num_classes, num_layers = probs.shape[2], probs.shape[1]
        default = cls.default_grid(num_classes=num_classes, num_layers=num_layers)
        scores = cls.knob_scores(probs, policy_probs, learned_scores)
        if scores is None or scores.numel() == 0 or points < 2:
            return default
        levels = torch.linspace(0.0, 1.0, points, dtype=torch.float64)
        values = torch.quantile(scores.reshape(-1).double(), levels).tolist()
        return _grid([*values, *default])

    def __repr__(self) -> str:
        if not self.has_knob:
            return f"{type(self).__name__}()"
        return f"{type(self).__name__}({self.knob_name}={self.knob!r})"


class ThresholdRule(ExitRule):
    """A stateless rule that exits when one per-row score passes the knob.

    The score is :meth:`score` of the signal ``signal`` (a :class:`LayerSignals` field, which is then what the
    rule ``needs``); it passes when ``score <comparison> knob``. The same two class methods are the decision of the
    decoder's per-token rule of the same meaning (:mod:`consistentee.generation.rules`)."""

    #: the LayerSignals field the score is computed from.
    signal: ClassVar[str] = "probs"
    #: ``">="``, ``">"`` or ``"<"``: how the score must compare with the knob for the row to exit.
    comparison: ClassVar[str] = ">="

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "needs" not in cls.__dict__:
            cls.needs = frozenset({cls.signal})

    @classmethod
    def score(cls, values: Tensor) -> Tensor:
        """The score of every row from its signal (``[..., C]`` probabilities or a ``[...]`` scalar signal)."""
        return values

    @classmethod
    def passes(cls, score: Tensor, knob: float) -> Tensor:
        """Bool: the rows whose score makes them exit at ``knob``."""
        if cls.comparison == "<":
            return score < knob
        return score > knob if cls.comparison == ">" else score >= knob

    def decide(self, layer, signals, state):
        self.check_signals(signals)
        return self.passes(self.score(getattr(signals, self.signal)), self.knob), state

    @classmethod
    def aggressiveness(cls, knob):
        return float(knob) if cls.comparison == "<" else -float(knob)

    @classmethod
    def knob_scores(cls, probs, policy_probs=None, learned_scores=None):
        table = {"probs": probs, "policy_prob": policy_probs, "learned_score": learned_scores}[cls.signal]
        return None if table is None else cls.score(table[:, : probs.shape[1] - 1])


RULES: dict[str, type[ExitRule]] = {}


def register_rule(cls: type[ExitRule]) -> type[ExitRule]:
    """Enter a rule class in ``RULES`` under its ``name`` (a class decorator); a taken name is an error."""
    if not isinstance(cls, type) or not issubclass(cls, ExitRule):
        raise TypeError(f"an exit rule must subclass ExitRule, got {cls!r}")
    if not getattr(cls, "name", "") or cls.name in RULES:
        raise ValueError(f"exit rule name {getattr(cls, 'name', '')!r} is empty or already registered")
    unknown = set(cls.needs) - set(SIGNAL_NAMES)
    if unknown:
        raise ValueError(f"rule {cls.name!r} needs unknown signals {sorted(unknown)}; known: {', '.join(SIGNAL_NAMES)}")
    RULES[cls.name] = cls
    return cls


def unregister_rule(name: str) -> None:
    """Take rule ``name`` out of ``RULES`` (tests that register a rule of their own)."""
    RULES.pop(name, None)


@register_rule
class EntropyRule(ThresholdRule):
    name = "entropy"
    knob_name = "S"
    default_knob = 0.3
    comparison = "<"

    @classmethod
    def validate_knob(cls, knob: Any) -> float:
        return _check_nonneg(cls.name, cls.knob_name, knob)

    @classmethod
    def score(cls, values):
        return entropy(values)

    @classmethod
    def default_grid(cls, *, num_classes: int = 2, num_layers: int = 12) -> list[float]:
        fractions = [0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
        return _grid(f * math.log(max(num_classes, 2)) for f in fractions)


@register_rule
class ConfidenceRule(ThresholdRule):
    name = "confidence"
    knob_name = "tau"
    default_knob = 0.9

    @classmethod
    def validate_knob(cls, knob: Any) -> float:
        return _check_unit(cls.name, cls.knob_name, knob)

    @classmethod
    def score(cls, values):
        return values.max(dim=-1).values

    @classmethod
    def default_grid(cls, *, num_classes: int = 2, num_layers: int = 12) -> list[float]:
        chance = 1.0 / max(num_classes, 2)
        fractions = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999]
        return _grid(chance + f * (1.0 - chance) for f in fractions)


class _LayerCountRule(ExitRule):
    """A rule whose knob is a number of layers (an exit layer, a patience)."""

    knob_text = "an integer"
    integer_knob = True

    @classmethod
    def validate_knob(cls, knob: Any) -> int:
        return _check_pos_int(cls.name, cls.knob_name, knob)

    @classmethod
    def knob_from_text(cls, text: str) -> int:
        return _int_text(text)

    @classmethod
    def knob_layers(cls, knob: Any) -> int | None:
        return knob

    @classmethod
    def aggressiveness(cls, knob):
        return -float(knob)

    @classmethod
    def default_grid(cls, *, num_classes: int = 2, num_layers: int = 12) -> list[int]:
        return list(range(1, num_layers + 1))


@register_rule
class PatienceRule(_LayerCountRule):
    name = "patience"
    knob_name = "t"
    default_knob = 3
    knob_layers_meaning = "patience"

    def init_state(self, batch_size, device=None):
        import torch

        return {
            "prev": torch.full((batch_size,), -1, dtype=torch.long, device=device),
            "count": torch.zeros(batch_size, dtype=torch.long, device=device),
        }

    def decide(self, layer, signals, state):
        import torch

        self.check_signals(signals)
        pred = signals.probs.argmax(dim=-1)
        same = pred == state["prev"]
        count = torch.where(same, state["count"] + 1, torch.ones_like(state["count"]))
        return count >= self.knob, {"prev": pred, "count": count}


@register_rule
class PCEERule(ExitRule):
    name = "pcee"
    knob_name = "t,S"
    default_knob = (2, 0.3)
    knob_text = "'t,S' (an integer and a real number)"
    knob_layers_meaning = "patience"

    @classmethod
    def validate_knob(cls, knob: Any) -> tuple[int, float]:
        if not isinstance(knob, tuple | list) or len(knob) != 2:
            raise ValueError(f"rule {cls.name!r}: knob must be a pair (t, S), got {knob!r}")
        return _check_pos_int(cls.name, "t", knob[0]), _check_nonneg(cls.name, "S", knob[1])

    @classmethod
    def knob_from_text(cls, text: str) -> tuple[int, float]:
        parts = [p for p in text.replace(";", ",").split(",") if p.strip()]
        if len(parts) != 2:
            raise _KnobText
        return int(parts[0]), _finite_text(cls.name, text, float(parts[1]))

    @classmethod
    def knob_to_json(cls, knob: Any, model_key: Any = None) -> dict[str, Any]:
        t, s = knob
        return {"t": int(t), "S": round_knob(s)}

    @classmethod
    def knob_from_json(cls, value: Any) -> tuple[int, float]:
        """From a report's ``{"t", "S"}`` or an operating point's ``[t, S]``."""
        if isinstance(value, Mapping):
            return int(value["t"]), float(value["S"])
        if isinstance(value, list | tuple):
            return int(value[0]), float(value[1])
        return value

    @classmethod
    def knob_layers(cls, knob: Any) -> int | None:
        return knob[0] if isinstance(knob, tuple | list) and knob else None

    def init_state(self, batch_size, device=None):
        import torch

        return {"count": torch.zeros(batch_size, dtype=torch.long, device=device)}

    def decide(self, layer, signals, state):
        import torch

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


class _UnitThresholdRule(ThresholdRule):
    """A threshold in [0, 1] on a probability-like signal."""

    default_knob = 0.5

    @classmethod
    def validate_knob(cls, knob: Any) -> float:
        return _check_unit(cls.name, cls.knob_name, knob)


@register_rule
class LearnedRule(_UnitThresholdRule):
    name = "learned"
    knob_name = "tau"
    signal = "learned_score"

    @classmethod
    def default_grid(cls, *, num_classes: int = 2, num_layers: int = 12) -> list[float]:
        return _grid([i / 20 for i in range(21)] + [0.97, 0.99])


@register_rule
class StaticRule(_LayerCountRule):
    name = "static"
    knob_name = "k"
    needs = frozenset()
    default_knob = None  # the exit layer depends on the model: always explicit
    knob_layers_meaning = "exit layer"

    @staticmethod
    def passes(layer: int, k: int) -> bool:
        """Every row exits at layer ``layer`` when ``layer >= k`` (the decoder's static rule too)."""
        return layer >= k

    def decide(self, layer, signals, state):
        import torch

        exit_ = torch.full(
            (signals.batch_size,), self.passes(layer, self.knob), dtype=torch.bool, device=signals.probs.device
        )
        return exit_, state

    @classmethod
    def in_sweep(cls, knob, num_layers):
        return knob <= num_layers


@register_rule
class ConsistentEERule(_UnitThresholdRule):
    name = "consistentee"
    knob_name = "threshold"
    signal = "policy_prob"
    comparison = ">"
    model_keyed = True

    @classmethod
    def knob_to_json(cls, knob: Any, model_key: Any = None) -> dict[str, Any]:
        """``{"beta": the policy model's beta, "threshold": ...}``."""
        return {"beta": None if model_key is None else float(model_key), "threshold": round_knob(knob)}

    @classmethod
    def knob_from_json(cls, value: Any) -> Any:
        """From a report's ``{"beta", "threshold"}`` or an operating point's plain threshold."""
        return float(value["threshold"]) if isinstance(value, Mapping) else value

    @classmethod
    def default_grid(cls, *, num_classes: int = 2, num_layers: int = 12) -> list[float]:
        return _grid([i / 20 for i in range(20)] + [0.97, 0.99])


@register_rule
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


def rule_names(*, without: Iterable[str] = ()) -> tuple[str, ...]:
    """The registered rules, in registration order, that read none of the signals ``without``."""
    skip = frozenset(without)
    return tuple(name for name, cls in RULES.items() if not cls.needs & skip)


#: The rules that need no gold labels, sorted: what ``predict`` and ``serve`` can run (their ``--rule`` choices).
PREDICT_RULES = tuple(sorted(rule_names(without={"labels"})))
#: The rules a saved model folder runs on its own (no labels, no learned heads): what ``calibrate`` searches,
#: the policy first.
CALIBRATION_RULES = tuple(sorted(rule_names(without={"labels", "learned_score"}),
                                 key=lambda name: (name != ConsistentEERule.name, name)))


def rule_class(name: str) -> type[ExitRule]:
    """The registered class of rule ``name``; ``ValueError`` naming the known rules otherwise."""
    try:
        return RULES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown exit rule {name!r}; known rules: {', '.join(sorted(RULES))}") from None


def make_rule(name: str, knob: Any = None) -> ExitRule:
    """Build rule ``name`` with ``knob`` (``None``: the rule's default knob, if it has one)."""
    return rule_class(name)(knob)


def parse_knob(rule: str, text: Any) -> Any:
    """A knob written as text -> the value ``make_rule(rule, ...)`` expects, range-checked
    (:meth:`ExitRule.knob_from_text`, then :meth:`ExitRule.validate_knob`).

    ``None`` or ``""`` means the rule's default knob. A value that is not text is returned as it is (a float
    must be finite). NaN and infinities are refused.
    """
    cls = rule_class(rule)
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    if not isinstance(text, str):
        if isinstance(text, float):
            _finite_text(rule, text, text)
        return text
    if not cls.has_knob:
        raise ValueError(f"rule {rule!r} has no knob, got {text!r}")
    try:
        parsed = cls.knob_from_text(text)
    except ValueError as exc:
        if "finite" in str(exc) and not isinstance(exc, _KnobText):
            raise
        raise ValueError(f"rule {rule!r}: knob {text!r} is not {cls.knob_text}") from None
    return cls.validate_knob(parsed)


def check_knob_for_depth(rule: str, knob: Any, num_layers: int) -> None:
    """Refuse a layer-count knob beyond the model's depth (``--rule static --knob 99`` on a 6-layer model):
    such a knob silently means "never exit early"."""
    if rule in RULES:
        _check_depth(RULES[rule], knob, num_layers)


def _check_depth(cls: type[ExitRule], knob: Any, num_layers: int) -> None:
    layers = cls.knob_layers(knob)
    if isinstance(layers, int) and not isinstance(layers, bool) and layers > num_layers:
        raise ValueError(f"rule {cls.name!r}: knob {layers} ({cls.knob_layers_meaning}) is beyond the model's "
                         f"{num_layers} layers; use 1..{num_layers}")


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
    import torch

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
