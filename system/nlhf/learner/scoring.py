"""The learner's scoring at an update's start point theta_s (pass 1 of
:mod:`nlhf.learner.update`): the batch's log pi_s, log pi_ref, exact KL(pi_s || pi_ref) and the
engine-learner gap, sharded over ranks, either as a separate no-grad pass or fused with the first
inner step's gradient forward where the loss allows it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from nlhf.algorithms.losses import LOG_RATIO_CAP, LossOutput
from nlhf.batch import Rollout, StepBatch
from nlhf.learner.logprobs import score_rollouts, scored_micro_batches, sequence_logprobs


def rollout_key(rollouts: list[Rollout]) -> tuple:
    """Identity of a batch's samples (prompt and response ids) for reusing its start scores."""
    return tuple((tuple(r.prompt_token_ids), tuple(r.response_token_ids)) for r in rollouts)


def _gap_and_tokens(local: list[Rollout], token_logp: list[torch.Tensor], valid: torch.Tensor) -> torch.Tensor:
    """(2,) float64: the sum over the valid rollouts' response tokens of
    ``|log pi_engine - log pi_s|`` (see module docstring) and their number of response tokens."""
    gap, tokens = 0.0, 0
    for j, (r, tok) in enumerate(zip(local, token_logp)):
        if valid[j] <= 0:
            continue
        tokens += len(r.response_token_ids)
        eng = r.sampler_token_logprobs
        if len(eng) == len(r.response_token_ids):
            gap += float((torch.tensor(eng, dtype=torch.float32) - tok.cpu()).abs().sum())
        else:
            gap += abs(float(r.sampler_logprob) - float(tok.sum()))
    return torch.tensor([gap, float(tokens)], dtype=torch.float64)


def _capped_ratio(logp_s: torch.Tensor, logp_engine: torch.Tensor, cap: float) -> torch.Tensor:
    """``min(pi_s / pi_engine, cap)`` elementwise from log-probs (any matching shapes)."""
    return torch.exp((logp_s - logp_engine).clamp(max=LOG_RATIO_CAP)).clamp(max=float(cap))


@dataclass
class StartScores:
    """Full-batch (B,) vectors at the update's start point theta_s (see :mod:`nlhf.learner.update`)."""

    key: tuple
    logp_s: torch.Tensor  # log pi_s(y_i|x_i), the behaviour policy of the ratios
    logp_ref: torch.Tensor
    logp_anchor: torch.Tensor  # pi_k: = logp_s in snapshot mode, the EMA model's otherwise
    kl_ref: torch.Tensor  # exact sum_t KL(pi_s || pi_ref) per sequence
    gap_sum: float  # sum over response tokens of |log pi_engine - log pi_s|
    tokens: int  # response tokens in the batch


class ScoringMixin:
    """Sharding and start-point scoring of :class:`nlhf.learner.update.UpdateMixin` (needs the
    same attributes, and its ``_loss_fn``, ``_engine_logp``, ``_separable_loss`` and
    ``_backward_micro_batch``)."""

    # ------------------------------------------------------------------ sharding
    def _shard(self, n: int) -> tuple[list[int], torch.Tensor]:
        """This rank's indices into a batch of n (padded to ceil(n/W) with repeats) and their 0/1 weights."""
        per_rank = math.ceil(n / self.world_size)
        idx = list(range(self.rank, n, self.world_size))
        valid = [1.0] * len(idx) + [0.0] * (per_rank - len(idx))
        idx = idx + [idx[0] if idx else 0] * (per_rank - len(idx))
        return idx, torch.tensor(valid, device=self.device)

    def _all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(t)
        return t

    def _to_full(self, local: torch.Tensor, idx: list[int], valid: torch.Tensor, n: int) -> torch.Tensor:
        """Scatter a shard's values (zero-weight padding dropped) into a (n,) vector summed over ranks."""
        full = torch.zeros(n, dtype=torch.float32, device=self.device)
        keep = valid > 0
        full[torch.tensor(idx, device=self.device)[keep]] = local.float().to(self.device)[keep]
        return self._all_sum(full)

    # ------------------------------------------------------------------ scoring
    def _policy_module(self) -> torch.nn.Module:
        return self.engine.module

    def _policy_logp_full(self, local: list[Rollout], idx: list[int], valid: torch.Tensor, n: int) -> torch.Tensor:
        """(n,) log pi_theta at the current weights, no grad (collective under ZeRO-3)."""
        model = self._policy_module()
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                lp = sequence_logprobs(model, local, self.cfg.learner.micro_batch_size, self.action_token_ids,
                                       pad_token_id=self.pad_token_id)
        finally:
            model.train(was)
        return self._to_full(lp, idx, valid, n)

    def _score_start(self, batch: StepBatch) -> StartScores:
        """Pass 1 at the current weights (collective)."""
        rollouts = batch.rollouts
        n = len(rollouts)
        idx, valid = self._shard(n)
        local = [rollouts[i] for i in idx]
        model = self._policy_module()
        was = model.training
        model.eval()
        try:
            sc = score_rollouts(model, local, self.cfg.learner.micro_batch_size, self.action_token_ids,
                                pad_token_id=self.pad_token_id, **self._reference_kw())
        finally:
            model.train(was)
        sums = self._all_sum(_gap_and_tokens(local, sc.token_logp, valid).to(self.device))
        logp_s = self._to_full(sc.logp, idx, valid, n)
        if self.anchor is not None:  # EMA anchor
            with torch.no_grad():
                la = sequence_logprobs(self.anchor, local, self.cfg.learner.micro_batch_size, self.action_token_ids,
                                       pad_token_id=self.pad_token_id)
            logp_anchor = self._to_full(la, idx, valid, n)
        else:
            logp_anchor = logp_s
        return StartScores(rollout_key(rollouts), logp_s, self._to_full(sc.logp_ref, idx, valid, n), logp_anchor,
                           self._to_full(sc.kl_ref, idx, valid, n), float(sums[0]), int(sums[1]))

    def _fuses_first_step(self) -> bool:
        """Whether pass 1 can be the first inner step's gradient forward: a separable loss
        (:meth:`_separable_loss`; sample i's ``dL/dlogp_i`` needs sample i's scores alone), no
        EMA anchor model (snapshot mode: pi_k is pi_s), and a policy whose train-mode forward
        equals its eval-mode one (no dropout), so pi_s is the same number either way."""
        if not self._separable_loss() or self.anchor is not None:
            return False
        cached = getattr(self, "_no_dropout", None)
        if cached is None:
            model = self._policy_module()
            drop = any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules())
            cfg = getattr(model, "config", None)
            drop = drop or any(float(getattr(cfg, a, 0.0) or 0.0) > 0 for a in
                               ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"))
            cached = self._no_dropout = not drop
        return cached

    def _score_start_and_backward(self, batch: StepBatch, local: list[Rollout], idx: list[int],
                                  valid: torch.Tensor) -> tuple[StartScores, torch.Tensor | None,
                                                                Callable[[torch.Tensor], LossOutput], LossOutput]:
        """Pass 1 fused with inner step 0's gradient (collective; see :meth:`_fuses_first_step`):
        each micro-batch's policy forward runs with grad, gives its log pi_s, per-token log-probs
        and (no-grad reference forward) log pi_ref and the exact KL to pi_ref; its entries of
        ``dL/dlogp`` at ``logp = logp_s`` follow (a separable loss needs no other sample), then its
        backward. Same start scores and the same step-0 gradient as :meth:`_score_start` followed
        by :meth:`_backward_given`, one no-grad forward over the batch fewer.

        Returns:
            (start scores, the engine-IS weights or None, the loss function, the step-0 loss at
            the full batch's ``logp_s``), all full-batch (B,) and summed over ranks.
        """
        n = len(batch.rollouts)
        zeros = (lambda: torch.zeros(n, dtype=torch.float32, device=self.device))
        logp_s, logp_ref, kl_ref = zeros(), zeros(), zeros()
        # filled in place micro-batch by micro-batch: the loss function reads these tensors
        start = StartScores(rollout_key(batch.rollouts), logp_s, logp_ref, logp_s, kl_ref, 0.0, 0)
        cap = self.cfg.algorithm.engine_is_cap
        weight = zeros() if cap is not None else None
        engine_logp = self._engine_logp(batch) if cap is not None else None
        loss_fn = self._loss_fn(batch, start, weight)
        pos_all = torch.tensor(idx, device=self.device)
        sums = torch.zeros(2, dtype=torch.float64)
        mb = self.cfg.learner.micro_batch_size
        kw = self._reference_kw()
        for part in scored_micro_batches(self.engine, local, mb, self.action_token_ids,
                                         pad_token_id=self.pad_token_id, grad=True, **kw):
            sl = slice(part.start, part.start + len(part.logp))
            keep = valid[sl] > 0
            pos = pos_all[sl][keep]
            logp_s[pos] = part.logp.float().to(self.device)[keep]
            logp_ref[pos] = part.logp_ref.float().to(self.device)[keep]
            kl_ref[pos] = part.kl_ref.float().to(self.device)[keep]
            if weight is not None:
                weight[pos] = _capped_ratio(logp_s[pos], engine_logp[pos], cap)
            self._backward_micro_batch(loss_fn, logp_s, pos_all[sl], valid[sl], part.logp_grad)
            sums += _gap_and_tokens(local[sl], part.token_logp, valid[sl])
        for t in (logp_s, logp_ref, kl_ref) + ((weight,) if weight is not None else ()):
            self._all_sum(t)  # in place: each sample was written on one rank only
        sums = self._all_sum(sums.to(self.device))
        start.gap_sum, start.tokens = float(sums[0]), int(sums[1])
        with torch.no_grad():
            out = loss_fn(logp_s)
        return start, weight, loss_fn, out
