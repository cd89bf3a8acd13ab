"""SMC and Power-SMC at the rollout level (samplers/smc/rollout_block.py).

The session is a rollout-only test double (tests/rollout_toys.py): it decodes whole continuations
with the ordinary token-level engine on a wrapped toy / tiny-HF session, and refuses next-token
laws with TokenLevelAccessError, like a serving engine.

Exact first: with tau = 1 a rollout block draws the same tokens from the same random stream as the
token-level path, so whole runs (tokens, weights, evidence, cost) are bit-identical; at tau != 1
they agree to round-off (the tempered law is normalised by another routine). Power-SMC at the
rollout level is SMC from the tempered law q_{1/alpha} with the power twist, replayed by the
token-level engine with proposal="reference". Without resampling every final weight is the exact
importance weight log p(x) + log G(x) - log q(x), q computed here from the policy table (the
exponent ramp included: one temperature per block). Then statistical: E[Ẑ/Z · W(x)] = pi(x) cell
by cell (Hotelling's T² against its F quantile at level 1e-3, with a resolution check) and
E[Ẑ]/Z = 1 within 4 standard errors. Last: same seed, same output; one decode request per block;
cost counted; the configurations that need full laws are refused naming the parameter.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hf_toys import BOS, tiny_model
from rollout_toys import RolloutOnlyPolicy, rollout_only
from smc_toys import (
    TRUNCATIONS,
    constrained_toy,
    gen,
    power_graded_toy,
    smc_runs,
    weighted_law_check,
)

import tiltsample
from tiltsample import TiltedTarget, power_target
from tiltsample.policy import TokenLevelAccessError
from tiltsample.samplers import csmc, smc
from tiltsample.samplers.smc import power_smc
from tiltsample.samplers.smc.power_smc import PowerRampTwist
from tiltsample.target import Truncation
from tiltsample.targets.rewards import ContainsTokenReward
from tiltsample.targets.tabular import random_tabular
from tiltsample.testing import check_sampler
from tiltsample.theory import exact_distribution, proposal_law
from tiltsample.types import Seq

pytestmark = pytest.mark.usefixtures("serial_torch")

ALPHA = 3.0


def power_toy(truncation: Truncation = "stop", alpha: float = ALPHA) -> TiltedTarget:
    """``p_ref^alpha``, V = 3 (EOS = 0), L = 4 (the Power-SMC toy of test_smc_power.py)."""
    policy = random_tabular(gen(3), 3, 4, concentration=0.7)
    return power_target(policy, alpha, max_new_tokens=4, truncation=truncation)


def _same_runs(a: smc.SMCState, b: smc.SMCState, exact: bool) -> None:
    """Token-level run ``a`` and rollout-level run ``b``: same particles, weights, evidence."""
    ra, rb = smc.result(a), smc.result(b)
    assert ra.sequences == rb.sequences
    assert torch.equal(a.finished, b.finished)
    if exact:
        assert torch.equal(a.log_w, b.log_w)
        assert torch.equal(a.log_p, b.log_p)
        assert torch.equal(smc.log_evidence_runs(a), smc.log_evidence_runs(b))
    else:
        assert torch.allclose(a.log_w, b.log_w, atol=1e-12, rtol=0)
        assert torch.allclose(a.log_p, b.log_p, atol=1e-12, rtol=0)
        assert torch.allclose(smc.log_evidence_runs(a), smc.log_evidence_runs(b), atol=1e-12)
    assert torch.equal(a.tok_log_p, b.tok_log_p) or not exact
    assert ra.cost.generated_tokens == rb.cost.generated_tokens
    assert ra.cost.reward_calls == rb.cost.reward_calls
    # not available at the rollout level: stored as NaN, read by nothing (moves are refused)
    assert b.tok_entropy is not None and bool(torch.isnan(b.tok_entropy).all())
    assert bool(torch.isnan(b.tok_log_q_move).all())


# ----------------------------------------------------------------------------- exact
SMC_CONFIGS: list[dict[str, Any]] = [
    {},
    {"block_size": 2},
    {"block_size": 3, "twist": "none", "ess_threshold": 1.0, "resampling": "multinomial"},
    {"block_size": 4, "ess_threshold": 0.0},
    {"temperature": 0.8, "block_size": 2},
    {"twist": "lookahead", "num_rollouts": 2, "block_size": 2},
]


@pytest.mark.parametrize("truncation", TRUNCATIONS)
@pytest.mark.parametrize(
    "params", SMC_CONFIGS, ids=["prefix", "block", "none-always", "is", "tempered", "rollouts"]
)
def test_rollout_blocks_replay_the_token_level_path(
    truncation: Truncation, params: dict[str, Any]
) -> None:
    target = constrained_toy(truncation)
    wrapped = rollout_only(target)
    a = smc_runs(target, 8, 6, 1, **params)
    b = smc_runs(wrapped, 8, 6, 1, **params)
    _same_runs(a, b, exact=params.get("temperature", 1.0) == 1.0)
    assert b.steps == a.steps


@pytest.mark.parametrize("truncation", TRUNCATIONS)
@pytest.mark.parametrize("block_size", [1, 2])
def test_power_smc_rollout_blocks_are_smc_from_the_tempered_law(
    truncation: Truncation, block_size: int
) -> None:
    """Rollout Power-SMC = token-level SMC with q = p^(1/tau), tau = 1/alpha, and the power twist
    (weights after the draw instead of the fully adapted ones before it)."""
    target = power_toy(truncation)
    a = smc_runs(
        target,
        8,
        6,
        2,
        proposal="reference",
        temperature=1 / ALPHA,
        twist=PowerRampTwist(),
        block_size=block_size,
    )
    b = smc_runs(rollout_only(target), 8, 6, 2, **power_smc.smc_params(block_size=block_size))
    _same_runs(a, b, exact=False)
    assert b.cost.reward_calls == 0  # the power tilt reuses log p_ref


def test_rollout_blocks_replay_the_token_level_path_on_the_tiny_hf_model() -> None:
    from tiltsample.targets.hf import HFPolicy

    policy = HFPolicy(tiny_model(torch.float64))
    target = TiltedTarget(policy, ContainsTokenReward(3, 0), 0.5, (BOS,), 6)
    params: dict[str, Any] = {"block_size": 2, "ess_threshold": 1.0}
    a = smc_runs(target, 4, 2, 7, **params)
    b = smc_runs(rollout_only(target), 4, 2, 7, **params)
    _same_runs(a, b, exact=True)
    assert a.cost == b.cost  # the same model calls and forward tokens, through the engine


def _log_q_blocks(target: TiltedTarget, x: Seq, tau_at: Callable[[int], float]) -> float:
    """``log q(x)`` when position ``t`` is drawn at temperature ``tau_at(t)`` (the forced EOS at
    the cap under ``truncation="condition"`` has factor 1), from the policy table."""
    total = 0.0
    for t, v in enumerate(x):
        if target.truncation == "condition" and t == target.max_new_tokens - 1:
            continue
        row = target.policy.next_logprobs(target.prompt, [x[:t]])[0].to(torch.float64)
        total += float(torch.log_softmax(row / tau_at(t), 0)[v])
    return total


def _exact_log_weights(
    target: TiltedTarget, xs: list[Seq], tau_at: Callable[[int], float] | float
) -> torch.Tensor:
    """``log p(x) + log G(x) - log q(x)`` (``-inf`` off the support), independently of smc."""
    if isinstance(tau_at, float):
        law = proposal_law(target, tau_at)
        index = {x: i for i, x in enumerate(law.support)}
        return torch.tensor([float(law.log_weights[index[x]]) for x in xs], dtype=torch.float64)
    log_p = target.policy.sequence_logprob(target.prompt, xs).to(torch.float64)
    log_g = target.evaluate_tilt(xs, log_reference=log_p).log_tilt
    log_q = torch.tensor([_log_q_blocks(target, x, tau_at) for x in xs], dtype=torch.float64)
    value = log_p + log_g - log_q
    return torch.where(torch.isneginf(log_p + log_g), log_p + log_g, value)


@pytest.mark.parametrize("truncation", TRUNCATIONS)
@pytest.mark.parametrize("config", ["smc-tempered", "power", "power-ramp"])
def test_without_resampling_every_weight_is_the_exact_importance_weight(
    truncation: Truncation, config: str
) -> None:
    """kappa = 0: each final weight is log p(x) + log G(x) - log q(x) of its own path, q the law
    the blocks were drawn from (for the ramp: tau = 1/alpha_{t0+1} for the block starting at
    t0); the mean weight is then log Ẑ."""
    tau_at: Callable[[int], float] | float
    if config == "smc-tempered":
        target = constrained_toy(truncation)
        params: dict[str, Any] = {"temperature": 0.8, "block_size": 2, "ess_threshold": 0.0}
        tau_at = 0.8
    elif config == "power":
        target = power_toy(truncation)
        params = power_smc.smc_params(block_size=3, ess_threshold=0.0)
        tau_at = 1 / ALPHA
    else:
        target = power_toy(truncation)
        ramp, block = 3, 2
        params = power_smc.smc_params(block_size=block, alpha_ramp=ramp, ess_threshold=0.0)

        def tau_at(t: int) -> float:
            first = block * (t // block) + 1  # length after the block's first token
            return 1.0 / (1.0 + (ALPHA - 1.0) * min(first / ramp, 1.0))

    state = smc_runs(rollout_only(target), 60, 1, 4, **params)
    out = smc.result(state)
    expected = _exact_log_weights(target, out.sequences, tau_at)
    assert torch.allclose(state.log_w, expected, atol=1e-10, rtol=0)
    log_z_hat = float(torch.logsumexp(expected, 0) - math.log(60))
    assert out.log_evidence == pytest.approx(log_z_hat, abs=1e-10)


# ----------------------------------------------------------------------------- statistical
LAW_CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("smc-bootstrap", {"twist": "none", "ess_threshold": 1.0}),
    (
        "smc-tempered-block",
        {"temperature": 0.8, "block_size": 2, "ess_threshold": 1.0, "resampling": "residual"},
    ),
    ("power-smc", power_smc.smc_params(ess_threshold=1.0)),
    (
        "power-smc-ramp-block",
        power_smc.smc_params(
            alpha_ramp=2, ramp_start=0.5, block_size=2, ess_threshold=1.0, resampling="multinomial"
        ),
    ),
]


@pytest.mark.parametrize("truncation", TRUNCATIONS)
@pytest.mark.parametrize(("name", "params"), LAW_CONFIGS, ids=[n for n, _ in LAW_CONFIGS])
def test_weighted_law_is_pi_and_evidence_unbiased(
    truncation: Truncation, name: str, params: dict[str, Any]
) -> None:
    """``p_ref^1.5 · exp(fraction of token 1)`` (smc_toys.power_graded_toy), R = 1000 runs of
    N = 8, resampling after every block: ``E[Ẑ/Z · W(x)] = pi(x)`` for every cell with
    ``pi >= 0.01`` (the rest merged) by Hotelling's T² at level 1e-3, the runs resolving a 10%
    relative bias of the heaviest cell at 4 standard errors; ``E[Ẑ]/Z = 1`` within 4 standard
    errors. (Calibration: 0 of 30 seeds rejected per configuration, largest T²/critical 0.89; a
    10% error in the engine's log q is rejected with T² > 100 × critical.)"""
    target = power_graded_toy(truncation)
    r, n = 1000, 8
    state = smc_runs(rollout_only(target), n, r, 11, **params)
    assert float(state.resample_count.double().mean()) > 0.9  # (not after a run's last block)
    check = weighted_law_check(state._replace(target=target))  # pi from the enumerable policy
    assert check.ok, str(check)
    assert check.resolution < 0.1, str(check)
    ratio = torch.exp(smc.log_evidence_runs(state) - exact_distribution(target).log_z)
    assert abs(float(ratio.mean()) - 1.0) < 4 * float(ratio.std()) / math.sqrt(r)


# ----------------------------------------------------------------------------- contract
@pytest.mark.parametrize("truncation", TRUNCATIONS)
def test_same_seed_same_output_one_request_per_block_and_cost(truncation: Truncation) -> None:
    for target, algorithm in (
        (
            t := rollout_only(constrained_toy(truncation)),
            smc.sampler(t, num_samples=8, block_size=2),
        ),
        (
            u := rollout_only(power_toy(truncation)),
            power_smc.sampler(u, num_samples=8, alpha_ramp=2),
        ),
    ):
        check_sampler(algorithm, target, num_samples=8)
        policy = target.policy
        assert isinstance(policy, RolloutOnlyPolicy)
        before = policy.decode_calls
        out = tiltsample.sample(algorithm, target, 8, seed=3)
        assert policy.decode_calls - before == out.meta["num_steps"]  # one request per block
        assert out.cost.model_calls > 0 and out.cost.forward_tokens > 0
        assert out.cost.generated_tokens > 0
    # without resampling every generated token is one of a particle's (forced EOS included)
    target = rollout_only(constrained_toy(truncation))
    out = tiltsample.sample(
        smc.sampler(target, num_samples=16, block_size=3, ess_threshold=0.0), target, 16, seed=0
    )
    assert out.cost.generated_tokens == sum(len(x) for x in out.sequences)
    assert out.cost.reward_calls == 2 * 16  # two tilt terms, once per particle


def _refusals(target: TiltedTarget, x: Seq) -> list[tuple[Any, str]]:
    return [
        (smc.sampler(target, num_samples=4, num_moves=1, block_size=2), "num_moves=1"),
        (smc.sampler(target, num_samples=4, proposal="optimal"), "proposal='optimal'"),
        (power_smc.sampler(target, num_samples=4, num_moves=2), "num_moves=2"),
        (csmc.sampler(target, num_samples=4, reference=x), "reference"),
    ]


@pytest.mark.parametrize("case", range(4), ids=["moves", "optimal", "power-moves", "csmc"])
def test_configurations_needing_full_laws_are_refused_by_name(case: int) -> None:
    inner = constrained_toy("stop")
    target = rollout_only(inner)
    x = exact_distribution(inner).support[0]  # a valid response (the enumerable policy)
    algorithm, name = _refusals(target, x)[case]
    with pytest.raises(TokenLevelAccessError, match="token-level access") as err:
        tiltsample.sample(algorithm, target, 4, seed=0)
    assert name in str(err.value)
    policy = target.policy
    assert isinstance(policy, RolloutOnlyPolicy) and policy.decode_calls == 0


def test_power_ramp_without_a_positive_exponent_is_refused() -> None:
    target = rollout_only(power_toy())
    algorithm = power_smc.sampler(target, num_samples=4, alpha_ramp=4, ramp_start=-2.0)
    with pytest.raises(ValueError, match=r"ramp_start=-2\.0"):
        tiltsample.sample(algorithm, target, 4, seed=0)


@pytest.mark.parametrize("cut", ["uniform", "entropy_jump"])
def test_moves_on_a_rollout_state_fail_at_the_session(cut: str) -> None:
    """The NaN placeholders of tok_log_q_move / tok_entropy are never used: rejuvenating a
    rollout-level state needs full laws and raises before any move is decided."""
    target = rollout_only(constrained_toy("stop"))
    g = gen(0)
    state = smc.init(target, generator=g, num_particles=8)
    state, _ = smc.build_kernel(block_size=2)(g, state)
    assert not bool(state.finished.all())
    with pytest.raises(TokenLevelAccessError, match="token-level access"):
        smc.rejuvenate(state, g, num_moves=1, move_cut=cut)
