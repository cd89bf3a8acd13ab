"""Devices and dtypes of the transformers backend (docs/hf.md, "Devices and dtypes").

The scheme: the policy owns its device and dtype; the model, its KV cache and every tensor handed
to the model live on ``policy.device``; the laws handed to samplers are float64 on the CPU.

This machine may have no GPU, so the placement of every tensor is checked on a **simulated
accelerator** (:class:`VirtualDevice`): a ``TorchFunctionMode`` in which the model's parameters,
its outputs, its KV cache and every tensor explicitly created on or moved to the accelerator are
marked as living there (their ``.device`` reads ``meta``, the accelerator's name here), and any op
that mixes accelerator tensors with (non-scalar) CPU tensors raises — what CUDA does. The values
are real CPU values, so a run under the simulation must be *bit-identical* to a plain CPU run:
it catches a session that builds model inputs on the CPU, indexes the cache with a CPU index or
hands an accelerator tensor to a sampler, without a GPU. Real-CUDA versions of the checks run
when CUDA is available (``benchmarks/gpu_check.py`` is the full GPU check).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

import tiltsample
from tiltsample.target import TiltedTarget, power_target
from tiltsample.targets import tasks
from tiltsample.targets.hf import (
    HFMaskedDiffusionPolicy,
    HFPolicy,
    resolve_device,
    resolve_dtype,
)
from tiltsample.targets.rewards import ContainsTokenReward

V = 8
EOS = 0
BOS = 1
PROMPT = (2, 4)

pytestmark = pytest.mark.usefixtures("serial_torch")


def tiny_model(dtype: torch.dtype = torch.float64, *, causal: bool = True, seed: int = 0) -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=BOS,
        eos_token_id=EOS,
        initializer_range=0.3 if causal else 0.5,
        is_causal=causal,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(cfg)
    return model.to(dtype).eval()


# ------------------------------------------------------------------------ simulated accelerator
ACCEL = torch.device("meta")
"""The simulated accelerator's name (``meta`` is never really used: values stay on the CPU)."""
_MARK = "_tiltsample_on_accelerator"


def on_accel(t: Any) -> bool:
    return isinstance(t, Tensor) and bool(getattr(t, _MARK, False))


def mark(obj: Any, value: bool = True) -> None:
    for t in _leaves(obj):
        setattr(t, _MARK, value)


def _leaves(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, list | tuple):
        for o in obj:
            yield from _leaves(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _leaves(o)


def _is_accel(device: Any) -> bool | None:
    """True for the accelerator, False for the CPU, None for 'not a device'."""
    if isinstance(device, str):
        try:
            device = torch.device(device)
        except RuntimeError:
            return None
    if isinstance(device, torch.device):
        if device.type == "meta":
            return True
        if device.type == "cpu":
            return False
        raise RuntimeError(f"the simulated machine has no {device}")
    return None


class VirtualDevice(TorchFunctionMode):
    """A simulated accelerator (module docstring). ``mixed`` counts refused ops."""

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = dict(kwargs or {})
        owner = getattr(func, "__self__", None)
        if owner is torch._C.TensorBase.device:  # the .device getter
            return ACCEL if on_accel(args[0]) else func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        dest: bool | None = None  # explicit destination: accelerator, CPU, or none
        if name == "to" and args and isinstance(args[0], Tensor):
            rest = list(args[1:])
            for i, a in enumerate(rest):
                if isinstance(a, Tensor):  # .to(other)
                    dest = on_accel(a)
                    rest[i] = a.dtype
                elif _is_accel(a) is not None:
                    dest = _is_accel(a)
                    rest[i] = torch.device("cpu")
            args = (args[0], *rest)
        elif name == "cpu":
            dest = False
        elif name in ("cuda", "numpy") and on_accel(args[0]):
            raise RuntimeError(f"Tensor.{name}() of an accelerator tensor")
        if "device" in kwargs and kwargs["device"] is not None:
            dest = _is_accel(kwargs["device"])
            kwargs["device"] = torch.device("cpu")
        tensors = [t for t in _leaves([args, kwargs]) if isinstance(t, Tensor)]
        if dest is None:
            places = {on_accel(t) for t in tensors if on_accel(t) or t.dim() > 0}
            if len(places) > 1:
                raise RuntimeError(
                    "Expected all tensors to be on the same device, but found accelerator and "
                    f"cpu tensors in {name or func}"
                )
            dest = bool(places and places.pop())
        out = func(*args, **kwargs)
        if isinstance(out, Tensor) and any(out is t for t in tensors) and on_accel(out) != dest:
            out = out.clone()  # .to / .cpu / as_tensor returned its input across the boundary
        mark(out, dest)
        return out


class Recorder(torch.nn.Module):
    """A causal LM that records where its inputs live and, under :class:`VirtualDevice`, runs the
    real model on the CPU values and marks its logits and KV cache as on the accelerator."""

    def __init__(self, inner: Any) -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.seen: list[dict[str, torch.device]] = []

        def forward(**kwargs: Any) -> Any:
            return self._forward(**kwargs)

        forward.__signature__ = inspect.signature(inner.forward)  # type: ignore[attr-defined]
        self.forward = forward

    def get_input_embeddings(self) -> Any:
        return self.inner.get_input_embeddings()

    def get_output_embeddings(self) -> Any:
        return self.inner.get_output_embeddings()

    def _forward(self, **kwargs: Any) -> Any:
        where = {k: v.device for k, v in kwargs.items() if isinstance(v, Tensor)}
        self.seen.append(where)
        strays = sorted(k for k, d in where.items() if d != ACCEL)
        if strays:  # what the model's first CUDA kernel says about a CPU input
            raise RuntimeError(f"Expected all tensors to be on the same device: {strays} on cpu")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        layers = list(getattr(cache, "layers", ()))
        for layer in layers:
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, Tensor) and t.numel() and not on_accel(t):
                    raise RuntimeError("a KV-cache tensor left the accelerator")
        with torch._C.DisableTorchFunction():
            out = self.inner(**kwargs)
        mark(out.logits)
        for layer in list(getattr(cache, "layers", ())):
            mark([getattr(layer, "keys", None), getattr(layer, "values", None)])
        return out


@pytest.fixture
def accel() -> Iterator[VirtualDevice]:
    with VirtualDevice() as mode:
        yield mode


def _accel_policy(model: Any) -> tuple[HFPolicy, Recorder]:
    """A policy whose model lives on the simulated accelerator (built under the mode)."""
    rec = Recorder(model)
    mark(list(rec.parameters()))
    return HFPolicy(rec), rec


def _runs(policy: Any) -> dict[str, tuple[Any, int, dict[str, Any]]]:
    target = TiltedTarget(policy, ContainsTokenReward(3, EOS), 0.5, PROMPT, 5, "stop")
    power = power_target(policy, 4.0, PROMPT, 5)
    return {
        "best-of-n": (target, 3, {"num_candidates": 4}),
        "smc": (target, 4, {"num_particles": 4}),
        "ets": (target, 1, {"num_candidates": 4, "num_rollouts": 1}),
        "power": (power, 2, {"num_steps": 3}),
    }


def _same(a: Any, b: Any) -> None:
    assert a.sequences == b.sequences
    assert torch.equal(a.log_weights, b.log_weights)
    assert a.log_weights.device.type == "cpu" and a.log_weights.dtype == torch.float64
    assert a.cost == b.cost


# ------------------------------------------------------------------------ the simulation itself
def test_the_simulated_accelerator_refuses_what_cuda_refuses(accel: VirtualDevice) -> None:
    host = torch.arange(4)
    dev = host.to(ACCEL)
    assert dev.device == ACCEL and host.device.type == "cpu"
    assert (dev + 1).device == ACCEL and torch.zeros(2, device=ACCEL).device == ACCEL
    assert dev.cpu().device.type == "cpu" and dev.to("cpu", torch.float64).device.type == "cpu"
    assert (dev + torch.tensor(1)).device == ACCEL  # a CPU scalar may mix, as on CUDA
    for bad in (lambda: dev + host, lambda: dev[host], lambda: torch.where(host > 0, dev, dev)):
        with pytest.raises(RuntimeError, match="same device"):
            bad()
    # the CPU result of a move is a new tensor: marking it never touches the source
    assert dev.to("cpu") is not dev and on_accel(dev) and not on_accel(dev.to("cpu"))


def test_the_simulation_catches_a_cpu_input(accel: VirtualDevice) -> None:
    policy, _ = _accel_policy(tiny_model())
    with pytest.raises(RuntimeError, match="same device"):
        policy.model(input_ids=torch.tensor([[2, 3]]), attention_mask=torch.ones(1, 2).to(ACCEL))


# ------------------------------------------------------------------------ (a) CPU bit-identity
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_explicit_cpu_is_bit_identical_to_the_default(dtype: torch.dtype) -> None:
    old = HFPolicy(tiny_model(dtype))  # built as before devices existed
    new = HFPolicy(tiny_model(dtype), device="cpu")
    assert old.device == new.device == torch.device("cpu") and new.dtype == dtype
    for name, (target, n, params) in _runs(old).items():
        a = tiltsample.sample(name, target, n, seed=3, **params)
        b = tiltsample.sample(name, _runs(new)[name][0], n, seed=3, **params)
        _same(a, b)


def test_from_pretrained_on_cpu_is_bit_identical(tmp_path: Path) -> None:
    model = tiny_model(torch.float32)
    model.save_pretrained(str(tmp_path))
    a = HFPolicy.from_pretrained(tmp_path, tokenizer=None)
    b = HFPolicy.from_pretrained(tmp_path, tokenizer=None, device="cpu", dtype="float32")
    assert a.dtype == b.dtype == torch.float32
    for name, (target, n, params) in _runs(a).items():
        out_a = tiltsample.sample(name, target, n, seed=1, **params)
        _same(out_a, tiltsample.sample(name, _runs(b)[name][0], n, seed=1, **params))


# ------------------------------------------------------------------------ (b) placement
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_samplers_on_the_accelerator_match_the_cpu_bit_for_bit(dtype: torch.dtype) -> None:
    plain = HFPolicy(tiny_model(dtype))
    expected = {
        name: tiltsample.sample(name, target, n, seed=3, **params)
        for name, (target, n, params) in _runs(plain).items()
    }
    with VirtualDevice():
        policy, rec = _accel_policy(tiny_model(dtype))
        assert policy.device == ACCEL
        got = {
            name: tiltsample.sample(name, target, n, seed=3, **params)
            for name, (target, n, params) in _runs(policy).items()
        }
    for name in expected:
        _same(got[name], expected[name])
    assert rec.seen and all(d == ACCEL for call in rec.seen for d in call.values())
    assert {"input_ids", "attention_mask", "position_ids"} <= set().union(*rec.seen)


def test_every_session_entry_point_feeds_the_accelerator(accel: VirtualDevice) -> None:
    plain = HFPolicy(tiny_model())
    policy, rec = _accel_policy(tiny_model())
    sessions = []
    for pol in (plain, policy):
        s = pol.session_multi([PROMPT, (5,)], [2, 2])
        s.extend(torch.tensor([[3], [4], [5], [6]]))
        scores = s.extend_and_score(torch.tensor([[3, 0], [4, 5], [5, 6], [6, 6]]))
        first = s.logprobs()
        s.truncate_rows(torch.tensor([1, 0, 2, 1]))
        s.select(torch.tensor([3, 0, 0, 2]))
        twin = s.fork()
        twin.extend(torch.tensor([[2], [3], [4], [5]]))
        s.append_rows(twin)
        sessions.append((scores, first, s.logprobs(), s.tokens()))
    for a, b in zip(*sessions, strict=True):
        assert not on_accel(b) and b.device.type == "cpu"
        assert torch.equal(a, b)
    assert sessions[1][2].dtype == torch.float64
    laws = [
        (p.next_logprobs(PROMPT, [(3,), ()]), p.sequence_logprob(PROMPT, [(3, 4), (5,)], True))
        for p in (plain, policy)
    ]
    for a, b in zip(*laws, strict=True):
        assert torch.equal(a, b) and b.device.type == "cpu" and b.dtype == torch.float64
    gen = policy.generate(PROMPT, 3, torch.Generator().manual_seed(0), max_new_tokens=4)
    ref = plain.generate(PROMPT, 3, torch.Generator().manual_seed(0), max_new_tokens=4)
    assert gen.sequences == ref.sequences and torch.equal(gen.log_q, ref.log_q)
    assert all(d == ACCEL for call in rec.seen for d in call.values())


def test_cut_and_regrow_compacts_the_cache_on_the_accelerator(accel: VirtualDevice) -> None:
    """MH-like use (ragged cuts, regrowth): the cache is compacted (gathered with an index built
    on the CPU) and every law still matches the CPU bit for bit."""
    plain = HFPolicy(tiny_model())
    policy, _ = _accel_policy(tiny_model())
    runs = []
    for pol in (plain, policy):
        gen = torch.Generator().manual_seed(2)
        s = pol.session((3,), 4)
        laws = []
        for cut in ([10, 0, 0, 0], [0, 10, 10, 10], [3, 0, 5, 1]):
            s.extend(torch.randint(1, V, (4, 10), generator=gen))
            laws.append(s.logprobs())
            s.truncate_rows(torch.tensor(cut))
            laws.append(s.logprobs())
        # row 0 cut early, the others late: ~10 holes in every row, so the cache was compacted
        assert s.cache_columns < 1 + 3 * 10
        runs.append(laws)
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b) and not on_accel(b)


def test_diffusion_policy_feeds_the_accelerator(accel: VirtualDevice) -> None:
    options: dict[str, Any] = {"length": 2, "mask_id": V - 1, "eos_id": EOS, "bos_id": BOS}
    plain = HFMaskedDiffusionPolicy(tiny_model(causal=False), **options)
    rec = Recorder(tiny_model(causal=False))
    mark(list(rec.parameters()))
    policy = HFMaskedDiffusionPolicy(rec, **options)
    assert policy.device == ACCEL and policy.with_options(num_steps=1).device == ACCEL
    outs = [p.sample(PROMPT, 5, torch.Generator().manual_seed(2)) for p in (plain, policy)]
    assert outs[0][0] == outs[1][0] and torch.equal(outs[0][1], outs[1][1])
    lp = policy.position_logprobs(PROMPT, policy.initial_states(3))
    assert not on_accel(lp) and lp.dtype == torch.float64
    assert rec.seen and all(d == ACCEL for call in rec.seen for d in call.values())


# ------------------------------------------------------------------------ (c) dtypes
def test_bfloat16_model_returns_float64_cpu_laws() -> None:
    policy = HFPolicy(tiny_model(torch.float32), dtype="bf16")
    assert policy.dtype == torch.bfloat16 and policy.model.dtype == torch.bfloat16
    target, n, params = _runs(policy)["best-of-n"]
    out = tiltsample.sample("best-of-n", target, n, seed=0, **params)
    assert len(out) == n and out.log_weights.dtype == torch.float64
    s = policy.session(PROMPT, 2)
    law = s.logprobs()
    assert law.dtype == torch.float64 and law.device.type == "cpu"
    assert torch.allclose(torch.logsumexp(law, dim=-1), torch.zeros(2, dtype=torch.float64))
    scores = s.extend_and_score(torch.tensor([[3, 4], [5, 0]]))
    assert scores.dtype == torch.float64 and bool(torch.isfinite(scores).all())


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("float32", torch.float32),
        ("fp32", torch.float32),
        ("bf16", torch.bfloat16),
        ("bfloat16", torch.bfloat16),
        ("fp16", torch.float16),
        ("float16", torch.float16),
        ("float64", torch.float64),
        (" BF16 ", torch.bfloat16),
        ("torch.bfloat16", torch.bfloat16),
        (torch.float16, torch.float16),
    ],
)
def test_dtype_names(given: Any, expected: torch.dtype) -> None:
    assert resolve_dtype(given) == expected


def test_loaders_pass_device_and_dtype_through() -> None:
    pol = tasks.load_policy(device="cpu", dtype="bf16")
    assert pol.dtype == torch.bfloat16 and pol.device.type == "cpu"
    assert tasks.load_policy() is tasks.load_policy(device="cpu", dtype="float32")
    assert tasks.load_policy().dtype == torch.float32
    dlm = tasks.load_diffusion_policy(dtype=torch.bfloat16, num_steps=24)
    assert dlm.dtype == torch.bfloat16 and dlm.num_steps == 24
    assert tasks.check_placement() == ("cpu", "float32")
    assert tasks.check_placement("cpu", "fp16") == ("cpu", "float16")


# ------------------------------------------------------------------------ (d) bad values
@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize(
    ("device", "match"),
    [
        ("tpu", "device must be cpu, cuda"),
        ("meta", "device must be cpu, cuda"),
        ("", "device must be a device name"),
        (3, "device must be a device name"),
        ("cuda", "device='cuda': CUDA is not available"),
        ("cuda:1", "device='cuda:1': CUDA is not available"),
    ],
)
def test_bad_device_names_the_parameter(device: Any, match: str, no_cuda: None) -> None:
    with pytest.raises(ValueError, match=match):
        resolve_device(device)
    with pytest.raises(ValueError, match=match):
        HFPolicy(tiny_model(), device=device)
    with pytest.raises(ValueError, match=match):
        tasks.load_policy(device=device)
    with pytest.raises(ValueError, match=match):
        HFMaskedDiffusionPolicy.from_pretrained(tasks.model_path("arith-dlm"), device=device)


@pytest.mark.parametrize("dtype", ["int8", "float8", torch.int64, torch.complex64, 32, None])
def test_bad_dtype_names_the_parameter(dtype: Any) -> None:
    with pytest.raises(ValueError, match="dtype must be one of"):
        HFPolicy.from_pretrained(tasks.model_path("arith-ar"), dtype=dtype)
    if dtype is not None:  # None means "keep the model's dtype" for the constructor
        with pytest.raises(ValueError, match="dtype must be one of"):
            HFPolicy(tiny_model(), dtype=dtype)
        with pytest.raises(ValueError, match="dtype must be one of"):
            tasks.load_policy(dtype=dtype)


def test_compare_refuses_a_bad_device_before_writing(tmp_path: Path, no_cuda: None) -> None:
    from tiltsample.app.compare import run_compare

    out = tmp_path / "c"
    for kwargs, match in (({"device": "cuda"}, "device"), ({"dtype": "int4"}, "dtype")):
        with pytest.raises(ValueError, match=match):
            run_compare(profile="test", out_dir=out, samplers=["ancestral"], **kwargs)
    assert not out.exists()


def test_cli_cuda_without_cuda_exits_2_naming_the_flag(
    tmp_path: Path, no_cuda: None, capsys: pytest.CaptureFixture[str]
) -> None:
    from tiltsample.app.cli import main

    assert main(["compare", "--device", "cuda", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tiltsample compare: error: --device='cuda'")
    assert "not available" in err[0] and not (tmp_path / "c").exists()


def test_cli_compare_runs_with_device_and_dtype(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from tiltsample.app.cli import main

    out = tmp_path / "c"
    argv = ["compare", "--profile", "test", "--samplers", "ancestral,best-of-n", "--out", str(out)]
    assert main([*argv, "--device", "cpu", "--dtype", "bf16", "--no-progress"]) == 0
    header = json.loads((out / "compare.jsonl").read_text().splitlines()[0])["header"]
    assert header["dtype"] == "bfloat16" and "device" not in header  # cpu is the default
    capsys.readouterr()


# ------------------------------------------------------------------------ real CUDA (if any)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_laws_match_the_cpu(dtype: torch.dtype) -> None:
    cpu = HFPolicy(tiny_model(dtype))
    gpu = HFPolicy(tiny_model(dtype), device="cuda")
    assert gpu.device.type == "cuda"
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    sessions = []
    for pol in (cpu, gpu):
        s = pol.session_multi([PROMPT, (5,)], [2, 2])
        scores = s.extend_and_score(torch.tensor([[3, 0], [4, 5], [5, 6], [6, 6]]))
        s.truncate_rows(torch.tensor([1, 0, 2, 1]))
        s.select(torch.tensor([3, 0, 0, 2]))
        sessions.append((scores, s.logprobs()))
    for a, b in zip(*sessions, strict=True):
        assert b.device.type == "cpu" and b.dtype == torch.float64
        assert torch.allclose(a, b, atol=tol, rtol=0)


@cuda
def test_samplers_run_on_cuda() -> None:
    policy = HFPolicy(tiny_model(torch.float32), device="cuda")
    for name, (target, n, params) in _runs(policy).items():
        out = tiltsample.sample(name, target, n, seed=0, **params)
        assert len(out) == n and out.log_weights.device.type == "cpu", name
