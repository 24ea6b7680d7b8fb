"""Exit rules for early-exit inference, usable in a batched engine and offline on full tables."""

from .rules import (
    RULES,
    ConfidenceRule,
    ConsistentEERule,
    EntropyRule,
    ExitResult,
    ExitRule,
    LayerSignals,
    LearnedRule,
    OracleRule,
    PatienceRule,
    PCEERule,
    StaticRule,
    entropy,
    make_rule,
    select_state,
    simulate_exits,
)

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
