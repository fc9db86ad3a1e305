"""`dtype: auto` / `precision: auto` read native bf16 as torch may use it (issue 8.5): a CPU whose
bf16 instructions torch is told not to use (oneDNN's or ATen's ISA capped at AVX2, which is how an
AVX2-only machine looks to torch) gets fp32, not the ~40x slower emulated bf16."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from nlhf import hardware


def _raw_native() -> bool:
    cpu = torch.cpu
    return any(bool(getattr(cpu, n)()) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported") if hasattr(cpu, n))


def test_uncapped_cpu_reports_its_instructions(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    want = _raw_native() and torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    assert hardware.cpu_has_native_bf16() is want
    assert hardware.resolve_dtype("auto", gpu=False) == ("bfloat16" if want else "float32")


@pytest.mark.parametrize("var", ["ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"])
def test_onednn_capped_below_bf16_means_fp32(monkeypatch, var):
    monkeypatch.setenv(var, "avx2")
    assert hardware.cpu_has_native_bf16() is False
    assert hardware.resolve_dtype("auto", gpu=False) == "float32"
    assert hardware.resolve_precision("auto", gpu=False) == "fp32"


def test_aten_capability_capped_at_avx2_means_fp32():
    """ATEN_CPU_CAPABILITY is read when torch starts, so the check runs in a fresh interpreter."""
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")}
    env["ATEN_CPU_CAPABILITY"] = "avx2"
    code = ("import torch; from nlhf import hardware; "
            "print(torch.backends.cpu.get_cpu_capability(), hardware.cpu_has_native_bf16())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out == ["AVX2", "False"]


# A step's worth of large buffers freed and re-allocated, as a training step does; prints the
# minor page faults of the last 5 rounds.
_FAULTS = """
import resource, sys, torch
from nlhf.hardware import retain_freed_memory
if sys.argv[1] == "1":
    assert retain_freed_memory()
def round_():
    xs = [torch.ones(10 * 2**20 + i * 2**18) for i in range(4)]  # 40-43 MiB each (above glibc's mmap threshold), touched
    return sum(float(x[-1]) for x in xs)
round_()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    round_()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_retained_freed_memory_is_reused_without_page_faults():
    def faults(retain: str) -> int:
        out = subprocess.run([sys.executable, "-c", _FAULTS, retain], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])

    default, retained = faults("0"), faults("1")
    # 5 rounds x 167 MiB of fresh pages by default (~215,000 faults of 4 KiB); retained, the heap's
    # own pages come back (measured ~40,000: 6x fewer)
    assert default > 150_000, default
    assert retained < default / 3, (default, retained)
