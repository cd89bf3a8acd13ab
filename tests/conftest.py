"""Test configuration: a derandomised hypothesis profile (reproducible CI), one torch thread."""

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

# The tests mirror the package layout (tests/core, tests/samplers/{ets,mh,smc}, tests/targets,
# tests/theory, tests/app, tests/project). Shared helpers (tests/smc_toys.py, tests/hf_toys.py) and
# a few test modules that reuse a sibling's toys are imported by name; --import-mode=importlib
# does not put their folders on sys.path, so add them (last: installed packages keep precedence;
# test module names are unique across folders, tests/project/test_layout.py checks it).
_TESTS = Path(__file__).resolve().parent
sys.path.append(str(_TESTS))
sys.path.extend(str(d) for d in sorted(_TESTS.rglob("*")) if d.is_dir() and d.name != "__pycache__")

# Tiny tensors dominate the suite; on a loaded 2-core machine intra-op thread wake-ups cost more
# than the work itself (measured: 35 s -> 7 s for the SMC tests).
torch.set_num_threads(1)

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.load_profile("ci")


@pytest.fixture(scope="module")
def serial_torch() -> Iterator[None]:
    """One intra-op thread for a module, restored afterwards (use with
    ``pytestmark = pytest.mark.usefixtures("serial_torch")``): tiny tensors only pay wake-up
    latency for threads on a loaded 2-core machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
