"""The learner's update: score the batch at the weights its samples came from, take the inner
optimiser steps of the algorithm's loss, measure where the step landed.

One update on a :class:`~nlhf.batch.StepBatch` of B rollouts (all ranks, same batch; rank r
scores rollouts r, r+W, ... and vectors are summed over ranks):

1. **Scoring pass at the start point** theta_s (theta_k for Nash-MP's both steps and for the
   one-step baselines; theta_{k+1/2} for EGPO's second step): one fused no-grad pass gives
   ``log pi_s`` (B,), per-token ``log pi_s``, ``log pi_ref`` (B,) and the exact per-token
   KL(pi_s || pi_ref) summed over response tokens (:func:`nlhf.learner.logprobs.score_rollouts`).
   ``pi_s`` is the behaviour policy of the importance ratios (as the learner computes it, not the
   engine's log-prob), and in snapshot mode also the proximal anchor pi_k. For a separable loss
   (below) in snapshot mode the pass *is* step 0's gradient forward: each micro-batch is scored
   with grad, its ``dL/dlogp`` at ``logp = logp_s`` formed and back-propagated at once
   (:meth:`UpdateMixin._score_start_and_backward`; one forward over the batch fewer).
2. **M inner steps** (``cfg.algorithm.inner_steps``; 1 for EGPO, see :mod:`nlhf.learner.worker`):
   each needs the batch's log-probs at the current theta (step 0 reuses pass 1), evaluates the
   loss and ``g = dL/dlogp`` (B,) on the whole batch identically on every rank, back-propagates
   ``W * sum_i g_i logp_i`` over the rank's shard in micro-batches (DeepSpeed averages over ranks:
   exactly dL/dtheta of the full-batch loss), then applies the optimiser. Steps >= 1 of a pair
   loss re-score the batch in a no-grad pass first; for a separable loss (a mean of per-sample
   terms: the policy-gradient losses) ``g_i`` needs sample i alone, so each micro-batch's gradient
   forward supplies its own log-probs and the extra pass is skipped (one forward fewer per step).
3. **Post-step pass**: ``log pi_after`` at the new weights; ``kl_anchor`` is the k3
   estimator ``mean_i [(r_i - 1) - log r_i]``, ``r_i = pi_after(y_i) / pi_s(y_i)``, of
   KL(pi_s || pi_after) on the batch's samples of pi_s (>= 0 per sample; unbiased), or on
   ``learner.kl_anchor_samples`` of them, evenly spread: a diagnostic that does not enter the
   update: one no-grad forward over the batch, against a forward and a backward per inner step.

The engine-learner gap: ``logprob_gap`` is the mean over response tokens of
``|log pi_engine - log pi_s|`` (per token where the rollout carries the engine's per-token
log-probs; otherwise that rollout contributes ``|sum_engine - sum_learner|``, a lower bound).
With ``cfg.algorithm.engine_is_cap = c`` each sample's loss term is weighted by
``min(pi_s(y) / pi_engine(y), c)`` (sequence level, detached): the truncated importance
correction of the gap between the engine that sampled y and the learner's pi_s.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from nlhf.algorithms.losses import LOG_RATIO_CAP, LossOutput
from nlhf.batch import Rollout, StepBatch
from nlhf.learner.logprobs import sequence_logprobs
from nlhf.learner.scoring import ScoringMixin, StartScores, _capped_ratio

# metrics the update computes itself; the loss's own keys of the same name (sample means) are dropped
_OWN_KEYS = ("loss", "grad_norm", "kl_ref", "kl_anchor")


class UpdateMixin(ScoringMixin):
    """The update machinery of :class:`nlhf.learner.worker.LearnerWorker` (needs its attributes:
    ``cfg, engine, anchor, rank, world_size, device, pad_token_id, action_token_ids`` and
    ``_reference_kw()``, the pi_ref arguments of ``score_rollouts``)."""

    # ------------------------------------------------------------------ losses
    def _loss_fn(self, batch: StepBatch, start: StartScores, weight: torch.Tensor | None
                 ) -> Callable[[torch.Tensor], LossOutput]:
        """The algorithm's loss as a function of the (B,) log-probs at the current theta."""
        from nlhf.algorithms import losses as L

        alg = self.cfg.algorithm
        pref = torch.tensor(batch.preference, dtype=torch.float32, device=self.device)
        needs_partner = alg.name in ("online-ipo", "egpo") or (alg.name == "nash-mp" and alg.estimator == "regression")
        if needs_partner and not batch.partner:
            what = "nash-mp with estimator 'regression'" if alg.name == "nash-mp" else alg.name
            raise ValueError(f"StepBatch.partner is empty: {what} needs pair partners (see nlhf.algorithms.pairing)")
        partner = torch.tensor(batch.partner, dtype=torch.long, device=self.device) if batch.partner else None
        common = {"logp_ref": start.logp_ref, "preference": pref, "beta": alg.beta, "sample_weight": weight}
        if alg.name == "nash-mp":
            return lambda lp: L.proximal_loss(alg.estimator, logp=lp, logp_anchor=start.logp_anchor,
                                              logp_sampler=start.logp_s, pair_index=partner, eta=alg.eta,
                                              clip=alg.clip, **common)
        if alg.name == "online-ipo":
            return lambda lp: L.online_ipo_loss(lp, pair_index=partner, **common)
        if alg.name == "egpo":
            return lambda lp: L.egpo_loss(lp, pair_index=partner, **common)
        if alg.name == "nash-md-pg":
            return lambda lp: L.nash_md_pg_loss(lp, logp_sampler=start.logp_s, clip=alg.clip, **common)
        raise ValueError(f"algorithm.name {alg.name!r} has no learner loss")

    def _engine_weight(self, batch: StepBatch, start: StartScores) -> torch.Tensor | None:
        """min(pi_s(y) / pi_engine(y), engine_is_cap) per sample (B,), or None without a cap."""
        cap = self.cfg.algorithm.engine_is_cap
        if cap is None:
            return None
        return _capped_ratio(start.logp_s, self._engine_logp(batch), cap)

    def _engine_logp(self, batch: StepBatch) -> torch.Tensor:
        """(B,) log pi_engine(y_i|x_i), the sampling engine's own sequence log-probs."""
        return torch.tensor([r.sampler_logprob for r in batch.rollouts], dtype=torch.float32, device=self.device)

    # ------------------------------------------------------------------ the update
    def _separable_loss(self) -> bool:
        """Whether the algorithm's loss is a mean of per-sample terms, term i a function of
        ``logp_i`` alone (so ``dL/dlogp_i`` needs only sample i's log-prob): the policy-gradient
        losses (Nash-MP's ``pg`` estimator, Nash-MD-PG). The pair losses (regression estimator,
        online IPO, EGPO) couple a sample with its pair partner."""
        alg = self.cfg.algorithm
        return alg.name == "nash-md-pg" or (alg.name == "nash-mp" and alg.estimator == "pg")

    def _backward_given(self, loss_fn: Callable[[torch.Tensor], LossOutput], logp_now: torch.Tensor,
                        local: list[Rollout], idx: list[int], valid: torch.Tensor) -> LossOutput:
        """Accumulate dL/dtheta given the full-batch (B,) log-probs at the current theta: one
        gradient forward and backward per micro-batch of this rank's shard."""
        leaf = logp_now.clone().requires_grad_(True)
        out = loss_fn(leaf)
        (g_full,) = torch.autograd.grad(out.loss, leaf)
        g_local = g_full[torch.tensor(idx, device=self.device)] * valid * self.world_size
        mb = self.cfg.learner.micro_batch_size
        for s in range(0, len(local), mb):
            lp = sequence_logprobs(self.engine, local[s:s + mb], mb, self.action_token_ids,
                                   pad_token_id=self.pad_token_id)
            self.engine.backward((g_local[s:s + mb] * lp).sum(), scale_wrt_gas=False)
        return out

    def _backward_fused(self, loss_fn: Callable[[torch.Tensor], LossOutput], logp_fill: torch.Tensor,
                        local: list[Rollout], idx: list[int], valid: torch.Tensor, n: int) -> LossOutput:
        """Accumulate dL/dtheta for a separable loss (:meth:`_separable_loss`) without a separate
        no-grad pass: each micro-batch's gradient forward gives its log-probs, its entries of
        ``dL/dlogp`` come from the loss at a (B,) vector holding them (the other entries,
        ``logp_fill``, do not enter them), then its backward. Same gradient as
        :meth:`_backward_given`, one forward pass fewer per micro-batch; the returned LossOutput
        (metrics) is the loss at the full batch's log-probs gathered from the gradient forwards."""
        mb = self.cfg.learner.micro_batch_size
        pos = torch.tensor(idx, device=self.device)
        seen = torch.empty(len(local), dtype=torch.float32, device=self.device)
        for s in range(0, len(local), mb):
            lp = sequence_logprobs(self.engine, local[s:s + mb], mb, self.action_token_ids,
                                   pad_token_id=self.pad_token_id)
            probe = logp_fill.detach().clone()
            probe[pos[s:s + mb]] = lp.detach().float()
            self._backward_micro_batch(loss_fn, probe, pos[s:s + mb], valid[s:s + mb], lp)
            seen[s:s + mb] = lp.detach().float()
        with torch.no_grad():
            return loss_fn(self._to_full(seen, idx, valid, n))

    def _backward_micro_batch(self, loss_fn: Callable[[torch.Tensor], LossOutput], probe: torch.Tensor,
                              pos: torch.Tensor, valid: torch.Tensor, logp: torch.Tensor) -> None:
        """For a separable loss: ``g = dL/dlogp`` at the (B,) vector ``probe`` (detached; its
        entries ``pos`` hold this micro-batch's log-probs), restricted to ``pos`` and weighted by
        ``valid * W``, then the engine's backward of ``sum(g * logp)`` (``logp``: the micro-batch's
        differentiable (m,) log-probs)."""
        leaf = probe.detach().clone().requires_grad_(True)
        (g_full,) = torch.autograd.grad(loss_fn(leaf).loss, leaf)
        g = g_full[pos] * valid * self.world_size
        self.engine.backward((g * logp).sum(), scale_wrt_gas=False)

    def kl_anchor_selection(self, n: int) -> list[int]:
        """Indices of the samples the post-step pass scores: ``learner.kl_anchor_samples`` of
        the batch's n, evenly spread (``floor(j * n / m)``), or all n."""
        m = self.cfg.learner.kl_anchor_samples
        return list(range(n)) if m is None or m >= n else [j * n // m for j in range(m)]

    def _kl_anchor(self, rollouts: list[Rollout], start: StartScores) -> float:
        """Post-step pass (collective): the k3 estimate ``mean_i [(r_i - 1) - log r_i]``,
        ``r_i = pi_after(y_i) / pi_s(y_i)``, of KL(pi_s || pi_after) over the samples of
        :meth:`kl_anchor_selection` (no grad; m forwards instead of B where a subset is asked)."""
        sel = self.kl_anchor_selection(len(rollouts))
        idx, valid = self._shard(len(sel))
        logp_after = self._policy_logp_full([rollouts[sel[j]] for j in idx], idx, valid, len(sel))
        log_r = (logp_after - start.logp_s[torch.tensor(sel, device=self.device)]).clamp(max=LOG_RATIO_CAP)
        return float((torch.expm1(log_r) - log_r).mean())

    def _grad_norm(self) -> float:
        from nlhf.learner.engine import clips_itself

        gn = self._last_grad_norm if clips_itself(self.cfg) else self.engine.get_global_grad_norm()
        return float(gn) if gn is not None else float("nan")

    def _update(self, batch: StepBatch, *, steps: int, start: StartScores | None = None,
                finish: Callable[[], float | None] | None = None) -> tuple[dict[str, float], StartScores]:
        """Score (unless ``start`` is given), take ``steps`` optimiser steps on the algorithm's
        loss, run the post-step pass; collective.

        ``finish``: replaces the *last* ``engine.step()``; it is called with the last gradient
        accumulated and returns the pre-clip gradient norm (None: read it from the engine), so
        a caller can restore theta_k before applying it (EGPO) or apply it without touching the
        optimiser state (:func:`nlhf.learner.snapshot.adamw_preview_`).

        Returns:
            (metrics, the start scores). Metrics: ``loss`` and the loss's diagnostics
            (``clip_frac``, ``ratio_min/mean/max``, ``pg_weight_std``, ...) of the last inner
            step, ``grad_norm`` (pre-clip, last inner step), ``kl_ref`` (exact, at theta_s),
            ``kl_ref_sample`` (mean log pi_s/pi_ref), ``kl_anchor`` (post-step, see module
            docstring), ``logprob_gap``, ``response_len``, ``inner_steps``, ``step_time_s``,
            and ``engine_is_weight_mean`` when ``engine_is_cap`` is set.

        Raises:
            ValueError: an empty batch or missing pair partners.
        """
        t0 = time.perf_counter()
        n = len(batch.rollouts)
        if n == 0:
            raise ValueError("empty StepBatch")
        idx, valid = self._shard(n)
        local = [batch.rollouts[i] for i in idx]
        first = None  # step 0's loss when pass 1 already accumulated its gradient
        if start is None and steps >= 1 and self._fuses_first_step():
            start, weight, loss_fn, first = self._score_start_and_backward(batch, local, idx, valid)
        else:
            start = start if start is not None else self._score_start(batch)
            weight = self._engine_weight(batch, start)
            loss_fn = self._loss_fn(batch, start, weight)
        fused = self._separable_loss()
        metrics: dict[str, float] = {}
        for step in range(steps):
            if step == 0 and first is not None:
                out = first
            elif step == 0 or not fused:
                logp_now = start.logp_s if step == 0 else self._policy_logp_full(local, idx, valid, n)
                out = self._backward_given(loss_fn, logp_now, local, idx, valid)
            else:
                out = self._backward_fused(loss_fn, start.logp_s, local, idx, valid, n)
            if step == steps - 1 and finish is not None:
                gn = finish()
                metrics["grad_norm"] = float(gn) if gn is not None else self._grad_norm()
            else:
                self.engine.step()
                metrics["grad_norm"] = self._grad_norm()
            metrics["loss"] = float(out.loss.detach())
            for k, v in out.metrics.items():
                if k not in _OWN_KEYS:
                    metrics[k] = float(v)
        metrics.update(
            kl_anchor=self._kl_anchor(batch.rollouts, start),
            kl_ref=float(start.kl_ref.mean()),
            kl_ref_sample=float((start.logp_s - start.logp_ref).mean()),
            logprob_gap=start.gap_sum / start.tokens if start.tokens else float("nan"),
            response_len=start.tokens / n,
            inner_steps=float(steps),
        )
        if weight is not None:
            metrics["engine_is_weight_mean"] = float(weight.mean())
        metrics["step_time_s"] = time.perf_counter() - t0
        return metrics, start
