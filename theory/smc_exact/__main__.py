"""``python -m tiltsample.theory.smc_exact``: the measurements of ``docs/samplers/smc.md``."""

from __future__ import annotations

from tiltsample.theory.smc_exact.tables import main

if __name__ == "__main__":  # pragma: no cover
    main()
