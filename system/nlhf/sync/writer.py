"""Streaming safetensors writers for the learner's weight export (object-store bytes and
``sync.backend: file``): tensors are cast and written one at a time, so the export costs one
cast tensor of memory beyond the output (``safetensors.torch.save`` peaked at twice the payload).
The output is the standard format; ``safetensors.torch.load`` / ``safe_open`` read it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def write_safetensors(named, stream, *, cast_to: torch.dtype | None = None,
                      metadata: dict[str, str] | None = None) -> int:
    """Write ``(name, tensor)`` pairs to the binary ``stream`` in the safetensors format (8-byte
    little-endian header length, JSON header with dtype / shape / data offsets, space-padded to
    8 bytes, then the raw little-endian data), floating-point tensors cast to ``cast_to`` one at a
    time, so the only extra memory is one cast tensor. ``safetensors.torch.load`` /
    ``safe_open`` read the result.

    ``named``: a list of pairs, or a callable returning a fresh iterator of the same pairs each
    time (called twice: header, then data), so tensors made on the fly (LoRA's merged weights)
    are alive one at a time.

    Returns:
        The number of bytes written.

    Raises:
        ValueError: a duplicate name or a dtype safetensors has no code for.
    """
    import struct

    pairs = named if callable(named) else (lambda: iter(named))
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, t in pairs():
        dt = cast_to if (cast_to is not None and t.is_floating_point()) else t.dtype
        if dt not in _ST_DTYPES:
            raise ValueError(f"tensor {name!r}: dtype {dt} has no safetensors code")
        if name in header:
            raise ValueError(f"duplicate tensor name {name!r}")
        size = t.numel() * torch.empty((), dtype=dt).element_size()
        header[name] = {"dtype": _ST_DTYPES[dt], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    stream.write(struct.pack("<Q", len(head)))
    stream.write(head)
    for _, t in pairs():
        t = t.detach()
        if cast_to is not None and t.is_floating_point() and t.dtype != cast_to:
            t = t.to(device="cpu", dtype=cast_to)
        t = t.to("cpu").contiguous()
        if t.numel():
            stream.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return 8 + len(head) + offset


def safetensors_bytes(named, *, cast_to: torch.dtype | None = None,
                      metadata: dict[str, str] | None = None) -> bytes:
    """:func:`write_safetensors` into one growing buffer whose bytes are returned without a
    further copy.

    Raises:
        ValueError: as :func:`write_safetensors`.
    """
    import io

    buf = io.BytesIO()
    size = write_safetensors(named, buf, cast_to=cast_to, metadata=metadata)
    out = buf.getvalue()  # CPython hands over its internal bytes object (no copy)
    if len(out) != size:
        raise RuntimeError("safetensors_bytes: payload size mismatch")
    return out


def write_safetensors_file(path: str | Path, named, *, cast_to: torch.dtype | None = None,
                           metadata: dict[str, str] | None = None, reuse: str | Path | None = None) -> int:
    """:func:`write_safetensors` into the file ``path``, atomically: written as ``path.tmp`` in
    the same folder (created if missing), flushed, then renamed over ``path``, so a reader sees
    the old file or the whole new one. The data goes through the page cache, not this process's
    memory.

    ``reuse``: a file in the same folder that is no longer needed (a spare of an older version,
    :func:`nlhf.sync.files.retire_weight_files`). Where it exists it becomes ``path.tmp`` and is
    overwritten in place (then cut to the new size), so the write lands on page-cache pages the
    file already owns: measured on the 2-core VM, 0.07-0.10 s for SmolLM2-135M's 538 MB of fp32
    against 1.1-1.3 s for a new file, whose fresh pages the kernel (and the hypervisor) must
    supply one fault at a time. The bytes written are the same either way.

    Returns:
        The file size in bytes.

    Raises:
        ValueError: as :func:`write_safetensors`. OSError: the folder cannot be written.
    """
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        recycled = False
        if reuse is not None and Path(reuse) != path:
            try:
                os.replace(reuse, tmp)
                recycled = True
            except FileNotFoundError:
                pass
        with open(tmp, "r+b" if recycled else "wb") as f:
            size = write_safetensors(named, f, cast_to=cast_to, metadata=metadata)
            f.truncate()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return size
