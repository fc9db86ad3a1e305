"""The DeepSpeed learner: sequence log-probs, half/full/omd steps, exact restore of theta_k,
anchor updates, weight export, checkpoints, and a 2-rank Ray group (tiny random Llama, CPU, gloo)."""

from __future__ import annotations

import contextlib
import copy
import os
import socket
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from nlhf.batch import Rollout, StepBatch  # noqa: E402
from nlhf.config import TrainConfig  # noqa: E402
from nlhf.learner.logprobs import sequence_logprobs  # noqa: E402


# ----------------------------------------------------------------------------- helpers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_cfg(learner: dict | None = None, algorithm: dict | None = None, **top) -> TrainConfig:
    lrn = {"micro_batch_size": 3, "optimizer": {"lr": 1e-2}}
    lrn.update(learner or {})
    return TrainConfig(data={"train_prompts": ["unused.jsonl"]}, judge={"kind": "pairwise", "path": "unused"},
                       learner=lrn, algorithm=algorithm or {}, prompts_per_iteration=4, responses_per_prompt=2, **top)


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def make_rollouts(tok, n: int = 8) -> list[Rollout]:
    """n rollouts, two per prompt, responses of 1-4 tokens (so padding is exercised)."""
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
    """An in-process LearnerWorker with world size 1 (one at a time: the process group is global)."""
    from nlhf.learner.worker import LearnerWorker

    w = LearnerWorker(cfg, str(path), str(path), master_port=_free_port(), **kw)
    try:
        yield w
    finally:
        w.shutdown()


def batch_for(w, rollouts, preference) -> StepBatch:
    """A StepBatch whose samples came from the current policy (sampler log-probs = policy's)."""
    for r, lp in zip(rollouts, w.sequence_logprobs(rollouts, "policy")):
        r.sampler_logprob = lp
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


PREF = [1.0, 0.0] * 4  # even samples beat their opponents, odd ones lose


# ----------------------------------------------------------------------------- log-probs
def test_sequence_logprobs_match_naive_loop(tiny_model_dir, tok):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    rollouts = make_rollouts(tok)
    assert len({len(r.response_token_ids) for r in rollouts}) > 1  # padding is exercised
    with torch.no_grad():
        got = sequence_logprobs(model, rollouts, micro_batch_size=3, pad_token_id=tok.pad_token_id or 0)
    want = naive_logprobs(model, rollouts)
    assert got.shape == (len(rollouts),) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    # gradient flows to the weights
    lp = sequence_logprobs(model, rollouts[:2], micro_batch_size=2)
    lp.sum().backward()
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0


def test_sequence_logprobs_restricted_to_action_tokens(tiny_model_dir, tok):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    actions = [tok.convert_tokens_to_ids(c) for c in "ABCDE"]
    prompt = tok.encode("Choose one letter.")
    rollouts = [Rollout("x", prompt, [a], "", 0.0) for a in actions]
    with torch.no_grad():
        got = sequence_logprobs(model, rollouts, micro_batch_size=2, action_token_ids=actions)
        full = sequence_logprobs(model, rollouts, micro_batch_size=2)
    torch.testing.assert_close(got, naive_logprobs(model, rollouts, actions), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.exp().sum(), torch.tensor(1.0), atol=1e-5, rtol=0)  # renormalised
    assert (got > full).all()  # the restricted softmax puts more mass on each action
    with pytest.raises(ValueError, match="not an action token"):
        sequence_logprobs(model, [Rollout("x", prompt, [tok.convert_tokens_to_ids("Z")], "", 0.0)], 1, actions)
    with pytest.raises(ValueError, match="expected 1"):
        sequence_logprobs(model, [Rollout("x", prompt, actions[:2], "", 0.0)], 1, actions)


# ----------------------------------------------------------------------------- worker steps
@pytest.mark.parametrize("estimator", ["pg", "regression"])
def test_half_step_moves_weights_towards_preferred_samples(tiny_model_dir, tok, estimator):
    with learner(make_cfg(algorithm={"estimator": estimator}), tiny_model_dir) as w:
        rollouts = make_rollouts(tok)
        batch = batch_for(w, rollouts, PREF)
        before_sd = w.gathered_state_dict()
        before = torch.tensor(w.sequence_logprobs(rollouts, "policy"))
        m = w.half_step(batch)
        after = torch.tensor(w.sequence_logprobs(rollouts, "policy"))
        for key in ("loss", "kl_ref", "kl_anchor", "grad_norm", "step_time_s"):
            assert key in m and m[key] == m[key], key  # present and not NaN
        assert m["grad_norm"] > 0
        assert abs(m["kl_ref"]) < 1e-6 and abs(m["kl_anchor"]) < 1e-6  # pi_k = pi_ref = anchor at k = 0
        after_sd = w.gathered_state_dict()
        assert any(not torch.equal(before_sd[k], after_sd[k]) for k in before_sd)
        delta = after - before
        if estimator == "pg":
            assert delta[0::2].mean() > 0 > delta[1::2].mean()  # winners up, losers down
        else:  # regression moves log-ratios within pairs: winner minus loser goes up
            assert (delta[0::2] - delta[1::2]).mean() > 0
        # the anchor (pi_k) and the reference did not move during a half-step
        torch.testing.assert_close(torch.tensor(w.sequence_logprobs(rollouts, "anchor")), before, atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(w.sequence_logprobs(rollouts, "reference")), before, atol=1e-5, rtol=0)


def test_game_mode_step_raises_the_winning_action(tiny_model_dir, tok):
    """One-token game: log-probs are over the action set only, and a half-step on
    'action A beats everything' raises pi(A) under the restricted softmax."""
    actions = [tok.convert_tokens_to_ids(c) for c in "ABCDE"]
    prompt = tok.encode("Choose one letter.")
    rollouts = [Rollout("x", prompt, [a], "", 0.0) for a in actions] * 2
    with learner(make_cfg(), tiny_model_dir, action_token_ids=actions) as w:
        before = torch.tensor(w.sequence_logprobs(rollouts[:5]))
        torch.testing.assert_close(before.exp().sum(), torch.tensor(1.0), atol=1e-5, rtol=0)
        pref = [1.0 if r.response_token_ids[0] == actions[0] else 0.5 for r in rollouts]
        w.half_step(batch_for(w, rollouts, pref))
        after = torch.tensor(w.sequence_logprobs(rollouts[:5]))
        torch.testing.assert_close(after.exp().sum(), torch.tensor(1.0), atol=1e-5, rtol=0)
        assert after[0] > before[0]


@pytest.mark.parametrize("stage,precision", [(0, "fp32"), (0, "bf16"), (2, "fp32"), (3, "fp32"), (3, "bf16")])
def test_restore_is_bit_exact(tiny_model_dir, tok, stage, precision):
    """After half_step, _restore() gives back theta_k's weights AND optimiser state bit for bit;
    and a full step on the same batch reproduces the half-step's theta exactly."""
    with learner(make_cfg({"zero_stage": stage, "precision": precision}), tiny_model_dir) as w:
        rollouts = make_rollouts(tok)
        batch = batch_for(w, rollouts, PREF)
        w.half_step(batch)
        w.full_step(batch)  # now AdamW has state (exp_avg, exp_avg_sq, step) to restore
        batch = batch_for(w, rollouts, PREF[::-1])
        weights_k = w.gathered_state_dict()
        opt_k = deep_clone(w.engine.optimizer.state_dict())
        logp_k = w.sequence_logprobs(rollouts, "policy")

        w.half_step(batch)
        weights_half = w.gathered_state_dict()
        assert any(not torch.equal(weights_k[k], weights_half[k]) for k in weights_k)
        with pytest.raises(AssertionError):
            assert_same(opt_k, w.engine.optimizer.state_dict())

        w._restore()
        assert_same(weights_k, w.gathered_state_dict(), "weights")
        assert_same(opt_k, w.engine.optimizer.state_dict(), "optimizer")
        assert w.sequence_logprobs(rollouts, "policy") == logp_k

        w.full_step(batch)  # restores again (same snapshot), same batch -> same update
        assert_same(weights_half, w.gathered_state_dict(), "full step == half step on the same batch")


def test_full_step_requires_a_half_step(tiny_model_dir, tok):
    with learner(make_cfg(), tiny_model_dir) as w:
        batch = batch_for(w, make_rollouts(tok), PREF)
        with pytest.raises(RuntimeError, match="half_step"):
            w.full_step(batch)


@pytest.mark.parametrize("anchor", ["snapshot", "ema"])
def test_anchor_update_after_full_step(tiny_model_dir, tok, anchor):
    d = 0.75
    with learner(make_cfg(algorithm={"anchor": anchor, "ema_decay": d}), tiny_model_dir) as w:
        rollouts = make_rollouts(tok)
        theta_0 = w.gathered_state_dict()
        w.half_step(batch_for(w, rollouts, PREF))
        half = w.gathered_state_dict()
        anchor_mid = {k: v.clone() for k, v in w.anchor.state_dict().items()}
        w.full_step(batch_for(w, rollouts, PREF[::-1]))  # sampler log-probs from pi_{k+1/2}: ratios != 1
        theta_1 = w.gathered_state_dict()
        assert any(not torch.equal(half[k], theta_1[k]) for k in half)
        got = w.anchor.state_dict()
        for k, v0 in theta_0.items():
            assert torch.equal(anchor_mid[k], v0), "the half-step must not move the anchor"
            want = theta_1[k] if anchor == "snapshot" else d * v0 + (1 - d) * theta_1[k]
            torch.testing.assert_close(got[k], want, atol=1e-7 if anchor == "ema" else 0, rtol=0)
        pol = w.sequence_logprobs(rollouts, "policy")
        anc = w.sequence_logprobs(rollouts, "anchor")
        if anchor == "snapshot":
            assert pol == anc
        else:
            assert pol != anc
        m = w.omd_step(batch_for(w, rollouts, PREF))
        if anchor == "snapshot":
            assert w.sequence_logprobs(rollouts, "anchor") == w.sequence_logprobs(rollouts, "policy")
        else:
            assert m["kl_anchor"] != 0.0


def test_state_dict_bytes_and_checkpoint_roundtrip(tiny_model_dir, tok, tmp_path):
    from safetensors.torch import load
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    with learner(make_cfg(), tiny_model_dir) as w:
        rollouts = make_rollouts(tok)
        w.omd_step(batch_for(w, rollouts, PREF))
        want = torch.tensor(w.sequence_logprobs(rollouts, "policy"))
        sd = load(w.state_dict_bytes())
        w.save_checkpoint(str(tmp_path / "ckpt"))

    fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_dir)).eval()
    missing, unexpected = fresh.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embeddings
    fresh.tie_weights()
    torch.testing.assert_close(naive_logprobs(fresh, rollouts), want, atol=1e-4, rtol=1e-5)

    ckpt = tmp_path / "ckpt"
    assert (ckpt / "config.json").is_file() and (ckpt / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    torch.testing.assert_close(naive_logprobs(loaded, rollouts), want, atol=1e-4, rtol=1e-5)
    assert AutoTokenizer.from_pretrained(ckpt).encode("hello") == tok.encode("hello")


# ----------------------------------------------------------------------------- Ray group


@pytest.mark.ray
def test_two_learner_group_zero3(ray_cluster, tiny_model_dir, tok):
    """2 ranks, ZeRO-3, gloo: half + full step; both ranks hold identical full weights, and the
    sharded data-parallel gradient equals the single-process full-batch gradient."""
    from nlhf.learner.group import LearnerGroup

    rollouts = make_rollouts(tok)
    # single process reference (ZeRO-0, world size 1) on the same batches
    with learner(make_cfg(), tiny_model_dir) as w:
        b_half = batch_for(w, rollouts, PREF)
        ref_half = w.half_step(b_half)
        b_full = StepBatch(copy.deepcopy(rollouts), PREF[::-1], b_half.partner)
        ref_full = w.full_step(b_full)
        ref_sd = w.gathered_state_dict()

    cfg = make_cfg({"zero_stage": 3, "num_learners": 2, "num_cpus": 0.5})
    group = LearnerGroup(cfg, str(tiny_model_dir), str(tiny_model_dir))
    try:
        half = group.half_step(b_half)
        full = group.full_step(b_full)
        for got, want in ((half, ref_half), (full, ref_full)):
            for key in ("loss", "grad_norm", "kl_ref", "kl_anchor"):
                assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
        sds = ray_cluster.get([wk.gathered_state_dict.remote(True) for wk in group.workers])
        assert_same(sds[0], sds[1], "rank 0 vs rank 1")
        for k, v in ref_sd.items():
            torch.testing.assert_close(sds[0][k], v, atol=5e-4, rtol=0)  # Adam steps are +-lr-sized
        from safetensors.torch import load

        assert_same(load(group.state_dict_bytes()), sds[0], "state_dict_bytes")
        assert_same(load(ray_cluster.get(group.state_dict_ref())), sds[0], "state_dict_ref")
        assert group.sequence_logprobs(rollouts, "anchor") == group.sequence_logprobs(rollouts, "policy")
    finally:
        group.shutdown()
