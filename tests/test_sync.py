"""Learner -> rollout weight sync: buckets, safetensors payloads, the bucketed broadcast
protocol over gloo, and THE check: after a sync the engine's greedy output equals
transformers' greedy output from the learner's weights (in-process, over gloo, via Ray)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from nlhf.sync.buckets import MiB, fill_bucket, pack_buckets, plan_buckets, split_bucket, unpack_buckets
from nlhf.sync.object_store import aliases_of, pack_state_dict, unpack

PROMPTS = ["What is the capital of France?", "Write a haiku about rain.", "List three prime numbers."]
NEW_TOKENS = 8


# ----------------------------------------------------------------------------- pure buckets
def _mixed_state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(64, 32, generator=g),                    # 8 KiB fp32
        "a.bias": torch.randn(32, generator=g),
        "b.weight": torch.randn(16, 64, generator=g).to(torch.bfloat16),
        "c.weight": torch.randn(128, 32, generator=g),                   # 16 KiB fp32
        "scalar": torch.tensor(3.5),
        "steps": torch.arange(5, dtype=torch.int64),
        "t.weight": torch.randn(32, 64, generator=g).t(),                # non-contiguous view
        "d.weight": torch.randn(8, 8, generator=g).to(torch.bfloat16),
    }


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def test_buckets_round_trip_is_bit_exact():
    sd = _mixed_state_dict()
    metas, flats = pack_buckets(sd, bucket_mb=10 / 1024)  # 10 KiB buckets
    out = unpack_buckets(metas, flats)
    assert list(out) != [] and set(out) == set(sd)
    for name, t in sd.items():
        assert out[name].dtype == t.dtype and out[name].shape == t.shape
        assert torch.equal(_bits(out[name]), _bits(t)), name
    # one dtype per bucket, every bucket's flat matches its meta
    for m, f in zip(metas, flats):
        assert {s.dtype for s in m.slots} == {m.dtype} and f.numel() == m.numel


def test_bucket_count_respects_size_limit():
    sd = {f"w{i}": torch.full((256,), float(i)) for i in range(10)}  # 1 KiB each
    metas = plan_buckets(sd, bucket_mb=3 / 1024)  # 3 KiB: 3 tensors per bucket
    assert [len(m.slots) for m in metas] == [3, 3, 3, 1]
    assert all(m.nbytes <= 3 * 1024 for m in metas)
    # order kept and offsets contiguous
    assert [s.name for m in metas for s in m.slots] == list(sd)
    for m in metas:
        assert [s.offset for s in m.slots] == [256 * k for k in range(len(m.slots))]
    assert len(plan_buckets(sd, bucket_mb=1.0)) == 1


def test_tensor_larger_than_bucket_gets_its_own():
    sd = {"small0": torch.zeros(100), "huge": torch.zeros(2 * MiB // 4), "small1": torch.zeros(100)}
    metas = plan_buckets(sd, bucket_mb=1.0)
    assert [[s.name for s in m.slots] for m in metas] == [["small0"], ["huge"], ["small1"]]
    assert metas[1].nbytes == 2 * MiB
    with pytest.raises(ValueError):
        plan_buckets(sd, bucket_mb=0)
    with pytest.raises(ValueError):
        split_bucket(metas[0], torch.zeros(99))
    with pytest.raises(ValueError):
        fill_bucket(metas[0], {"small0": torch.zeros(101)})


def test_object_store_round_trip_keeps_tied_weights_once():
    emb = torch.nn.Embedding(50, 8)
    head = torch.nn.Linear(8, 50, bias=False)
    head.weight = emb.weight  # tied
    sd = {"model.embed_tokens.weight": emb.weight, "x": torch.randn(3, 4).t(), "lm_head.weight": head.weight}
    payload = pack_state_dict(sd)
    assert aliases_of(payload) == {"lm_head.weight": "model.embed_tokens.weight"}
    assert len(payload) < 2 * 50 * 8 * 4  # the tied matrix is stored once
    out = unpack(payload)
    assert set(out) == set(sd)
    for k, v in sd.items():
        assert torch.equal(out[k], v.detach())
    assert out["lm_head.weight"] is out["model.embed_tokens.weight"]
    assert set(unpack(payload, with_aliases=False)) == {"model.embed_tokens.weight", "x"}
    with pytest.raises(ValueError):
        pack_state_dict({})


# ----------------------------------------------------------------------------- protocol over gloo
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_SENDER = textwrap.dedent("""
    import sys, json
    from safetensors.torch import load_file
    from nlhf.sync.nccl import NcclWeightSender
    port, world, bucket_mb, path = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    sd = load_file(path)
    sender = NcclWeightSender("127.0.0.1", port, world, backend="gloo")
    print(json.dumps(sender.send(sd, bucket_mb)), flush=True)
    sender.close()
""")


def _start_sender(port: int, world: int, bucket_mb: float, sd_path: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _SENDER, str(port), str(world), str(bucket_mb), str(sd_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_bucketed_broadcast_between_two_processes(tmp_path):
    from safetensors.torch import save_file

    from nlhf.sync.nccl import NcclWeightReceiver

    sd = {k: v.contiguous() for k, v in _mixed_state_dict().items()}
    save_file(sd, tmp_path / "sd.safetensors")
    port = _free_port()
    proc = _start_sender(port, 2, 10 / 1024, tmp_path / "sd.safetensors")
    try:
        recv = NcclWeightReceiver("127.0.0.1", port, 1, 2, backend="gloo")
        calls = []
        inner = recv.channel.broadcast
        recv.channel.broadcast = lambda t, src: (calls.append(t.numel()), inner(t, src))[1]
        got = dict(recv.receive())
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert set(got) == set(sd)
    for k in sd:
        assert got[k].dtype == sd[k].dtype and torch.equal(got[k], sd[k]), k
    n_buckets = len(plan_buckets(sd, 10 / 1024))
    assert len(calls) == 2 + n_buckets < 2 + len(sd)  # plan (size + bytes), then one call per bucket


# ----------------------------------------------------------------------------- engine sync
def chat_ids(tok, prompt: str) -> list[int]:
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def hf_greedy(model, prompt_ids: list[list[int]], n: int = NEW_TOKENS) -> list[list[int]]:
    """transformers greedy continuation of each prompt (fp32, one prompt at a time, no padding)."""
    outs = []
    with torch.no_grad():
        for ids in prompt_ids:
            x = torch.tensor([ids])
            y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                               pad_token_id=model.config.eos_token_id)
            outs.append(y[0, len(ids):].tolist())
    return outs


def reseeded_model(model_dir: Path, seed: int):
    """The tiny model's architecture with fresh random weights (a 'learner update')."""
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    config.initializer_range = 0.5  # peaked logits: greedy output depends on the weights, wide argmax margins
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float().eval()


@pytest.fixture(scope="module")
def setup(tiny_model_dir, cache_dir):
    from transformers import AutoTokenizer

    from nlhf.config import RolloutConfig
    from nlhf.rollout.worker import RolloutWorker

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = RolloutConfig(max_new_tokens=NEW_TOKENS, max_model_len=256, cpu_kvcache_gb=1)
    worker = RolloutWorker(str(tiny_model_dir), cfg, pool="current", cache_dir=str(cache_dir))
    ids = [chat_ids(tok, p) for p in PROMPTS]
    yield worker, cfg, ids
    worker.shutdown()


def _greedy_ids(worker, ids) -> list[list[int]]:
    return [r[0].response_token_ids for r in worker.generate(PROMPTS, ids, [[0]] * len(PROMPTS), greedy=True)]


def test_object_store_sync_makes_engine_match_learner(setup, tiny_model_dir):
    worker, _, ids = setup
    before = _greedy_ids(worker, ids)
    learner = reseeded_model(tiny_model_dir, seed=1234)
    expected = hf_greedy(learner, ids)
    assert expected != before  # the test can fail: the new weights change greedy output
    res = worker.update_weights(pack_state_dict(learner.state_dict()))
    assert res["bytes"] > 0 and res["tensors"] >= 19 and res["seconds"] < 30
    after = _greedy_ids(worker, ids)
    assert after == expected
    assert after != before


def test_gloo_bucketed_sync_into_engine(setup, tiny_model_dir, tmp_path):
    """The receive path the NCCL backend uses (extension -> buckets -> reload), over gloo."""
    from safetensors.torch import save_file

    worker, _, ids = setup
    before = _greedy_ids(worker, ids)
    learner = reseeded_model(tiny_model_dir, seed=99)
    expected = hf_greedy(learner, ids)
    assert expected != before
    sd = {k: v.contiguous() for k, v in learner.state_dict().items() if k != "lm_head.weight"}
    save_file(sd, tmp_path / "learner.safetensors")
    port = _free_port()
    proc = _start_sender(port, 2, 1.0, tmp_path / "learner.safetensors")  # 1 MiB buckets: several
    try:
        assert worker.init_weight_group("127.0.0.1", port, 1, 2, backend="gloo") == [1]
        res = worker.receive_weights()
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert res["tensors"] == len(sd)
    assert '"buckets": ' in out and int(out.split('"buckets": ')[1].split("}")[0]) > 1
    assert _greedy_ids(worker, ids) == expected


# ----------------------------------------------------------------------------- through Ray


def test_ray_actor_syncs_from_object_ref(ray_cluster, setup, tiny_model_dir, cache_dir):
    from nlhf.rollout.worker import RolloutWorker

    ray = ray_cluster
    _, cfg, ids = setup
    learner = reseeded_model(tiny_model_dir, seed=7)
    expected = hf_greedy(learner, ids)
    Actor = ray.remote(num_cpus=1)(RolloutWorker)
    actor = Actor.remote(str(tiny_model_dir), cfg, pool="extrapolated", cache_dir=str(cache_dir))
    try:
        before = [r[0].response_token_ids for r in ray.get(actor.generate.remote(PROMPTS, ids, [[0]] * len(PROMPTS), greedy=True))]
        assert before != expected
        ref = ray.put(pack_state_dict(learner.state_dict()))
        res = ray.get(actor.update_weights.remote(ref))  # the ObjectRef is resolved to bytes by Ray
        assert res["version"] == 1
        after = [r[0].response_token_ids for r in ray.get(actor.generate.remote(PROMPTS, ids, [[0]] * len(PROMPTS), greedy=True))]
        assert after == expected
        ray.get(actor.shutdown.remote())
        with pytest.raises(ray.exceptions.RayTaskError, match="shut down"):
            ray.get(actor.generate.remote(PROMPTS, ids, [[0]] * len(PROMPTS)))
    finally:
        ray.kill(actor)
