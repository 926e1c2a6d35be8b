"""Evaluation harness: the AlphaEdit paper's sequential-editing protocol on CounterFact and zsRE.

`data` loads the benchmarks, `metrics` defines every number, `runner` runs the protocol on a
target (`targets.engine.EngineTarget`: an in-process editor built as the service builds its own;
`targets.service.ServiceTarget`: a running service over its public HTTP API), `report` writes
results.json, a Markdown table and plots, and `cli` is the `knowpatch eval` command.

A package of its own beside `service/`: the domain does not depend on the evaluation, its CLI,
its HTTP client or its plotting.
"""
