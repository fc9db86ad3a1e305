"""nlhf.telemetry.memory: the private / shared split of an actor's peak RSS."""

from __future__ import annotations

import sys
import time
from multiprocessing import shared_memory

import pytest

from nlhf.telemetry.memory import MemoryWatch, read_status_kb

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")

MB = 1024**2
GIB = 1024**3


def _touch(buf, size: int) -> None:
    view = memoryview(buf)
    for off in range(0, size, 4096):  # one write per page makes it resident
        view[off] = 1


def test_private_peak_keeps_a_freed_allocation_and_shared_memory_is_counted_apart() -> None:
    watch = MemoryWatch(interval_s=0.02)
    try:
        base = watch.peaks()
        # 256 MiB of private memory, resident for a while, then freed
        block = bytearray(256 * MB)
        _touch(block, len(block))
        time.sleep(0.2)
        del block
        after_private = watch.peaks()
        assert after_private["peak_private_gb"] - base["peak_private_gb"] >= 0.9 * 256 * MB / GIB
        assert read_status_kb()["RssAnon"] * 1024 < after_private["peak_private_gb"] * GIB - 128 * MB  # freed, peak kept
        assert after_private["peak_shared_gb"] - base["peak_shared_gb"] < 32 * MB / GIB

        # 128 MiB of shared memory (a /dev/shm segment, as Ray's object store is): shared, not private
        seg = shared_memory.SharedMemory(create=True, size=128 * MB)
        try:
            _touch(seg.buf, seg.size)
            time.sleep(0.2)
            after_shared = watch.peaks()
        finally:
            seg.close()
            seg.unlink()
        assert after_shared["peak_shared_gb"] - base["peak_shared_gb"] >= 0.9 * 128 * MB / GIB
        assert after_shared["peak_private_gb"] - after_private["peak_private_gb"] < 32 * MB / GIB
        assert after_shared["peak_rss_gb"] >= after_shared["peak_private_gb"] - 1e-3
    finally:
        watch.close()


def test_bad_interval_is_refused() -> None:
    with pytest.raises(ValueError, match="interval_s must be > 0, got 0"):
        MemoryWatch(interval_s=0)
