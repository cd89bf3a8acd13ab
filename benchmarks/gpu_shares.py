r"""Every sampler's generated tokens/s as a share of plain batched decoding, at two batch widths.

The ``shares`` section of :mod:`gpu_check` (``python benchmarks/gpu_check.py --device cuda``), also
runnable alone::

    python benchmarks/gpu_shares.py --device cuda            # Qwen2-0.5B shape, bf16, 64 and 256
    .venv/bin/python benchmarks/gpu_shares.py --device cpu --quick   # smoke test (a minute)

Model: random weights shaped like Qwen2-0.5B (:func:`gpu_check.qwen05b_config`; ``--quick``
shrinks it and its vocabulary to :data:`QUICK_VOCAB`) in bfloat16 on the device (float32 on a
CPU, which has no fast bf16 kernels). For every width ``W`` in ``--widths`` it times

* plain batched decoding of ``W`` rows (:func:`tiltsample.decoding.decode_until_complete` on a
  KV-cached :class:`~tiltsample.targets.hf.HFSession`, ``--new-tokens`` tokens per row: with random
  weights EOS is rare, so rows run to the cap), and
* each autoregressive sampler set up so that its widest model call has ``W`` rows (``ancestral`` and
  ``best-of-n`` with ``W`` candidates, ``beam`` with ``W`` beams, ``smc`` / ``power-smc`` with ``W``
  particles, ``ets`` with ``W / 4`` candidates × 4 rollouts, the MH family with ``W`` chains),

and reports ``generated tokens/s ÷ plain decoding's at the same width`` (medians over
``--repeats``, all runs of a width timed round robin so that drift hits them alike). The target
is a power target (``alpha = 4``) for the MH family and Power-SMC and a token-contains tilt
(``lam = 0.5``) for the others. Failures are recorded per sampler, never fatal.

Time budget (``--budget`` seconds; :mod:`gpu_check` passes its own): a run that would end after
it (its expected duration: its warm-up time, or the previous width's scaled by the width ratio)
is skipped and reported as ``skipped``, never silently dropped. :func:`time_runs`,
:func:`share_row` and :func:`share_table` are shared with the vLLM table (:mod:`gpu_vllm`).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

# (sampler, target kind, draws, parameters) as functions of the width W
RUNS: dict[str, Callable[[int], tuple[str, int, dict[str, Any]]]] = {
    "ancestral": lambda w: ("tilt", w, {}),
    "best-of-n": lambda w: ("tilt", 1, {"num_candidates": w, "selection": "argmax"}),
    "beam": lambda w: ("tilt", 1, {"num_beams": w}),
    "smc": lambda w: ("tilt", w, {"num_particles": w}),
    "power-smc": lambda w: ("power", w, {"num_particles": w}),
    "ets": lambda w: ("tilt", 1, {"num_candidates": max(w // 4, 1), "num_rollouts": 4}),
    "power": lambda w: ("power", w, {"num_steps": 2}),
    "entropy-cut": lambda w: ("power", w, {"num_steps": 2}),
    "mh": lambda w: ("power", w, {"num_steps": 2}),
}


QUICK_VOCAB = 8192
"""The vocabulary with ``--quick``: the host-side draw over 151,936 tokens made the CPU smoke test
slow, and above :data:`~tiltsample.targets.vllm.loader.FULL_VOCAB_LIMIT` a vLLM engine still
serves rollouts only."""


def sync(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def build_policy(device: str, quick: bool) -> Any:
    """A random Qwen2-0.5B-shaped model on ``device`` as an :class:`HFPolicy`."""
    import torch
    from gpu_check import QWEN_VOCAB, qwen05b_config
    from transformers import Qwen2ForCausalLM

    from tiltsample.targets.hf import HFPolicy

    dev = torch.device(device)
    cfg = qwen05b_config(quick, QUICK_VOCAB if quick else QWEN_VOCAB)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        with dev:
            model: Any = Qwen2ForCausalLM(cfg)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    return HFPolicy(model.to(dtype).eval(), eos_id=cfg.eos_token_id, bos_id=cfg.bos_token_id)


def targets(policy: Any, new_tokens: int) -> dict[str, Any]:
    import torch

    from tiltsample import TiltedTarget
    from tiltsample.target import power_target
    from tiltsample.targets.rewards import ContainsTokenReward

    gen = torch.Generator().manual_seed(0)
    high = min(150000, policy.vocab_size - 8)  # below the special ids
    prompt = tuple(int(t) for t in torch.randint(0, high, (16,), generator=gen))
    reward = ContainsTokenReward(int(prompt[0]), policy.eos_id)
    return {
        "tilt": TiltedTarget(policy, reward, 0.5, prompt=prompt, max_new_tokens=new_tokens),
        "power": power_target(policy, 4.0, prompt, new_tokens),
    }


def plain(policy: Any, prompt: tuple[int, ...], width: int, new_tokens: int) -> int:
    import torch

    from tiltsample.decoding import decode_until_complete

    session = policy.session(prompt, width)
    gen = torch.Generator().manual_seed(0)
    d = decode_until_complete(session, gen, eos_id=policy.eos_id, max_length=new_tokens)
    return int(d.generated_tokens)


def budget_fits(deadline: float | None, seconds: float) -> bool:
    """Whether ``seconds`` more work ends before ``deadline`` (a ``time.perf_counter`` time)."""
    return deadline is None or time.perf_counter() + seconds <= deadline


def time_runs(
    runs: dict[str, Callable[[], int]],
    repeats: int,
    device: Any,
    deadline: float | None = None,
    guess: dict[str, float] | None = None,
    refusals: dict[type[Exception], str] | None = None,
) -> tuple[dict[str, Any], dict[str, float]]:
    """Warm up every run (a failure is recorded, never fatal), then time ``repeats`` round-robin
    rounds (so that drift hits every run alike). Each run returns its generated tokens.

    Returns ``(results, seconds)``: per run ``{"tokens_per_s", "generated_tokens", "repeats"}``
    (the median of its timed rounds), ``{"error": ...}`` or ``{"skipped": ...}``, and the
    warm-up seconds of every run that worked. ``refusals`` maps an exception type to the reason
    reported (as ``skipped``) when a warm-up raises it: an expected refusal, not an error.

    The time budget: a run is skipped when its expected duration (``guess[name]`` before its
    warm-up, its warm-up time before a timed round) would end after ``deadline``; a run that was
    warmed up but never timed reports ``skipped``, so a budget cut is visible and never silently
    turns into a short median.
    """
    out: dict[str, Any] = {}
    warm: dict[str, float] = {}
    for name, fn in runs.items():
        if not budget_fits(deadline, (guess or {}).get(name, 0.0)):
            out[name] = {"skipped": "time budget (before its warm-up)"}
            continue
        start = time.perf_counter()
        try:
            fn()  # warm-up, and a check that the run works here
            sync(device)
        except Exception as exc:  # recorded, never fatal
            why = next((v for k, v in (refusals or {}).items() if isinstance(exc, k)), None)
            out[name] = {"skipped": why} if why else {"error": f"{type(exc).__name__}: {exc}"[:300]}
            continue
        warm[name] = time.perf_counter() - start
    times: dict[str, list[float]] = {k: [] for k in warm}
    tokens: dict[str, int] = {}
    for _ in range(repeats):
        for name in warm:
            if not budget_fits(deadline, warm[name]):
                continue
            fn = runs[name]
            sync(device)
            start = time.perf_counter()
            tokens[name] = fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    for name in warm:
        if not times[name]:
            out[name] = {"skipped": "time budget (warmed up, never timed)"}
            continue
        out[name] = {
            "tokens_per_s": round(tokens[name] / statistics.median(times[name]), 1),
            "generated_tokens": tokens[name],
            "repeats": len(times[name]),
        }
    return {k: out[k] for k in runs}, warm


def share_row(timed: dict[str, Any]) -> dict[str, Any]:
    """A width's row from :func:`time_runs` results with a ``plain`` entry: ``plain_tokens_per_s``
    and, per sampler, its result with ``share_of_plain`` added."""
    plain_rate = timed["plain"].get("tokens_per_s")
    row: dict[str, Any] = {"plain_tokens_per_s": plain_rate, "plain": timed["plain"]}
    for name, cell in timed.items():
        if name == "plain":
            continue
        if plain_rate and "tokens_per_s" in cell:
            cell = {**cell, "share_of_plain": round(cell["tokens_per_s"] / plain_rate, 3)}
        row[name] = cell
    return row


def measure(
    device: str,
    quick: bool,
    widths: list[int],
    new_tokens: int,
    repeats: int,
    deadline: float | None = None,
) -> dict[str, Any]:
    """The share table: ``{"W": {"plain_tokens_per_s": ..., sampler: {...}}}``. With a
    ``deadline`` (a ``time.perf_counter`` time), runs that would end after it are skipped and
    say so (:func:`time_runs`; a wider row's runs are expected to take ``W / W_prev`` times the
    previous width's warm-up)."""
    import tiltsample

    policy = build_policy(device, quick)
    tg = targets(policy, new_tokens)
    prompt = tg["tilt"].prompt
    out: dict[str, Any] = {
        "backend": "hf",
        "policy": {"device": str(policy.device), "dtype": str(policy.dtype)},
        "new_tokens": new_tokens,
        "repeats": repeats,
    }
    guess: dict[str, float] = {}
    previous = None
    for width in widths:
        runs: dict[str, Callable[[], int]] = {}
        runs["plain"] = functools.partial(plain, policy, prompt, width, new_tokens)
        for name, spec in RUNS.items():
            kind, n, params = spec(width)

            def run(name: str = name, kind: str = kind, n: int = n, params: Any = params) -> int:
                res = tiltsample.sample(name, tg[kind], n, seed=0, progress=False, **params)
                return int(res.cost.generated_tokens)

            runs[name] = run
        scale = width / previous if previous else 1.0
        timed, warm = time_runs(
            runs, repeats, device, deadline, {k: v * scale for k, v in guess.items()}
        )
        guess, previous = warm, width
        out[str(width)] = share_row(timed)
    return out


def cell_text(cell: Any) -> str:
    """A table cell: the share, or why there is none."""
    if not isinstance(cell, dict):
        return str(cell)
    if "share_of_plain" in cell:
        return str(cell["share_of_plain"])
    if "error" in cell:
        return "error"
    return str(cell.get("skipped", "—"))


def table(result: dict[str, Any]) -> str:
    """A markdown table of the shares (one column per width)."""
    return share_table({"": result})


def share_table(columns: dict[str, dict[str, Any]]) -> str:
    """One markdown table of several share results (``{label: measure(...)}``; a column per
    label and width, a row per sampler of any of them; ``—`` where a result has no such row)."""
    heads: list[tuple[str, str]] = [
        (label, w) for label, res in columns.items() for w in res if w.isdigit()
    ]
    names: list[str] = []
    for res in columns.values():
        for w in (k for k in res if k.isdigit()):
            names += [k for k in res[w] if k not in ("plain", "plain_tokens_per_s")]
    names = list(dict.fromkeys(names))

    def head(label: str, w: str) -> str:
        return f"{label} {w} rows".strip()

    lines = [
        "| sampler | " + " | ".join(head(label, w) for label, w in heads) + " |",
        "|---|" + "---:|" * len(heads),
        "| plain decoding (tokens/s) | "
        + " | ".join(str(columns[label][w].get("plain_tokens_per_s")) for label, w in heads)
        + " |",
    ]
    for name in names:
        cells = [cell_text(columns[label][w].get(name, "—")) for label, w in heads]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sizes(quick: bool) -> tuple[list[int], int, int]:
    """Default widths, new tokens per row and repeats: ``[64, 256]``, 64, 3 (quick: ``[8, 16]``,
    8, 1)."""
    return ([8, 16], 8, 1) if quick else ([64, 256], 64, 3)


def share_parser(description: str) -> argparse.ArgumentParser:
    """The command line of a share table (this module and :mod:`gpu_vllm`)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="a small model and short runs (smoke test)")
    p.add_argument("--widths", default=None, help="comma-separated batch widths (default 64,256)")
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--budget", type=float, default=None, help="seconds; later runs are skipped")
    return p


def share_sizes(args: argparse.Namespace) -> tuple[list[int], int, int, float | None]:
    """``(widths, new tokens, repeats, deadline)`` from :func:`share_parser`'s arguments."""
    widths, new_tokens, repeats = sizes(args.quick)
    if args.widths:
        widths = [int(w) for w in args.widths.split(",")]
    deadline = None if args.budget is None else time.perf_counter() + args.budget
    return widths, args.new_tokens or new_tokens, args.repeats or repeats, deadline


def main(argv: list[str] | None = None) -> int:
    args = share_parser(__doc__.split("\n")[0]).parse_args(argv)
    res = measure(args.device, args.quick, *share_sizes(args))
    print(json.dumps(res))
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
