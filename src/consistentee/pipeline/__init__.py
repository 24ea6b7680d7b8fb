"""Orchestration: recipes that load models and data, call the math of ``evaluation`` and write results.

The layer above ``training``, ``inference``, ``generation`` and ``evaluation``; beside ``serving``, below the CLI
(the layers are written down in pyproject.toml, ``[tool.importlinter]``).

* :mod:`.benchmark`     ``consistentee benchmark``: every exit rule on one trained model, one report
* :mod:`.benchmark_lm`  ``consistentee benchmark-lm``: every token-level exit rule on one early-exit LM
* :mod:`.calibrate`     ``consistentee calibrate``: an operating point with an accuracy guarantee
* :mod:`.memorize`      ``consistentee memorize``: the memorized layers of a run's training set
* :mod:`.wallclock`     the batched engine against full depth, timed
"""
