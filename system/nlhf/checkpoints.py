"""Atomic checkpoints of a run and the run folder's lock.

A checkpoint ``output_dir/checkpoints/<name>/`` (``iter_00004``, ``final``) holds:

- the policy as an HF folder (``config.json``, ``model.safetensors``, generation config,
  tokenizer): load it with transformers or ``vllm serve``;
- ``trainer/``: the learner's trainer state (optimiser, EMA anchor, RNG; safetensors + JSON);
- ``run_state.json``: the driver's :class:`nlhf.run_state.RunState`;
- ``manifest.json``, written last: the iteration and every file with its size.

It is written into ``checkpoints/.tmp-<name>-<pid>/`` and renamed into place only once the
manifest is there, so a crash mid-save never leaves a folder that looks complete: a folder
counts as a checkpoint only if its manifest exists and every file it lists has its size.
``final/`` is replaced the same way (the old one is moved aside, then deleted).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

MANIFEST = "manifest.json"
TRAINER_DIR = "trainer"
LOCK_FILE = ".nlhf.lock"


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint folder and the iteration it holds (iterations completed)."""

    path: Path
    iteration: int


def _manifest_files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def is_complete(folder: Path) -> Checkpoint | None:
    """The :class:`Checkpoint` in ``folder`` if its manifest is there and every listed file has its
    recorded size; None otherwise (incomplete, torn or not a checkpoint)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        for rel, size in manifest["files"].items():
            if (folder / rel).stat().st_size != int(size):
                return None
        return Checkpoint(folder, int(manifest["iteration"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_checkpoint(root: Path, name: str, iteration: int, fill: Callable[[Path], None]) -> Checkpoint:
    """Write checkpoint ``root/name`` atomically.

    ``fill(tmp)`` writes the contents into a temporary folder (the learner's HF folder and
    trainer state, the run state); then the manifest is written and fsynced, and the folder
    renamed into place, replacing an older folder of that name.

    Raises:
        whatever ``fill`` raises (the temporary folder is removed first).
    """
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fill(tmp)
        files = _manifest_files(tmp)
        _fsync_tree(tmp)
        (tmp / MANIFEST).write_text(json.dumps({"iteration": iteration, "time": time.time(), "files": files}, indent=1))
        with open(tmp / MANIFEST, "rb") as f:
            os.fsync(f.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    dest = root / name
    old = None
    if dest.exists():
        old = root / f".old-{name}-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        dest.rename(old)
    tmp.rename(dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return Checkpoint(dest, iteration)


def list_checkpoints(root: Path) -> list[Checkpoint]:
    """Complete checkpoints under ``root`` (``iter_*`` and ``final``), oldest iteration first."""
    if not root.is_dir():
        return []
    found = [c for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
             for c in [is_complete(p)] if c is not None]
    return sorted(found, key=lambda c: (c.iteration, c.path.name == "final"))


def latest_checkpoint(root: Path) -> Checkpoint | None:
    """The complete checkpoint with the most iterations (``final`` wins a tie), or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def prune(root: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete ``iter_*`` checkpoints, and leftover
    temporary folders of this process's crashed saves. ``final`` is never pruned. Returns what was removed."""
    iters = [c for c in list_checkpoints(root) if c.path.name.startswith("iter_")]
    removed = [c.path for c in iters[:-keep_last]] if keep_last > 0 else []
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def clean_partial(root: Path) -> list[Path]:
    """Remove temporary and half-replaced folders left by interrupted saves (``.tmp-*``, ``.old-*``)
    and ``iter_*`` folders without a complete manifest. Returns what was removed."""
    if not root.is_dir():
        return []
    removed = []
    for p in root.iterdir():
        if p.is_dir() and (p.name.startswith((".tmp-", ".old-")) or is_complete(p) is None):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


class RunFolderLock:
    """An exclusive ``flock`` on ``output_dir/.nlhf.lock`` for the life of a run, so two runs
    cannot share a run folder. The lock dies with the process (no stale locks after a crash).

    Raises:
        ConfigError: another process holds the lock (its pid is named when known).
    """

    def __init__(self, output_dir: Path) -> None:
        self.path = Path(output_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "RunFolderLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            from nlhf.config import ConfigError

            raise ConfigError(f"output_dir: {self.path.parent} is in use by another nlhf run (pid {holder})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None
