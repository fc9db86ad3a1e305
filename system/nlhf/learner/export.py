"""What leaves the learner: weights for the rollout engines, HF checkpoints, and the trainer
state that makes a resumed run continue bit for bit.

Trainer state (``save_trainer_state(path)``), one folder per rank ``path/rank{r}/``:

- ``state.safetensors``: every tensor that defines theta (module weights or their ZeRO-3
  partitions, optimiser master weights; see :func:`nlhf.learner.snapshot.state_tensors`) as
  ``theta.{i}``, the AdamW state of master parameter j as ``opt.{j}.{key}``, the EMA anchor's
  weights as ``anchor.{name}`` (EMA mode), torch's CPU RNG state as ``rng.cpu`` (and
  ``rng.cuda`` on GPU);
- ``state.json``: the scalars: optimiser param-group hyper-parameters, DeepSpeed's loss-scaler
  fields and step counters, the layout (tensor count and shapes) to check against on load.

Nothing is pickled, so loading needs no ``torch.load`` at all. The module weights are stored
in the trainer state too, so the resume is exact whatever dtype the HF checkpoint was written
in; a fresh learner built from the HF checkpoint folder (``LearnerWorker(cfg, ckpt, ref)``) then
``load_trainer_state(path)`` is the resume recipe.

With LoRA (``learner.lora``) theta is the adapter: the trainer state holds the adapter's
tensors and their AdamW state only, while the engines' weights and the HF checkpoint are the
merged ``W + (alpha / rank) B A`` under the base model's names; a resumed LoRA learner rebuilds
its frozen base from ``reference_path`` and its adapter from the trainer state.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from nlhf.sync.writer import safetensors_bytes, write_safetensors_file

SAFETENSORS_NAME = "model.safetensors"
_JSONABLE = (bool, int, float, str, type(None))


def _jsonable(value: object) -> bool:
    if isinstance(value, _JSONABLE):
        return True
    if isinstance(value, (list, tuple)):
        return all(_jsonable(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _jsonable(v) for k, v in value.items())
    return False


class ExportMixin:
    """Weight export, checkpoints and trainer state of :class:`nlhf.learner.worker.LearnerWorker`."""

    # ------------------------------------------------------------------ weights for the engines
    @torch.no_grad()
    def gathered_state_dict(self, all_ranks: bool = False) -> dict[str, torch.Tensor] | None:
        """The policy's full state dict with HF names, on CPU, in the training dtype (collective;
        with LoRA: the merged weights, every floating-point tensor in the training dtype).

        Tied weights appear once (``lm_head.weight`` is left out when tied to the embeddings, as
        ``save_pretrained`` does). Rank 0 gets the dict (copies); other ranks take part in the
        ZeRO-3 gather and get None, unless ``all_ranks`` (then every rank returns its copy).
        """
        out: dict[str, torch.Tensor] = {}
        mine = self.rank == 0 or all_ranks
        with self._gathered():
            if mine:
                for name, t in self._named_weights():
                    dt = self.dtype if t.is_floating_point() else t.dtype
                    out[name] = t.detach().to("cpu", dtype=dt, copy=True).contiguous()
        return out if mine else None

    def _named_weights(self):
        """(HF name, tensor) of every parameter (tied ones once) and persistent buffer; call inside
        ``_gathered``. With LoRA: the merged weights under the base model's names
        (:func:`nlhf.learner.lora.merged_named_weights`)."""
        module = self.engine.module
        if getattr(self, "lora", None) is not None:
            from nlhf.learner.lora import merged_named_weights

            yield from merged_named_weights(module)
            return
        keys = set(module.state_dict().keys())
        yield from module.named_parameters()  # removes duplicates (tied weights)
        for name, b in module.named_buffers():
            if name in keys:
                yield name, b

    def state_dict_bytes(self, dtype: str) -> bytes | None:
        """The policy's weights as safetensors bytes for a rollout engine of dtype ``dtype``
        (``"float32"`` or ``"bfloat16"``: the pool's resolved dtype, see
        :func:`nlhf.hardware.resolve_dtype`); floating-point tensors are cast to it here, since the
        engine would cast on load anyway. Rank 0 gets the bytes, other ranks None. Collective.

        Memory: the payload is written tensor by tensor into one buffer (:func:`safetensors_bytes`),
        so the only extra memory is the returned bytes plus one cast tensor at a time.
        (``safetensors.torch.save`` peaked at twice the payload: 0.98 GB for 0.5 GB.)

        Raises:
            ValueError: an unknown ``dtype``.
        """
        return self._export(dtype, lambda target: safetensors_bytes(self._named_weights, cast_to=target,
                                                                    metadata={"format": "pt"}))

    def state_dict_file(self, dtype: str, path: str, reuse: str | None = None) -> dict | None:
        """Like :meth:`state_dict_bytes`, but rank 0 writes the safetensors file ``path``
        (atomically, :func:`write_safetensors_file`; over the spare file ``reuse`` in place
        where it exists) instead of returning bytes: the ``sync.backend: file`` transport, for
        engines on this node. Nothing of the payload stays in this process's memory (neither a
        buffer nor Ray object-store pages). Collective.

        Returns:
            Rank 0: ``{"path": path, "bytes": file size}``; other ranks None.

        Raises:
            ValueError: an unknown ``dtype``. OSError: ``path`` cannot be written.
        """
        size = self._export(dtype, lambda target: write_safetensors_file(path, self._named_weights, cast_to=target,
                                                                         metadata={"format": "pt"}, reuse=reuse))
        return None if size is None else {"path": str(path), "bytes": size}

    def _export(self, dtype: str, write):
        """Check ``dtype``, gather the weights (collective) and on rank 0 return ``write(torch dtype)``
        (None on other ranks), adding the time to ``export_seconds``."""
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16' (the engines' resolved dtype), got {dtype!r}")
        t0 = time.perf_counter()
        with torch.no_grad(), self._gathered():
            if self.rank != 0:
                return None
            out = write(getattr(torch, dtype))
        self._export_seconds = getattr(self, "_export_seconds", 0.0) + time.perf_counter() - t0
        return out

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
        self._barrier()

    def _barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    # ------------------------------------------------------------------ trainer state (resume)
    def save_trainer_state(self, path: str) -> None:
        """Write this rank's trainer state under ``path/rank{r}/`` (see module docstring).
        Collective (every rank writes its own folder). Call between iterations.

        Raises:
            RuntimeError: mid-iteration (a theta_k snapshot is pending), or an optimiser-state
                value that is neither a tensor nor JSON-serialisable.
        """
        from safetensors.torch import save_file

        from nlhf.learner.snapshot import scaler_objects, state_tensors

        if self._snapshot is not None:
            raise RuntimeError("save_trainer_state mid-iteration: call it after full_step (or step)")
        out = Path(path) / f"rank{self.rank}"
        out.mkdir(parents=True, exist_ok=True)
        tensors, masters = state_tensors(self.engine, self._zero3())
        state = self._base_optimizer.state
        sd: dict[str, torch.Tensor] = {f"theta.{i}": t.detach().cpu().contiguous() for i, t in enumerate(tensors)}
        opt_scalars: dict[str, dict] = {}
        for j, p in enumerate(masters):
            for k, v in state.get(p, {}).items():
                if torch.is_tensor(v):
                    sd[f"opt.{j}.{k}"] = v.detach().cpu().contiguous()
                elif _jsonable(v):
                    opt_scalars.setdefault(str(j), {})[k] = v
                else:
                    raise RuntimeError(f"optimiser state {k!r} of parameter {j} is a {type(v).__name__}")
        if self.anchor is not None:
            for name, t in self.anchor.named_parameters():  # tied weights once
                sd[f"anchor.{name}"] = t.detach().cpu().contiguous()
        sd["rng.cpu"] = torch.get_rng_state()
        if self.device.type == "cuda":
            sd["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        scalers = {}
        for name, obj in scaler_objects(self.engine).items():
            fields = {k: v for k, v in vars(obj).items() if _jsonable(v)}
            for k, v in vars(obj).items():
                if torch.is_tensor(v):
                    sd[f"scaler.{name}.{k}"] = v.detach().cpu().contiguous().reshape(v.shape)
            scalers[name] = fields
        groups = [{k: v for k, v in g.items() if k != "params" and _jsonable(v)}
                  for g in self._base_optimizer.param_groups]
        meta = {
            "world_size": self.world_size, "rank": self.rank, "zero_stage": self.cfg.learner.zero_stage,
            "precision": self.cfg.learner.precision, "layout": [list(t.shape) for t in tensors],
            "masters": len(masters), "opt_scalars": opt_scalars, "param_groups": groups, "scalers": scalers,
            "engine": {k: int(getattr(self.engine, k, 0)) for k in ("global_steps", "global_samples", "skipped_steps")},
        }
        save_file(sd, str(out / "state.safetensors"))
        (out / "state.json").write_text(json.dumps(meta, indent=1))
        self._barrier()

    def load_trainer_state(self, path: str) -> None:
        """Load this rank's trainer state written by :meth:`save_trainer_state` (same config and
        world size): theta, the optimiser state, the EMA anchor, the RNG state. Collective.

        Raises:
            FileNotFoundError: no ``path/rank{r}/state.json``.
            RuntimeError: the saved layout (world size, ZeRO stage, tensor shapes) does not match
                this learner's.
        """
        from safetensors.torch import load_file

        from nlhf.learner.snapshot import scaler_objects, state_tensors

        folder = Path(path) / f"rank{self.rank}"
        if not (folder / "state.json").is_file():
            raise FileNotFoundError(f"no trainer state for rank {self.rank} under {path}")
        meta = json.loads((folder / "state.json").read_text())
        tensors, masters = state_tensors(self.engine, self._zero3())
        mine = {"world_size": self.world_size, "zero_stage": self.cfg.learner.zero_stage,
                "precision": self.cfg.learner.precision, "layout": [list(t.shape) for t in tensors],
                "masters": len(masters)}
        for k, v in mine.items():
            if meta.get(k) != v:
                raise RuntimeError(f"trainer state at {path}: {k} is {meta.get(k)!r}, this learner has {v!r}")
        sd = load_file(str(folder / "state.safetensors"))
        with torch.no_grad():
            for i, t in enumerate(tensors):
                t.copy_(sd[f"theta.{i}"])
        state = self._base_optimizer.state
        for j, p in enumerate(masters):
            entry = {k[len(f"opt.{j}."):]: v.to(p.device) for k, v in sd.items() if k.startswith(f"opt.{j}.")}
            entry.update(meta["opt_scalars"].get(str(j), {}))
            if entry:
                state[p] = entry
            else:
                state.pop(p, None)
        for g, saved in zip(self._base_optimizer.param_groups, meta["param_groups"]):
            g.update({k: (tuple(v) if isinstance(g.get(k), tuple) else v) for k, v in saved.items()})
        for name, obj in scaler_objects(self.engine).items():
            fields = dict(meta["scalers"].get(name, {}))
            for k in list(vars(obj)):
                if f"scaler.{name}.{k}" in sd:
                    fields[k] = sd[f"scaler.{name}.{k}"].to(self.device)
            vars(obj).update(fields)
        for k, v in meta["engine"].items():
            if hasattr(self.engine, k):
                setattr(self.engine, k, v)
        if self.anchor is not None:
            with torch.no_grad():
                for name, t in self.anchor.named_parameters():
                    t.copy_(sd[f"anchor.{name}"])
        torch.set_rng_state(sd["rng.cpu"])
        if "rng.cuda" in sd and self.device.type == "cuda":
            torch.cuda.set_rng_state(sd["rng.cuda"], self.device)
        self._cache = None
        self._barrier()

    # ------------------------------------------------------------------ vLLM weight transfer (GPU)
    def init_weight_transfer(self, name: str, master_address: str, master_port: int, world_size: int,
                             workers: list, rank_offsets: list[int], dtype: str) -> None:
        """Open vLLM's ``nccl`` weight-transfer group ``name`` to one rollout pool (collective: every
        rank builds its :class:`nlhf.sync.weight_transfer.WeightTransferSender`; rank 0 hosts the
        rendezvous at ``master_address:master_port``, on its own node, and makes the pool's
        ``workers`` (Ray handles) join at ``rank_offsets``). Packed buffers and ZeRO-3 gather
        buckets are ``sync.bucket_mb`` MiB; tensors go in the engines' ``dtype``.

        Raises:
            ValueError: an unknown ``dtype``, or a group ``name`` already open.
            NcclUnavailableError: NCCL cannot run on rank 0 or on an engine.
        """
        from nlhf.sync.weight_transfer import MiB, PoolClient, WeightTransferSender

        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16' (the engines' resolved dtype), got {dtype!r}")
        if name in self._senders:
            raise ValueError(f"weight-transfer group {name!r} is already open")
        client = (PoolClient(workers, rank_offsets, timeout_s=self.cfg.fault_tolerance.actor_timeout_s)
                  if self.rank == 0 else None)
        self._senders[name] = WeightTransferSender(
            self.engine.module, rank=self.rank, master_address=master_address, master_port=master_port,
            world_size=world_size, client=client, dtype=getattr(torch, dtype), device=self.device,
            zero3=self._zero3(), bucket_bytes=int(self.cfg.sync.bucket_mb * MiB))

    def push_weights(self, name: str, version: int) -> dict:
        """Send the current policy weights over group ``name`` as weight ``version`` (collective:
        all ranks take part in the ZeRO-3 gathers; rank 0 broadcasts and sets the version).

        Returns:
            rank 0: ``{"seconds", "bytes", "tensors", "version"}``; other ranks ``{}``.

        Raises:
            KeyError: no group ``name`` (``init_weight_transfer`` first).
        """
        if name not in self._senders:
            raise KeyError(f"no weight-transfer group {name!r}: call init_weight_transfer first")
        t0 = time.perf_counter()
        out = self._senders[name].push(version)
        self._export_seconds = getattr(self, "_export_seconds", 0.0) + time.perf_counter() - t0
        return out

    def close_weight_transfer(self, name: str) -> None:
        """Close group ``name`` (no-op if it is not open)."""
        sender = self._senders.pop(name, None)
        if sender is not None:
            sender.close()
