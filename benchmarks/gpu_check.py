r"""GPU check: samplers on CUDA, CUDA vs CPU log-probs, decode speed, sampler shares (HF, vLLM).

Run on the GPU machine from the repository root (one go, within ``--budget``: :data:`BUDGET` =
290 s by default, model creation and the vLLM engine start included)::

    python benchmarks/gpu_check.py --device cuda

and here, before, as a smoke test of the script itself (every section, no time budget; about
4 minutes on 2 busy CPU cores, half of it the shares with host-side sampling over 151,936 tokens
and the vLLM engine start)::

    .venv/bin/python benchmarks/gpu_check.py --device cpu --quick

Prints one compact JSON summary on stdout and writes it (indented) to ``--out`` (default:
``$OUT/gpu_check.json`` when ``OUT`` is set); the share table of ``shares`` and ``vllm_shares``
also goes to stderr as markdown (and to ``share_table`` in the JSON). Every section runs in its
own ``try`` and records its error, so one failure does not lose the rest; the exit status is 0
when every section ran without error and every check passed, 1 otherwise.

Time budget: ``shares`` and ``vllm_shares`` skip the runs that would end after the budget
(``shares`` leaves :data:`VLLM_RESERVE` seconds to ``vllm_shares`` when vLLM is installed) and
report them as ``skipped`` (``budget_cut: true`` on the section); the earlier sections are fixed
work (about 1–3 minutes on an H200, measured 2026-12-04).

Sections
--------
``env``
    versions, the device, how ``tiltsample`` was imported (installed, or from this source tree when
    it is not installed: ``tiltsample.samplers`` / ``.targets`` / ``.theory`` are mapped to their
    folders), and every attempt to import ``pyro`` (blocked here, as on a machine without
    pyro-ppl; ``pyro_imports`` lists who tried).
``samplers``
    ``best-of-n``, ``smc``, ``ets`` and ``power`` through :func:`tiltsample.sample` on held-out
    problems with the shipped ``arith-ar`` on the device in float32 and bfloat16: no error, valid
    outputs (lengths, ids, complete responses, float64 CPU log-weights without NaN), accuracy,
    and the share of draws equal to a CPU float32 run with the same seed (informative: equal
    whenever the log-probs agree to the bits that matter).
``logprobs``
    A fixed batch of responses scored on the device (float32, bfloat16) and on the CPU (float32,
    float64): max |diff| of per-token and per-sequence log-probs, of session laws and
    ``extend_and_score`` scores through ragged cuts, ``select``, ``fork`` + ``append_rows`` and
    cache compaction, and the largest total variation between session laws. Checks: float32
    within 1e-3 everywhere; bfloat16 within 0.5 per token and 0.1 in total variation (loose).
``decode``
    Generated tokens/s of :meth:`HFPolicy.generate` (our loop, KV cache, CPU sampling) at batch 64
    and 256 with the shipped model on the device (float32, bfloat16) and on the CPU (float32).
``qwen05b``
    A random model shaped like Qwen2-0.5B (hidden 896, 24 layers, 14 heads, 2 KV heads,
    intermediate 4864, vocab 151936) in bfloat16 on the device: tokens/s at batch 64 for ~64 new
    tokens with our loop vs ``transformers`` ``generate`` (``do_sample=True, top_k=0, top_p=1.0,
    temperature=1.0`` inside ``torch.random.fork_rng``), and a breakdown of one step of our loop
    (forward + law to the host, the host copy alone, CPU sampling). ``--quick`` shrinks the model
    (hidden 128, 2 layers, 2 heads of 64, same vocabulary) and the token count.
``shares``
    :mod:`gpu_shares` on the same random Qwen2-0.5B-shaped model (bfloat16 on the device): plain
    batched decoding's tokens/s and every autoregressive sampler's generated tokens/s as a share
    of it, at 64 and 256 rows (64 new tokens, medians of 3; ``--quick``: the small model with a
    vocabulary of 8,192, 8 and 16 rows, 8 tokens, 1 repeat). ``ok`` is false when a sampler fails.
``vllm_shares``
    :mod:`gpu_vllm`, only where ``vllm`` is importable (else ``skipped: vllm not installed``): the
    same model saved to a temporary folder and served by vLLM
    (:func:`tiltsample.targets.vllm.load_vllm_policy`, bfloat16, no tokenizer), the same table
    (plus ``imh`` and ``qalign``). The engine serves rollouts only (vocabulary above the
    full-law limit): samplers that need next-token laws refuse it at their warm-up and are
    reported as ``needs token-level laws`` (``beam``, ``entropy-cut``); ``ok`` is false when a
    sampler fails otherwise. ``--vllm-eager`` starts the engine without CUDA graphs (faster
    start, slower decoding).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.abc
import importlib.util
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SAMPLERS = ("best-of-n", "smc", "ets", "power")
BUDGET = 290.0
"""Default ``--budget`` in seconds (none with ``--quick``, a smoke test of every path)."""
VLLM_RESERVE = 120.0
"""Seconds of the budget that ``shares`` leaves to ``vllm_shares`` (engine start and runs)."""
PYRO_IMPORTS: list[str] = []


# ------------------------------------------------------------------------------ import set-up
class _NoPyro(importlib.abc.MetaPathFinder):
    """Refuse ``pyro`` (the GPU machine has no pyro-ppl) and record who asked."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name == "pyro" or name.startswith("pyro."):
            frames = [
                f"{f.filename}:{f.lineno}"
                for f in traceback.extract_stack()[:-1]
                if "importlib" not in f.filename
            ]
            PYRO_IMPORTS.append(f"{name} <- {frames[-1] if frames else '?'}")
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by gpu_check)")
        return None


def import_tiltsample(force_shim: bool = False) -> str:
    """Import ``tiltsample`` installed, or else from this source tree (the folders ``samplers/``,
    ``targets/``, ``theory/`` published as ``tiltsample.samplers`` / ``.targets`` / ``.theory``)."""
    if not force_shim:
        try:
            importlib.import_module("tiltsample.targets.hf")
            return "installed"
        except ImportError:
            pass
    for name in [m for m in sys.modules if m == "tiltsample" or m.startswith("tiltsample.")]:
        del sys.modules[name]
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()]
    sys.path.insert(0, str(ROOT))
    import tiltsample

    if Path(tiltsample.__file__).resolve().parent != ROOT / "tiltsample":
        raise ImportError(f"imported tiltsample from {tiltsample.__file__}, not {ROOT}")
    for sub in ("samplers", "targets", "theory"):
        name = f"tiltsample.{sub}"
        spec = importlib.util.spec_from_file_location(
            name, ROOT / sub / "__init__.py", submodule_search_locations=[str(ROOT / sub)]
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        setattr(tiltsample, sub, module)
    importlib.import_module("tiltsample.targets.hf")
    return "source tree (shim)"


# ------------------------------------------------------------------------------ helpers
def sync(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def section(report: dict[str, Any], name: str) -> Iterator[dict[str, Any]]:
    out: dict[str, Any] = {}
    report[name] = out
    start = time.perf_counter()
    try:
        yield out
        out.setdefault("ok", True)
    except Exception as exc:  # one failing section must not lose the others
        out["ok"] = False
        out["error"] = f"{type(exc).__name__}: {exc}"[:800]
        out["traceback"] = traceback.format_exc(limit=12)[-3000:]
    out["seconds"] = round(time.perf_counter() - start, 2)
    print(f"[gpu_check] {name}: ok={out['ok']} ({out['seconds']} s)", file=sys.stderr)


def rnd(x: float, digits: int = 4) -> float | None:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return None
    return float(f"{x:.{digits}g}")


def validate(out: Any, target: Any, num: int, vocab: int) -> list[str]:
    """Problems with a sampler's output (empty when valid)."""
    import torch

    issues = []
    if len(out) != num:
        issues.append(f"{len(out)} draws, expected {num}")
    for x in out.sequences:
        if not all(isinstance(t, int) and 0 <= t < vocab for t in x):
            issues.append(f"token outside [0, {vocab}): {x}")
        if len(x) > target.max_new_tokens:
            issues.append(f"longer than the cap: {len(x)}")
        if not target.is_complete(x):
            issues.append(f"incomplete response of {len(x)} tokens")
    w = out.log_weights
    if w.device.type != "cpu" or w.dtype != torch.float64:
        issues.append(f"log-weights on {w.device} in {w.dtype}")
    if bool(torch.isnan(w).any()) or bool((w == math.inf).any()):
        issues.append("NaN or +inf log-weight")
    return issues[:5]


def sampler_runs(
    policy: Any, problem: Any, quick: bool
) -> dict[str, tuple[Any, int, dict[str, Any]]]:
    from tiltsample.target import power_target
    from tiltsample.targets import tasks

    target = tasks.problem_target(problem, policy, lam=0.1)
    power = power_target(policy, 4.0, target.prompt, target.max_new_tokens)
    k = 4 if quick else 8
    return {
        "best-of-n": (target, 1, {"num_candidates": k, "selection": "argmax"}),
        "smc": (target, k, {"num_particles": k}),
        "ets": (target, 1, {"num_candidates": k // 2, "num_rollouts": 1}),
        "power": (power, 1, {"num_steps": 2 if quick else 6}),
    }


# ------------------------------------------------------------------------------ sections
def check_env(out: dict[str, Any], device: str, how: str) -> None:
    import torch
    import transformers

    import tiltsample

    out["import"] = how
    out["tiltsample"] = str(Path(tiltsample.__file__).resolve().parent)
    out["torch"] = torch.__version__
    out["transformers"] = transformers.__version__
    out["python"] = sys.version.split()[0]
    out["cuda_available"] = torch.cuda.is_available()
    out["threads"] = torch.get_num_threads()
    out["device"] = device
    if torch.device(device).type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(torch.device(device))
        out["cuda"] = torch.version.cuda


def check_samplers(out: dict[str, Any], device: str, problems: list[Any], quick: bool) -> None:
    import torch

    import tiltsample
    from tiltsample.targets import tasks

    seeds = list(range(len(problems)))
    reference: dict[tuple[str, int], list[Any]] = {}
    cpu = tasks.load_policy(device="cpu", dtype="float32")
    for name in SAMPLERS:
        for i, problem in enumerate(problems):
            target, n, params = sampler_runs(cpu, problem, quick)[name]
            reference[name, i] = tiltsample.sample(
                name, target, n, seed=seeds[i], progress=False, **params
            ).sequences
    verifier = tasks.verifier()
    all_ok = True
    for dtype in ("float32", "bfloat16"):
        policy = tasks.load_policy(device=device, dtype=dtype)
        rows: dict[str, Any] = {"policy_device": str(policy.device), "dtype": str(policy.dtype)}
        for name in SAMPLERS:
            row: dict[str, Any] = {"issues": [], "errors": []}
            same = draws = gen_tokens = 0
            correct = 0.0
            seconds = 0.0
            for i, problem in enumerate(problems):
                target, n, params = sampler_runs(policy, problem, quick)[name]
                try:
                    start = time.perf_counter()
                    res = tiltsample.sample(
                        name, target, n, seed=seeds[i], progress=False, **params
                    )
                    sync(device)
                    seconds += time.perf_counter() - start
                except Exception as exc:
                    row["errors"].append(f"problem {i}: {type(exc).__name__}: {exc}"[:400])
                    continue
                row["issues"] += validate(res, target, n, policy.vocab_size)
                scores = verifier(target.prompt, res.sequences)
                assert scores.device.type == "cpu"
                correct += float(scores.max()) if name != "smc" else float(scores.mean())
                same += sum(a == b for a, b in zip(res.sequences, reference[name, i], strict=True))
                draws += len(res)
                gen_tokens += res.cost.generated_tokens
            row["ok"] = not row["issues"] and not row["errors"]
            all_ok &= row["ok"]
            row["accuracy"] = rnd(correct / len(problems))
            row["same_draws_as_cpu_fp32"] = f"{same}/{draws}"
            row["seconds"] = rnd(seconds)
            row["gen_tokens_per_s"] = rnd(gen_tokens / seconds) if seconds else None
            if not row["issues"]:
                del row["issues"]
            if not row["errors"]:
                del row["errors"]
            rows[name] = row
        out[dtype] = rows
        del policy
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    out["ok"] = all_ok


def _session_trace(policy: Any, prompt: tuple[int, ...], block: Any) -> list[Any]:
    """Laws and scores of a session through every operation that touches the cache."""
    import torch

    batch = block.shape[0]
    s = policy.session(prompt, batch)
    got = [s.logprobs()]
    got.append(s.extend_and_score(block[:, :6]))
    got.append(s.logprobs())
    cuts = torch.tensor([(5 * r) % 6 for r in range(batch)])
    s.truncate_rows(cuts)
    got.append(s.logprobs())
    s.select(torch.arange(batch).flip(0))
    twin = s.fork()
    twin.extend(block[:, 6:8])
    s.append_rows(twin)
    got.append(s.logprobs())
    for cut in ([6] * batch + [0] * batch, [0] * batch + [6] * batch):  # holes: compaction
        s.extend(torch.cat([block[:, :6], block[:, :6]]))
        got.append(s.logprobs())
        s.truncate_rows(torch.tensor(cut).clamp(max=s.row_lengths()))
        got.append(s.logprobs())
    return got


def _max_diff(a: Any, b: Any) -> float:
    import torch

    if a.shape != b.shape:
        return math.inf
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    if not torch.equal(fa, fb):
        return math.inf
    return float((a[fa] - b[fb]).abs().max()) if bool(fa.any()) else 0.0


def _max_tv(a: Any, b: Any) -> float:
    """Largest total-variation distance between matching rows of two ``[..., V]`` laws."""
    if a.shape != b.shape:
        return math.inf
    return float(0.5 * (a.exp() - b.exp()).abs().sum(-1).max()) if a.numel() else 0.0


def check_logprobs(out: dict[str, Any], device: str, problems: list[Any]) -> None:
    import torch

    from tiltsample.targets import tasks
    from tiltsample.targets.hf import HFPolicy

    cpu32 = tasks.load_policy(device="cpu", dtype="float32")
    cpu64 = HFPolicy.from_pretrained(tasks.model_path(tasks.DEFAULT_AR), dtype="float64")
    policies = {
        "cpu_float64": cpu64,
        "cpu_float32": cpu32,
        "dev_float32": tasks.load_policy(device=device, dtype="float32"),
        "dev_bfloat16": tasks.load_policy(device=device, dtype="bfloat16"),
    }
    scored: dict[str, list[Any]] = {k: [] for k in policies}
    traces: dict[str, list[Any]] = {k: [] for k in policies}
    for i, problem in enumerate(problems):
        prompt = problem.prompt_ids()
        xs = cpu32.generate(
            prompt, 16, torch.Generator().manual_seed(i), max_new_tokens=tasks.MAX_NEW_TOKENS
        ).sequences
        width = 8
        block = torch.tensor([(list(x) + [cpu32.eos_id] * width)[:width] for x in xs])
        for key, pol in policies.items():
            per = pol.sequence_logprob(prompt, xs, per_token=True)
            nxt = pol.next_logprobs(prompt, [x[:3] for x in xs])
            for t in (per, nxt):
                assert t.device.type == "cpu" and t.dtype == torch.float64, (key, t.device)
            scored[key].append((per, nxt))
            traces[key].extend(_session_trace(pol, prompt, block))
    table: dict[str, Any] = {}
    for key in ("cpu_float32", "dev_float32", "dev_bfloat16"):
        for ref in ("cpu_float64", "cpu_float32"):
            if key == ref:
                continue
            per = max(_max_diff(a[0], b[0]) for a, b in zip(scored[key], scored[ref], strict=True))
            seq = max(
                _max_diff(a[0].sum(1), b[0].sum(1))
                for a, b in zip(scored[key], scored[ref], strict=True)
            )
            nxt = max(_max_diff(a[1], b[1]) for a, b in zip(scored[key], scored[ref], strict=True))
            pairs = list(zip(traces[key], traces[ref], strict=True))
            ses = max(_max_diff(a, b) for a, b in pairs)
            laws = [(a, b) for a, b in pairs if a.dim() == 2 and a.shape[-1] == cpu32.vocab_size]
            table[f"{key}_vs_{ref}"] = {
                "per_token": rnd(per),
                "per_sequence": rnd(seq),
                "next_logprobs": rnd(nxt),
                "session": rnd(ses),
                "session_law_tv": rnd(max(_max_tv(a, b) for a, b in laws)),
            }
    out["max_abs_diff"] = table
    out["note"] = (
        "max |diff| of log-probs (session: every entry of every law and score of a ragged "
        "session, tails included); session_law_tv: largest total variation between laws"
    )
    f32 = table["dev_float32_vs_cpu_float32"]
    bf16 = table["dev_bfloat16_vs_cpu_float32"]
    out["float32_within_1e-3"] = all(v is not None and v <= 1e-3 for v in f32.values())
    out["bfloat16_tokens_within_0.5_tv_within_0.1"] = bool(
        bf16["per_token"] is not None
        and bf16["per_token"] <= 0.5
        and bf16["session_law_tv"] is not None
        and bf16["session_law_tv"] <= 0.1
    )
    out["ok"] = bool(out["float32_within_1e-3"] and out["bfloat16_tokens_within_0.5_tv_within_0.1"])


def check_decode(out: dict[str, Any], device: str, problems: list[Any], quick: bool) -> None:
    import torch

    from tiltsample.targets import tasks

    prompt = problems[0].prompt_ids()
    places = [(device, "float32"), (device, "bfloat16")]
    if torch.device(device).type != "cpu":
        places.append(("cpu", "float32"))
    batches = (64,) if quick else (64, 256)
    for where, dtype in places:
        pol = tasks.load_policy(device=where, dtype=dtype)
        pol.generate(prompt, 8, torch.Generator().manual_seed(0), max_new_tokens=4)  # warm-up
        row = {}
        for batch in batches:
            sync(where)
            start = time.perf_counter()
            g = pol.generate(
                prompt, batch, torch.Generator().manual_seed(1), max_new_tokens=tasks.MAX_NEW_TOKENS
            )
            sync(where)
            dt = time.perf_counter() - start
            row[f"batch{batch}_tokens_per_s"] = rnd(g.cost.generated_tokens / dt)
            row[f"batch{batch}_steps_per_s"] = rnd(max(len(x) for x in g.sequences) / dt)
        out[f"{torch.device(where).type}_{dtype}"] = row


QWEN_VOCAB = 151936


def qwen05b_config(quick: bool, vocab_size: int = QWEN_VOCAB) -> Any:
    """Qwen2-0.5B's shape (``quick``: hidden 128, 2 layers, 2 heads of 64) with ``vocab_size``
    tokens (Qwen2's special ids; the last three ids of a smaller vocabulary)."""
    from transformers import Qwen2Config

    bos, eos = (151643, 151645) if vocab_size == QWEN_VOCAB else (vocab_size - 3, vocab_size - 1)
    size: dict[str, Any] = (
        {
            "hidden_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 256,
        }
        if quick
        else {
            "hidden_size": 896,
            "num_hidden_layers": 24,
            "num_attention_heads": 14,
            "intermediate_size": 4864,
        }
    )
    return Qwen2Config(
        vocab_size=vocab_size,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=True,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=bos,
        **size,
    )


def check_qwen05b(out: dict[str, Any], device: str, quick: bool) -> None:
    import warnings

    import torch
    from transformers import Qwen2ForCausalLM

    from tiltsample.decoding import sample_categorical
    from tiltsample.targets.hf import HFPolicy

    dev = torch.device(device)
    cfg = qwen05b_config(quick)
    new_tokens = 8 if quick else 64
    batch = 64
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        with dev:  # initialise on the device (fast), then cast
            model: Any = Qwen2ForCausalLM(cfg)
    model = model.to(torch.bfloat16).eval()
    out["params_M"] = rnd(sum(p.numel() for p in model.parameters()) / 1e6)
    out["new_tokens"] = new_tokens
    out["batch"] = batch
    policy = HFPolicy(model, eos_id=cfg.eos_token_id, bos_id=cfg.bos_token_id)
    out["policy"] = {"device": str(policy.device), "dtype": str(policy.dtype)}
    gen = torch.Generator().manual_seed(0)
    prompt = tuple(int(t) for t in torch.randint(0, 150000, (16,), generator=gen))
    # ours
    policy.generate(prompt, 4, torch.Generator().manual_seed(0), max_new_tokens=2)  # warm-up
    sync(dev)
    start = time.perf_counter()
    g = policy.generate(prompt, batch, torch.Generator().manual_seed(1), max_new_tokens=new_tokens)
    sync(dev)
    dt = time.perf_counter() - start
    out["ours_tokens_per_s"] = rnd(g.cost.generated_tokens / dt)
    out["ours_ms_per_step"] = rnd(1000 * dt / new_tokens)
    out["ours_generated"] = g.cost.generated_tokens
    # transformers generate (full-vocabulary sampling asked explicitly, global RNG forked)
    ids = torch.tensor([prompt] * batch, device=dev)
    kwargs: dict[str, Any] = {
        "attention_mask": torch.ones_like(ids),
        "do_sample": True,
        "top_k": 0,
        "top_p": 1.0,
        "temperature": 1.0,
        "min_new_tokens": new_tokens,
        "max_new_tokens": new_tokens,
        "pad_token_id": cfg.pad_token_id,
    }
    devices = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(0)
        with torch.no_grad():
            model.generate(ids, **{**kwargs, "min_new_tokens": 2, "max_new_tokens": 2})
            sync(dev)
            start = time.perf_counter()
            seqs = model.generate(ids, **kwargs)
            sync(dev)
        dt = time.perf_counter() - start
    produced = int(seqs.shape[1] - ids.shape[1]) * batch
    out["hf_generate_tokens_per_s"] = rnd(produced / dt)
    out["hf_generate_ms_per_step"] = rnd(1000 * dt / new_tokens)
    out["hf_generate_warnings"] = sorted({str(w.message)[:160] for w in caught})[:5]
    out["ours_over_hf"] = rnd(out["ours_tokens_per_s"] / out["hf_generate_tokens_per_s"])
    # one step of our loop, in parts
    session = policy.session(prompt, batch)
    law = session.logprobs()
    step_gen = torch.Generator().manual_seed(2)
    fwd, draw = [], []
    for _ in range(3):
        start = time.perf_counter()
        tok = sample_categorical(step_gen, law)
        draw.append(time.perf_counter() - start)
        start = time.perf_counter()
        session.extend(tok[:, None])
        law = session.logprobs()  # forward on the device + log_softmax + copy to the host
        fwd.append(time.perf_counter() - start)
    logits = torch.randn(batch, cfg.vocab_size, device=dev, dtype=torch.bfloat16)
    copies = []
    for _ in range(3):
        sync(dev)
        start = time.perf_counter()
        torch.log_softmax(logits.to(torch.float64), dim=-1).to("cpu")
        copies.append(time.perf_counter() - start)
    out["step_ms"] = {
        "forward_and_law_to_host": rnd(1000 * min(fwd)),
        "law_to_host_alone": rnd(1000 * min(copies)),
        "cpu_sampling": rnd(1000 * min(draw)),
    }


def share_status(result: dict[str, Any]) -> tuple[bool, bool]:
    """``(ok, cut)`` of a share result: ``ok`` when no cell holds an error, ``cut`` when the time
    budget skipped a run."""
    cells = [c for w, row in result.items() if w.isdigit() for c in row.values()]
    texts = [json.dumps(c) if isinstance(c, dict) else str(c) for c in cells]
    ok = not any(
        (isinstance(c, dict) and "error" in c) or (isinstance(c, str) and c.startswith("error"))
        for c in cells
    )
    return ok, any("time budget" in t for t in texts) or "time budget" in str(
        result.get("skipped", "")
    )


def check_shares(out: dict[str, Any], device: str, quick: bool, deadline: float) -> None:
    import gpu_shares

    widths, new_tokens, repeats = gpu_shares.sizes(quick)
    res = gpu_shares.measure(device, quick, widths, new_tokens, repeats, deadline)
    out.update(res)
    out["ok"], out["budget_cut"] = share_status(res)


def check_vllm_shares(
    out: dict[str, Any], device: str, quick: bool, deadline: float, eager: bool
) -> None:
    import gpu_shares
    import gpu_vllm

    missing = gpu_vllm.vllm_missing()
    if missing:
        out["skipped"] = missing
        return
    widths, new_tokens, repeats = gpu_shares.sizes(quick)
    res = gpu_vllm.measure(device, quick, widths, new_tokens, repeats, deadline, eager)
    out.update(res)
    out["ok"], out["budget_cut"] = share_status(res)


def share_table(report: dict[str, Any]) -> str | None:
    """The markdown table of the ``shares`` and ``vllm_shares`` results present."""
    import gpu_shares

    columns = {
        label: report[key]
        for key, label in (("shares", "HF"), ("vllm_shares", "vLLM"))
        if any(k.isdigit() for k in report.get(key, {}))
    }
    return gpu_shares.share_table(columns) if columns else None


# ------------------------------------------------------------------------------ main
def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="gpu_check.py",
        description="GPU check of tiltsample's transformers backend (see the module docstring).",
    )
    parser.add_argument("--device", default="cuda", help="device to check (default: cuda)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes (a smoke test of the script on a CPU in under a minute)",
    )
    parser.add_argument("--problems", type=int, default=None, help="held-out problems (3; quick 1)")
    parser.add_argument(
        "--out",
        default=None,
        help="JSON file to write (default: $OUT/gpu_check.json if OUT is set)",
    )
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated sections to run "
        "(env,samplers,logprobs,decode,qwen05b,shares,vllm_shares)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds for the whole check; the share sections skip runs past it "
        "(default: 290, none with --quick)",
    )
    parser.add_argument(
        "--vllm-eager",
        action="store_true",
        help="start the vLLM engine with enforce_eager (no CUDA graphs: faster start)",
    )
    parser.add_argument(
        "--force-shim", action="store_true", help="import from the source tree even if installed"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    sys.meta_path.insert(0, _NoPyro())
    started = time.perf_counter()
    report: dict[str, Any] = {"kind": "tiltsample-gpu-check", "args": vars(args)}
    how = import_tiltsample(args.force_shim)
    import torch

    from tiltsample.targets import tasks
    from tiltsample.targets.hf import resolve_device

    try:
        device = str(resolve_device(args.device, "--device"))
    except ValueError as exc:  # e.g. CUDA not available: still one JSON line
        report.update(ok=False, error=str(exc), torch=torch.__version__)
        emit(report, args.out)
        return 2
    n = args.problems or (1 if args.quick else 3)
    problems = tasks.held_out_problems(n, seed=0)
    only = None if args.only is None else set(args.only.split(","))
    budget = args.budget if args.budget is not None else (math.inf if args.quick else BUDGET)
    report["budget_s"] = None if math.isinf(budget) else budget
    deadline = started + budget
    with_vllm = (only is None or "vllm_shares" in only) and (
        importlib.util.find_spec("vllm") is not None
    )
    share_deadline = deadline - (VLLM_RESERVE if with_vllm else 0.0)
    steps: dict[str, Callable[[dict[str, Any]], None]] = {
        "env": lambda out: check_env(out, device, how),
        "samplers": lambda out: check_samplers(out, device, problems, args.quick),
        "logprobs": lambda out: check_logprobs(out, device, problems),
        "decode": lambda out: check_decode(out, device, problems, args.quick),
        "qwen05b": lambda out: check_qwen05b(out, device, args.quick),
        "shares": lambda out: check_shares(out, device, args.quick, share_deadline),
        "vllm_shares": lambda out: check_vllm_shares(
            out, device, args.quick, deadline, args.vllm_eager
        ),
    }
    for name, step in steps.items():
        if only is not None and name not in only:
            continue
        with section(report, name) as out:
            step(out)
    table = share_table(report)
    if table:
        report["share_table"] = table
        print(
            f"[gpu_check] generated tokens/s as a share of plain decoding:\n{table}",
            file=sys.stderr,
        )
    report["pyro_imports"] = PYRO_IMPORTS
    report["ok"] = all(
        v.get("ok", False) for v in report.values() if isinstance(v, dict) and "ok" in v
    )
    report["seconds"] = round(time.perf_counter() - started, 1)
    emit(report, args.out)
    return 0 if report["ok"] else 1


def emit(report: dict[str, Any], out: str | None) -> None:
    """Print the compact JSON line; write it indented to ``out`` or ``$OUT/gpu_check.json``."""
    print(json.dumps(report, separators=(",", ":"), default=str))
    target = out or (
        str(Path(os.environ["OUT"]) / "gpu_check.json") if os.environ.get("OUT") else None
    )
    if target:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_text(json.dumps(report, indent=1, default=str) + "\n")


if __name__ == "__main__":
    sys.exit(main())
