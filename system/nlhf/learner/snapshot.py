"""Saving theta_k and putting it back bit for bit (weights, optimiser state, loss-scaler state).

Nash-MP's full step and EGPO's second step start again from theta_k after a half-step has
moved the weights, so the learner keeps theta_k aside for the duration of one iteration:

- **full** snapshot: every state tensor (module weights, optimiser master weights) and the
  AdamW state (``exp_avg``, ``exp_avg_sq``, ``step``) of every master parameter;
- **weights-only** snapshot: the state tensors only, for half-steps that leave the optimiser
  state untouched (:func:`adamw_preview_`: one AdamW update applied to the weights while the
  moments stay at theta_k's);

stored in memory (cloned tensors) or on disk (``learner.snapshot: disk``: raw bytes in a
temporary file, read back *into* the live tensors, so neither the save nor the restore holds a
second copy in RAM). :meth:`Snapshot.restore` moves the saved state back: weights are
``copy_``-ed (in place: DeepSpeed and the optimiser keep references to them), the saved
optimiser-state dicts are assigned back (memory) or read into the live moment tensors (disk),
and the snapshot is dropped. Nothing is cloned on restore.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from typing import Literal

import torch

SnapshotMode = Literal["memory", "disk"]


def state_tensors(engine, zero3: bool) -> tuple[list[torch.Tensor], list[torch.nn.Parameter]]:
    """Every tensor that defines theta for the next update, in a fixed order, plus the master
    parameters whose AdamW state defines the optimiser: the module's trainable weights (all of
    them in full fine-tuning, the adapter's with LoRA; under ZeRO-3 the local partitions ``ds_tensor``) and the optimiser's master weights (ZeRO-1/2/3 and bf16:
    fp32 partitions; stage 0 fp32: the module's own parameters, listed once).

    Under ZeRO-3 every gathered copy (persistent small parameters, prefetched ones) is released
    first, so the partitions are the only copy and the next forward re-gathers from them.
    """
    if zero3:
        engine.empty_partition_cache()
    opt = engine.optimizer
    base = getattr(opt, "optimizer", opt)
    if hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3 empties AdamW's param_groups between steps
        masters = list(opt.fp32_partitioned_groups_flat)
    else:
        masters = [p for group in base.param_groups for p in group["params"]]
    # trainable parameters only: frozen ones (a LoRA adapter's base model) never change
    weights = [p.ds_tensor.data if hasattr(p, "ds_tensor") else p.data for p in engine.module.parameters()
               if p.requires_grad]
    tensors: list[torch.Tensor] = []
    seen: set[tuple] = set()
    for t in weights + [p.data for p in masters]:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            tensors.append(t)
    return tensors, masters


def scaler_objects(engine) -> dict[str, object]:
    """DeepSpeed's loss-scaling bookkeeping (scale, iteration counters), part of the optimiser state."""
    opt = engine.optimizer
    found = {name: getattr(opt, name) for name in ("loss_scale_config", "loss_scaler") if hasattr(opt, name)}
    return {name: obj for name, obj in found.items() if hasattr(obj, "__dict__")}


def _as_bytes(t: torch.Tensor):
    """A writable uint8 numpy view of a contiguous tensor's memory (no copy)."""
    return t.detach().reshape(-1).view(torch.uint8).numpy()


class _DiskFile:
    """Tensors written back to back into one file and read back into same-shaped tensors."""

    def __init__(self, directory: str, name: str) -> None:
        self.path = os.path.join(directory, name)
        self.layout: list[tuple[tuple[int, ...], torch.dtype]] = []

    def write(self, tensors: list[torch.Tensor]) -> None:
        with open(self.path, "wb") as f:
            for t in tensors:
                if t.device.type != "cpu" or not t.is_contiguous():
                    t = t.detach().contiguous().cpu()
                self.layout.append((tuple(t.shape), t.dtype))
                f.write(memoryview(_as_bytes(t)))

    def read_into(self, tensors: list[torch.Tensor]) -> None:
        if [(tuple(t.shape), t.dtype) for t in tensors] != self.layout:
            raise RuntimeError("the learner's state layout changed since the snapshot")
        with open(self.path, "rb") as f:
            for t in tensors:
                if t.device.type == "cpu" and t.is_contiguous():
                    f.readinto(memoryview(_as_bytes(t)))
                else:  # a GPU (or strided) tensor: stage through one host buffer
                    host = torch.empty(t.shape, dtype=t.dtype)
                    f.readinto(memoryview(_as_bytes(host)))
                    t.copy_(host)


class Snapshot:
    """theta_k, taken by :meth:`take` and put back (then dropped) by :meth:`restore`.

    Args:
        engine: the DeepSpeed engine of the policy.
        zero3: ZeRO stage 3 (partitioned module weights).
        mode: ``memory`` or ``disk``.
        weights_only: save the state tensors but not the optimiser state (the caller
            guarantees the optimiser state is not modified until :meth:`restore`).
        directory: where ``disk`` mode writes (a fresh temporary folder is made in it; removed
            on restore). None: the system temporary directory.
    """

    def __init__(self, engine, zero3: bool, mode: SnapshotMode = "memory", *, weights_only: bool = False,
                 directory: str | None = None) -> None:
        if mode not in ("memory", "disk"):
            raise ValueError(f"learner.snapshot must be 'memory' or 'disk', got {mode!r}")
        self.engine, self.zero3, self.mode, self.weights_only = engine, zero3, mode, weights_only
        self._dir: str | None = None
        self.weights: list[torch.Tensor] = []  # memory mode: the saved state tensors
        tensors, masters = state_tensors(engine, zero3)
        state = self._optimizer().state
        self.scalers = {name: copy.deepcopy(vars(obj)) for name, obj in scaler_objects(engine).items()}
        self.n_tensors, self.n_masters = len(tensors), len(masters)
        self.nbytes = sum(t.numel() * t.element_size() for t in tensors)
        # per master parameter: None (no state yet), else its state dict (tensors saved by mode)
        self.opt_state: list[dict | None] | None = None
        if not weights_only:
            self.opt_state = [None if p not in state else dict(state[p]) for p in masters]
            self.nbytes += sum(v.numel() * v.element_size() for s in self.opt_state if s for v in s.values()
                               if torch.is_tensor(v) and v.dim() > 0)
        if mode == "memory":
            self.weights = [t.detach().clone() for t in tensors]
            if self.opt_state is not None:
                self.opt_state = [None if s is None else {k: (v.detach().clone() if torch.is_tensor(v) else v)
                                                          for k, v in s.items()} for s in self.opt_state]
        else:
            self._dir = tempfile.mkdtemp(prefix="nlhf-theta-k-", dir=directory)
            self._weights_file = _DiskFile(self._dir, "weights.bin")
            self._weights_file.write(tensors)
            if self.opt_state is not None:
                self._moments_file = _DiskFile(self._dir, "optimizer.bin")
                # moments (>= 1-D tensors) go to disk; steps and other scalars stay in memory
                big = [v for s in self.opt_state if s for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
                self._moments_file.write(big)
                self.opt_state = [None if s is None else {k: (v.detach().clone() if torch.is_tensor(v) and v.dim() == 0
                                                              else (None if torch.is_tensor(v) else v))
                                                          for k, v in s.items()} for s in self.opt_state]

    def _optimizer(self) -> torch.optim.Optimizer:
        opt = self.engine.optimizer
        return getattr(opt, "optimizer", opt)

    def restore(self) -> None:
        """Put theta_k back bit for bit and drop the snapshot (it cannot be restored twice).

        Raises:
            RuntimeError: the set of state tensors changed shape since :meth:`take`, or the
                live optimiser lost a moment tensor that a disk snapshot must be read into.
        """
        tensors, masters = state_tensors(self.engine, self.zero3)
        if len(tensors) != self.n_tensors or len(masters) != self.n_masters:
            raise RuntimeError("the learner's state layout changed since the snapshot")
        with torch.no_grad():
            if self.mode == "memory":
                for t, s in zip(tensors, self.weights):
                    t.copy_(s)
                self.weights = []
            else:
                self._weights_file.read_into(tensors)
        if self.opt_state is not None:
            state = self._optimizer().state
            if self.mode == "disk":
                live = []
                for p, s in zip(masters, self.opt_state):
                    if s is None:
                        continue
                    if p not in state:
                        raise RuntimeError("the optimiser state of a parameter vanished since the snapshot")
                    for k, v in s.items():
                        if v is None:  # a moment tensor saved on disk: read into the live one
                            live.append(state[p][k])
                with torch.no_grad():
                    self._moments_file.read_into(live)
                for p, s in zip(masters, self.opt_state):
                    if s is not None:
                        for k, v in s.items():
                            if v is not None:
                                state[p][k] = v
            for p, s in zip(masters, self.opt_state):
                if s is None:
                    state.pop(p, None)
                elif self.mode == "memory":
                    state[p] = s  # the saved tensors become the live ones
            self.opt_state = None
        for name, obj in scaler_objects(self.engine).items():
            vars(obj).update(self.scalers[name])
        self.close()

    def close(self) -> None:
        """Drop what the snapshot holds (memory tensors, the disk folder). Idempotent."""
        self.weights = []
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


@torch.no_grad()
def adamw_preview_(optimizer: torch.optim.Optimizer, max_norm: float | None) -> float:
    """Apply one step of ``optimizer`` (a torch AdamW) to its parameters *without changing its
    state*: the gradients are clipped to ``max_norm`` (as the learner's pre-step hook does), and
    each parameter is updated by a throw-away AdamW with the same hyper-parameters whose state
    is a per-tensor copy of the real one, so the arithmetic is torch's own, element for element.

    Used for a half-step of one optimiser step at ZeRO stage 0 in fp32: the weights become
    theta_{k+1/2} exactly as ``optimizer.step()`` would make them, while the moments stay at
    theta_k's, so restoring theta_k needs the weights only. Transient memory: two copies of
    the largest parameter.

    Returns:
        the pre-clip global gradient norm (``inf``-norm clipping is not supported).

    Raises:
        TypeError: the optimiser is not torch.optim.AdamW.
    """
    if not isinstance(optimizer, torch.optim.AdamW):
        raise TypeError(f"adamw_preview_ needs torch.optim.AdamW, got {type(optimizer).__name__}")
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf")))
    for group in optimizer.param_groups:
        hyper = {k: v for k, v in group.items() if k != "params"}
        for p in group["params"]:
            if p.grad is None:
                continue
            tmp = torch.optim.AdamW([{"params": [p], **hyper}])
            real = optimizer.state.get(p)
            if real:
                tmp.state[p] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in real.items()}
            tmp.step()
            del tmp
    return norm
