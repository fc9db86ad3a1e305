"""MixtureWorker: samples of Nash-MD's geometric mixture pi_theta^(1-m) pi_ref^m with KV caches,
checked against full forward passes (no cache) of both models; m = 0 / 1; temperature and top-p;
game mode (exact restricted mixture, chi-square); per-sample seeds; EOS; weight updates; bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from nlhf.algorithms.losses import geometric_mixture_logits

PROMPTS = ["What is the capital of France?", "Write a haiku about rain.", "Hi"]
NEW_TOKENS = 6
LEN = 128


def chat_ids(tok, prompt: str) -> list[int]:
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.fixture(scope="module", autouse=True)
def keep_torch_threads():
    """MixtureWorker sets torch's thread count from cfg.num_cpus; give the session its own back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model_dir, tokenizer_dir, cache_dir):
    """(policy dir, reference dir, tokenizer, fp32 policy, fp32 reference). The policy is a tiny
    Llama with large random weights (peaked distributions); the reference is the tiny model
    built with seed 1."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from nlhf.config import TinyModelConfig
    from nlhf.models.tiny import make_tiny_llama, tiny_folder_name

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.initializer_range = 0.5
    torch.manual_seed(3)
    policy = LlamaForCausalLM(config).float().eval()
    out = tmp_path_factory.mktemp("mix-policy")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    policy.save_pretrained(out)
    tok.save_pretrained(out)
    ref_cfg = TinyModelConfig(seed=1)
    ref_dir = make_tiny_llama(cache_dir / "models" / tiny_folder_name(ref_cfg, "float32"), tokenizer_dir, ref_cfg)
    reference = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
    return out, ref_dir, tok, policy, reference


def make_worker(models, mixture=0.5, **cfg_kw):
    from nlhf.config import RolloutConfig
    from nlhf.rollout.mixture import MixtureWorker

    policy_dir, ref_dir = models[0], models[1]
    game = cfg_kw.pop("action_token_ids", None)
    path = cfg_kw.pop("model_path", policy_dir)
    cfg = RolloutConfig(**{"max_new_tokens": NEW_TOKENS, "max_model_len": LEN, **cfg_kw})
    return MixtureWorker(str(path), cfg, pool="mixture", reference_path=str(ref_dir), mixture=mixture,
                         dtype="float32", action_token_ids=game)


@pytest.fixture(scope="module")
def worker(models):
    w = make_worker(models)
    yield w
    w.shutdown()


def full_forward_logprobs(model, prompt_ids, response_ids) -> torch.Tensor:
    """(T, V) next-token log-probs at the response positions, one forward of the whole sequence."""
    x = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        return model(x).logits[0, len(prompt_ids) - 1:-1].float().log_softmax(-1)


def brute_force_mixture(models, m, prompt_ids, response_ids) -> torch.Tensor:
    """(T,) log pi_mix(y_t | x, y_<t) from full forward passes without a cache."""
    _, _, _, policy, reference = models
    mix = geometric_mixture_logits(full_forward_logprobs(policy, prompt_ids, response_ids),
                                   full_forward_logprobs(reference, prompt_ids, response_ids), m)
    return mix.gather(1, torch.tensor(response_ids)[:, None]).squeeze(1)


def test_logprobs_equal_brute_force_mixture(worker, models):
    tok = models[2]
    ids = [chat_ids(tok, p) for p in PROMPTS]
    seeds = [[11, 12, 13], [21, 22], [31]]
    worker.stats()
    out = worker.generate(PROMPTS, ids, seeds)
    assert [len(s) for s in out] == [3, 2, 1]
    n_tokens = 0
    for prompt, pids, row, samples in zip(PROMPTS, ids, seeds, out):
        for seed, r in zip(row, samples):
            assert r.prompt == prompt and r.prompt_token_ids == pids and r.seed == seed
            assert 1 <= len(r.response_token_ids) == len(r.sampler_token_logprobs) <= NEW_TOKENS
            assert r.finished == (r.response_token_ids[-1] in worker.eos_token_ids)
            assert r.response_text == tok.decode(r.response_token_ids, skip_special_tokens=True)
            exact = brute_force_mixture(models, 0.5, pids, r.response_token_ids)
            assert torch.allclose(torch.tensor(r.sampler_token_logprobs), exact, atol=1e-4, rtol=0)
            assert abs(r.sampler_logprob - float(exact.sum())) < 1e-4
            # the mixture is neither model alone (so the comparison above can fail)
            policy_lp = full_forward_logprobs(models[3], pids, r.response_token_ids)
            policy_lp = float(policy_lp.gather(1, torch.tensor(r.response_token_ids)[:, None]).sum())
            assert abs(policy_lp - r.sampler_logprob) > 0.1
            n_tokens += len(r.response_token_ids)
    st = worker.stats()
    assert st["tokens"] == n_tokens and st["seconds"] > 0 and st["tokens_per_s"] > 0
    assert st["weight_version"] == 0 and st["mixture"] == 0.5 and st["pool"] == "mixture"
    assert worker.stats()["tokens"] == 0  # counters reset


def test_greedy_is_the_mixture_argmax_copied(worker, models):
    tok = models[2]
    pids = chat_ids(tok, PROMPTS[0])
    [samples] = worker.generate(PROMPTS[:1], [pids], [[1, 2, 3]], greedy=True, max_new_tokens=4)
    assert len(samples) == 3 and all(r.seed is None for r in samples)
    assert all(r.response_token_ids == samples[0].response_token_ids for r in samples)
    assert samples[1].response_token_ids is not samples[0].response_token_ids  # independent copies
    y = samples[0].response_token_ids
    assert len(y) == 4
    _, _, _, policy, reference = models
    mix = geometric_mixture_logits(full_forward_logprobs(policy, pids, y), full_forward_logprobs(reference, pids, y), 0.5)
    assert mix.argmax(-1).tolist() == y
    assert abs(samples[0].sampler_logprob - float(mix.max(-1).values.sum())) < 1e-4


@pytest.mark.parametrize("m", [0.0, 1.0])
def test_mixture_endpoints_are_policy_and_reference(models, m):
    tok, policy, reference = models[2], models[3], models[4]
    w = make_worker(models, mixture=m)
    try:
        ids = [chat_ids(tok, p) for p in PROMPTS[:2]]
        for pids, samples in zip(ids, w.generate(PROMPTS[:2], ids, [[5, 6], [7, 8]])):
            for r in samples:
                y = torch.tensor(r.response_token_ids)[:, None]
                lp_policy = full_forward_logprobs(policy, pids, r.response_token_ids).gather(1, y).squeeze(1)
                lp_ref = full_forward_logprobs(reference, pids, r.response_token_ids).gather(1, y).squeeze(1)
                want, other = (lp_policy, lp_ref) if m == 0.0 else (lp_ref, lp_policy)
                assert torch.allclose(torch.tensor(r.sampler_token_logprobs), want, atol=1e-4, rtol=0)
                assert abs(float(other.sum()) - r.sampler_logprob) > 0.1
    finally:
        w.shutdown()


def test_temperature_and_top_p_give_the_nucleus_distribution(models):
    """log q_t = log_softmax(l_t / T) restricted to the smallest most-probable set of mass >= top_p."""
    temperature, top_p = 0.7, 0.6
    tok = models[2]
    w = make_worker(models, temperature=temperature, top_p=top_p)
    try:
        pids = chat_ids(tok, PROMPTS[1])
        [samples] = w.generate(PROMPTS[1:2], [pids], [[1, 2, 3, 4]])
        for r in samples:
            y = r.response_token_ids
            l_t = geometric_mixture_logits(full_forward_logprobs(models[3], pids, y),
                                           full_forward_logprobs(models[4], pids, y), 0.5)
            s = torch.log_softmax(l_t / temperature, dim=-1)
            probs, order = s.exp().sort(dim=-1, descending=True)
            mass_before = probs.cumsum(-1) - probs
            keep_sorted = mass_before < top_p  # keep a token while the more probable ones hold < top_p
            keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
            q = torch.log_softmax(s.masked_fill(~keep, float("-inf")), dim=-1)
            assert keep.sum(-1).min() < l_t.shape[-1]  # the nucleus excludes tokens
            got = torch.tensor(r.sampler_token_logprobs)
            want = q.gather(1, torch.tensor(y)[:, None]).squeeze(1)
            assert torch.isfinite(got).all() and torch.allclose(got, want, atol=1e-4, rtol=0)
            assert (got > l_t.gather(1, torch.tensor(y)[:, None]).squeeze(1)).all()  # not the raw mixture
    finally:
        w.shutdown()


def test_game_mode_samples_the_exact_restricted_mixture(models):
    from scipy.stats import chisquare

    tok, policy, reference = models[2], models[3], models[4]
    actions = tok.convert_tokens_to_ids(list("ABCDE"))
    pids = chat_ids(tok, "Choose one letter.")
    with torch.no_grad():
        z, z_ref = policy(torch.tensor([pids])).logits[0, -1], reference(torch.tensor([pids])).logits[0, -1]
    exact = geometric_mixture_logits(z[actions], z_ref[actions], 0.5)  # (A,)
    full = geometric_mixture_logits(z, z_ref, 0.5)[actions].log_softmax(-1)  # the same, via the full vocabulary
    assert torch.allclose(exact, full, atol=1e-5)
    assert float(exact.exp().max()) < 0.9 and float(exact.exp().min()) > 0.01  # every action matters
    w = make_worker(models, action_token_ids=actions)
    try:
        n = 4000
        [samples] = w.generate(["Choose one letter."], [pids], [list(range(n))], max_new_tokens=5)
        assert len(samples) == n
        counts = torch.zeros(len(actions))
        for r in samples:
            assert len(r.response_token_ids) == 1 and r.finished
            k = actions.index(r.response_token_ids[0])
            counts[k] += 1
            assert abs(r.sampler_logprob - float(exact[k])) < 1e-5 and r.sampler_token_logprobs == [r.sampler_logprob]
        p_exact = exact.double().exp()
        assert chisquare(counts.numpy(), (n * p_exact / p_exact.sum()).numpy()).pvalue > 1e-3
        # the policy alone over the actions would be rejected: the test sees the mixture
        policy_only = z[actions].double().softmax(-1)
        assert chisquare(counts.numpy(), (n * policy_only / policy_only.sum()).numpy()).pvalue < 1e-6
        [[g]] = w.generate(["x"], [pids], [[0]], greedy=True)
        assert g.response_token_ids == [actions[int(exact.argmax())]]
    finally:
        w.shutdown()
    with pytest.raises(ValueError, match="action_token_ids"):
        make_worker(models, action_token_ids=[5, 5])
    with pytest.raises(ValueError, match="action_token_ids"):
        make_worker(models, action_token_ids=[10**7])


def test_each_sample_depends_only_on_its_seed(worker, models):
    tok = models[2]
    ids = [chat_ids(tok, p) for p in PROMPTS]

    def draws(prompt_idx, seeds):
        out = worker.generate([PROMPTS[i] for i in prompt_idx], [ids[i] for i in prompt_idx], seeds)
        return [[(r.response_token_ids, r.sampler_logprob) for r in s] for s in out]

    [[alone]] = draws([0], [[77]])
    # same seed inside a bigger batch: other prompts (other lengths, so other padding), other samples
    batched = draws([2, 0, 1], [[1, 2], [5, 77, 9], [3]])
    tokens, logprob = batched[1][1]
    assert tokens == alone[0] and abs(logprob - alone[1]) < 1e-5
    assert draws([0], [[77]]) == [[alone]]  # reproducible
    eight = draws([0], [list(range(100, 108))])[0]
    assert len({tuple(t) for t, _ in eight}) == 8  # different seeds, different samples
    assert worker.generate(PROMPTS[:1], ids[:1], [[2**62 + 77]])[0][0].seed == 77  # seeds are 62-bit


def test_stops_on_generation_config_eos_and_clips_to_max_model_len(worker, models, tmp_path):
    tok = models[2]
    pids = chat_ids(tok, PROMPTS[0])
    [[r]] = worker.generate(PROMPTS[:1], [pids], [[42]])
    assert not r.finished and len(r.response_token_ids) == NEW_TOKENS  # a random model rarely says EOS
    stop = r.response_token_ids[2]
    # a copy of the policy whose generation_config also stops on the third token drawn above
    folder = tmp_path / "eos-policy"
    shutil.copytree(models[0], folder)
    gen_file = folder / "generation_config.json"
    gen = json.loads(gen_file.read_text()) if gen_file.exists() else {}
    gen["eos_token_id"] = [tok.eos_token_id, stop]
    gen_file.write_text(json.dumps(gen))
    w = make_worker(models, model_path=folder)
    try:
        [[s]] = w.generate(PROMPTS[:1], [pids], [[42]])
        first = r.response_token_ids.index(stop)
        assert s.finished and s.response_token_ids == r.response_token_ids[:first + 1]
        assert abs(s.sampler_logprob - sum(r.sampler_token_logprobs[:first + 1])) < 1e-5
    finally:
        w.shutdown()
    long_prompt = pids + [pids[-1]] * (LEN - 2 - len(pids))  # room for 2 tokens
    [[c]] = worker.generate(["long"], [long_prompt], [[1]], max_new_tokens=50)
    assert len(c.response_token_ids) <= 2


def test_update_weights_loads_the_new_policy(models, tmp_path):
    from nlhf.sync.object_store import pack_state_dict

    tok, reference = models[2], models[4]
    w = make_worker(models)
    try:
        pids = chat_ids(tok, PROMPTS[0])
        [[before]] = w.generate(PROMPTS[:1], [pids], [[3]])
        info = w.update_weights(pack_state_dict(reference.state_dict()))  # policy := reference
        assert info["version"] == 1 and info["bytes"] > 0 and info["tensors"] > 0
        assert w.stats()["weight_version"] == 1
        [[after]] = w.generate(PROMPTS[:1], [pids], [[3]])
        assert after.response_token_ids != before.response_token_ids
        # policy == reference, so the mixture is the reference (the reference was not changed)
        y = torch.tensor(after.response_token_ids)[:, None]
        want = full_forward_logprobs(reference, pids, after.response_token_ids).gather(1, y).squeeze(1)
        assert torch.allclose(torch.tensor(after.sampler_token_logprobs), want, atol=1e-4, rtol=0)
        partial = {k: v for k, v in reference.state_dict().items() if "layers.0." not in k}
        with pytest.raises(ValueError, match="misses"):
            w.update_weights(pack_state_dict(partial))
        with pytest.raises(ValueError, match="lacks"):
            w.update_weights(pack_state_dict({**reference.state_dict(), "extra.weight": torch.zeros(2)}))
        # the original policy's weights with one bad shape: refused whole, nothing is loaded
        bad = {k: (v[:-1] if k == "model.norm.weight" else v) for k, v in models[3].state_dict().items()}
        with pytest.raises(ValueError, match="shape"):
            w.update_weights(pack_state_dict(bad))
        [[again]] = w.generate(PROMPTS[:1], [pids], [[3]])
        assert again.response_token_ids == after.response_token_ids
        assert abs(again.sampler_logprob - after.sampler_logprob) < 1e-6
        with pytest.raises(TypeError):
            w.update_weights({"not": "bytes"})
        # sync.backend: file: the original policy back from a weight file on this node
        path = tmp_path / "current-v000002.safetensors"
        path.write_bytes(pack_state_dict(models[3].state_dict()))
        assert w.update_weights(str(path), version=2)["version"] == 2
        [[back]] = w.generate(PROMPTS[:1], [pids], [[3]])
        assert back.response_token_ids == before.response_token_ids
        from nlhf.sync.files import WeightFileMissingError

        with pytest.raises(WeightFileMissingError, match="not on this node"):
            w.update_weights(str(tmp_path / "missing.safetensors"), version=3)
        assert w.weight_version() == 2
    finally:
        w.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        w.generate(PROMPTS[:1], [pids], [[1]])


def test_bad_input_raises(worker, models):
    tok = models[2]
    ids = [chat_ids(tok, p) for p in PROMPTS[:2]]
    with pytest.raises(ValueError, match="prompt_token_ids"):
        worker.generate(PROMPTS[:2], ids[:1], [[1], [2]])
    with pytest.raises(ValueError, match="seeds"):
        worker.generate(PROMPTS[:2], ids, [[1]])
    with pytest.raises(ValueError, match=r"seeds\[1\] is empty"):
        worker.generate(PROMPTS[:2], ids, [[1], []])
    with pytest.raises(ValueError, match=r"seeds\[0\]\[1\]"):
        worker.generate(PROMPTS[:1], ids[:1], [[1, "two"]])
    with pytest.raises(ValueError, match=r"prompt_token_ids\[0\] is empty"):
        worker.generate(["x"], [[]], [[1]])
    with pytest.raises(ValueError, match="max_new_tokens"):
        worker.generate(PROMPTS[:1], ids[:1], [[1]], max_new_tokens=0)
    with pytest.raises(ValueError, match="max_model_len"):
        worker.generate(["x"], [[1] * LEN], [[1]])
    assert worker.generate([], [], []) == []
    assert torch.get_num_threads() == 1  # max(1, int(cfg.num_cpus = 0.5)), as the learner sets it
    with pytest.raises(ValueError, match="mixture"):
        make_worker(models, mixture=1.5)
