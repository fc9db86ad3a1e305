"""The DeepSpeed learner: sequence and per-token log-probs, the exact KL to the reference,
half/full steps, exact restore of theta_k (memory and disk snapshots, the weights-only
half-step), anchor updates, weight export, checkpoints, and a 2-rank Ray group (tiny random
Llama, CPU, gloo)."""

from __future__ import annotations

import copy

import pytest
import torch

from _learner_util import (PREF, assert_same, batch_for, deep_clone, differs, learner, make_cfg,  # noqa: E402
                           make_rollouts, naive_logprobs)
from nlhf.batch import Rollout, StepBatch  # noqa: E402
from nlhf.learner.logprobs import score_rollouts, sequence_logprobs  # noqa: E402


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


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


def _other_model(model_dir, seed: int):
    """The tiny architecture with other random weights (a policy that differs from pi_ref)."""
    from transformers import AutoConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(AutoConfig.from_pretrained(model_dir)).float().eval()


@pytest.mark.parametrize("game", [False, True])
def test_score_rollouts_exact_kl_matches_brute_force(tiny_model_dir, tok, game):
    """Per-token log-probs, log pi_ref and sum_t KL(pi || pi_ref) over the whole vocabulary (or
    the action set) equal an explicit loop over sequences and positions; the KL is >= 0."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    pol = _other_model(tiny_model_dir, seed=3)
    if game:
        actions = [tok.convert_tokens_to_ids(c) for c in "ABCDE"]
        prompt = tok.encode("Choose one letter.")
        rollouts = [Rollout("x", prompt, [a], "", 0.0) for a in actions]
    else:
        actions, rollouts = None, make_rollouts(tok)
    sc = score_rollouts(pol, rollouts, micro_batch_size=3, action_token_ids=actions, reference=ref, chunk_tokens=2)
    want_kl, want_tok = [], []
    with torch.no_grad():
        for r in rollouts:
            ids = torch.tensor([r.prompt_token_ids + r.response_token_ids])
            lp, lr = (m(input_ids=ids).logits[0].float() for m in (pol, ref))
            if actions is not None:
                lp, lr = lp[:, actions], lr[:, actions]
            lp, lr = lp.log_softmax(-1), lr.log_softmax(-1)
            p = len(r.prompt_token_ids)
            kl, toks = 0.0, []
            for t, y in enumerate(r.response_token_ids):
                q, s = lp[p - 1 + t], lr[p - 1 + t]
                kl += float(sum(float(q[v].exp()) * float(q[v] - s[v]) for v in range(len(q))))
                toks.append(float(q[y if actions is None else actions.index(y)]))
            want_kl.append(kl)
            want_tok.append(toks)
    assert (sc.kl_ref >= 0).all() and sc.kl_ref.sum() > 0
    torch.testing.assert_close(sc.kl_ref, torch.tensor(want_kl), atol=1e-5, rtol=1e-4)
    for got, want in zip(sc.token_logp, want_tok):
        torch.testing.assert_close(got, torch.tensor(want), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sc.logp, naive_logprobs(pol, rollouts, actions), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(sc.logp_ref, naive_logprobs(ref, rollouts, actions), atol=1e-4, rtol=1e-5)


# ----------------------------------------------------------------------------- worker steps
@pytest.mark.parametrize("estimator", ["pg", "regression"])
def test_half_step_moves_weights_towards_preferred_samples(tiny_model_dir, tok, estimator):
    """Pairs (i, i ^ 1) share a prompt; the default inner_steps (4) apply, at a learning rate small
    enough (Adam moves every weight by ~lr per step) for the step to stay first-order."""
    cfg = make_cfg({"optimizer": {"lr": 1e-3}}, {"estimator": estimator}, responses_per_prompt=4)
    assert cfg.algorithm.inner_steps > 1
    with learner(cfg, tiny_model_dir) as w:
        rollouts = make_rollouts(tok)
        batch = batch_for(w, rollouts, PREF)
        before_sd = w.gathered_state_dict()
        before = torch.tensor(w.sequence_logprobs(rollouts, "policy"))
        m = w.half_step(batch)
        after = torch.tensor(w.sequence_logprobs(rollouts, "policy"))
        for key in ("loss", "kl_ref", "kl_ref_sample", "kl_anchor", "grad_norm", "logprob_gap", "response_len",
                    "step_time_s"):
            assert key in m and m[key] == m[key], key  # present and not NaN
        assert m["grad_norm"] > 0 and m["inner_steps"] == cfg.algorithm.inner_steps
        assert m["kl_ref"] == pytest.approx(0.0, abs=1e-6)  # pi_k = pi_ref at k = 0, exact KL
        assert m["kl_anchor"] > 1e-6  # measured after the step: the policy left pi_k
        assert m["logprob_gap"] == pytest.approx(0.0, abs=1e-6)  # batch_for: engine == learner
        assert m["response_len"] == pytest.approx(sum(len(r.response_token_ids) for r in rollouts) / len(rollouts))
        if estimator == "pg":
            for key in ("clip_frac", "ratio_min", "ratio_mean", "ratio_max", "pg_weight_std"):
                assert key in m, key
        assert differs(before_sd, w.gathered_state_dict())
        delta = after - before
        if estimator == "pg":
            assert delta[0::2].mean() > 0 > delta[1::2].mean()  # winners up, losers down
        else:  # regression moves log-ratios within pairs: winner minus loser goes up
            assert (delta[0::2] - delta[1::2]).mean() > 0
        # the reference did not move, and theta_k comes back exactly
        assert w.sequence_logprobs(rollouts, "reference") == before.tolist()
        with pytest.raises(RuntimeError, match="set aside"):
            w.sequence_logprobs(rollouts, "anchor")
        w._restore()
        assert w.sequence_logprobs(rollouts, "policy") == before.tolist()


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
        batch = batch_for(w, rollouts, pref)
        w.half_step(StepBatch(batch.rollouts, pref))
        after = torch.tensor(w.sequence_logprobs(rollouts[:5]))
        torch.testing.assert_close(after.exp().sum(), torch.tensor(1.0), atol=1e-5, rtol=0)
        assert after[0] > before[0]


@pytest.mark.parametrize("stage,precision,inner,snapshot", [
    (0, "fp32", 4, "memory"), (0, "fp32", 4, "disk"), (0, "fp32", 1, "memory"), (0, "bf16", 4, "memory"),
    (2, "fp32", 4, "memory"), (3, "fp32", 4, "disk"), (3, "bf16", 4, "memory")])
def test_restore_is_bit_exact(tiny_model_dir, tok, stage, precision, inner, snapshot):
    """After half_step, _restore() gives back theta_k's weights AND optimiser state bit for bit
    (from memory or disk; inner=1 at stage 0 fp32 is the weights-only half-step, whose
    optimiser state never moved), the snapshot is consumed, and a full step on the same batch
    reproduces the half-step's theta exactly."""
    cfg = make_cfg({"zero_stage": stage, "precision": precision}, {"inner_steps": inner})
    with learner(cfg, tiny_model_dir) as w:
        w.snapshot_mode = snapshot
        rollouts = make_rollouts(tok)
        batch = batch_for(w, rollouts, PREF)
        w.half_step(batch)
        w.full_step(batch)  # now AdamW has state (exp_avg, exp_avg_sq, step) to restore
        batch = batch_for(w, rollouts, PREF[::-1])
        weights_k = w.gathered_state_dict()
        opt_k = deep_clone(w.engine.optimizer.state_dict())
        logp_k = w.sequence_logprobs(rollouts, "policy")

        w.half_step(batch)
        assert w._snapshot.weights_only == (inner == 1 and stage == 0 and precision == "fp32")
        if snapshot == "disk":
            assert not w._snapshot.weights  # nothing held in memory
        weights_half = w.gathered_state_dict()
        assert differs(weights_k, weights_half)
        if inner == 1 and stage == 0 and precision == "fp32":
            assert_same(opt_k, w.engine.optimizer.state_dict(), "a weights-only half-step leaves AdamW alone")
        else:
            with pytest.raises(AssertionError):
                assert_same(opt_k, w.engine.optimizer.state_dict())

        w._restore()
        assert w._snapshot is None
        assert_same(weights_k, w.gathered_state_dict(), "weights")
        assert_same(opt_k, w.engine.optimizer.state_dict(), "optimizer")
        assert w.sequence_logprobs(rollouts, "policy") == logp_k

        w.half_step(batch)  # from the restored theta_k: the same half-step again
        assert_same(weights_half, w.gathered_state_dict(), "half step from restored theta_k")
        w.full_step(batch)  # restores, same batch -> same update
        assert_same(weights_half, w.gathered_state_dict(), "full step == half step on the same batch")


@pytest.mark.parametrize("native", [False, True])
def test_precision_auto_follows_native_bf16(tiny_model_dir, tok, monkeypatch, native):
    """``learner.precision: auto`` trains in bf16 (DeepSpeed bf16) only where the CPU computes
    bf16 natively and in fp32 elsewhere (an AVX2-only CPU: bf16 matmuls ~46x slower); the worker
    reports the resolved value and the config it keeps has it."""
    import nlhf.hardware as hw

    monkeypatch.setattr(hw, "cpu_has_native_bf16", lambda: native)
    cfg = make_cfg({"precision": "auto"})
    with learner(cfg, tiny_model_dir) as w:
        want = "bf16" if native else "fp32"
        assert w.precision() == want and w.cfg.learner.precision == want
        assert w.dtype == (torch.bfloat16 if native else torch.float32)
        assert next(w.engine.module.parameters()).dtype == w.dtype
        assert w.ds_config["bf16"]["enabled"] is native


def test_precision_bad_value_is_refused():
    from nlhf.hardware import resolve_precision

    with pytest.raises(ValueError, match="learner.precision.*'fp16'"):
        resolve_precision("fp16", gpu=False)
    with pytest.raises(ValueError, match="precision"):
        make_cfg({"precision": "fp16"})


def test_full_step_requires_a_half_step(tiny_model_dir, tok):
    with learner(make_cfg(), tiny_model_dir) as w:
        batch = batch_for(w, make_rollouts(tok), PREF)
        with pytest.raises(RuntimeError, match="half_step"):
            w.full_step(batch)
        with pytest.raises(ValueError, match="step is not an operation of algorithm.name 'nash-mp'"):
            w.step(batch)


@pytest.mark.parametrize("anchor", ["snapshot", "ema"])
def test_anchor_update_after_full_step(tiny_model_dir, tok, anchor):
    d = 0.75
    with learner(make_cfg(algorithm={"anchor": anchor, "ema_decay": d}), tiny_model_dir) as w:
        assert (w.anchor is None) == (anchor == "snapshot")  # snapshot mode keeps no anchor copy
        rollouts = make_rollouts(tok)
        theta_0 = w.gathered_state_dict()
        w.half_step(batch_for(w, rollouts, PREF))
        half = w.gathered_state_dict()
        anchor_mid = None if w.anchor is None else {k: v.clone() for k, v in w.anchor.state_dict().items()}
        w.full_step(StepBatch(rollouts, PREF[::-1], [i ^ 1 for i in range(len(rollouts))]))
        theta_1 = w.gathered_state_dict()
        assert differs(half, theta_1)
        pol = w.sequence_logprobs(rollouts, "policy")
        anc = w.sequence_logprobs(rollouts, "anchor")
        if anchor == "snapshot":
            assert pol == anc  # between iterations pi_k is the policy itself
            return
        got = w.anchor.state_dict()
        for k, v0 in theta_0.items():
            assert torch.equal(anchor_mid[k], v0), "the half-step must not move the anchor"
            torch.testing.assert_close(got[k], d * v0 + (1 - d) * theta_1[k], atol=1e-7, rtol=0)
        assert pol != anc


def test_state_dict_bytes_and_checkpoint_roundtrip(tiny_model_dir, tok, tmp_path):
    from safetensors.torch import load
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    with learner(make_cfg(), tiny_model_dir) as w:
        rollouts = make_rollouts(tok)
        batch = batch_for(w, rollouts, PREF)
        w.half_step(batch)
        w.full_step(batch)
        want = torch.tensor(w.sequence_logprobs(rollouts, "policy"))
        sd = load(w.state_dict_bytes("float32"))
        sd16 = load(w.state_dict_bytes("bfloat16"))
        # sync.backend: file writes the very same payload
        info = w.state_dict_file("bfloat16", str(tmp_path / "sync" / "extrapolated-v000001.safetensors"))
        assert (tmp_path / "sync" / "extrapolated-v000001.safetensors").read_bytes() == w.state_dict_bytes("bfloat16")
        assert info["bytes"] == (tmp_path / "sync" / "extrapolated-v000001.safetensors").stat().st_size
        live = w.gathered_state_dict()
        w.save_checkpoint(str(tmp_path / "ckpt"))
        with pytest.raises(ValueError, match="dtype"):
            w.state_dict_bytes("float16")
    assert_same(sd, live, "fp32 export")
    assert all(v.dtype == torch.bfloat16 and torch.equal(v, live[k].to(torch.bfloat16)) for k, v in sd16.items())

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
    # single process reference (ZeRO-0, world size 1) on the same batches, same reference dtype
    with learner(make_cfg(), tiny_model_dir, reference_dtype="auto") as w:
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
            for key in ("loss", "grad_norm", "kl_ref", "kl_anchor", "logprob_gap"):
                assert got[key] == pytest.approx(want[key], rel=1e-3, abs=1e-5), key
        sds = ray_cluster.get([wk.gathered_state_dict.remote(True) for wk in group.workers])
        assert_same(sds[0], sds[1], "rank 0 vs rank 1")
        for k, v in ref_sd.items():
            torch.testing.assert_close(sds[0][k], v, atol=5e-4, rtol=0)  # Adam steps are +-lr-sized
        from safetensors.torch import load

        assert_same(load(group.state_dict_bytes("float32")), sds[0], "state_dict_bytes")
        assert_same(load(ray_cluster.get(group.state_dict_ref("float32"))), sds[0], "state_dict_ref")
        assert group.sequence_logprobs(rollouts, "anchor") == group.sequence_logprobs(rollouts, "policy")
        toks = group.token_logprobs(rollouts)
        torch.testing.assert_close(torch.tensor([sum(t) for t in toks]),
                                   torch.tensor(group.sequence_logprobs(rollouts)), atol=1e-5, rtol=0)
    finally:
        group.shutdown()
