"""Reference policies and rewards (installed as ``tiltsample.targets``).

Toy policies whose distributions can be enumerated (:mod:`~tiltsample.targets.tabular`,
:mod:`~tiltsample.targets.decision_trace`, :mod:`~tiltsample.targets.pyro_program`), rewards
(:mod:`~tiltsample.targets.rewards`) and the named toy targets of the CLI
(:mod:`~tiltsample.targets.toys`). Nothing here imports a sampler.
"""
