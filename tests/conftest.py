"""Test configuration: a derandomised hypothesis profile (reproducible CI), one torch thread."""

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

# Shared test helpers (tests/smc_toys.py) are imported by name; --import-mode=importlib does not
# put this folder on sys.path, so add it (last: installed packages keep precedence).
sys.path.append(str(Path(__file__).resolve().parent))

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
