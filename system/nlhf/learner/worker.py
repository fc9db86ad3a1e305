"""The DeepSpeed learner: one rank of the data-parallel group that trains pi_theta.

Operations by ``cfg.algorithm.name`` (``/work/shared/docs/nash-mp.md``):

``nash-mp`` (Tiapkin et al., arXiv:2505.19731, Nash Mirror Prox; nash-mp.md "Stochastic
Nash-MP for language models", steps 2 and 4)::

    half_step(batch_k)   keep theta_k aside; M steps of the proximal loss vs pi_k   -> theta_{k+1/2}
    full_step(batch_k')  put theta_k back exactly; M steps vs pi_{k+1/2}            -> theta_{k+1}

  both anchored at pi_k (snapshot mode: the policy's own log-probs at theta_k; ema mode: an
  fp32 EMA copy of theta). The loss is :func:`nlhf.algorithms.losses.proximal_loss`
  (estimator ``pg`` or ``regression``), ratios pi_theta / pi_k against the learner's own pi_k.

``online-ipo`` (Calandriello et al., arXiv:2403.08635, the online IPO loss, their eq. for
IPO-MD with the current policy as sampler) and ``nash-md-pg`` (Munos et al.,
arXiv:2312.00886, Nash-MD's policy gradient against the geometric mixture, their Sec. 7)::

    step(batch_k)        M steps of online_ipo_loss / nash_md_pg_loss from theta_k  -> theta_{k+1}

``egpo`` (Zhou, Fazel, Du, arXiv:2503.08942, extragradient in parameter space, their
Algorithm 1: theta_{k+1/2} = theta_k - lr g(theta_k); theta_{k+1} = theta_k - lr g(theta_{k+1/2}),
with AdamW as the optimiser)::

    half_step(batch_k)   keep theta_k aside; one optimiser step of egpo_loss on samples of pi_k
    full_step(batch_h)   gradient of egpo_loss at theta_{k+1/2} on samples of pi_{k+1/2}; put
                         theta_k back (weights and optimiser state); apply that gradient

  EGPO takes exactly one optimiser step per extragradient half (the paper's scheme;
  ``inner_steps`` is not used): more steps would no longer be an extragradient step.

Where theta_k is kept (:mod:`nlhf.learner.snapshot`): a half-step of **one** optimiser step at
ZeRO stage 0 in fp32 (Nash-MP with ``inner_steps: 1``; EGPO always) applies the AdamW update
to the weights without touching the optimiser state (:func:`~nlhf.learner.snapshot.adamw_preview_`,
torch's own AdamW arithmetic on per-tensor copies of the moments), so only the weights are
kept; otherwise weights and optimiser state are. ``learner.snapshot``: ``memory`` (default) or
``disk`` (raw bytes in a temporary folder under ``learner.snapshot_dir`` or the system's, read
back into the live tensors: no second copy in the process's RAM; the file sits in the page
cache; written once and read once per iteration: 1.6 GB each way for SmolLM2-135M fp32 with a
full snapshot, 0.54 GB for a weights-only one).

Memory: the reference pi_ref is a frozen copy in bf16 where the hardware computes bf16
natively (:func:`nlhf.hardware.resolve_dtype` of ``learner.reference_dtype``, default
``auto``), fp32 otherwise; no anchor copy in snapshot mode.

LoRA (``learner.lora``, :mod:`nlhf.learner.lora`): the policy is the base model (read from
``reference_path``, frozen, in ``learner.lora.base_dtype``: bf16 where native by default; the
adapter in the training precision) with a peft LoRA adapter; pi_ref is the
same module with the adapter disabled (no reference copy); AdamW, the theta_k snapshot and the
trainer state hold the adapter's tensors only; exports and checkpoints are the merged weights.

Batches are sharded by rank (see :mod:`nlhf.learner.update`); all ranks must receive the same
StepBatch, and every method marked *collective* must be called on all ranks in the same order.
"""

from __future__ import annotations

import contextlib
import os
from typing import Literal

import torch

from nlhf.batch import Rollout, StepBatch
from nlhf.config import TrainConfig
from nlhf.learner.engine import (
    build_ds_config,
    clips_itself,
    return_freed_memory_to_the_os,
)
from nlhf.learner.export import SAFETENSORS_NAME, ExportMixin
from nlhf.learner.logprobs import score_rollouts, sequence_logprobs
from nlhf.learner.snapshot import Snapshot, adamw_preview_
from nlhf.learner.scoring import rollout_key
from nlhf.learner.update import UpdateMixin
from nlhf.telemetry.memory import MemoryWatch

__all__ = ["SAFETENSORS_NAME", "LearnerWorker", "build_ds_config", "clips_itself", "return_freed_memory_to_the_os"]

_TWO_STEP = ("nash-mp", "egpo")  # half_step + full_step
_ONE_STEP = ("online-ipo", "nash-md-pg")  # step


class LearnerWorker(UpdateMixin, ExportMixin):
    """One rank of the DeepSpeed learner group (a plain class; ``LearnerGroup`` wraps it in Ray).

    Holds the trainable policy pi_theta (a DeepSpeed engine with ZeRO stage, precision, torch
    AdamW and gradient clipping from ``cfg.learner``), the frozen reference pi_ref (from
    ``reference_path``) and, in ``ema`` anchor mode only, the fp32 EMA anchor.

    Args:
        cfg: the run's config (``learner``, ``algorithm`` and the batch sizes are read;
            ``learner.snapshot`` and ``learner.reference_dtype`` when the config has them).
        policy_path: HF folder of the initial policy theta_0 (also its tokenizer); a folder
            written by :meth:`save_checkpoint` resumes from it (with :meth:`load_trainer_state`).
        reference_path: HF folder of pi_ref. With ``learner.lora`` it is also the frozen base
            of the adapter (pi_ref = theta_0), and ``policy_path`` gives the tokenizer only: a
            resumed LoRA learner gets its adapter from :meth:`load_trainer_state`.
        rank, world_size: this process's place in the torch.distributed group.
        master_addr, master_port: rendezvous of the group (TCP store on rank 0).
        action_token_ids: game mode: responses are single tokens among these ids and are scored
            under the softmax restricted to them (see :func:`nlhf.learner.logprobs.sequence_logprobs`).
        reference_dtype: overrides ``learner.reference_dtype`` (``auto``, ``float32``, ``bfloat16``).

    The constructor joins the process group (gloo on CPU, nccl when ``cfg.learner.num_gpus > 0``);
    every rank must construct its worker concurrently.

    Raises:
        ValueError: ``rank`` outside ``[0, world_size)``, or an unknown snapshot mode / dtype.
    """

    def __init__(self, cfg: TrainConfig, policy_path: str, reference_path: str, *, rank: int = 0,
                 world_size: int = 1, master_addr: str = "127.0.0.1", master_port: int = 29500,
                 action_token_ids: list[int] | None = None, reference_dtype: str | None = None) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        from nlhf.hardware import resolve_precision

        if cfg.learner.precision == "auto":  # resolved here, on the learner's own device
            resolved = resolve_precision("auto", gpu=cfg.learner.num_gpus > 0)
            cfg = cfg.model_copy(update={"learner": cfg.learner.model_copy(update={"precision": resolved})})
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.policy_path, self.reference_path = str(policy_path), str(reference_path)
        self.action_token_ids = list(action_token_ids) if action_token_ids is not None else None
        lc = cfg.learner
        self.snapshot_mode = lc.snapshot
        if self.snapshot_mode not in ("memory", "disk"):
            raise ValueError(f"learner.snapshot must be 'memory' or 'disk', got {self.snapshot_mode!r}")
        use_gpu = lc.num_gpus > 0
        self._memory = MemoryWatch()
        return_freed_memory_to_the_os()
        if not use_gpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK="0", LOCAL_SIZE="1")

        import deepspeed
        import torch.distributed as dist
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from nlhf.hardware import resolve_dtype

        self.device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
        if use_gpu:
            torch.cuda.set_device(self.device)
        # Intra-op threads: as many as the CPUs this learner reserved. More threads than cores
        # (the default is every core of the machine) made a step up to 25x slower on a shared CPU.
        torch.set_num_threads(lc.torch_threads or max(1, int(lc.num_cpus)))
        if not use_gpu and lc.retain_freed_memory:
            from nlhf.hardware import retain_freed_memory

            retain_freed_memory()
        self._owns_process_group = not dist.is_initialized()  # else: someone else's (e.g. an in-process vLLM)
        if self._owns_process_group:
            dist.init_process_group("nccl" if use_gpu else "gloo", init_method=f"tcp://{master_addr}:{master_port}",
                                    rank=rank, world_size=world_size)
        if not use_gpu and os.environ.get("NLHF_DS_SHM_COMM", "0") != "1":
            # DeepSpeed's CPU shared-memory all-reduce is a ~45 s JIT build per fresh extensions
            # dir; gloo does every collective without it. NLHF_DS_SHM_COMM=1 re-enables it.
            import deepspeed.ops as ds_ops
            ds_ops.__compatible_ops__["deepspeed_shm_comm"] = False

        self.dtype = torch.bfloat16 if lc.precision == "bf16" else torch.float32
        ref_choice = reference_dtype or lc.reference_dtype
        self.reference_dtype = getattr(torch, resolve_dtype(ref_choice, gpu=use_gpu))
        if self.dtype == torch.bfloat16:
            self.reference_dtype = torch.bfloat16  # a bf16 learner computes pi_ref as it computes pi
        self.pad_token_id = AutoTokenizer.from_pretrained(self.policy_path).pad_token_id or 0
        self.ds_config = build_ds_config(cfg, world_size)

        def frozen(path: str, dtype: torch.dtype) -> torch.nn.Module:
            m = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.device).eval()
            m.requires_grad_(False)
            return m

        self.lora = lc.lora
        if self.lora is not None and lc.zero_stage == 3:
            raise ValueError("learner.lora: ZeRO stage 3 is not supported with a LoRA adapter, got zero_stage=3")
        # Frozen copies first: once an HfDeepSpeedConfig with ZeRO-3 lives, from_pretrained partitions.
        # LoRA: no copy, pi_ref is the policy's base with the adapter disabled
        self.reference = None if self.lora is not None else frozen(self.reference_path, self.reference_dtype)
        self.base_dtype = self.dtype  # the policy's frozen weights
        if self.lora is not None:
            if self.dtype == torch.float32:
                self.base_dtype = getattr(torch, resolve_dtype(self.lora.base_dtype, gpu=use_gpu))
            self.reference_dtype = self.base_dtype
        # EMA needs fp32 accumulation; snapshot mode's anchor pi_k is the policy's own weights at theta_k
        self.anchor = frozen(self.policy_path, torch.float32) if cfg.algorithm.anchor == "ema" else None

        self._hf_ds_config = None
        if lc.zero_stage == 3:
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds_config = HfDeepSpeedConfig(self.ds_config)  # kept alive: makes from_pretrained zero.Init
        policy = AutoModelForCausalLM.from_pretrained(
            self.policy_path if self.lora is None else self.reference_path, dtype=self.base_dtype)
        if lc.gradient_checkpointing:
            policy.gradient_checkpointing_enable()
        if self.lora is not None:
            from nlhf.learner.lora import wrap_with_lora

            if lc.gradient_checkpointing:
                policy.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still get grads
            policy = wrap_with_lora(policy.to(self.device), self.lora)
        opt = lc.optimizer
        adamw = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=opt.lr,
                                  betas=tuple(opt.betas), eps=opt.eps, weight_decay=opt.weight_decay)
        self.engine, _, _, _ = deepspeed.initialize(model=policy, optimizer=adamw, config=self.ds_config)
        self.engine.train()
        if world_size == 1 and clips_itself(cfg):
            # DeepSpeed's stage-0 "all-reduce" flattens every gradient into one buffer and copies it
            # back (0.54 GB transient for SmolLM2-135M) even when it averages over one rank
            self.engine.enable_backward_allreduce = False
        self._last_grad_norm: float | None = None
        if clips_itself(cfg):
            adamw.register_step_pre_hook(self._clip_hook)
        self._snapshot: Snapshot | None = None  # theta_k, between half_step and full_step
        self._cache = None  # StartScores at theta_k of the last half-step (reused by full_step)
        self._senders: dict = {}
        self._closed = False

    # ------------------------------------------------------------------ helpers
    @property
    def _base_optimizer(self) -> torch.optim.Optimizer:
        """The torch AdamW that updates the master (fp32, possibly partitioned) weights."""
        opt = self.engine.optimizer
        return getattr(opt, "optimizer", opt)

    def _clip_hook(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        """Stage-0 fp32: runs after DeepSpeed's all-reduce, before AdamW: record the pre-clip
        gradient norm and clip to ``cfg.learner.optimizer.grad_clip``."""
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        max_norm = self.cfg.learner.optimizer.grad_clip or float("inf")
        self._last_grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def _zero3(self) -> bool:
        return self.cfg.learner.zero_stage == 3

    def _gathered(self):
        """Context in which every policy parameter is whole on every rank (collective under ZeRO-3)."""
        if not self._zero3():
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()), modifier_rank=None)

    def _algorithm(self, allowed: tuple[str, ...], op: str) -> str:
        name = self.cfg.algorithm.name
        if name not in allowed:
            other = "half_step/full_step" if name in _TWO_STEP else "step"
            raise ValueError(f"{op} is not an operation of algorithm.name {name!r} (it uses {other})")
        return name

    def _light_half_step(self) -> bool:
        """A half-step of one optimiser step that can leave the optimiser state untouched."""
        one = self.cfg.algorithm.name == "egpo" or self.cfg.algorithm.inner_steps == 1
        return one and clips_itself(self.cfg)

    def _preview_step(self) -> float:
        """Apply the accumulated gradient to the weights without changing the optimiser state
        (stage 0 fp32; all-reduced over ranks as DeepSpeed would) and clear the gradients."""
        params = [p for p in self.engine.module.parameters() if p.grad is not None]
        if self.world_size > 1:
            import torch.distributed as dist

            for p in params:
                dist.all_reduce(p.grad)
                p.grad.div_(self.world_size)
        norm = adamw_preview_(self._base_optimizer, self.cfg.learner.optimizer.grad_clip)
        self.engine.zero_grad()
        return norm

    def _take_snapshot(self, weights_only: bool) -> None:
        if self._snapshot is not None:
            self._snapshot.close()
        self._snapshot = Snapshot(self.engine, self._zero3(), self.snapshot_mode, weights_only=weights_only,
                                  directory=self.cfg.learner.snapshot_dir)

    def _restore(self) -> None:
        """Put theta_k back bit for bit (weights and optimiser state) and drop the snapshot.

        Raises:
            RuntimeError: no snapshot (``half_step`` not called since the last full step), or the
                set of state tensors changed shape.
        """
        if self._snapshot is None:
            raise RuntimeError("no theta_k snapshot to restore: call half_step before full_step")
        snap, self._snapshot = self._snapshot, None
        snap.restore()

    @torch.no_grad()
    def _update_anchor(self) -> None:
        """EMA mode: anchor := d * anchor + (1 - d) * theta (collective under ZeRO-3). Snapshot
        mode keeps no anchor copy: pi_k is the policy itself at the start of the next iteration."""
        if self.anchor is None:
            return
        d = self.cfg.algorithm.ema_decay
        anchor_params = dict(self.anchor.named_parameters())
        with self._gathered():
            for name, p in self.engine.module.named_parameters():
                a = anchor_params[name]
                a.mul_(d).add_(p.data.to(device=a.device, dtype=a.dtype), alpha=1.0 - d)

    # ------------------------------------------------------------------ public API: updates
    def half_step(self, batch: StepBatch) -> dict[str, float]:
        """First half of a Nash-MP or EGPO iteration (collective); ``batch`` holds samples of pi_k.

        ``nash-mp``: keep theta_k aside, ``inner_steps`` optimiser steps on the proximal loss with
        preferences against opponents from pi_k -> theta_{k+1/2} (nash-mp.md step 2).
        ``egpo``: keep theta_k aside, one optimiser step on ``egpo_loss`` -> theta_{k+1/2}
        (arXiv:2503.08942, Algorithm 1, first line of the extragradient step).

        Returns:
            metrics (see :meth:`nlhf.learner.update.UpdateMixin._update`).

        Raises:
            ValueError: another algorithm, an empty batch, or missing pair partners.
        """
        name = self._algorithm(_TWO_STEP, "half_step")
        light = self._light_half_step()
        self._cache = None
        self._take_snapshot(weights_only=light)
        steps = 1 if name == "egpo" else self.cfg.algorithm.inner_steps
        metrics, start = self._update(batch, steps=steps, finish=self._preview_step if light else None)
        self._cache = start if name == "nash-mp" else None
        return metrics

    def full_step(self, batch: StepBatch) -> dict[str, float]:
        """Second half of a Nash-MP or EGPO iteration (collective).

        ``nash-mp``: ``batch`` holds samples of pi_k judged against opponents from pi_{k+1/2};
        put theta_k back exactly (weights and optimiser state), ``inner_steps`` steps on the
        proximal loss -> theta_{k+1} (nash-mp.md step 4); the half-step's scoring at theta_k is
        reused when the rollouts are the same. ``egpo``: ``batch`` holds samples of pi_{k+1/2}
        (their own partners and opponents); the gradient of ``egpo_loss`` at theta_{k+1/2}, then
        theta_k put back (weights and optimiser state) and that gradient applied by the
        optimiser -> theta_{k+1}. Then the EMA anchor update (ema mode).

        Raises:
            RuntimeError: no half_step since the last full step.
            ValueError: another algorithm, an empty batch, or missing pair partners.
        """
        name = self._algorithm(_TWO_STEP, "full_step")
        if self._snapshot is None:
            raise RuntimeError("no theta_k snapshot to restore: call half_step before full_step")
        if name == "egpo":
            def finish() -> None:
                self._restore()  # gradients stay: they were taken at theta_{k+1/2}
                self.engine.step()

            metrics, _ = self._update(batch, steps=1, finish=finish)
        else:
            self._restore()
            cached = self._cache if self._cache is not None and self._cache.key == rollout_key(batch.rollouts) else None
            metrics, _ = self._update(batch, steps=self.cfg.algorithm.inner_steps, start=cached)
        self._cache = None
        self._update_anchor()
        return metrics

    def step(self, batch: StepBatch) -> dict[str, float]:
        """One update per iteration from the current theta_k, no snapshot (collective):
        ``online-ipo``: ``inner_steps`` steps of ``online_ipo_loss`` with ``batch.partner`` and
        ``preference[i] = P(y_i > y_partner(i))`` (arXiv:2403.08635); ``nash-md-pg``:
        ``inner_steps`` steps of ``nash_md_pg_loss`` with opponents from the geometric mixture,
        ratios against the learner's own pi_k (arXiv:2312.00886). Then the EMA anchor update.

        Raises:
            ValueError: another algorithm, an empty batch, or missing pair partners.
        """
        self._algorithm(_ONE_STEP, "step")
        self._cache = None
        metrics, _ = self._update(batch, steps=self.cfg.algorithm.inner_steps)
        self._update_anchor()
        return metrics

    # ------------------------------------------------------------------ public API: scoring
    def _reference_kw(self) -> dict:
        """``reference`` (and, with LoRA, ``reference_context``) arguments of
        :func:`~nlhf.learner.logprobs.score_rollouts` that compute pi_ref."""
        if self.lora is None:
            return {"reference": self.reference}
        return {"reference": self.engine.module, "reference_context": self.engine.module.disable_adapter}

    def _scoring(self, which: str) -> tuple[torch.nn.Module, contextlib.AbstractContextManager]:
        """The module that computes ``which`` and the context it must run in."""
        if which == "policy":
            return self.engine.module, contextlib.nullcontext()
        if which == "reference":
            kw = self._reference_kw()
            return kw["reference"], kw.get("reference_context", contextlib.nullcontext)()
        if which == "anchor":
            if self.anchor is not None:
                return self.anchor, contextlib.nullcontext()
            if self._snapshot is not None:
                raise RuntimeError("the anchor pi_k (theta_k) is set aside between half_step and full_step; "
                                   "score it after full_step")
            return self.engine.module, contextlib.nullcontext()  # snapshot mode between iterations: pi_k is the policy
        raise ValueError(f"which must be 'policy', 'reference' or 'anchor', got {which!r}")

    @torch.no_grad()
    def sequence_logprobs(self, rollouts: list[Rollout],
                          which: Literal["policy", "reference", "anchor"] = "policy") -> list[float]:
        """log pi(y|x) (nats, summed over response tokens) of each rollout under the current policy,
        the reference or the anchor pi_k. ``policy`` is collective under ZeRO-3.

        Raises:
            ValueError: unknown ``which``.
            RuntimeError: ``anchor`` in snapshot mode between half_step and full_step.
        """
        model, ctx = self._scoring(which)
        was = model.training
        model.eval()
        try:
            with ctx:
                return sequence_logprobs(model, rollouts, self.cfg.learner.micro_batch_size, self.action_token_ids,
                                         pad_token_id=self.pad_token_id).tolist()
        finally:
            model.train(was)

    @torch.no_grad()
    def token_logprobs(self, rollouts: list[Rollout],
                       which: Literal["policy", "reference", "anchor"] = "policy") -> list[list[float]]:
        """Per-token log pi(y_t | x, y_<t) (nats) of each rollout's response tokens (``out[i]``
        has ``len(rollouts[i].response_token_ids)`` entries); collective under ZeRO-3 for the policy.

        Raises:
            ValueError / RuntimeError: as :meth:`sequence_logprobs`.
        """
        model, ctx = self._scoring(which)
        was = model.training
        model.eval()
        try:
            with ctx:
                sc = score_rollouts(model, rollouts, self.cfg.learner.micro_batch_size, self.action_token_ids,
                                    pad_token_id=self.pad_token_id)
        finally:
            model.train(was)
        return [t.tolist() for t in sc.token_logp]

    @torch.no_grad()
    def kl_to_reference(self, rollouts: list[Rollout]) -> list[float]:
        """Exact KL(pi_theta || pi_ref) of each rollout's response (nats, summed over its
        positions of the per-token KL over the vocabulary; game mode: over the actions), >= 0.
        Collective under ZeRO-3."""
        model, _ = self._scoring("policy")
        was = model.training
        model.eval()
        try:
            sc = score_rollouts(model, rollouts, self.cfg.learner.micro_batch_size, self.action_token_ids,
                                pad_token_id=self.pad_token_id, **self._reference_kw())
        finally:
            model.train(was)
        return sc.kl_ref.tolist()

    def precision(self) -> str:
        """The resolved ``learner.precision`` of this rank (``fp32`` or ``bf16``)."""
        return self.cfg.learner.precision

    def stats(self) -> dict[str, float]:
        """``{"rank", "peak_rss_gb" (this process's peak RSS, GiB), "peak_private_gb",
        "peak_shared_gb" (its sampled private / object-store parts, see
        :mod:`nlhf.telemetry.memory`), "export_seconds" (time spent packing weights for the
        engines since the last call)}``."""
        export, self._export_seconds = getattr(self, "_export_seconds", 0.0), 0.0
        return {"rank": self.rank, **self._memory.peaks(), "export_seconds": export}

    # ------------------------------------------------------------------ teardown
    def shutdown(self) -> None:
        """Leave the process group (when this worker created it), drop a pending snapshot and
        release the ZeRO-3 from_pretrained hook (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._memory.close()
        if self._snapshot is not None:
            self._snapshot.close()
            self._snapshot = None
        for sender in self._senders.values():
            sender.close()
        self._senders.clear()
        if self._hf_ds_config is not None:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
            self._hf_ds_config = None
        import deepspeed.comm as ds_comm
        import torch.distributed as dist

        if dist.is_initialized() and self._owns_process_group:
            if ds_comm.is_initialized():
                ds_comm.destroy_process_group()  # also drops DeepSpeed's cached sub-groups
            else:
                dist.destroy_process_group()
