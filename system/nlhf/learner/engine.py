"""DeepSpeed settings of the learner's policy engine, and process-level memory settings."""

from __future__ import annotations

import math

from nlhf.config import TrainConfig


def return_freed_memory_to_the_os() -> bool:
    """glibc only: serve every allocation of >= 128 KiB with its own mmap, returned to the OS on
    free. Setting ``M_MMAP_THRESHOLD`` explicitly turns off glibc's dynamic threshold, which
    otherwise rises to the largest block freed so far (up to 32 MiB), after which freed
    activations and gradients stay resident on the heap. Measured on SmolLM2-135M fp32, one
    forward+backward of 4 x 128 tokens: 0.33 GB stayed resident without it, 0.01 GB with it,
    and the peak was 0.2 GB lower. Returns whether it was applied."""
    import ctypes

    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def clips_itself(cfg: TrainConfig) -> bool:
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
        "gradient_clipping": 0.0 if clips_itself(cfg) else float(lc.optimizer.grad_clip or 0.0),
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
