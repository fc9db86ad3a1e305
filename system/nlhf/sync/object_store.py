"""CPU weight transport: the learner packs its state dict into safetensors bytes, the driver
``ray.put``s them once, and every rollout worker of a pool loads them (``update_weights``).

Bytes rather than a dict of tensors because vLLM's ``collective_rpc`` cannot pickle tensor
memoryviews in multiprocess mode, and one immutable blob is what the object store shares best.

Tied weights (names sharing storage, e.g. ``lm_head.weight`` and ``model.embed_tokens.weight``)
are stored once; the other names are recorded as aliases in the safetensors metadata and
restored by :func:`unpack` as the same tensor.
"""

from __future__ import annotations

import json
from typing import Mapping

import torch

ALIASES_KEY = "nlhf_aliases"


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device.type, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def pack_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bytes:
    """Serialise ``state_dict`` to safetensors bytes.

    Every tensor is detached, moved to CPU and made contiguous. Names that alias another
    tensor exactly (same storage, offset, shape, stride and dtype) are stored once and listed
    under the ``nlhf_aliases`` metadata key as ``{alias: stored name}``. Tensors that only
    partially overlap another's storage are cloned.

    Args:
        state_dict: name -> tensor (any device, any dtype safetensors supports).

    Returns:
        The safetensors file contents (bytes); size ~ total parameter bytes.

    Raises:
        ValueError: an empty state dict or a non-tensor value.
    """
    from safetensors.torch import save

    if not state_dict:
        raise ValueError("cannot pack an empty state dict")
    seen: dict[tuple, str] = {}
    storages: set[tuple] = set()
    aliases: dict[str, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"state dict entry {name!r} is a {type(t).__name__}, not a tensor")
        key = _storage_key(t)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        storage = (t.device.type, t.untyped_storage().data_ptr())
        t = t.detach().to("cpu")
        # safetensors refuses tensors sharing memory: give partial overlaps their own copy
        t = t.clone() if storage in storages or not t.is_contiguous() else t
        storages.add(storage)
        tensors[name] = t.contiguous()
    metadata = {ALIASES_KEY: json.dumps(aliases)} if aliases else None
    return save(tensors, metadata=metadata)


def aliases_of(payload: bytes) -> dict[str, str]:
    """``{alias: stored name}`` recorded in ``payload`` by :func:`pack_state_dict` ({} if none)."""
    n = int.from_bytes(payload[:8], "little")
    header = json.loads(payload[8:8 + n])
    meta = header.get("__metadata__") or {}
    return json.loads(meta.get(ALIASES_KEY, "{}"))


def unpack(payload: bytes, *, with_aliases: bool = True) -> dict[str, torch.Tensor]:
    """Inverse of :func:`pack_state_dict`: name -> CPU tensor.

    Args:
        payload: safetensors bytes.
        with_aliases: also return the tied names (as the very same tensor object as their
            target); False returns only the tensors actually stored.

    Raises:
        safetensors.SafetensorError: ``payload`` is not a safetensors blob.
    """
    from safetensors.torch import load

    out = load(payload)
    if with_aliases:
        for alias, target in aliases_of(payload).items():
            out[alias] = out[target]
    return out
