"""Locked, atomic builds of shared cache folders (converted models, tokenizers, tiny models, judges).

Several processes (tests, a training driver, ``nlhf judge train``) may ask for the same cache
folder at once, and any of them may be killed half-way. A folder ``out`` is therefore built by
:func:`build_once`:

1. if ``is_complete(out)`` already holds, it is returned without any locking;
2. an exclusive ``fcntl.flock`` on ``<parent>/.<name>.lock`` serialises the builders (the lock
   is released by the kernel when its holder dies, so a crash never leaves it held);
3. temporary folders of ``out`` left by dead processes are removed, and completeness is checked
   again (another process may have finished the build while this one waited);
4. the folder is built into ``<parent>/<name>.tmp<pid>-<random>``, fsynced, and moved into
   place: with Linux ``renameat2(RENAME_EXCHANGE)`` when ``out`` already exists (a reader sees
   the old or the new folder, never none), else with a plain ``rename``;
5. the temporary folder is removed on every exit path (errors and ``KeyboardInterrupt`` too).

The lock file stays (deleting it while another process waits on it would break the lock).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import secrets
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

_held = threading.local()  # .paths: lock files this thread holds (a nested build of one folder would deadlock)
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def lock_path(out: str | Path) -> Path:
    """The lock file guarding builds of ``out``: ``<parent>/.<name>.lock``."""
    out = Path(out)
    return out.parent / f".{out.name}.lock"


@contextlib.contextmanager
def build_lock(out: str | Path) -> Iterator[Path]:
    """Hold the exclusive build lock of ``out`` (blocking until it is free); yields the lock file.

    Creates ``out``'s parent folder if needed.

    Other threads of this process wait like other processes do (each call opens its own file
    description, and flock locks on different descriptions exclude each other).

    Raises:
        RuntimeError: this thread already holds the lock of ``out`` (a nested build of the same
            folder, which would otherwise wait for itself forever).
    """
    path = lock_path(out).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    held = _held.__dict__.setdefault("paths", set())
    if path in held:
        raise RuntimeError(f"nested build of {Path(out)}: this thread already holds {path}")
    held.add(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield path
        finally:
            os.close(fd)  # closing the descriptor releases the flock
    finally:
        held.discard(path)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def remove_stale_temps(out: str | Path) -> list[Path]:
    """Delete ``<name>.tmp<pid>[-*]`` and ``<name>.old<pid>[-*]`` siblings of ``out`` whose
    process ``pid`` is no longer alive (left by a crashed or killed build).

    Call it while holding :func:`build_lock` of ``out``. Folders of live processes are kept.

    Returns:
        the removed paths.
    """
    out = Path(out)
    if not out.parent.is_dir():
        return []
    pattern = re.compile(rf"^{re.escape(out.name)}\.(?:tmp|old)(\d+)(?:-.*)?$")
    removed = []
    for p in out.parent.iterdir():
        m = pattern.match(p.name)
        if m and not _pid_alive(int(m.group(1))):
            _remove(p)
            removed.append(p)
    return removed


@contextlib.contextmanager
def temp_dir(out: str | Path) -> Iterator[Path]:
    """A fresh empty folder ``<parent>/<name>.tmp<pid>-<random>`` next to ``out`` (same file
    system, so it can be renamed into place; mode from the umask, as ``out`` will keep it),
    removed on exit if it still exists."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = out.parent / f"{out.name}.tmp{os.getpid()}-{secrets.token_hex(4)}"
        try:
            tmp.mkdir()
            break
        except FileExistsError:
            continue
    try:
        yield tmp
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _fsync_path(path: Path, directory: bool) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every regular file and folder under ``root`` (and ``root``), so a rename that
    publishes the folder cannot be persisted before its contents."""
    root = Path(root)
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            if p.is_file() and not p.is_symlink():
                _fsync_path(p, directory=False)
        _fsync_path(Path(dirpath), directory=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, f"renameat2({a}, {b}, RENAME_EXCHANGE): {os.strerror(err)}")


def publish(tmp: str | Path, out: str | Path) -> Path:
    """Move the finished folder ``tmp`` to ``out`` (same parent folder), replacing any old ``out``.

    ``tmp``'s contents are fsynced first. An existing ``out`` is swapped atomically with
    ``tmp`` (renameat2 RENAME_EXCHANGE) and then deleted, so readers always find a folder at
    ``out``; where the file system lacks the exchange, ``out`` is renamed aside to
    ``<name>.old<pid>-*`` first (a window of microseconds without ``out``). Call it while
    holding :func:`build_lock` of ``out``.

    Returns:
        ``out`` as a Path.
    """
    tmp, out = Path(tmp), Path(out)
    fsync_tree(tmp)
    if out.exists() or out.is_symlink():
        if _exchange(tmp, out):
            _remove(tmp)  # tmp now holds the old folder
        else:
            old = Path(tempfile.mkdtemp(prefix=f"{out.name}.old{os.getpid()}-", dir=out.parent))
            os.rename(out, old / "x")
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)
    _fsync_path(out.parent, directory=True)
    return out


def build_once(out: str | Path, is_complete: Callable[[Path], bool], build: Callable[[Path], None],
               *, rebuild: bool = False) -> Path:
    """Return the folder ``out``, building it first (once, across processes) unless complete.

    Args:
        out: the folder to produce.
        is_complete: whether a folder holds a finished build (e.g. a marker file matches the
            wanted configuration); an existing ``out`` that fails it is rebuilt and replaced.
        build: writes the folder's contents into the empty folder it is given (a temporary
            sibling of ``out``); it must not touch ``out`` itself.
        rebuild: build even when ``out`` is complete (``nlhf judge train`` retraining a judge).
    Returns:
        ``out`` as a Path.
    Raises:
        RuntimeError: ``build`` returned but its folder fails ``is_complete``, or a nested
            build of the same ``out`` in this process.
        Any exception of ``build``: ``out`` is then left as it was and the temporary folder
            is removed.
    """
    out = Path(out)
    if not rebuild and is_complete(out):
        return out
    with build_lock(out):
        remove_stale_temps(out)
        if not rebuild and is_complete(out):
            return out
        with temp_dir(out) as tmp:
            build(tmp)
            if not is_complete(tmp):
                raise RuntimeError(f"building {out}: the build finished but its folder is incomplete")
            publish(tmp, out)
    return out
