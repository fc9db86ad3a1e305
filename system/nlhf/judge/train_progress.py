"""Resumable progress of ``nlhf judge train``, kept in ``<judge.path>.partial/`` while it trains.

Folder contents (replaced atomically at each save, see :func:`nlhf.cachebuild.publish`):

- ``model.safetensors``: the judge's parameters (``PairwiseJudgeModel.state_dict()``);
- ``optimizer.safetensors``: AdamW's per-parameter tensors (``state.<param index>.<name>``:
  ``step``, ``exp_avg``, ``exp_avg_sq``) and ``torch_rng``, the CPU generator state (dropout);
- ``progress.json`` (written last): format, the fingerprint of config + data + initial
  weights, step, epoch, batches done in the epoch, the batch-order RNG state at the start of
  the epoch, EMA loss/accuracy, training seconds spent, the time budget, the pre-training
  validation, and AdamW's param groups.

Restoring all of this makes a resumed run take the same batches in the same order with the
same dropout masks and the same learning rates as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from nlhf.cachebuild import publish, temp_dir

PROGRESS_NAME = "progress.json"
FORMAT_VERSION = 1
# Fields that do not change the trained weights: a resumed run may change them freely.
NOT_FINGERPRINTED = {"num_threads", "checkpoint_every_s", "eval_before"}


def progress_folder(out: str | Path) -> Path:
    """Where the progress of training the judge folder ``out`` is kept: ``<out>.partial``."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def fingerprint(head: str, train_cfg, pairs: Sequence, model: torch.nn.Module) -> str:
    """sha256 (hex) of what determines the trained weights: the head, ``judge.train`` minus
    :data:`NOT_FINGERPRINTED`, the pairs' texts (train and validation, in order) and the
    initial weights (encoder and the seeded head)."""
    h = hashlib.sha256()
    h.update(json.dumps({"format": FORMAT_VERSION, "head": head,
                         "train": train_cfg.model_dump(mode="json", exclude=NOT_FINGERPRINTED)},
                        sort_keys=True).encode())
    for p in pairs:
        h.update(json.dumps([p.prompt, p.chosen, p.rejected, p.source]).encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class TrainProgress:
    """Where a judge training run stands after ``step`` optimiser steps.

    ``epoch_rng_state`` is ``random.Random.getstate()`` (as JSON lists) taken just before the
    current epoch's batches were drawn; ``pos`` batches of that epoch are done.
    ``train_seconds`` counts the training loop's wall seconds over all runs so far; ``budget``
    is the loop's time budget in seconds (None: no ``max_seconds``). ``torch_rng`` is
    ``torch.get_rng_state()`` at this point (uint8, shape (5056,)).
    """

    step: int
    epoch: int
    pos: int
    epoch_rng_state: list
    ema_loss: float | None
    ema_acc: float | None
    train_seconds: float
    budget: float | None
    val_before: dict | None
    torch_rng: torch.Tensor

    def batch_rng(self) -> random.Random:
        """A ``random.Random`` positioned at the start of the current epoch."""
        rng = random.Random()
        version, internal, gauss = self.epoch_rng_state
        rng.setstate((version, tuple(internal), gauss))
        return rng


def rng_state_json(rng: random.Random) -> list:
    """``rng.getstate()`` as JSON-serialisable lists."""
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def save_progress(folder: str | Path, fp: str, model: torch.nn.Module, opt: torch.optim.Optimizer,
                  prog: TrainProgress) -> None:
    """Write ``prog`` with the model and optimiser state to ``folder`` (replacing it atomically).

    Call it while holding the build lock of the judge folder (see :func:`nlhf.cachebuild.build_lock`).
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    sd = opt.state_dict()
    tensors, scalars = {"torch_rng": prog.torch_rng.clone()}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    meta = {"format_version": FORMAT_VERSION, "fingerprint": fp, "step": prog.step, "epoch": prog.epoch,
            "pos": prog.pos, "epoch_rng_state": prog.epoch_rng_state, "ema_loss": prog.ema_loss,
            "ema_acc": prog.ema_acc, "train_seconds": prog.train_seconds, "budget": prog.budget,
            "val_before": prog.val_before, "param_groups": sd["param_groups"], "optimizer_scalars": scalars}
    with temp_dir(folder) as tmp:
        model_state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if "position_ids" not in k}
        save_file(model_state, str(tmp / "model.safetensors"))
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / PROGRESS_NAME).write_text(json.dumps(meta))
        publish(tmp, folder)


def load_progress(folder: str | Path, fp: str, model: torch.nn.Module, opt: torch.optim.Optimizer,
                  note: Callable[[str], None]) -> TrainProgress | None:
    """Restore the model and optimiser from ``folder`` and return the progress, if it matches.

    Progress made with another fingerprint (config, data or initial weights), or unreadable
    progress, is deleted with a line to ``note`` and None is returned; None too when ``folder``
    does not exist. ``model`` and ``opt`` are only changed when progress is returned.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    if not folder.exists():
        return None
    try:
        meta = json.loads((folder / PROGRESS_NAME).read_text())
        if meta.get("format_version") != FORMAT_VERSION or meta.get("fingerprint") != fp:
            note(f"discarding judge training progress in {folder}: it was made with another config or data")
            shutil.rmtree(folder, ignore_errors=True)
            return None
        model_state = load_file(str(folder / "model.safetensors"))
        tensors = load_file(str(folder / "optimizer.safetensors"))
    except (OSError, ValueError, KeyError) as e:  # JSONDecodeError is a ValueError
        note(f"discarding unreadable judge training progress in {folder}: {e}")
        shutil.rmtree(folder, ignore_errors=True)
        return None
    missing, unexpected = model.load_state_dict(model_state, strict=False)
    if unexpected or any("position_ids" not in k for k in missing):
        raise RuntimeError(f"{folder}: model state does not fit the judge (missing {missing}, unexpected {unexpected})")
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("state."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for key, v in meta["optimizer_scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})
    return TrainProgress(step=meta["step"], epoch=meta["epoch"], pos=meta["pos"],
                         epoch_rng_state=meta["epoch_rng_state"], ema_loss=meta["ema_loss"], ema_acc=meta["ema_acc"],
                         train_seconds=meta["train_seconds"], budget=meta["budget"], val_before=meta["val_before"],
                         torch_rng=tensors["torch_rng"])
