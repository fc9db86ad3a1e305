"""Learner -> rollout weight sync on the CPU path: safetensors payloads, and THE check: after a
sync the engine's greedy output equals transformers' greedy output from the learner's weights
(in-process and via Ray), with the weight version set on the engine. The GPU path (vLLM's
weight transfer) is tested in tests/test_weight_transfer.py and tests/gpu/test_gpu_sync.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nlhf.sync.object_store import aliases_of, pack_state_dict, unpack

PROMPTS = ["What is the capital of France?", "Write a haiku about rain.", "List three prime numbers."]
NEW_TOKENS = 8


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
    assert worker.llm.get_weight_version() == str(res["version"]) == str(worker.weight_version())  # vLLM's too
    after = _greedy_ids(worker, ids)
    assert after == expected
    assert after != before


# ----------------------------------------------------------------------------- through Ray


def test_ray_actor_syncs_from_object_ref(ray_cluster, setup, tiny_model_dir, cache_dir):
    from nlhf.rollout.worker import RolloutWorker

    ray = ray_cluster
    _, cfg, ids = setup
    learner = reseeded_model(tiny_model_dir, seed=7)
    expected = hf_greedy(learner, ids)
    Actor = ray.remote(num_cpus=1)(RolloutWorker)
    # rollout.torch_threads: the engine gets 2 threads where Ray's OMP_NUM_THREADS would give it 1
    cfg = cfg.model_copy(update={"torch_threads": 2})
    actor = Actor.remote(str(tiny_model_dir), cfg, pool="extrapolated", cache_dir=str(cache_dir))
    try:
        assert ray.get(actor.info.remote())["torch_threads"] == 2
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


# ----------------------------------------------------------------------------- sync.backend: file
def test_file_sync_makes_engine_match_learner_and_a_missing_file_changes_nothing(setup, tiny_model_dir, tmp_path):
    from nlhf.sync.writer import write_safetensors_file
    from nlhf.sync.files import WeightFileMissingError, remove_stale_weight_files, weight_file_path

    worker, _, ids = setup
    learner = reseeded_model(tiny_model_dir, seed=4321)
    expected = hf_greedy(learner, ids)
    before = _greedy_ids(worker, ids)
    assert expected != before
    old = weight_file_path(tmp_path, "current", 1)
    old.write_bytes(b"stale")
    path = weight_file_path(tmp_path, "current", 2)
    named = [(k, v) for k, v in learner.state_dict().items() if k != "lm_head.weight"]  # tied: stored once
    size = write_safetensors_file(path, named, cast_to=torch.float32)
    assert path.stat().st_size == size and not list(tmp_path.glob("*.tmp"))
    res = worker.update_weights(str(path), version=2)
    assert res["bytes"] == size and res["tensors"] == len(named) and res["version"] == 2
    assert _greedy_ids(worker, ids) == expected
    assert remove_stale_weight_files(tmp_path, "current", keep=path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    # a path this node does not have: one clear error, the engine keeps its weights and version
    with pytest.raises(WeightFileMissingError, match=r"current-v000003.*not on this node.*object_store"):
        worker.update_weights(str(weight_file_path(tmp_path, "current", 3)), version=3)
    assert worker.weight_version() == 2
    assert _greedy_ids(worker, ids) == expected
    with pytest.raises(TypeError, match="bytes or a weight file path"):
        worker.update_weights(12345)


def test_file_payload_equals_object_store_payload(tmp_path):
    from nlhf.sync.writer import safetensors_bytes, write_safetensors_file
    from nlhf.sync.files import iter_weight_file, read_weight_file

    named = [("a", torch.randn(3, 5)), ("b", torch.arange(7)), ("c", torch.randn(4, dtype=torch.float64))]
    path = tmp_path / "w.safetensors"
    write_safetensors_file(path, named, cast_to=torch.bfloat16, metadata={"format": "pt"})
    assert read_weight_file(path) == safetensors_bytes(named, cast_to=torch.bfloat16, metadata={"format": "pt"})
    got = dict(iter_weight_file(path))
    assert got["a"].dtype == torch.bfloat16 and torch.equal(got["a"], named[0][1].to(torch.bfloat16))
    assert got["b"].dtype == torch.int64 and torch.equal(got["b"], named[1][1])
    with pytest.raises(ValueError, match="duplicate"):  # a failed write leaves the old file whole
        write_safetensors_file(path, named + [("a", torch.zeros(1))])
    assert dict(iter_weight_file(path)).keys() == got.keys() and not list(tmp_path.glob("*.tmp"))


def test_file_sync_overwrites_the_spare_in_place_and_the_engine_keeps_what_it_loaded(setup, tiny_model_dir, tmp_path):
    """The spare (the version before the loaded one) is overwritten in place by the next write:
    same inode, same bytes as a fresh file, and the engine's weights (loaded from the newer
    file) do not change while the spare's pages are rewritten."""
    from nlhf.sync.files import retire_weight_files, spare_weight_file_path, weight_file_path
    from nlhf.sync.writer import safetensors_bytes, write_safetensors_file

    worker, _, ids = setup
    models = [reseeded_model(tiny_model_dir, seed=s) for s in (11, 12, 13)]
    named = [[(k, v) for k, v in m.state_dict().items() if k != "lm_head.weight"] for m in models]
    spare = spare_weight_file_path(tmp_path, "current")
    paths = [weight_file_path(tmp_path, "current", v) for v in (1, 2, 3)]
    for v in (0, 1):
        write_safetensors_file(paths[v], named[v], cast_to=torch.float32, reuse=spare)  # no spare yet: new files
        worker.update_weights(str(paths[v]), version=v + 1)
        retire_weight_files(tmp_path, "current", keep=paths[v])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([paths[1].name, spare.name])
    inode = spare.stat().st_ino
    want_v2 = hf_greedy(models[1], ids)
    assert _greedy_ids(worker, ids) == want_v2

    size = write_safetensors_file(paths[2], named[2], cast_to=torch.float32, reuse=spare)
    assert paths[2].stat().st_ino == inode and not spare.exists()  # the spare's pages, rewritten
    assert paths[2].read_bytes() == safetensors_bytes(named[2], cast_to=torch.float32) and paths[2].stat().st_size == size
    assert _greedy_ids(worker, ids) == want_v2  # the engine holds nothing of the file it loaded before
    worker.update_weights(str(paths[2]), version=3)
    assert _greedy_ids(worker, ids) == hf_greedy(models[2], ids)
    retire_weight_files(tmp_path, "current", keep=paths[2])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([paths[2].name, spare.name])


def test_recycled_weight_file_is_cut_to_the_new_size(tmp_path):
    from nlhf.sync.files import iter_weight_file, remove_stale_weight_files, spare_weight_file_path
    from nlhf.sync.writer import safetensors_bytes, write_safetensors_file

    spare = spare_weight_file_path(tmp_path, "current")
    spare.write_bytes(b"x" * 100_000)  # a larger older version
    small = [("a", torch.randn(3, 5)), ("b", torch.arange(7))]
    path = tmp_path / "current-v000002.safetensors"
    write_safetensors_file(path, small, cast_to=torch.bfloat16, reuse=spare)
    assert path.read_bytes() == safetensors_bytes(small, cast_to=torch.bfloat16)
    assert dict(iter_weight_file(path)).keys() == {"a", "b"} and not spare.exists()
    spare.write_bytes(b"y")
    assert remove_stale_weight_files(tmp_path, "current") == 2 and not list(tmp_path.iterdir())
