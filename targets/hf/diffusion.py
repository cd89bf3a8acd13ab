"""The ``transformers`` masked-diffusion LM as a policy: :class:`HFMaskedDiffusionPolicy`."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tiltsample import validation
from tiltsample.decoding import sample_categorical, tempered_logprobs
from tiltsample.diffusion import block_positions, block_quota, check_step
from tiltsample.targets.hf.devices import (
    model_device,
    model_dtype,
    resolve_device,
    resolve_dtype,
    to_host,
)
from tiltsample.targets.hf.loading import (
    check_model_source,
    load_tokenizer,
    loading_errors,
    special_id,
)
from tiltsample.types import Cost, Seq

__all__ = ["UNMASKING_RULES", "HFMaskedDiffusionPolicy"]

UNMASKING_RULES: tuple[str, ...] = ("fixed", "random", "max-confidence", "drawn-confidence")


class HFMaskedDiffusionPolicy:
    r"""A bidirectional mask predictor as a :class:`~tiltsample.diffusion.MaskedDiffusionPolicy`.

    The network sees ``context ⊕ state`` (``state`` the ``L`` response positions, ``mask_id`` where
    masked) with full (non-causal) attention and predicts, at every response position, the token
    there: :meth:`position_logprobs` returns these ``[B, L, V]`` laws (``mask_id`` and the ids in
    ``forbidden_ids`` get probability zero).

    Base sampler (it *defines* ``p_ref``; ``specs/ets.md`` §1, §3), with the names and schedule of
    the exact toy :class:`~tiltsample.targets.masked_diffusion.MaskedDiffusionToy`: ``T =
    num_steps`` steps; LLaDA's semi-autoregressive schedule splits the response into blocks of
    ``block_length`` positions (default one block) and each block evenly over its ``T / (L /
    block_length)`` steps. At every step each eligible (current block, masked) position draws a
    token from its predictive law at ``temperature`` with the caller's generator, and the
    committed positions are chosen by ``unmasking``:

    ``"fixed"``
        the leftmost eligible masked positions;
    ``"random"``
        a uniformly random subset of them;
    ``"max-confidence"``
        the positions whose predictive law has the largest maximum probability;
    ``"drawn-confidence"`` (default)
        LLaDA's low-confidence remasking: the positions whose *drawn* tokens have the highest
        untempered probability.

    Ties go to the lowest position. The first three rules look at the revealed tokens only, so with
    one position per step and an exact predictor the output law is the joint (the spec's DLM toy);
    ``"drawn-confidence"`` looks at the fresh draws, so ``p_ref`` is the sampler's own output law,
    which has no tractable sequence probability for a network (this class therefore has no
    ``sequence_logprob``; samplers that need only rewards run on it).

    ``shift=True`` reads the prediction for position ``j`` from the network output at ``j - 1``
    (the last context position for ``j = 0``), as in models adapted from causal LMs (Dream,
    DiffuLLaMA); the shipped task model is one.

    Positions after a committed EOS are not forced to EOS; a response is read as a
    :data:`~tiltsample.types.Seq` cut after its first EOS (the protocol's convention) and the
    trained task model learns to fill them with EOS.

    Cost of a step: one forward of ``B × (len(context) + L)`` tokens (no KV cache: attention is
    bidirectional) for the rows that still have a masked position; ``generated_tokens`` =
    positions committed.

    Devices (as :class:`~tiltsample.targets.hf.HFPolicy`): ``device=`` moves the model (None keeps
    it where it is), ``dtype=`` casts it; the states and the ids fed to the network are moved to
    :attr:`device`, the predictive laws are normalised in float64 there and returned float64 on
    the CPU, where the unmasking rule and the caller's generator work.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        length: int,
        num_steps: int | None = None,
        block_length: int | None = None,
        mask_id: int | None = None,
        eos_id: int | None = None,
        bos_id: int | None = None,
        unmasking: str = "drawn-confidence",
        temperature: float = 1.0,
        forbidden_ids: Sequence[int] = (),
        shift: bool = False,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> None:
        if not callable(model) or not hasattr(model, "config"):
            raise TypeError(f"model must be a transformers model, got {type(model).__name__}")
        if not isinstance(shift, bool):
            raise TypeError(f"shift must be a bool, got {type(shift).__name__}")
        self.shift = shift
        target_device = None if device is None else resolve_device(device)
        target_dtype = None if dtype is None else resolve_dtype(dtype)
        if target_dtype is not None:
            model = model.to(target_dtype)
        if target_device is not None:
            model = model.to(target_device)
        self.model = model.eval()
        self._device = model_device(model)
        self._dtype = model_dtype(model)
        self.tokenizer = tokenizer
        config = model.config
        vocab = getattr(config, "vocab_size", None)
        if not isinstance(vocab, int) or vocab < 3:
            raise ValueError(f"model.config.vocab_size must be an int >= 3, got {vocab!r}")
        self._vocab = vocab
        self._length = validation.positive_int("length", length)
        steps = length if num_steps is None else num_steps
        self._steps = validation.positive_int("num_steps", steps)
        if self._steps > self._length:
            raise ValueError(f"num_steps must lie in [1, length={length}], got {steps}")
        block = length if block_length is None else block_length
        self.block_length = validation.positive_int("block_length", block)
        if length % block:
            raise ValueError(f"block_length must divide length={length}, got {block}")
        if self._steps % (length // block):
            raise ValueError(
                f"num_steps={self._steps} must be a multiple of the number of blocks "
                f"length/block_length = {length // block}"
            )
        self._steps_per_block = self._steps // (length // block)
        if self._steps_per_block > block:
            raise ValueError(
                f"each block of {block} positions gets {self._steps_per_block} steps; "
                "lower num_steps or raise block_length"
            )
        mask = mask_id if mask_id is not None else special_id(tokenizer, config, "mask")
        if mask is None:
            raise ValueError("mask_id: the model/tokenizer defines no mask_token_id; pass mask_id=")
        self._mask = validation.token_id("mask_id", mask, vocab)
        eos = eos_id if eos_id is not None else special_id(tokenizer, config, "eos")
        if eos is None:
            raise ValueError("eos_id: the model/tokenizer defines no eos_token_id; pass eos_id=")
        self._eos = validation.token_id("eos_id", eos, vocab)
        if self._eos == self._mask:
            raise ValueError("eos_id and mask_id must differ")
        bos = bos_id if bos_id is not None else special_id(tokenizer, config, "bos")
        self._bos = None if bos is None else validation.token_id("bos_id", bos, vocab)
        self.unmasking = validation.one_of("unmasking", unmasking, UNMASKING_RULES)
        self.temperature = validation.positive_float("temperature", temperature)
        forbidden = {self._mask}
        for i, t in enumerate(forbidden_ids):
            forbidden.add(validation.token_id(f"forbidden_ids[{i}]", t, vocab))
        if self._eos in forbidden:
            raise ValueError("forbidden_ids must not contain eos_id")
        self._forbidden = torch.tensor(sorted(forbidden), dtype=torch.long)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype = torch.float32,
        tokenizer: Any = "auto",
        local_files_only: bool | None = None,
        **kwargs: Any,
    ) -> HFMaskedDiffusionPolicy:
        """Load the mask predictor and tokenizer (as :meth:`HFPolicy.from_pretrained`, with the
        same ``device`` and ``dtype``).

        A ``tiltsample_diffusion.json`` in the folder supplies defaults for ``length``,
        ``num_steps``, ``unmasking`` and ``forbidden_ids``; keyword arguments override them.
        """
        import json

        from transformers import AutoModelForCausalLM

        folder = Path(path)
        target_device = None if device is None else resolve_device(device)
        target_dtype = resolve_dtype(dtype)
        offline = check_model_source(path, local_files_only)
        with loading_errors(path, offline):
            model = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=target_dtype, local_files_only=offline
            )
        auto = isinstance(tokenizer, str) and tokenizer == "auto"
        tok = load_tokenizer(path, local_files_only=offline) if auto else tokenizer
        meta_file = folder / "tiltsample_diffusion.json"
        options: dict[str, Any] = {}
        if meta_file.is_file():
            options = json.loads(meta_file.read_text())
        options.update(kwargs)
        return cls(model, tok, device=target_device, **options)

    def with_options(self, **changes: Any) -> HFMaskedDiffusionPolicy:
        """The same network with another sampler (``num_steps``, ``unmasking``, ...)."""
        args: dict[str, Any] = {
            "length": self._length,
            "num_steps": self._steps,
            "block_length": self.block_length,
            "mask_id": self._mask,
            "eos_id": self._eos,
            "bos_id": self._bos,
            "unmasking": self.unmasking,
            "temperature": self.temperature,
            "forbidden_ids": [int(t) for t in self._forbidden if int(t) != self._mask],
            "shift": self.shift,
        }
        args.update(changes)
        return HFMaskedDiffusionPolicy(self.model, self.tokenizer, **args)

    # ------------------------------------------------------------------ protocol
    @property
    def vocab_size(self) -> int:
        return self._vocab

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def mask_id(self) -> int:
        return self._mask

    @property
    def device(self) -> torch.device:
        """Where the network and its inputs live (laws come back float64 on the CPU)."""
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        """The network's parameter dtype."""
        return self._dtype

    @property
    def length(self) -> int:
        return self._length

    @property
    def num_steps(self) -> int:
        return self._steps

    def context(self, prompt: Seq) -> Seq:
        """The ids before the response positions (``(bos_id,)`` for an empty prompt)."""
        prompt = tuple(int(t) for t in prompt)
        if prompt:
            return prompt
        if self._bos is None:
            raise ValueError("prompt is empty and the model has no bos_token_id")
        return (self._bos,)

    def initial_states(self, batch: int) -> Tensor:
        """``[batch, L]`` fully masked states."""
        validation.non_negative_int("batch", batch)
        return torch.full((batch, self._length), self._mask, dtype=torch.long)

    def _check_step(self, step: int) -> int:
        return check_step(step, self._steps)

    def quota(self, step: int) -> int:
        """Positions committed at step ``step`` (an even split of its block over the block's
        steps; earlier steps of a block take the remainder)."""
        return block_quota(self._check_step(step), self.block_length, self._steps_per_block)

    def block(self, step: int) -> range:
        """Positions eligible at step ``step`` (the current block)."""
        return block_positions(self._check_step(step), self.block_length, self._steps_per_block)

    def _check_states(self, states: Tensor) -> Tensor:
        from tiltsample.diffusion import check_states

        return check_states(self, states)

    def position_logprobs(self, prompt: Seq, states: Tensor) -> Tensor:
        """``[B, L, V]`` float64 predictive log-probs of every response position."""
        return self._position_logprobs(prompt, self._check_states(states))[0]

    def _position_logprobs(self, prompt: Seq, states: Tensor) -> tuple[Tensor, Cost]:
        ctx = self.context(prompt)
        batch = states.shape[0]
        if batch == 0:
            return torch.zeros((0, self._length, self._vocab), dtype=torch.float64), Cost()
        dev = self._device
        context = torch.tensor([ctx], dtype=torch.long, device=dev).expand(batch, -1)
        ids = torch.cat([context, states.to(dev)], dim=1)
        with torch.no_grad():
            lo = len(ctx) - int(self.shift)
            logits = self.model(input_ids=ids, use_cache=False).logits[:, lo : lo + self._length]
        logits = logits.to(torch.float64)
        logits[..., self._forbidden.to(logits.device)] = -math.inf
        cost = Cost(forward_tokens=int(ids.numel()), model_calls=1)
        return to_host(torch.log_softmax(logits, dim=-1)), cost

    def denoise_step(
        self, prompt: Seq, states: Tensor, step: int, generator: torch.Generator
    ) -> tuple[Tensor, Cost]:
        """Commit ``quota(step)`` eligible masked positions of every row (class docstring).

        Rows with fewer eligible masked positions than the quota commit all of them; rows without
        a masked position are returned unchanged and are not pushed through the network.
        """
        validation.generator("generator", generator)
        states = self._check_states(states)
        self._check_step(step)
        new = states.clone()
        live = (states == self._mask).any(dim=1).nonzero().flatten()
        if live.numel() == 0:
            return new, Cost()
        rows = states[live]
        log_p, cost = self._position_logprobs(prompt, rows)
        n, length, vocab = log_p.shape
        log_q = tempered_logprobs(log_p, self.temperature)
        drawn = sample_categorical(generator, log_q.reshape(-1, vocab)).view(n, length)
        eligible = torch.zeros(length, dtype=torch.bool)
        blk = self.block(step)
        eligible[blk.start : blk.stop] = True
        masked = (rows == self._mask) & eligible
        if self.unmasking == "fixed":
            score = -torch.arange(length, dtype=torch.float64).expand(n, -1).clone()
        elif self.unmasking == "random":
            score = torch.rand((n, length), generator=generator, dtype=torch.float64)
        elif self.unmasking == "max-confidence":
            score = log_p.max(dim=-1).values
        else:
            score = log_p.gather(-1, drawn[..., None]).squeeze(-1)
        score = score.masked_fill(~masked, -math.inf)
        k = self.quota(step)
        # stable descending sort: ties go to the lowest position
        order = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :k]
        commit = torch.zeros_like(masked).scatter(1, order, True) & masked
        new[live] = torch.where(commit, drawn, rows)
        return new, cost + Cost(generated_tokens=int(commit.sum()))

    def sample(
        self, prompt: Seq, num: int, generator: torch.Generator
    ) -> tuple[list[Seq], Tensor, Cost]:
        """``num`` complete responses of the base sampler (all ``T`` steps, one batch).

        Returns the responses (cut after the first EOS), the raw ``[num, L]`` states and the cost.
        """
        validation.positive_int("num", num)
        states = self.initial_states(num)
        cost = Cost()
        for step in range(self._steps):
            states, c = self.denoise_step(prompt, states, step, generator)
            cost = cost + c
        return self.to_seqs(states), states, cost

    def to_seqs(self, states: Tensor) -> list[Seq]:
        """Complete states as responses cut after their first EOS."""
        from tiltsample.diffusion import states_to_seqs

        return states_to_seqs(states, self._eos, self._mask)

    def __repr__(self) -> str:
        return (
            f"HFMaskedDiffusionPolicy(V={self._vocab}, L={self._length}, T={self._steps}, "
            f"block_length={self.block_length}, unmasking={self.unmasking!r})"
        )
