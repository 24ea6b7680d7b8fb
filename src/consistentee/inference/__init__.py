"""Batched early-exit inference: the engine, the full-depth baseline and the text-in predictor."""

from consistentee.inference.engine import EarlyExitEngine, EngineOutput, full_depth_logits
from consistentee.inference.predictor import EarlyExitPredictor, parse_knob, resolve_model_source

__all__ = ["EarlyExitEngine", "EarlyExitPredictor", "EngineOutput", "full_depth_logits", "parse_knob",
           "resolve_model_source"]
