"""The DeepSpeed learner: one rank of the data-parallel group that trains pi_theta with Nash-MP.

Per Nash-MP iteration (``/work/shared/docs/nash-mp.md``, "Stochastic Nash-MP for language
models"; Tiapkin et al., arXiv:2505.19731)::

    half_step(batch_k)       snapshot theta_k (weights + optimiser state), M steps  -> theta_{k+1/2}
    full_step(batch_{k+1/2}) restore theta_k exactly, M steps                       -> theta_{k+1}
                             anchor pi_k := theta_{k+1} (snapshot) or EMA of theta  (ema)

Each of the M (``cfg.algorithm.inner_steps``) optimiser steps minimises
``nlhf.algorithms.losses.proximal_loss`` on the whole batch.  The loss couples samples (pairs
for the regression estimator, batch statistics), so the gradient is taken in two passes:

1. every rank scores its shard of the batch without grad; the (B,) vectors of log-probs are
   summed over ranks so each rank holds them for the whole batch, and evaluates the loss and
   ``g = dL/dlogp`` (B,) identically;
2. each rank back-propagates the surrogate ``world_size * sum_i g_i logp_i`` over its shard in
   micro-batches (gradients accumulate locally); DeepSpeed averages over ranks, which gives
   exactly ``dL/dtheta`` of the full-batch loss, then takes one optimiser step.

Batches are **sharded by rank** (rank r scores rollouts r, r+W, r+2W, ...; shards are padded to
equal length with zero-weight repeats so every rank runs the same number of forward passes,
which ZeRO-3's parameter gathering requires).  All ranks must receive the same StepBatch.

The frozen reference pi_ref and the anchor pi_k are plain (un-partitioned) copies on every
rank; only the trained policy goes through DeepSpeed.

Forward passes saved: in ``snapshot`` mode the anchor's log-probs are the policy's at the
start of a step (the weights are theta_k = anchor), and a full step on the half-step's own
rollouts (the Nash-MP case: same y ~ pi_k, new opponent preferences) reuses the half-step's
log pi_ref, log pi_k and anchor values, since theta_k is restored bit for bit. Per iteration
that is 2 scoring passes + 2 gradient passes instead of 6 + 2.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from pathlib import Path
from typing import Literal

import torch

from nlhf.batch import Rollout, StepBatch
from nlhf.config import TrainConfig
from nlhf.learner.logprobs import sequence_logprobs as _sequence_logprobs

SAFETENSORS_NAME = "model.safetensors"


def _clips_itself(cfg: TrainConfig) -> bool:
    """Stage 0 in fp32 hands DeepSpeed the bare AdamW, and DeepSpeed then clips without keeping
    the norm; the worker clips in an optimiser pre-hook instead, to report ``grad_norm``."""
    return cfg.learner.zero_stage == 0 and cfg.learner.precision == "fp32"


def build_ds_config(cfg: TrainConfig, world_size: int) -> dict:
    """DeepSpeed config dict from ``cfg.learner``.

    ``gradient_accumulation_steps`` is the nominal number of micro-batches per rank for a batch
    of ``prompts_per_iteration * responses_per_prompt`` rollouts; the worker owns the accumulation
    boundary (``managed_gradient_accumulation: false``), so batches of any size work.
    ``gradient_clipping`` is 0 for ZeRO stage 0 in fp32, where the worker clips itself.
    """
    lc = cfg.learner
    batch = cfg.prompts_per_iteration * cfg.responses_per_prompt
    per_rank = math.ceil(batch / world_size)
    gas = max(1, math.ceil(per_rank / lc.micro_batch_size))
    return {
        "train_micro_batch_size_per_gpu": lc.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "managed_gradient_accumulation": False,
        "zero_optimization": {"stage": lc.zero_stage},
        "bf16": {"enabled": lc.precision == "bf16"},
        "gradient_clipping": 0.0 if _clips_itself(cfg) else float(lc.optimizer.grad_clip or 0.0),
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _default_pair_index(rollouts: list[Rollout]) -> list[int]:
    """Pair each rollout with the next one (cyclically) that has the same prompt ids; itself if none."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, r in enumerate(rollouts):
        groups.setdefault(tuple(r.prompt_token_ids), []).append(i)
    pair = list(range(len(rollouts)))
    for members in groups.values():
        for j, i in enumerate(members):
            pair[i] = members[(j + 1) % len(members)]
    return pair


def _rollout_key(rollouts: list[Rollout]) -> tuple:
    """Identity of a batch's samples (prompt and response ids) for reusing its log-probs."""
    return tuple((tuple(r.prompt_token_ids), tuple(r.response_token_ids)) for r in rollouts)


def _clone_state(state: dict) -> dict:
    return {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in state.items()}


class LearnerWorker:
    """One rank of the DeepSpeed learner group (a plain class; ``LearnerGroup`` wraps it in Ray).

    Holds the trainable policy pi_theta (a DeepSpeed engine with ZeRO stage, precision, torch
    AdamW and gradient clipping from ``cfg.learner``), the frozen reference pi_ref (from
    ``reference_path``) and the anchor pi_k (initially the policy's weights).

    Args:
        cfg: the run's config (``learner``, ``algorithm`` and the batch sizes are read).
        policy_path: HF folder of the initial policy theta_0 (also its tokenizer).
        reference_path: HF folder of pi_ref.
        rank, world_size: this process's place in the torch.distributed group.
        master_addr, master_port: rendezvous of the group (TCP store on rank 0).
        action_token_ids: game mode: responses are single tokens among these ids and are scored
            under the softmax restricted to them (see :func:`nlhf.learner.logprobs.sequence_logprobs`).

    The constructor joins the process group (gloo on CPU, nccl when ``cfg.learner.num_gpus > 0``);
    every rank must construct its worker concurrently. Methods marked *collective* must be called
    on all ranks in the same order.

    Raises:
        ValueError: ``rank`` outside ``[0, world_size)``.
    """

    def __init__(self, cfg: TrainConfig, policy_path: str, reference_path: str, *, rank: int = 0,
                 world_size: int = 1, master_addr: str = "127.0.0.1", master_port: int = 29500,
                 action_token_ids: list[int] | None = None) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.policy_path, self.reference_path = str(policy_path), str(reference_path)
        self.action_token_ids = list(action_token_ids) if action_token_ids is not None else None
        lc = cfg.learner
        use_gpu = lc.num_gpus > 0
        if not use_gpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK="0", LOCAL_SIZE="1")

        import deepspeed
        import torch.distributed as dist
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
        if use_gpu:
            torch.cuda.set_device(self.device)
        # Intra-op threads: as many as the CPUs this learner reserved. More threads than cores
        # (the default is every core of the machine) made a step up to 25x slower on a shared CPU.
        torch.set_num_threads(lc.torch_threads or max(1, int(lc.num_cpus)))
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_gpu else "gloo", init_method=f"tcp://{master_addr}:{master_port}",
                                    rank=rank, world_size=world_size)
        if not use_gpu and os.environ.get("NLHF_DS_SHM_COMM", "0") != "1":
            # DeepSpeed's CPU shared-memory all-reduce is a ~45 s JIT build per fresh extensions
            # dir; gloo does every collective without it. NLHF_DS_SHM_COMM=1 re-enables it.
            import deepspeed.ops as ds_ops
            ds_ops.__compatible_ops__["deepspeed_shm_comm"] = False

        self.dtype = torch.bfloat16 if lc.precision == "bf16" else torch.float32
        self.pad_token_id = AutoTokenizer.from_pretrained(self.policy_path).pad_token_id or 0
        self.ds_config = build_ds_config(cfg, world_size)

        def frozen(path: str, dtype: torch.dtype) -> torch.nn.Module:
            m = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.device).eval()
            m.requires_grad_(False)
            return m

        # Frozen copies first: once an HfDeepSpeedConfig with ZeRO-3 lives, from_pretrained partitions.
        self.reference = frozen(self.reference_path, self.dtype)
        anchor_dtype = torch.float32 if cfg.algorithm.anchor == "ema" else self.dtype  # EMA needs fp32 accumulation
        self.anchor = frozen(self.policy_path, anchor_dtype)

        self._hf_ds_config = None
        if lc.zero_stage == 3:
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds_config = HfDeepSpeedConfig(self.ds_config)  # kept alive: makes from_pretrained zero.Init
        policy = AutoModelForCausalLM.from_pretrained(self.policy_path, dtype=self.dtype)
        if lc.gradient_checkpointing:
            policy.gradient_checkpointing_enable()
        opt = lc.optimizer
        adamw = torch.optim.AdamW(policy.parameters(), lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps,
                                  weight_decay=opt.weight_decay)
        self.engine, _, _, _ = deepspeed.initialize(model=policy, optimizer=adamw, config=self.ds_config)
        self.engine.train()
        self._grad_norm: float | None = None
        if _clips_itself(cfg):
            adamw.register_step_pre_hook(self._clip_hook)
        self._snapshot: tuple[list, list, dict, bool] | None = None
        # True while the policy's weights are exactly the anchor's (snapshot mode, before any step)
        self._policy_is_anchor = cfg.algorithm.anchor == "snapshot"
        self._cache: tuple | None = None  # (rollout key, logp_ref, logp_anchor, logp_k) of the last update
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
        self._grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def _zero3(self) -> bool:
        return self.cfg.learner.zero_stage == 3

    def _gathered(self):
        """Context in which every policy parameter is whole on every rank (collective under ZeRO-3)."""
        if not self._zero3():
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()), modifier_rank=None)

    def _logp(self, model: torch.nn.Module, rollouts: list[Rollout]) -> torch.Tensor:
        return _sequence_logprobs(model, rollouts, self.cfg.learner.micro_batch_size, self.action_token_ids,
                                  pad_token_id=self.pad_token_id)

    def _shard(self, n: int) -> tuple[list[int], torch.Tensor]:
        """This rank's indices into a batch of n (padded to ceil(n/W) with repeats) and their 0/1 weights."""
        per_rank = math.ceil(n / self.world_size)
        idx = list(range(self.rank, n, self.world_size))
        valid = [1.0] * len(idx) + [0.0] * (per_rank - len(idx))
        idx = idx + [idx[0] if idx else 0] * (per_rank - len(idx))
        return idx, torch.tensor(valid, device=self.device)

    def _to_full(self, local: torch.Tensor, idx: list[int], valid: torch.Tensor, n: int) -> torch.Tensor:
        """Scatter a shard's values (with zero-weight padding dropped) into a (n,) vector summed over ranks."""
        full = torch.zeros(n, dtype=torch.float32, device=self.device)
        keep = valid > 0
        full[torch.tensor(idx, device=self.device)[keep]] = local.float()[keep]
        if self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(full)
        return full

    # ------------------------------------------------------------------ snapshot / restore of theta_k
    def _state_tensors(self) -> tuple[list[torch.Tensor], list[torch.nn.Parameter]]:
        """Every tensor that defines theta for the next update, in a fixed order, plus the master
        parameters whose AdamW state must be saved: the module's weights (under ZeRO-3 the
        local partition ``ds_tensor``) and the optimiser's master weights (ZeRO-1/2/3: fp32
        partitions; stage 0: the module's own).

        Under ZeRO-3 every gathered copy (persistent small parameters, prefetched ones) is
        released first, so the partitions are the only copy and the next forward re-gathers
        from them."""
        if self._zero3():
            self.engine.empty_partition_cache()
        opt = self.engine.optimizer
        if hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3 empties AdamW's param_groups between steps
            masters = list(opt.fp32_partitioned_groups_flat)
        else:
            masters = [p for group in self._base_optimizer.param_groups for p in group["params"]]
        weights = [p.ds_tensor.data if hasattr(p, "ds_tensor") else p.data for p in self.engine.module.parameters()]
        tensors: list[torch.Tensor] = []
        seen: set[tuple] = set()
        for t in weights + [p.data for p in masters]:  # stage 0 fp32: the masters are the weights
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
            if key not in seen:
                seen.add(key)
                tensors.append(t)
        return tensors, masters

    def _take_snapshot(self) -> None:
        """Copy theta_k: weights and the AdamW state (exp_avg, exp_avg_sq, step) of every master parameter."""
        tensors, masters = self._state_tensors()
        state = self._base_optimizer.state
        self._snapshot = ([t.detach().clone() for t in tensors],
                          [_clone_state(state[p]) if p in state else None for p in masters],
                          {name: copy.deepcopy(vars(obj)) for name, obj in self._scaler_objects().items()},
                          self._policy_is_anchor)

    def _scaler_objects(self) -> dict[str, object]:
        """DeepSpeed's loss-scaling bookkeeping (scale, iteration counters), part of the optimiser state."""
        opt = self.engine.optimizer
        found = {name: getattr(opt, name) for name in ("loss_scale_config", "loss_scaler") if hasattr(opt, name)}
        return {name: obj for name, obj in found.items() if hasattr(obj, "__dict__")}

    def _restore(self) -> None:
        """Put theta_k back bit for bit (weights and optimiser state) from the last snapshot.

        Raises:
            RuntimeError: no snapshot was taken (``half_step`` not called since the last full step),
                or the set of state tensors changed shape.
        """
        if self._snapshot is None:
            raise RuntimeError("no theta_k snapshot to restore: call half_step before full_step")
        saved_tensors, saved_state, saved_scalers, self._policy_is_anchor = self._snapshot
        tensors, masters = self._state_tensors()
        if len(tensors) != len(saved_tensors) or len(masters) != len(saved_state):
            raise RuntimeError("the learner's state layout changed since the snapshot")
        with torch.no_grad():
            for t, s in zip(tensors, saved_tensors):
                t.copy_(s)
        state = self._base_optimizer.state
        for p, s in zip(masters, saved_state):
            if s is None:
                state.pop(p, None)
            else:
                state[p] = _clone_state(s)
        for name, obj in self._scaler_objects().items():
            vars(obj).update(copy.deepcopy(saved_scalers[name]))
        self.engine.zero_grad()

    # ------------------------------------------------------------------ the proximal update
    def _proximal_update(self, batch: StepBatch) -> dict[str, float]:
        """``inner_steps`` optimiser steps on the proximal loss of ``batch`` (collective)."""
        from nlhf.algorithms.losses import proximal_loss

        t0 = time.perf_counter()
        alg = self.cfg.algorithm
        n = len(batch.rollouts)
        if n == 0:
            raise ValueError("empty StepBatch")
        idx, valid = self._shard(n)
        local = [batch.rollouts[i] for i in idx]
        key = _rollout_key(batch.rollouts)
        logp_k: torch.Tensor | None = None  # log pi_theta at the weights the step starts from
        if self._cache is not None and self._cache[0] == key:
            # full step on the half-step's samples: theta_k, pi_ref and the anchor are unchanged
            _, logp_ref, logp_anchor, logp_k = self._cache
        else:
            with torch.no_grad():
                logp_ref = self._to_full(self._logp(self.reference, local), idx, valid, n)
                # snapshot anchor == the weights we start from: take it from pass 1 below
                logp_anchor = None if self._policy_is_anchor else self._to_full(
                    self._logp(self.anchor, local), idx, valid, n)
        logp_sampler = torch.tensor([r.sampler_logprob for r in batch.rollouts], dtype=torch.float32, device=self.device)
        preference = torch.tensor(batch.preference, dtype=torch.float32, device=self.device)
        pair = batch.partner or _default_pair_index(batch.rollouts)
        pair_index = torch.tensor(pair, dtype=torch.long, device=self.device)
        mb = self.cfg.learner.micro_batch_size
        metrics: dict[str, float] = {}
        for step in range(alg.inner_steps):
            # pass 1: log-probs of the whole batch at the current theta, loss, dL/dlogp
            if step == 0 and logp_k is not None:
                logp_now = logp_k
            else:
                self.engine.module.eval()
                with torch.no_grad():
                    logp_now = self._to_full(self._logp(self.engine.module, local), idx, valid, n)
                self.engine.module.train()
            if step == 0:
                logp_k = logp_now
                if logp_anchor is None:
                    logp_anchor = logp_now
            logp_leaf = logp_now.clone().requires_grad_(True)
            out = proximal_loss(alg.estimator, logp=logp_leaf, logp_ref=logp_ref, logp_anchor=logp_anchor,
                                logp_sampler=logp_sampler, preference=preference, pair_index=pair_index,
                                beta=alg.beta, eta=alg.eta, clip=alg.clip)
            (g_full,) = torch.autograd.grad(out.loss, logp_leaf)
            g_local = g_full[torch.tensor(idx, device=self.device)] * valid * self.world_size
            if step == 0:  # samples come from pi_k = the weights at the start of the step
                metrics["kl_ref"] = float((logp_now - logp_ref).mean())
                metrics["kl_anchor"] = float((logp_now - logp_anchor).mean())
            # pass 2: back-propagate sum_i g_i logp_i over this rank's shard, micro-batch by micro-batch
            for s in range(0, len(local), mb):
                lp = self._logp(self.engine, local[s:s + mb])
                self.engine.backward((g_local[s:s + mb] * lp).sum(), scale_wrt_gas=False)
            self.engine.step()
            self._policy_is_anchor = False
            metrics["loss"] = float(out.loss.detach())
            gn = self._grad_norm if _clips_itself(self.cfg) else self.engine.get_global_grad_norm()
            metrics["grad_norm"] = float(gn) if gn is not None else float("nan")
            for k, v in out.metrics.items():  # the loss's diagnostics, never shadowing ours
                if k not in ("kl_ref", "kl_anchor", "loss", "grad_norm"):
                    metrics[k] = float(v)
        metrics["step_time_s"] = time.perf_counter() - t0
        self._cache = (key, logp_ref, logp_anchor, logp_k)
        return metrics

    @torch.no_grad()
    def _update_anchor(self) -> None:
        """anchor := theta (snapshot) or anchor := d * anchor + (1 - d) * theta (ema) (collective under ZeRO-3)."""
        alg = self.cfg.algorithm
        anchor_params = dict(self.anchor.named_parameters())
        with self._gathered():
            for name, p in self.engine.module.named_parameters():
                a = anchor_params[name]
                src = p.data.to(device=a.device, dtype=a.dtype)
                if alg.anchor == "snapshot":
                    a.copy_(src)
                else:
                    a.mul_(alg.ema_decay).add_(src, alpha=1.0 - alg.ema_decay)
        self._policy_is_anchor = alg.anchor == "snapshot"

    # ------------------------------------------------------------------ public API
    def half_step(self, batch: StepBatch) -> dict[str, float]:
        """Nash-MP half-step (collective): snapshot theta_k (weights and optimiser state), then
        ``cfg.algorithm.inner_steps`` optimiser steps on the proximal loss whose preferences are
        against the opponent pi_k -> theta_{k+1/2}. The anchor is not touched.

        Returns:
            metrics: ``loss``, ``kl_ref`` (mean logp - logp_ref over the batch's samples of pi_k,
            an estimate of KL(pi_k || pi_ref) in nats), ``kl_anchor``, ``grad_norm`` (pre-clip,
            last inner step), ``step_time_s``, plus the loss's own metrics.
        """
        self._take_snapshot()
        self._cache = None
        return self._proximal_update(batch)  # leaves (rollouts, logp_ref, logp_anchor, logp_k) in the cache

    def full_step(self, batch: StepBatch) -> dict[str, float]:
        """Nash-MP full step (collective): restore theta_k exactly (weights and optimiser state),
        ``inner_steps`` optimiser steps with preferences against pi_{k+1/2} -> theta_{k+1}, then
        update the anchor (``snapshot``: anchor := theta_{k+1}; ``ema``: anchor :=
        d * anchor + (1 - d) * theta_{k+1}, d = ``cfg.algorithm.ema_decay``).

        Raises:
            RuntimeError: no half_step since the last full step.
        """
        self._restore()
        self._snapshot = None
        metrics = self._proximal_update(batch)  # reuses the half-step's log-probs when the rollouts are the same
        self._cache = None
        self._update_anchor()
        return metrics

    def omd_step(self, batch: StepBatch) -> dict[str, float]:
        """Online mirror descent baseline (collective): one proximal update from the current theta
        (no snapshot, no restore), then the anchor update as in :meth:`full_step`."""
        self._cache = None
        metrics = self._proximal_update(batch)
        self._cache = None
        self._update_anchor()
        return metrics

    @torch.no_grad()
    def gathered_state_dict(self, all_ranks: bool = False) -> dict[str, torch.Tensor] | None:
        """The policy's full state dict with HF names, on CPU, in the training dtype (collective).

        Tied weights appear once (``lm_head.weight`` is left out when tied to the embeddings, as
        ``save_pretrained`` does). Rank 0 gets the dict; other ranks take part in the ZeRO-3
        gather and get None, unless ``all_ranks`` (then every rank returns its gathered copy).
        """
        module = self.engine.module
        keys = set(module.state_dict().keys())
        out: dict[str, torch.Tensor] = {}
        mine = self.rank == 0 or all_ranks
        with self._gathered():
            if mine:
                for name, p in module.named_parameters():  # removes duplicates (tied weights)
                    out[name] = p.data.detach().to("cpu", copy=True).contiguous()
                for name, b in module.named_buffers():
                    if name in keys:
                        out[name] = b.detach().to("cpu", copy=True).contiguous()
        return out if mine else None

    def state_dict_bytes(self) -> bytes | None:
        """:meth:`gathered_state_dict` serialised with ``safetensors.torch.save`` (rank 0; others None). Collective.

        Floating-point tensors are cast to the rollout engines' dtype (``cfg.policy.dtype``) first:
        the engines would cast on load anyway, so this halves the bytes moved for a bf16 engine
        fed by an fp32 learner without changing what the engine ends up holding."""
        sd = self.gathered_state_dict()
        if sd is None:
            return None
        from safetensors.torch import save

        from nlhf.hardware import resolve_dtype

        engine_dtype = getattr(torch, resolve_dtype(self.cfg.policy.dtype, gpu=self.cfg.rollout.num_gpus > 0))
        sd = {k: (v.to(engine_dtype) if v.is_floating_point() else v) for k, v in sd.items()}
        return save(sd, metadata={"format": "pt"})

    def save_checkpoint(self, path: str) -> None:
        """Write the policy as an HF folder (``config.json``, ``model.safetensors``, generation
        config, tokenizer of ``policy_path``) that transformers and vLLM load. Collective; rank 0 writes."""
        sd = self.gathered_state_dict()
        if self.rank == 0:
            from safetensors.torch import save_file
            from transformers import AutoTokenizer

            out = Path(path)
            out.mkdir(parents=True, exist_ok=True)
            config = self.engine.module.config
            config.dtype = "bfloat16" if self.dtype == torch.bfloat16 else "float32"
            config.save_pretrained(out)
            gen = getattr(self.engine.module, "generation_config", None)
            if gen is not None:
                gen.save_pretrained(out)
            save_file(sd, str(out / SAFETENSORS_NAME), metadata={"format": "pt"})
            AutoTokenizer.from_pretrained(self.policy_path).save_pretrained(out)
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    @torch.no_grad()
    def sequence_logprobs(self, rollouts: list[Rollout],
                          which: Literal["policy", "reference", "anchor"] = "policy") -> list[float]:
        """log pi(y|x) (nats, summed over response tokens) of each rollout under the current policy,
        the reference or the anchor. ``policy`` is collective under ZeRO-3.

        Raises:
            ValueError: unknown ``which``.
        """
        if which == "policy":
            model = self.engine.module
            was_training = model.training
            model.eval()
            try:
                return self._logp(model, rollouts).tolist()
            finally:
                model.train(was_training)
        if which == "reference":
            return self._logp(self.reference, rollouts).tolist()
        if which == "anchor":
            return self._logp(self.anchor, rollouts).tolist()
        raise ValueError(f"which must be 'policy', 'reference' or 'anchor', got {which!r}")

    def init_weight_sender(self, name: str, master_addr: str, master_port: int, world_size: int) -> None:
        """Rank 0: open the weight-sync group ``name`` to a rollout pool as its sender (rank 0 of a
        group of ``world_size`` = 1 + the pool's engine ranks; nccl on GPU, gloo on CPU; see
        :class:`nlhf.sync.nccl.NcclWeightSender`). Blocks until the pool's receivers join. Other
        ranks do nothing."""
        if self.rank != 0:
            return
        from nlhf.sync.nccl import NcclWeightSender

        backend = "nccl" if self.cfg.learner.num_gpus > 0 else "gloo"
        self._senders[name] = NcclWeightSender(master_addr, master_port, world_size, backend=backend,
                                               device=self.device if backend == "nccl" else None)

    def send_weights(self, name: str, bucket_mb: float = 256.0) -> dict:
        """Broadcast the gathered policy weights over sync group ``name`` (collective over the
        learner ranks, which all take part in the gather; rank 0 sends).

        Returns:
            rank 0: the sender's stats dict; other ranks: ``{}``.

        Raises:
            KeyError: rank 0 has no sender called ``name`` (``init_weight_sender`` first).
        """
        if self.rank == 0 and name not in self._senders:
            raise KeyError(f"no weight sender {name!r}: call init_weight_sender first")
        sd = self.gathered_state_dict()
        if self.rank != 0:
            return {}
        if self.device.type == "cuda":
            sd = {k: v.to(self.device) for k, v in sd.items()}
        return self._senders[name].send(sd, bucket_mb)

    def shutdown(self) -> None:
        """Leave the process group and release the ZeRO-3 from_pretrained hook (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for sender in self._senders.values():
            sender.close()
        self._senders.clear()
        if self._hf_ds_config is not None:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
            self._hf_ds_config = None
        import deepspeed.comm as ds_comm
        import torch.distributed as dist

        if dist.is_initialized():
            if ds_comm.is_initialized():
                ds_comm.destroy_process_group()  # also drops DeepSpeed's cached sub-groups
            else:
                dist.destroy_process_group()
