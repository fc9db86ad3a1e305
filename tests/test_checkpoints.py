"""Atomic checkpoints (nlhf.checkpoints): a failure in the middle of a save, an exception or a
killed process, never leaves a folder that looks complete, and resume picks the newest
complete checkpoint only."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nlhf.checkpoints import clean_partial, is_complete, latest_checkpoint, list_checkpoints, prune, write_checkpoint


def _fill(payload: bytes):
    def fill(tmp: Path) -> None:
        (tmp / "config.json").write_text("{}")
        (tmp / "trainer").mkdir()
        (tmp / "trainer" / "optimizer.safetensors").write_bytes(payload)
    return fill


def _failing_fill(tmp: Path) -> None:
    (tmp / "config.json").write_text("{}")
    raise RuntimeError("disk full")


def test_an_exception_mid_save_leaves_nothing_that_looks_complete(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    write_checkpoint(root, "iter_00002", 2, _fill(b"a" * 100))
    with pytest.raises(RuntimeError, match="disk full"):
        write_checkpoint(root, "iter_00004", 4, _failing_fill)
    assert sorted(p.name for p in root.iterdir()) == ["iter_00002"]  # no iter_00004, no temp folder
    assert latest_checkpoint(root).iteration == 2


def test_a_failed_replacement_of_final_keeps_the_old_final(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    write_checkpoint(root, "final", 6, _fill(b"old"))
    with pytest.raises(RuntimeError):
        write_checkpoint(root, "final", 8, _failing_fill)
    final = is_complete(root / "final")
    assert final is not None and final.iteration == 6
    assert (root / "final" / "trainer" / "optimizer.safetensors").read_bytes() == b"old"
    write_checkpoint(root, "final", 8, _fill(b"new"))
    assert is_complete(root / "final").iteration == 8
    assert (root / "final" / "trainer" / "optimizer.safetensors").read_bytes() == b"new"
    assert sorted(p.name for p in root.iterdir()) == ["final"]


def test_a_process_killed_mid_save_leaves_only_a_temporary_folder(tmp_path: Path) -> None:
    """The saving process dies (os._exit, as under SIGKILL) after writing half the files."""
    root = tmp_path / "checkpoints"
    write_checkpoint(root, "iter_00002", 2, _fill(b"a" * 10))
    code = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from nlhf.checkpoints import write_checkpoint\n"
        "def fill(tmp):\n"
        "    (tmp / 'config.json').write_text('{}')\n"
        "    os._exit(9)\n"
        f"write_checkpoint(Path({str(root)!r}), 'iter_00004', 4, fill)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ), capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    leftovers = [p.name for p in root.iterdir() if p.name != "iter_00002"]
    assert leftovers and all(name.startswith(".tmp-iter_00004") for name in leftovers)
    assert [c.iteration for c in list_checkpoints(root)] == [2]  # resume ignores the half-written save
    assert latest_checkpoint(root).path.name == "iter_00002"
    removed = clean_partial(root)
    assert [p.name for p in removed] == leftovers
    assert sorted(p.name for p in root.iterdir()) == ["iter_00002"]


def test_a_torn_file_or_missing_manifest_is_not_a_checkpoint(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    ckpt = write_checkpoint(root, "iter_00004", 4, _fill(b"x" * 64))
    assert is_complete(ckpt.path) is not None
    blob = ckpt.path / "trainer" / "optimizer.safetensors"
    blob.write_bytes(b"x" * 10)  # truncated after the manifest was written
    assert is_complete(ckpt.path) is None
    assert latest_checkpoint(root) is None
    (root / "iter_00006").mkdir()  # a folder without a manifest
    (root / "iter_00006" / "config.json").write_text("{}")
    assert latest_checkpoint(root) is None
    assert {p.name for p in clean_partial(root)} == {"iter_00004", "iter_00006"}


def test_prune_keeps_the_newest_and_final(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    for it in (2, 4, 6, 8):
        write_checkpoint(root, f"iter_{it:05d}", it, _fill(b"w"))
    write_checkpoint(root, "final", 8, _fill(b"w"))
    removed = prune(root, keep_last=2)
    assert sorted(p.name for p in removed) == ["iter_00002", "iter_00004"]
    assert sorted(p.name for p in root.iterdir()) == ["final", "iter_00006", "iter_00008"]
    assert latest_checkpoint(root).path.name == "final"  # final wins the tie at iteration 8


@pytest.mark.parametrize("resume, overwrite", [(True, False), (False, True)])
def test_a_run_refused_for_a_held_folder_deletes_nothing_of_it(tmp_path: Path, resume: bool, overwrite: bool) -> None:
    """A second ``nlhf train`` into a folder another run holds is refused before it touches the
    folder: ``--resume`` used to clean the holder's checkpoint being written (``.tmp-*``) first, and
    ``--overwrite`` to delete the holder's files, before the lock said no."""
    from types import SimpleNamespace

    from nlhf.checkpoints import RunFolderLock
    from nlhf.config import ConfigError
    from nlhf.session import prepare_run_folder

    out = tmp_path / "run"
    root = out / "checkpoints"
    write_checkpoint(root, "iter_00002", 2, _fill(b"a" * 10))
    being_written = root / ".tmp-iter_00004-12345"
    being_written.mkdir()
    (being_written / "config.json").write_text("{}")
    (out / "metrics.jsonl").write_text('{"iteration": 1}\n')
    holder = RunFolderLock(out).acquire()
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    try:
        cfg = SimpleNamespace(output_dir=str(out), resume=resume)
        with pytest.raises(ConfigError, match="in use by another nlhf run"):
            prepare_run_folder(cfg, RunFolderLock(out), overwrite=overwrite)
        assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    finally:
        holder.release()
    # once the folder is free, the same call resumes (cleaning the stale partial) or overwrites
    lock = RunFolderLock(out)
    got = prepare_run_folder(SimpleNamespace(output_dir=str(out), resume=resume), lock, overwrite=overwrite)
    lock.release()
    assert not being_written.exists()
    assert (got.iteration == 2) if resume else (got is None and not root.exists())


def test_a_refused_resume_into_a_new_folder_leaves_no_folder(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from nlhf.checkpoints import RunFolderLock
    from nlhf.config import ConfigError
    from nlhf.session import prepare_run_folder

    out = tmp_path / "new-run"
    with pytest.raises(ConfigError, match="resume: .* no complete checkpoint"):
        prepare_run_folder(SimpleNamespace(output_dir=str(out), resume=True), RunFolderLock(out), overwrite=False)
    assert not out.exists()
