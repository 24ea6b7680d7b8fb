"""Orchestration: recipes that load models and data, call the math of ``evaluation`` and write results.

The layer above ``training``, ``inference`` and ``evaluation``; the CLI and the server sit above it.
"""
