"""The continuous-batching engine of the MH chains (``batching="continuous"``): one ragged decode
session, every chain at its own phase, one generator stream per chain."""

from __future__ import annotations

import torch
from torch import Tensor

from tiltsample.decode_engine import decode_step
from tiltsample.policy import (
    DecodeSession,
    open_session,
    open_session_multi,
    supports_ragged,
    truncate_rows,
)
from tiltsample.samplers.mh.acceptance import MHRatio, mh_log_ratio
from tiltsample.samplers.mh.config import MHConfig
from tiltsample.samplers.mh.cuts import cut_log_probs
from tiltsample.samplers.mh.laws import proposal_law
from tiltsample.samplers.mh.parts import TargetParts
from tiltsample.samplers.mh.proposals import suffix_sum
from tiltsample.samplers.mh.scoring import score_chains
from tiltsample.samplers.mh.snapshot import StepSnapshot
from tiltsample.target import TiltedTarget
from tiltsample.token_laws import inverse_cdf
from tiltsample.types import Cost

__all__ = ["ContinuousEngine"]


_UNIFORM_BLOCK = 64


class ContinuousEngine:
    """Continuous batching of independent MH chains over one ragged decode session.

    Row ``r`` of the session always holds the proposal chain ``members[r]`` is decoding. Every
    tick draws one token for every running chain (one model call); a chain whose proposal ends
    (EOS or its cap) is scored together with the other chains that ended in the same tick (one
    reward call), accepted or rejected, and immediately starts its next step: a new cut ``j`` of
    its current state, its row truncated to the longest prefix it shares with ``x_<j`` and the
    missing prefix tokens (if the row held a rejected proposal) re-fed one per tick, each in the
    same model call as the other rows' new tokens (so no call is padded to a wider block). The
    batch stays full until chains run out of steps; their rows leave the session (``select``)
    once they are an eighth of it.

    The kernel per chain is the lock-step one (:mod:`~tiltsample.samplers.mh.kernel`) with
    ``block_size=None``: the same ``q_tau`` draws (EOS forced at ``L - 1`` under
    ``truncation="condition"``), the same
    :func:`~tiltsample.samplers.mh.acceptance.mh_log_ratio` with the cut-law correction (or the
    published code's truncation in
    ``length_mode="reference"``). A proposal's last token is never pushed through the model (no
    later cut keeps it), so the policy is never asked for a law past the cap.

    Each chain draws all its randomness (tokens, acceptance, cuts — in that order, by inverse
    CDF) from its own ``torch.Generator`` seeded with ``chain_seeds[c]``
    (:func:`~tiltsample.samplers.mh.continuous.init_continuous` derives them with
    :func:`tiltsample.seeds.chunk_seed` from a base seed and the chain's index), so a chain's
    trajectory does not depend on how the ticks interleave the chains (exactly so for policies
    whose log-probs do not depend on the batch).
    """

    def __init__(
        self,
        targets: list[TiltedTarget],
        parts_all: list[TargetParts],
        per_target: int,
        chain_seeds: list[int],
        cfg: MHConfig,
    ) -> None:
        target = targets[0]
        self.targets, self.parts_all, self.cfg = targets, parts_all, cfg
        self.law = proposal_law(cfg)
        self.joint = len(targets) > 1
        chains = per_target * len(targets)
        self.chains = chains
        self.owner = (
            torch.repeat_interleave(torch.arange(len(targets)), per_target) if self.joint else None
        )
        self.eos, self.width = target.eos_id, target.max_new_tokens
        self.condition = target.truncation == "condition"
        self.reference = cfg.length_mode == "reference"
        prompts = [t.prompt for t in targets]
        rows = chains if cfg.max_rows is None else min(cfg.max_rows, chains)
        if self.joint and rows < chains:
            raise ValueError(
                "max_rows < all chains is supported for a single target (a session row keeps "
                "its prompt); run the targets with one row per chain"
            )
        session = (
            open_session_multi(target.policy, prompts, per_target)
            if self.joint
            else open_session(target.policy, prompts[0], rows)
        )
        if not supports_ragged(session):
            raise ValueError(
                "batching='continuous' needs a decode session with ragged rows "
                "(tiltsample.policy.RaggedDecodeSession); this policy's session has none: use "
                "batching='grouped' or 'aligned'"
            )
        self.session: DecodeSession = session
        self.members = torch.arange(rows)
        self.queued = rows  # chains rows..chains-1 wait for a free row
        if len(chain_seeds) != chains:
            raise ValueError(f"chain_seeds must hold one seed per chain ({chains})")
        self.gens = [torch.Generator().manual_seed(s) for s in chain_seeds]
        self.ubuf = torch.zeros((chains, _UNIFORM_BLOCK), dtype=torch.float64)
        self.uptr = torch.full((chains,), _UNIFORM_BLOCK, dtype=torch.long)
        L, eos = self.width, self.eos
        f = torch.zeros((chains, L), dtype=torch.float64)
        # current states
        self.tokens = torch.full((chains, L), eos, dtype=torch.long)
        self.ell, self.g, self.ent = f.clone(), f.clone(), f.clone()
        self.length = torch.zeros(chains, dtype=torch.long)
        self.log_ref = torch.zeros(chains, dtype=torch.float64)
        self.rest = torch.zeros(chains, dtype=torch.float64)
        self.reward: Tensor | None = None
        # proposals in flight (absolute positions; prefix copied from the current state)
        self.p_tokens = torch.full((chains, L), eos, dtype=torch.long)
        self.p_ell, self.p_g, self.p_ent = f.clone(), f.clone(), f.clone()
        self.start = torch.zeros(chains, dtype=torch.long)
        self.pos = torch.zeros(chains, dtype=torch.long)  # next position to draw
        self.rlen = torch.zeros(chains, dtype=torch.long)  # tokens of the chain's session row
        self.cap = torch.full((chains,), L, dtype=torch.long)
        self.log_c_fwd = torch.zeros(chains, dtype=torch.float64)
        self.started = torch.zeros(chains, dtype=torch.bool)  # initial draw complete
        self.steps = torch.zeros(chains, dtype=torch.long)
        self.accepted = torch.zeros(chains, dtype=torch.long)
        self.finished = torch.zeros(chains, dtype=torch.bool)
        self.chain_cost = torch.zeros((chains, 2), dtype=torch.long)
        self.reward_calls = 0
        self.snapshots: dict[int, StepSnapshot] = {}
        self.filler = 0 if eos != 0 else 1

    # ------------------------------------------------------------------ randomness
    def _uniforms(self, chains: Tensor) -> Tensor:
        """The next uniform of each chain's own stream (``chains`` distinct)."""
        empty = chains[self.uptr[chains] >= _UNIFORM_BLOCK]
        for c in empty.tolist():
            self.ubuf[c] = torch.rand(_UNIFORM_BLOCK, generator=self.gens[c], dtype=torch.float64)
            self.uptr[c] = 0
        u = self.ubuf[chains, self.uptr[chains]]
        self.uptr[chains] += 1
        return u

    @property
    def cost(self) -> Cost:
        return self.session.cost + Cost(
            generated_tokens=int(self.chain_cost[:, 0].sum()), reward_calls=self.reward_calls
        )

    # ------------------------------------------------------------------ the loop
    def run_until(self, steps: int) -> None:
        """Tick until every chain has made at least ``steps`` MH steps."""
        while bool((self.steps < steps).any()):
            self._tick()

    def _tick(self) -> None:
        eos = self.eos
        session = self.session
        rows = self.members
        n_rows = int(rows.numel())
        chains = rows[~self.finished[rows]]
        r_idx = (~self.finished[rows]).nonzero().flatten()
        # a row below its cut re-feeds the current state's token there (one per tick, like a
        # drawn token, so no call is padded); a row at its cut or above draws the next token
        length = self.rlen[chains]
        forcing = length < self.start[chains]
        feed = torch.full((n_rows,), self.filler, dtype=torch.long)
        drop = torch.ones(n_rows, dtype=torch.long)  # tokens to take back after the extend
        f_idx = r_idx[forcing]
        if f_idx.numel():
            cf = chains[forcing]
            feed[f_idx] = self.tokens[cf, self.rlen[cf]]
            drop[f_idx] = 0
            self.rlen[cf] += 1
        s_idx = r_idx[~forcing]
        ch = chains[~forcing]
        log_p = session.logprobs()
        if ch.numel():
            # one position of the drawing rows under the engine's rules (q_tau, EOS forced at
            # L - 1 under truncation="condition", l / g / H recorded), each chain's token by
            # inverse CDF of its own next uniform
            t = self.pos[ch]
            out = decode_step(
                log_p[s_idx],
                self.law,
                eos_id=eos,
                live=torch.ones(int(ch.numel()), dtype=torch.bool),
                position=t,
                cap=self.cap[ch],
                force_eos=self.condition,
                uniforms=self._uniforms(ch),
                record_entropy=True,
            )
            assert out.entropy is not None
            tok = out.tokens
            self.p_tokens[ch, t] = tok
            self.p_ell[ch, t] = out.log_p
            self.p_g[ch, t] = out.log_q
            self.p_ent[ch, t] = out.entropy
            self.pos[ch] = t + 1
            self.chain_cost[ch, 0] += 1
            fin = ~out.live
            go = ~fin
            feed[s_idx[go]] = tok[go]
            drop[s_idx[go]] = 0
            self.rlen[ch[go]] = t[go] + 1
            if bool(fin.any()):
                f_rows = s_idx[fin]
                held = self.rlen[ch[fin]]  # the proposal minus its last token
                keep = self._finish(ch[fin])
                drop[f_rows] = held + 1 - keep
        session.extend(feed)
        if bool((drop > 0).any()):
            session = truncate_rows(session, drop)
        # a waiting chain takes the (now empty) row of a chain that has made all its steps
        free = self.finished[rows].nonzero().flatten()
        if free.numel() and self.queued < self.chains:
            take = free[: self.chains - self.queued]
            rows = rows.clone()
            rows[take] = torch.arange(self.queued, self.queued + int(take.numel()))
            self.queued += int(take.numel())
            self.members = rows
        # drop rows of chains that have made all their steps once they are an eighth of the batch
        gone = self.finished[rows]
        if bool(gone.any()) and (int(gone.sum()) * 8 >= n_rows or bool(gone.all())):
            stay = (~gone).nonzero().flatten()
            session.select(stay)
            self.members = rows[stay]
        self.session = session

    def _finish(self, chains: Tensor) -> Tensor:
        """Complete the proposals of ``chains``: initial draws become states, MH proposals are
        accepted or rejected; then start the next step. Returns per chain the length of the row
        prefix to keep (the longest prefix of the row that is also a prefix of ``x_<j``; the rest
        of ``x_<j`` is re-fed by the next ticks)."""
        eos, L = self.eos, self.width
        p_len = self.pos[chains]
        pos = torch.arange(L)[None, :]
        inside = pos < p_len[:, None]
        p_tokens = torch.where(inside, self.p_tokens[chains], eos)
        p_ell = torch.where(inside, self.p_ell[chains], 0.0)
        p_g = torch.where(inside, self.p_g[chains], 0.0)
        p_ent = torch.where(inside, self.p_ent[chains], 0.0)
        p_log_ref = p_ell.sum(dim=1)
        p_rest, p_reward, rcost, per_calls = score_chains(
            self.targets, self.parts_all, self.owner, chains, True, p_tokens, p_len, p_log_ref
        )
        self.reward_calls += rcost.reward_calls
        self.chain_cost[chains, 1] += per_calls
        if p_reward is not None and self.reward is None:
            self.reward = torch.zeros(self.chains, dtype=torch.float64)
        old_tokens = self.tokens[chains].clone()
        init = ~self.started[chains]
        mh = ~init
        acc = init.clone()
        k = mh.nonzero().flatten()
        ratio: MHRatio | None = None
        if k.numel():
            c = chains[k]
            ratio = self._log_ratio(c, p_ell[k], p_g[k], p_ent[k], p_len[k], p_rest[k])
            log_u = torch.log(self._uniforms(c))
            acc[k] = log_u < ratio.total
        # update the current states
        a = acc.nonzero().flatten()
        ca = chains[a]
        self.tokens[ca] = p_tokens[a]
        self.ell[ca] = p_ell[a]
        self.g[ca] = p_g[a]
        self.ent[ca] = p_ent[a]
        self.length[ca] = p_len[a]
        self.log_ref[ca] = p_log_ref[a]
        self.rest[ca] = p_rest[a]
        if self.reward is not None and p_reward is not None:
            self.reward[ca] = p_reward[a].to(torch.float64)
        self.started[chains] = True
        if k.numel():
            assert ratio is not None
            c = chains[k]
            self.steps[c] += 1
            self.accepted[c] += acc[k].long()
            self._snap(c, k, acc, p_tokens, p_len, ratio)
        # how much of each session row (the proposal minus its last token) the next step keeps
        held = p_len - 1
        same = (p_tokens == old_tokens) | (pos >= held[:, None])
        lcp = torch.where(acc, held, torch.argmin(same.long(), dim=1))
        lcp = torch.where(same.all(dim=1) & ~acc, held, lcp).clamp(max=held)
        return self._restart(chains, lcp)

    def _log_ratio(
        self,
        c: Tensor,
        p_ell: Tensor,
        p_g: Tensor,
        p_ent: Tensor,
        p_len: Tensor,
        p_rest: Tensor,
    ) -> MHRatio:
        """The MH log ratio of the finished proposals (``p_*``, ``[K, ...]``) of chains ``c``
        against their current states (cut correction as in the lock-step kernel)."""
        cfg = self.cfg
        j = self.start[c]
        n = self.length[c]
        stop_cur = p_len if self.reference else n
        if self.reference and cfg.cut == "uniform":
            fwd = torch.zeros(int(c.numel()), dtype=torch.float64)
            rev = fwd
        else:
            fwd = self.log_c_fwd[c]
            rev_all = cut_log_probs(p_ent, p_len, cfg.cut, cfg.cut_power)
            rev = rev_all.gather(1, j[:, None]).squeeze(1)
        return mh_log_ratio(
            power=self.parts_all[0].power,
            ell_current=suffix_sum(self.ell[c], j, stop_cur),
            ell_proposal=suffix_sum(p_ell, j, p_len),
            g_current=suffix_sum(self.g[c], j, stop_cur),
            g_proposal=suffix_sum(p_g, j, p_len),
            rest_current=self.rest[c],
            rest_proposal=p_rest,
            log_cut_forward=fwd,
            log_cut_reverse=rev,
            greedy=cfg.greedy,
        )

    def _restart(self, chains: Tensor, lcp: Tensor) -> Tensor:
        """Start the next step of the ``chains`` that have steps left: draw a cut ``j`` of the
        current state and reset the proposal to ``x_<j``. Returns per chain the length of the
        session row to keep (``min(j, lcp)``; 0 for a chain that has made all its steps)."""
        cfg, L = self.cfg, self.width
        done_now = self.steps[chains] >= cfg.num_steps
        self.finished[chains[done_now]] = True
        keep = torch.zeros_like(lcp)
        go = (~done_now).nonzero().flatten()
        if go.numel():
            c = chains[go]
            log_c = cut_log_probs(self.ent[c], self.length[c], cfg.cut, cfg.cut_power)
            j = inverse_cdf(log_c, self._uniforms(c))
            self.log_c_fwd[c] = log_c.gather(1, j[:, None]).squeeze(1)
            self.start[c] = j
            self.pos[c] = j
            self.cap[c] = self.length[c] if self.reference else L
            self.p_tokens[c] = self.tokens[c]
            self.p_ell[c] = self.ell[c]
            self.p_g[c] = self.g[c]
            self.p_ent[c] = self.ent[c]
            keep[go] = torch.minimum(j, lcp[go])
        self.rlen[chains] = keep
        return keep

    def _snap(
        self,
        c: Tensor,
        k: Tensor,
        acc: Tensor,
        p_tokens: Tensor,
        p_len: Tensor,
        ratio: MHRatio,
    ) -> None:
        """Record the state and move statistics of chains ``c`` after their latest step."""
        steps = self.steps[c]
        for s in sorted(set(steps.tolist())):
            m = steps == s
            snap = self.snapshots.get(s)
            if snap is None:
                snap = StepSnapshot(self.chains, self.width, self.eos, True)
                self.snapshots[s] = snap
            cs = c[m]
            km = k[m]
            snap.tokens[cs] = self.tokens[cs]
            snap.ell[cs] = self.ell[cs]
            snap.g[cs] = self.g[cs]
            snap.ent[cs] = self.ent[cs]
            snap.length[cs] = self.length[cs]
            snap.log_ref[cs] = self.log_ref[cs]
            snap.rest[cs] = self.rest[cs]
            if snap.reward is not None and self.reward is not None:
                snap.reward[cs] = self.reward[cs]
            snap.acc[cs] = acc[km]
            snap.cut[cs] = self.start[cs]
            snap.p_tokens[cs] = p_tokens[km]
            snap.p_len[cs] = p_len[km]
            snap.lacc[cs] = ratio.total[m]
            snap.r_target[cs] = ratio.target[m]
            snap.r_prop[cs] = ratio.proposal[m]
            snap.r_cut[cs] = ratio.cut[m]
            snap.filled[cs] = True
