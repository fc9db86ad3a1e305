"""Single-node weight transport (``sync.backend: file``): learner rank 0 writes the pool's weights
as one safetensors file in ``sync.dir`` (default ``<output_dir>/sync``), and every engine of the
pool reads it from the same node's disk.

Why a file rather than the object store on one machine: a ``ray.put`` payload is written into
Ray's shared-memory arena, and its pages stay mapped, and counted in the resident set, in the
learner that wrote it and in every engine that read it (1.5 GB each in the fp32 bench: the two
pools' live payloads and the one in flight). A file goes through the page cache: the writer
streams tensor by tensor (:func:`nlhf.sync.writer.write_safetensors_file`), and the reader
maps it only while it loads. The engine process opens the file itself, so the bytes do not pass
through the rollout actor and vLLM's RPC either.

Each pool keeps its newest file (the one a restarted engine is re-pushed from); once every engine
has loaded a new version, the previous one becomes the pool's spare (``{pool}-spare.safetensors``)
and older ones are deleted; the next write overwrites the spare in place instead of a new file
(:func:`nlhf.sync.writer.write_safetensors_file`, ``reuse``). Across nodes, use ``object_store`` or ``nccl``:
a reader that cannot see the file raises :class:`WeightFileMissingError`.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Iterator

import torch

SUFFIX = ".safetensors"


class WeightFileMissingError(FileNotFoundError):
    """A ``sync.backend: file`` payload is not on this node (an engine on another node than the
    learner, or the file was removed)."""


def _check_pool(pool: str) -> None:
    if not pool or os.sep in pool or (os.altsep and os.altsep in pool):
        raise ValueError(f"pool name must be a plain file name, got {pool!r}")


def weight_file_path(folder: str | Path, pool: str, version: int) -> Path:
    """Where learner rank 0 writes weight ``version`` of ``pool``: ``folder/{pool}-v{version:06d}.safetensors``.

    Raises:
        ValueError: an empty pool name, one with a path separator, or a version below 1.
    """
    _check_pool(pool)
    if int(version) < 1:
        raise ValueError(f"weight version must be >= 1, got {version}")
    return Path(folder) / f"{pool}-v{int(version):06d}{SUFFIX}"


def spare_weight_file_path(folder: str | Path, pool: str) -> Path:
    """The pool's spare weight file, an older version kept for the next write to overwrite in
    place: ``folder/{pool}-spare.safetensors``.

    Raises:
        ValueError: an empty pool name or one with a path separator.
    """
    _check_pool(pool)
    return Path(folder) / f"{pool}-spare{SUFFIX}"


def retire_weight_files(folder: str | Path, pool: str, keep: Path) -> int:
    """Once every engine of ``pool`` has loaded ``keep``: the newest older version becomes the
    pool's spare (:func:`spare_weight_file_path`, replacing an earlier spare), every other weight
    file of the pool but ``keep`` is deleted; returns how many files were deleted."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    spare = spare_weight_file_path(folder, pool)
    older = sorted(p for p in folder.glob(f"{pool}-v*{SUFFIX}") if p.name != Path(keep).name)
    if older:
        os.replace(older[-1], spare)
    return remove_stale_weight_files(folder, pool, keep=Path(keep), spare=False)


def remove_stale_weight_files(folder: str | Path, pool: str, keep: Path | None = None, *, spare: bool = True) -> int:
    """Delete the weight files of ``pool`` in ``folder`` other than ``keep`` (older versions, or a
    leftover ``.tmp`` of an interrupted write; all of them when ``keep`` is None), and the pool's
    spare unless ``spare=False``; returns how many were removed (a file already gone is skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    n = 0
    found = list(folder.glob(f"{pool}-v*{SUFFIX}*"))
    if spare:
        found += [p for p in [spare_weight_file_path(folder, pool)] if p.exists()]
    for p in found:
        if keep is not None and p.name == Path(keep).name:
            continue
        try:
            p.unlink()
            n += 1
        except FileNotFoundError:
            pass
    return n


def _check(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise WeightFileMissingError(
            f"sync.backend 'file': weight file {path} is not on this node ({socket.gethostname()}); "
            "this backend needs every rollout worker on learner rank 0's node (use sync.backend: "
            "object_store across nodes, or nccl on GPUs)")
    return path


def iter_weight_file(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` of a weight file one tensor at a time (memory-mapped, CPU);
    tied-weight aliases are not in the file (the engine ties them itself).

    Raises:
        WeightFileMissingError: ``path`` does not exist here.
        safetensors.SafetensorError: not a safetensors file.
    """
    from safetensors import safe_open

    with safe_open(str(_check(path)), framework="pt", device="cpu") as f:
        for name in f.keys():
            yield name, f.get_tensor(name)


def read_weight_file(path: str | Path) -> bytes:
    """The whole weight file as bytes (the same payload the object store carries).

    Raises:
        WeightFileMissingError: ``path`` does not exist here.
    """
    return _check(path).read_bytes()


def weight_file_size(path: str | Path) -> int:
    """Size in bytes of a weight file.

    Raises:
        WeightFileMissingError: ``path`` does not exist here.
    """
    return _check(path).stat().st_size
