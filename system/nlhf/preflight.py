"""Start-up checks that need the cluster: do the GPUs Ray hands out work?

Ray schedules by declared resources (``ray start --num-gpus=8`` on a node without CUDA, or a
broken driver, still places GPU actors), so an actor that needs CUDA would otherwise fail deep
inside DeepSpeed or vLLM. :func:`check_gpu_roles` runs one tiny task per GPU role, with that
role's GPU request, before any GPU actor starts, and stops the run with one line naming the
field when torch sees no CUDA device there.
"""

from __future__ import annotations

import os
from typing import Any

from nlhf.config import ConfigError, TrainConfig


class GPUUnavailableError(ConfigError):
    """A role asks for GPUs (``learner.num_gpus``, ``rollout.num_gpus``) that torch cannot use on
    the node Ray placed it on. Raised before the first GPU actor starts."""


def _probe() -> dict[str, Any]:
    """Runs inside a Ray task holding the role's GPUs: what torch sees there."""
    import ray
    import torch

    return {"node_ip": ray.util.get_node_ip_address(), "cuda": bool(torch.cuda.is_available()),
            "devices": int(torch.cuda.device_count()) if torch.cuda.is_available() else 0,
            "visible": os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)"), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda}


def gpu_roles(cfg: TrainConfig) -> list[tuple[str, float]]:
    """(field, GPUs per actor) of every actor role that needs CUDA: learners and rollout engines."""
    r = cfg.rollout
    roles = [("learner.num_gpus", cfg.learner.num_gpus), ("rollout.num_gpus", r.num_gpus * r.tensor_parallel_size)]
    return [(field, gpus) for field, gpus in roles if gpus > 0]


def check_gpu_roles(cfg: TrainConfig, timeout_s: float = 300.0) -> list[dict[str, Any]]:
    """For each GPU role, one task with that role's GPU request checks that torch sees CUDA.

    Assumes ``ray.init`` was done. Returns the probes' reports (empty on a CPU-only config).

    Raises:
        GPUUnavailableError: torch sees no CUDA device in the task (message: field, node,
            ``CUDA_VISIBLE_DEVICES``, torch build), or no node could take the task within
            ``timeout_s`` seconds.
    """
    import ray

    reports = []
    for field, gpus in gpu_roles(cfg):
        ref = ray.remote(num_cpus=0, num_gpus=gpus)(_probe).remote()
        done, _ = ray.wait([ref], timeout=timeout_s)
        if not done:
            ray.cancel(ref, force=True)
            raise GPUUnavailableError(f"{field}: no node took a task with num_gpus={gpus:g} within {timeout_s:g}s "
                                      f"(cluster GPUs: {ray.cluster_resources().get('GPU', 0):g})")
        rep = ray.get(ref)
        if not rep["cuda"]:
            raise GPUUnavailableError(
                f"{field}: {gpus:g} GPU(s) per actor, but on node {rep['node_ip']} (CUDA_VISIBLE_DEVICES="
                f"{rep['visible']}) torch {rep['torch']} sees no CUDA device (torch.cuda.is_available() is False"
                f"{'; a CPU-only build' if rep['torch_cuda'] is None else ''}): stopping before the first GPU actor")
        reports.append({"field": field, **rep})
    return reports
