"""What the hardware does fast: native bf16 or not, and the CPU capability quoted next to figures.

On CPUs without native bf16 (AVX2-only machines) a torch bf16 matmul was measured 46x slower
than fp32 (../shared/docs/platform-notes.md), so ``dtype: auto`` means bf16 only where the
hardware has it natively: CUDA compute capability >= 8.0, or a CPU with AVX512_BF16 or AMX.
"""

from __future__ import annotations

import sys
from typing import Literal

Dtype = Literal["float32", "bfloat16"]


def cpu_capability() -> str:
    """``torch.backends.cpu.get_cpu_capability()`` (e.g. ``AVX512``, ``AVX2``), for benchmark records."""
    import torch

    return str(torch.backends.cpu.get_cpu_capability())


# oneDNN ISA caps (``ONEDNN_MAX_CPU_ISA``) below AVX512_CORE_BF16: bf16 matmuls fall back to
# emulation (measured on an AVX512_BF16 CPU with ONEDNN_MAX_CPU_ISA=AVX2: 51 ms against 0.29 ms
# for a 64x576 @ 576x1536 bf16 matmul, fp32 1.2 ms either way)
_ONEDNN_NO_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512_BF16 or AMX tiles) *and* torch may use it.

    The instructions being present is not enough: ``ONEDNN_MAX_CPU_ISA`` capped below
    ``AVX512_CORE_BF16`` makes torch's bf16 matmuls emulated (~40x slower than fp32), and
    ``ATEN_CPU_CAPABILITY`` below AVX512 (``torch.backends.cpu.get_cpu_capability()`` then reads
    ``AVX2`` or ``DEFAULT``) keeps ATen's kernels off AVX-512. Either cap reads as no native bf16,
    as on an AVX2-only machine.
    """
    import os

    import torch

    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "")).strip().upper()
    if isa in _ONEDNN_NO_BF16 or not cpu_capability().upper().startswith("AVX512"):
        return False
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name)()) for name in checks if hasattr(cpu, name))


def cuda_has_native_bf16(device: int = 0) -> bool:
    """True when CUDA device ``device`` has compute capability >= 8.0 (Ampere or newer)."""
    import torch

    if not torch.cuda.is_available():
        return False
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def resolve_dtype(dtype: str, *, gpu: bool) -> Dtype:
    """The concrete dtype for a config's ``dtype`` (``auto``, ``float32`` or ``bfloat16``).

    ``auto`` gives ``bfloat16`` where the device has native bf16 (``gpu``: the CUDA device;
    otherwise the CPU), ``float32`` elsewhere. Explicit values are returned unchanged.

    Raises:
        ValueError: an unknown dtype name.
    """
    if dtype in ("float32", "bfloat16"):
        return dtype  # type: ignore[return-value]
    if dtype != "auto":
        raise ValueError(f"dtype must be 'auto', 'float32' or 'bfloat16', got {dtype!r}")
    native = cuda_has_native_bf16() if gpu else cpu_has_native_bf16()
    return "bfloat16" if native else "float32"


def resolve_precision(precision: str, *, gpu: bool) -> Literal["fp32", "bf16"]:
    """The concrete learner precision for ``learner.precision`` (``auto``, ``fp32`` or ``bf16``).

    ``auto`` gives ``bf16`` where the device computes bf16 natively (as :func:`resolve_dtype`):
    on this project's AVX512_BF16 CPU a SmolLM2-135M forward+backward of 4x112 tokens took
    1.0 s in bf16 against 2.9 s in fp32, on an AVX2-only CPU bf16 matmuls are ~46x slower.

    Raises:
        ValueError: an unknown precision name.
    """
    dtypes = {"auto": "auto", "fp32": "float32", "bf16": "bfloat16"}
    if precision not in dtypes:
        raise ValueError(f"learner.precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
    return "bf16" if resolve_dtype(dtypes[precision], gpu=gpu) == "bfloat16" else "fp32"


def describe() -> dict[str, object]:
    """Machine facts recorded next to every figure: CPU capability, native bf16, CUDA devices."""
    import os
    import platform

    import torch

    info: dict[str, object] = {
        "cpu_capability": cpu_capability(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    if torch.cuda.is_available():
        info["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def retain_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in this process instead of handing it back to the
    kernel: ``mallopt(M_MMAP_MAX, 0)`` (large blocks come from the heap, not from ``mmap``,
    so freeing them is not a ``munmap``) and ``mallopt(M_TRIM_THRESHOLD, INT_MAX)`` (the heap's
    free top is never trimmed). A training step frees and re-allocates the same activation and
    gradient buffers every micro-batch; by default each of those re-allocations comes back as
    fresh pages, one minor fault per 4 KiB page (~200,000 faults per SmolLM2-135M fp32
    forward+backward of 4 x 112 tokens on the 2-core VM, 0.5-0.9 s of kernel time). Measured
    there (CPU capability AVX512, one process, 4 steps each): fp32 2.51-2.97 -> 2.25-2.33 s per
    step, bf16 0.85 -> 0.77 s; peak RSS +0.3 GB (2.62 -> 2.93 GB, memory no longer returned
    between steps). Call it before the model is built; affects this process only.

    Returns:
        True where it took effect (Linux with glibc), False elsewhere (no glibc: nothing changes).
    """
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
