"""Evaluation harness: the AlphaEdit paper's sequential-editing protocol on CounterFact and zsRE.

`data` loads the benchmarks, `metrics` defines every number, `runner` runs the protocol on a
backend (`local`: an in-process editor; `remote`: a running service over HTTP), `report` writes
results.json, a Markdown table and plots, and `cli` is the `knowpatch eval` command.
"""
