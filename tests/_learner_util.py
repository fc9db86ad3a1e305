"""Helpers shared by the learner tests (in-process LearnerWorker on the tiny random Llama)."""

from __future__ import annotations

import contextlib
import copy
import os
import socket
from pathlib import Path

import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from nlhf.batch import Rollout, StepBatch  # noqa: E402
from nlhf.config import TrainConfig  # noqa: E402

PREF = [1.0, 0.0] * 4  # even samples beat their opponents, odd ones lose


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_cfg(learner: dict | None = None, algorithm: dict | None = None, **top) -> TrainConfig:
    lrn = {"micro_batch_size": 3, "optimizer": {"lr": 1e-2}}
    lrn.update(learner or {})
    top.setdefault("responses_per_prompt", 2)
    return TrainConfig(data={"train_prompts": ["unused.jsonl"]}, judge={"kind": "pairwise", "path": "unused"},
                       learner=lrn, algorithm=algorithm or {}, prompts_per_iteration=4, **top)


def make_rollouts(tok, n: int = 8) -> list[Rollout]:
    """n rollouts, two per prompt (i and i ^ 1 share it), responses of 1-4 tokens (padding is exercised)."""
    words = ["yes", "no", "maybe so", "the cat sat", "blue", "red green", "a b c d", "ok"]
    out = []
    for i in range(n):
        prompt = tok.encode(f"Question {i // 2}: say something" + "!" * (i // 2 % 3))
        resp = tok.encode(" " + words[i % len(words)])[:4]
        out.append(Rollout(f"q{i // 2}", prompt, resp, words[i % len(words)], 0.0))
    return out


def naive_logprobs(model, rollouts, action_ids=None) -> torch.Tensor:
    """One sequence at a time, no padding, explicit per-token log-softmax."""
    vals = []
    with torch.no_grad():
        for r in rollouts:
            ids = torch.tensor([r.prompt_token_ids + r.response_token_ids])
            logits = model(input_ids=ids).logits[0].float()
            p = len(r.prompt_token_ids)
            total = 0.0
            for t, y in enumerate(r.response_token_ids):
                row = logits[p - 1 + t]
                if action_ids is None:
                    total += float(row.log_softmax(-1)[y])
                else:
                    total += float(row[action_ids].log_softmax(-1)[action_ids.index(y)])
            vals.append(total)
    return torch.tensor(vals)


@contextlib.contextmanager
def learner(cfg: TrainConfig, path: Path, **kw):
    """An in-process LearnerWorker with world size 1 (one at a time: the process group is global).
    The reference is fp32 unless asked otherwise, so pi_ref == pi_0 exactly."""
    from nlhf.learner.worker import LearnerWorker

    kw.setdefault("reference_dtype", "float32")
    w = LearnerWorker(cfg, str(path), str(path), master_port=free_port(), **kw)
    try:
        yield w
    finally:
        w.shutdown()


def batch_for(w, rollouts, preference, engine_offset: float = 0.0) -> StepBatch:
    """A StepBatch whose samples came from the current policy: the engine's log-probs are the
    learner's (per token and summed), plus ``engine_offset`` nats per token."""
    for r, toks in zip(rollouts, w.token_logprobs(rollouts, "policy")):
        r.sampler_token_logprobs = [t + engine_offset for t in toks]
        r.sampler_logprob = sum(r.sampler_token_logprobs)
    return StepBatch(rollouts, preference, [i ^ 1 for i in range(len(rollouts))])


def deep_clone(x):
    """Copy of nested dicts/lists whose tensors are detached clones (a snapshot of live state)."""
    if torch.is_tensor(x):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: deep_clone(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(deep_clone(v) for v in x)
    return copy.deepcopy(x)


def assert_same(a, b, where="") -> None:
    """Bit-for-bit equality of nested dicts/lists of tensors and plain values."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"tensor differs at {where}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"keys differ at {where}"
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"length differs at {where}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif hasattr(a, "__dict__") and not isinstance(a, type):  # e.g. DeepSpeed's loss scaler
        assert type(a) is type(b), where
        assert_same(vars(a), vars(b), f"{where}.{type(a).__name__}")
    else:
        assert a == b, f"{a!r} != {b!r} at {where}"


def differs(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)
