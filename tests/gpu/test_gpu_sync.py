"""GPU smoke test of ``sync.backend: nccl``: a DeepSpeed learner on CUDA pushes its weights into a
vLLM engine through vLLM's weight-transfer API (:mod:`nlhf.sync.weight_transfer`), and the
engine's greedy output equals the learner's greedy output before and after a learner step, with
the weight version set on every push.

Needs: 2 CUDA devices (NCCL refuses two ranks of one group on the same GPU: the learner takes the
first, the engine runs in a child process on the second), vLLM (CUDA build) and DeepSpeed.
Skipped otherwise, with the reason printed. Run it in its own pytest call (the CPU tests pin
DeepSpeed's accelerator to CPU for the whole process)::

    PYTHONPATH=$PWD/system python -m pytest -q -s tests/gpu/test_gpu_sync.py
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch


def _why_skip() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    if torch.cuda.device_count() < 2:
        return (f"{torch.cuda.device_count()} CUDA device: NCCL needs the learner and the engine on different GPUs "
                "(2 needed)")
    try:
        import vllm  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"vllm is not importable ({type(e).__name__}: {e})"
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed"
    os.environ["DS_ACCELERATOR"] = "cuda"  # before DeepSpeed is imported (tests/_learner_util defaults to cpu)
    return None


REASON = _why_skip()
if REASON is not None:
    print(f"\ntests/gpu/test_gpu_sync.py skipped: {REASON}")
    pytest.skip(REASON, allow_module_level=True)

from _learner_util import PREF, free_port, make_cfg, make_rollouts  # noqa: E402

from nlhf.batch import StepBatch  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["What is the capital of France?", "Write a haiku about rain.", "List three prime numbers."]
NEW_TOKENS = 8

SERVER = r"""
import json, sys
from multiprocessing.connection import Listener
from nlhf.config import RolloutConfig
from nlhf.rollout.worker import RolloutWorker

port, key, model, cache, cfg = int(sys.argv[1]), sys.argv[2].encode(), sys.argv[3], sys.argv[4], sys.argv[5]
with Listener(("127.0.0.1", port), authkey=key) as listener, listener.accept() as conn:
    try:
        worker = RolloutWorker(model, RolloutConfig(**json.loads(cfg)), pool="current", dtype="float32",
                               weight_transfer="nccl", cache_dir=cache)
    except BaseException as e:
        conn.send(("err", f"{type(e).__name__}: {e}"))
        raise
    conn.send(("ok", None))
    while True:
        name, args, kwargs = conn.recv()
        if name is None:
            break
        try:
            conn.send(("ok", getattr(worker, name)(*args, **kwargs)))
        except BaseException as e:
            conn.send(("err", f"{type(e).__name__}: {e}"))
    worker.shutdown()
"""


class EngineProcess:
    """A RolloutWorker (vLLM engine, ``weight_transfer="nccl"``) in a child process on the second
    GPU; its methods are called over a pipe (a plain object for :class:`PoolClient`)."""

    def __init__(self, model_dir: Path, cache_dir: Path, rollout: dict) -> None:
        from multiprocessing.connection import Client

        gpus = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(str(i) for i in range(torch.cuda.device_count())))
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpus.split(",")[1], PYTHONPATH=str(REPO / "system"))
        port, key = free_port(), secrets.token_hex(16)
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, str(port), key, str(model_dir), str(cache_dir),
                                      json.dumps(rollout)], env=env)
        deadline = time.monotonic() + 120
        while True:
            try:
                self.conn = Client(("127.0.0.1", port), authkey=key.encode())
                break
            except ConnectionRefusedError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"engine process did not start (exit {self.proc.poll()})") from None
                time.sleep(0.5)
        self.lock = threading.Lock()
        if not self.conn.poll(600):
            raise RuntimeError("engine did not come up within 600 s")
        status, value = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"engine start failed: {value}")

    def __getattr__(self, name: str):
        if name.startswith("_") or name in ("conn", "lock", "proc"):
            raise AttributeError(name)

        def call(*args, **kwargs):
            with self.lock:
                self.conn.send((name, args, kwargs))
                status, value = self.conn.recv()
            if status != "ok":
                raise RuntimeError(f"engine.{name}: {value}")
            return value

        return call

    def close(self) -> None:
        try:
            self.conn.send((None, (), {}))
            self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


@pytest.fixture(scope="module")
def engine(tiny_model_dir, cache_dir):
    e = EngineProcess(tiny_model_dir, cache_dir, {"num_gpus": 1, "max_new_tokens": NEW_TOKENS, "max_model_len": 256,
                                                  "gpu_memory_utilization": 0.3, "enforce_eager": True})
    yield e
    e.close()


def _learner_model(tiny_model_dir: Path, out: Path, seed: int) -> Path:
    """The tiny architecture with other random weights (peaked logits: greedy output depends on
    the weights with wide argmax margins), saved as an HF folder with the tokenizer."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.initializer_range = 0.5
    torch.manual_seed(seed)
    LlamaForCausalLM(config).float().save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def _chat_ids(tok) -> list[list[int]]:
    out = []
    for p in PROMPTS:
        ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def _learner_greedy(w, ids: list[list[int]]) -> list[list[int]]:
    model = w.engine.module
    model.eval()
    outs = []
    with torch.no_grad(), w._gathered():
        for x in ids:
            t = torch.tensor([x], device=w.device)
            y = model.generate(t, attention_mask=torch.ones_like(t), do_sample=False, max_new_tokens=NEW_TOKENS,
                               pad_token_id=model.config.eos_token_id)
            outs.append(y[0, len(x):].tolist())
    model.train()
    return outs


def _engine_greedy(engine, ids: list[list[int]]) -> list[list[int]]:
    return [r[0].response_token_ids for r in engine.generate(PROMPTS, ids, [[0]] * len(PROMPTS), greedy=True)]


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("zero_stage", [0, 3])
def test_learner_step_syncs_into_vllm_over_nccl(engine, tiny_model_dir, tmp_path, zero_stage):
    from transformers import AutoTokenizer

    from nlhf.learner.worker import LearnerWorker
    from nlhf.sync.weight_transfer import rank_offsets

    path = _learner_model(tiny_model_dir, tmp_path / "learner", seed=1000 + zero_stage)
    tok = AutoTokenizer.from_pretrained(path)
    ids = _chat_ids(tok)
    cfg = make_cfg(learner={"num_gpus": 1, "zero_stage": zero_stage}, algorithm={"name": "online-ipo"},
                   rollout={"num_gpus": 1}, sync={"backend": "nccl", "bucket_mb": 1})  # 1 MiB: several chunks
    w = LearnerWorker(cfg, str(path), str(path), master_port=free_port(), reference_dtype="float32")
    try:
        assert w.device.type == "cuda"
        learner_before = _learner_greedy(w, ids)
        assert _engine_greedy(engine, ids) != learner_before  # the test can fail: a push must change the engine
        offsets, world = rank_offsets([1])
        w.init_weight_transfer("current", "127.0.0.1", free_port(), world, [engine], offsets, "float32")
        res = w.push_weights("current", 1)
        assert res["version"] == 1 and res["bytes"] > 2 * 1024 * 1024 and res["tensors"] > 10
        assert engine.weight_version() == 1 and engine.info()["engine_weight_version"] == "1"
        assert _engine_greedy(engine, ids) == learner_before

        rollouts = make_rollouts(tok)
        for r, lp in zip(rollouts, w.token_logprobs(rollouts, "policy")):
            r.sampler_token_logprobs, r.sampler_logprob = lp, sum(lp)
        before = {k: v.clone() for k, v in w.gathered_state_dict().items()}
        w.step(StepBatch(rollouts, PREF, [i ^ 1 for i in range(len(rollouts))]))
        after = w.gathered_state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in before)  # the step moved the weights
        learner_after = _learner_greedy(w, ids)

        res = w.push_weights("current", 2)
        assert res["version"] == 2
        assert engine.weight_version() == 2 and engine.info()["engine_weight_version"] == "2"
        assert _engine_greedy(engine, ids) == learner_after
        print(f"zero_stage {zero_stage}: push {res['bytes'] / 2**20:.1f} MiB in {res['seconds']:.3f}s; greedy "
              f"{'changed' if learner_after != learner_before else 'unchanged'} by the step")
    finally:
        w.close_weight_transfer("current")
        w.shutdown()
