"""Early exit for decoder-only language models (docs/method.md section 7).

Modules, one concern each:

* :mod:`.loading`   the built-in SmolLM2 (GGUF -> cached safetensors) and any local or hub causal LM
* :mod:`.decoder`   layer-wise Llama-family decoder with its own per-layer KV cache, exit heads, policies
* :mod:`.kv`        what happens to the K/V of skipped layers: ``propagate``, ``recompute``, ``full``
* :mod:`.rules`     token-level exit rules: consistentee, static, confidence (max-prob / top-2 gap), saturation
* :mod:`.generate`  generation API: greedy / sampling, stop strings, streaming, batches, chat template, lossless
* :mod:`.training`  stages 1-3 per token, token-level memorized layers
* :mod:`.data`      WikiText-2 and XSum
* :mod:`.bundled`   the trained exits shipped for the built-in model, checked by their sha256 before use
* :mod:`.benchmark` the measurements of ``consistentee benchmark-lm``: FLOPs, clocks, cost model, bootstrap,
  offline perplexity (the recipe, which writes the report, is :mod:`consistentee.pipeline.benchmark_lm`)
"""
