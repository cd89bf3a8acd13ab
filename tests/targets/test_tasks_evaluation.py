"""The evaluation sampler of the causal task model (targets/tasks/evaluation.py) decodes through
the decode engine: it is the HF policy's own sampler (same draws as ``HFPolicy.generate`` for the
same generator), its draws follow the policy's law (exact law of two-token responses,
chi-square), greedy decoding takes the most likely token and leaves the caller's generator
alone, and the model's train/eval mode is left as it was.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import pytest
import torch
from scipy.stats import chisquare

from tiltsample.targets import tasks
from tiltsample.targets.tasks.evaluation import _ar_samples

pytestmark = pytest.mark.usefixtures("serial_torch")


@pytest.fixture(scope="module")
def policy() -> Any:
    return tasks.load_policy()


def test_ar_samples_are_the_policy_sampler(policy: Any) -> None:
    """Per problem, the draws are ``HFPolicy.generate``'s for the same generator state (one
    session and one multinomial per position, rows in problem order)."""
    problems = tasks.held_out_problems(3, seed=2)
    for temperature in (1.0, 0.7):
        gen = torch.Generator().manual_seed(4)
        ours = _ar_samples(policy.model, problems[:1], 5, temperature, gen, 12)
        ref_gen = torch.Generator().manual_seed(4)
        ref = policy.generate(
            problems[0].prompt_ids(),
            5,
            ref_gen,
            max_new_tokens=12,
            temperature=temperature,
        )
        assert ours[0] == ref.sequences
        assert torch.equal(gen.get_state(), ref_gen.get_state())
    # several problems: num rows each, in problem order; a cap bounds every response
    out = _ar_samples(policy.model, problems, 4, 1.0, torch.Generator().manual_seed(0), 6)
    assert [len(xs) for xs in out] == [4, 4, 4]
    assert all(0 < len(x) <= 6 for xs in out for x in xs)
    assert all(tasks.EOS_ID not in x[:-1] for xs in out for x in xs)


def test_ar_samples_follow_the_policy_law_on_a_short_cap(policy: Any) -> None:
    """Responses capped at two tokens, temperature 3 (the model copies the prompt's first number
    almost surely at temperature 1): the empirical law of 3000 draws matches the exact law
    ``q(x_1) q(x_2 | x_1)``, ``q = softmax(log p / 3)`` of the HF policy (EOS ends a response
    early)."""
    problem = tasks.held_out_problems(1, seed=7)[0]
    prompt = problem.prompt_ids()
    n, tau = 3000, 3.0
    gen = torch.Generator().manual_seed(1)
    draws = _ar_samples(policy.model, [problem], n, tau, gen, 2)[0]
    vocab, eos = policy.vocab_size, policy.eos_id
    first = torch.log_softmax(policy.next_logprobs(prompt, [()])[0] / tau, -1)
    firsts = [a for a in range(vocab) if a != eos]
    seconds = torch.log_softmax(policy.next_logprobs(prompt, [(a,) for a in firsts]) / tau, -1)
    law: dict[tuple[int, ...], float] = {(eos,): math.exp(float(first[eos]))}
    for a, row in zip(firsts, seconds, strict=True):
        for b in range(vocab):
            law[(a, b)] = math.exp(float(first[a] + row[b]))
    assert abs(sum(law.values()) - 1.0) < 1e-9
    counts = Counter(draws)
    assert set(counts) <= {x for x, q in law.items() if q > 0}
    big = [x for x in law if law[x] * n >= 5]
    obs = [counts[x] for x in big] + [n - sum(counts[x] for x in big)]
    exp = [law[x] * n for x in big] + [n - sum(law[x] * n for x in big)]
    assert len(big) >= 10
    assert chisquare(obs, exp).pvalue > 1e-3


def test_greedy_takes_the_most_likely_token_and_keeps_the_generator(policy: Any) -> None:
    problems = tasks.held_out_problems(2, seed=3)
    gen = torch.Generator().manual_seed(9)
    state = gen.get_state()
    out = _ar_samples(policy.model, problems, 2, 0.0, gen, 10)
    assert torch.equal(gen.get_state(), state)  # a point mass needs no draw
    for xs, p in zip(out, problems, strict=True):
        assert xs[0] == xs[1]
        x = xs[0]
        laws = policy.next_logprobs(p.prompt_ids(), [x[:i] for i in range(len(x))])
        for i, row in enumerate(laws):
            top = float(row.max())
            assert float(row[x[i]]) > top - 1e-5, (i, x)


def test_the_model_mode_is_left_as_it_was(policy: Any) -> None:
    model = policy.model
    problems = tasks.held_out_problems(1)
    try:
        for training in (True, False):
            model.train(training)
            _ar_samples(model, problems, 1, 1.0, torch.Generator().manual_seed(0), 3)
            assert model.training is training
    finally:
        model.eval()
