"""Test configuration: a derandomised hypothesis profile (reproducible CI), one torch thread."""

import torch
from hypothesis import HealthCheck, settings

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
