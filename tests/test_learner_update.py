"""The learner's update (issue 8.1, 8.4, 8.6; issue 9's trainer state): importance ratios against
the learner's own pi_k, the engine-learner gap and its truncated correction, proximal steps in
which eta acts, kl_anchor measured after the step, and a resume that continues bit for bit."""

from __future__ import annotations

import math

import pytest
import torch

from _learner_util import PREF, assert_same, batch_for, differs, learner, make_cfg, make_rollouts  # noqa: E402
from nlhf.batch import StepBatch  # noqa: E402


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_ratio_is_against_the_learners_own_pi_k(tiny_model_dir, tok):
    """The engine's log-probs are 0.5 nats per token below the learner's (another precision and
    kernels, exaggerated). The first inner step's ratio is exactly 1 and nothing is clipped, the
    update is the one of an engine that agrees with the learner, and the gap is reported."""
    cfg = make_cfg(algorithm={"inner_steps": 1, "clip": 0.2})
    rollouts = make_rollouts(tok)
    with learner(cfg, tiny_model_dir) as w:
        m = w.half_step(batch_for(w, rollouts, PREF, engine_offset=-0.5))
        offset_theta = w.gathered_state_dict()
        assert m["ratio_min"] == m["ratio_max"] == m["ratio_mean"] == 1.0
        assert m["clip_frac"] == 0.0
        assert m["logprob_gap"] == pytest.approx(0.5, abs=1e-5)
        w._restore()
        m0 = w.half_step(batch_for(w, rollouts, PREF, engine_offset=0.0))
        assert m0["logprob_gap"] == pytest.approx(0.0, abs=1e-6)
        assert_same(offset_theta, w.gathered_state_dict(), "the engine's log-probs do not enter the update")


def test_logprob_gap_falls_back_to_sequence_sums(tiny_model_dir, tok):
    rollouts = make_rollouts(tok)
    with learner(make_cfg(algorithm={"inner_steps": 1}), tiny_model_dir) as w:
        batch = batch_for(w, rollouts, PREF, engine_offset=0.25)
        for r in batch.rollouts:
            r.sampler_token_logprobs = []  # the producer did not record per-token values
        m = w.half_step(batch)
    assert m["logprob_gap"] == pytest.approx(0.25, abs=1e-5)


def test_engine_is_cap_weights_samples(tiny_model_dir, tok):
    """engine_is_cap = c: sample i's term is weighted by min(pi_k(y_i)/pi_engine(y_i), c)."""
    rollouts = make_rollouts(tok)
    offsets = [-0.05 * (i + 1) for i in range(len(rollouts))]  # engine below the learner: ratios > 1
    thetas, metrics = [], []
    for cap in (None, 1.2):
        with learner(make_cfg(algorithm={"inner_steps": 1, "engine_is_cap": cap}), tiny_model_dir) as w:
            batch = batch_for(w, rollouts, PREF)
            for r, off in zip(batch.rollouts, offsets):
                r.sampler_token_logprobs = [t + off for t in r.sampler_token_logprobs]
                r.sampler_logprob = sum(r.sampler_token_logprobs)
            metrics.append(w.half_step(batch))
            thetas.append(w.gathered_state_dict())
    lengths = [len(r.response_token_ids) for r in rollouts]
    want = sum(min(math.exp(-off * n), 1.2) for off, n in zip(offsets, lengths)) / len(rollouts)
    assert "engine_is_weight_mean" not in metrics[0]
    assert metrics[1]["engine_is_weight_mean"] == pytest.approx(want, rel=1e-5)
    assert differs(thetas[0], thetas[1])


@pytest.mark.parametrize("inner_steps", [1, 3])
def test_eta_acts_only_with_several_inner_steps(tiny_model_dir, tok, inner_steps):
    """Two values of eta, same batches: theta_{k+1} differs with inner_steps >= 2; with one step
    the anchor term has zero gradient at theta_k and eta cannot act (bit-identical result)."""
    rollouts = make_rollouts(tok)
    out = []
    for eta in (0.05, 5.0):
        with learner(make_cfg(algorithm={"inner_steps": inner_steps, "eta": eta, "beta": 0.5}), tiny_model_dir) as w:
            batch = batch_for(w, rollouts, PREF)
            w.half_step(batch)
            w.full_step(StepBatch(batch.rollouts, PREF[::-1], batch.partner))
            out.append(w.gathered_state_dict())
    if inner_steps == 1:
        assert_same(out[0], out[1], "eta has no effect with one step")
    else:
        assert differs(out[0], out[1])


def test_kl_anchor_is_measured_after_the_step(tiny_model_dir, tok):
    """kl_anchor = mean_i [(r_i - 1) - log r_i], r_i = pi_after(y_i)/pi_k(y_i): the k3 estimate of
    KL(pi_k || pi_after) on the batch's samples of pi_k (> 0 once the policy moved)."""
    rollouts = make_rollouts(tok)
    with learner(make_cfg(algorithm={"inner_steps": 2}), tiny_model_dir) as w:
        before = torch.tensor(w.sequence_logprobs(rollouts))
        m = w.half_step(batch_for(w, rollouts, PREF))
        d = torch.tensor(w.sequence_logprobs(rollouts)) - before
    want = float((torch.expm1(d) - d).mean())
    assert want > 1e-4
    assert m["kl_anchor"] == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("name", ["nash-mp", "nash-md-pg"])
def test_separable_loss_steps_skip_the_rescoring_pass(tiny_model_dir, tok, monkeypatch, name):
    """Every inner step of a policy-gradient loss takes dL/dlogp_i from each micro-batch's own
    gradient forward (step 0's is also the scoring pass at theta_k): one model forward fewer per
    micro-batch and step than scoring the batch in a no-grad pass first, and the same theta_{k+1}
    and loss metrics (up to float rounding)."""
    import nlhf.learner.logprobs as logprobs
    from nlhf.learner.update import UpdateMixin

    steps, mbs = 3, 3  # 8 rollouts in micro-batches of 3: 3 micro-batches, the last one short
    rollouts = make_rollouts(tok)
    runs = {}
    calls, policy = [], []
    forward = logprobs._response_logits  # one call = one forward of a micro-batch (its prompts shared or not)

    def counting(model, *args, **kw):
        if policy and getattr(model, "module", model) is policy[0]:
            calls.append(1)
        return forward(model, *args, **kw)

    monkeypatch.setattr(logprobs, "_response_logits", counting)
    for fused in (True, False):
        monkeypatch.setattr(UpdateMixin, "_separable_loss", lambda self, f=fused: f, raising=False)
        cfg = make_cfg(algorithm={"name": name, "inner_steps": steps, "beta": 0.5, "clip": 0.2},
                       learner={"micro_batch_size": mbs})
        with learner(cfg, tiny_model_dir) as w:
            batch = batch_for(w, rollouts, PREF)
            calls.clear()
            policy[:] = [w.engine.module]
            m = w.step(batch) if name == "nash-md-pg" else w.half_step(batch)
            runs[fused] = (len(calls), m, w.gathered_state_dict())
            policy.clear()
    (n_fused, m_fused, theta_fused), (n_plain, m_plain, theta_plain) = runs[True], runs[False]
    assert n_plain - n_fused == steps * 3
    for k in theta_plain:
        torch.testing.assert_close(theta_fused[k], theta_plain[k], rtol=1e-4, atol=1e-6, msg=k)
    for key in ("loss", "ratio_mean", "ratio_max", "clip_frac", "kl_anchor"):
        assert m_fused[key] == pytest.approx(m_plain[key], rel=1e-4, abs=1e-6), key
    assert m_fused["ratio_max"] > 1.0  # later inner steps saw moved weights


@pytest.mark.parametrize("cap", [None, 1.2])
def test_scoring_pass_fused_with_the_first_step_gives_the_same_update(tiny_model_dir, tok, monkeypatch, cap):
    """Pass 1 run as step 0's gradient forward (separable loss, snapshot anchor, no dropout)
    gives the start scores of a separate no-grad pass: the same kl_ref, engine-learner gap,
    truncated-IS weights and theta_{k+1/2}, and the full step reuses them as before. With
    dropout in the policy the separate pass stays (train and eval forwards differ)."""
    from nlhf.learner.update import UpdateMixin

    rollouts = make_rollouts(tok)
    runs = {}
    for fuse in (True, False):
        if not fuse:
            monkeypatch.setattr(UpdateMixin, "_fuses_first_step", lambda self: False)
        cfg = make_cfg(algorithm={"inner_steps": 2, "beta": 0.5, "clip": 0.2, "engine_is_cap": cap})
        with learner(cfg, tiny_model_dir) as w:
            assert w._fuses_first_step() is fuse
            batch = batch_for(w, rollouts, PREF, engine_offset=-0.1)
            half = w.half_step(batch)
            full = w.full_step(batch)
            runs[fuse] = (half, full, w.gathered_state_dict())
    (h1, f1, t1), (h0, f0, t0) = runs[True], runs[False]
    for k in t0:
        torch.testing.assert_close(t1[k], t0[k], rtol=1e-4, atol=1e-6, msg=k)
    keys = ["loss", "kl_ref", "kl_ref_sample", "logprob_gap", "response_len", "ratio_mean", "kl_anchor"]
    keys += ["engine_is_weight_mean"] if cap is not None else []
    for m1, m0 in ((h1, h0), (f1, f0)):
        for key in keys:
            assert m1[key] == pytest.approx(m0[key], rel=1e-4, abs=1e-6), key
    assert h1["logprob_gap"] == pytest.approx(0.1, abs=1e-5)
    if cap is not None:
        want = sum(min(math.exp(0.1 * len(r.response_token_ids)), cap) for r in rollouts) / len(rollouts)
        assert h1["engine_is_weight_mean"] == pytest.approx(want, rel=1e-5)  # pi_s / pi_engine = e^0.1 per token


def test_dropout_keeps_the_separate_scoring_pass(tiny_model_dir, tok):
    cfg = make_cfg(algorithm={"inner_steps": 2})
    with learner(cfg, tiny_model_dir) as w:
        w.engine.module.add_module("extra_dropout", torch.nn.Dropout(0.1))
        assert not w._fuses_first_step()


def test_pair_losses_need_partners(tiny_model_dir, tok):
    rollouts = make_rollouts(tok)
    with learner(make_cfg(algorithm={"name": "online-ipo"}), tiny_model_dir) as w:
        batch = batch_for(w, rollouts, PREF)
        with pytest.raises(ValueError, match="StepBatch.partner is empty: online-ipo"):
            w.step(StepBatch(batch.rollouts, PREF))
        with pytest.raises(ValueError, match="half_step is not an operation of algorithm.name 'online-ipo'"):
            w.half_step(batch)
        m = w.step(batch)
        assert m["loss"] > 0 and m["kl_anchor"] > 0


@pytest.mark.parametrize("stage,anchor", [(0, "snapshot"), (2, "ema")])
def test_trainer_state_resume_is_bit_exact(tiny_model_dir, tok, tmp_path, stage, anchor):
    """Save after an iteration, build a fresh learner from the HF checkpoint, load the trainer
    state: the next half + full step gives the same weights, bit for bit, as not stopping."""
    cfg = make_cfg({"zero_stage": stage}, {"inner_steps": 2, "anchor": anchor})
    rollouts = make_rollouts(tok)
    with learner(cfg, tiny_model_dir) as w:
        b1 = batch_for(w, rollouts, PREF)
        w.half_step(b1)
        w.full_step(StepBatch(b1.rollouts, PREF[::-1], b1.partner))
        w.save_checkpoint(str(tmp_path / "ckpt"))
        w.save_trainer_state(str(tmp_path / "state"))
        b2 = batch_for(w, make_rollouts(tok), PREF[::-1])
        torch.manual_seed(123)  # the resumed learner must not depend on what happened to the RNG since
        w.half_step(b2)
        w.full_step(StepBatch(b2.rollouts, PREF, b2.partner))
        want = w.gathered_state_dict()
        want_anchor = None if w.anchor is None else w.anchor.state_dict()
    from nlhf.learner.worker import LearnerWorker
    from _learner_util import free_port

    fresh = LearnerWorker(cfg, str(tmp_path / "ckpt"), str(tiny_model_dir), master_port=free_port(),
                          reference_dtype="float32")
    try:
        fresh.load_trainer_state(str(tmp_path / "state"))
        fresh.half_step(b2)
        fresh.full_step(StepBatch(b2.rollouts, PREF, b2.partner))
        assert_same(want, fresh.gathered_state_dict(), "resumed vs uninterrupted")
        if want_anchor is not None:
            assert_same(dict(want_anchor), dict(fresh.anchor.state_dict()), "EMA anchor")
        with pytest.raises(RuntimeError, match="mid-iteration"):
            fresh.half_step(b2)
            fresh.save_trainer_state(str(tmp_path / "again"))
    finally:
        fresh.shutdown()
    assert (tmp_path / "state" / "rank0" / "state.safetensors").is_file()


def test_kl_anchor_on_a_subsample_scores_the_selected_samples_only(tiny_model_dir, tok):
    """learner.kl_anchor_samples = m: the post-step pass scores m samples spread over the batch
    (floor(j n / m)) and kl_anchor is the k3 estimate over them; the update itself is unchanged."""
    rollouts = make_rollouts(tok)
    n, m = len(rollouts), 3
    assert n > m
    thetas = []
    for samples in (None, m):
        with learner(make_cfg(algorithm={"inner_steps": 2}, learner={"kl_anchor_samples": samples}),
                     tiny_model_dir) as w:
            before = torch.tensor(w.sequence_logprobs(rollouts))
            scored: list[int] = []
            real = w._policy_logp_full

            def counting(local, idx, valid, k, real=real):
                scored.append(len(local))
                return real(local, idx, valid, k)

            w._policy_logp_full = counting
            metrics = w.half_step(batch_for(w, rollouts, PREF))
            post = scored[-1]  # the post-step pass is the last one
            d = torch.tensor(w.sequence_logprobs(rollouts)) - before
            thetas.append(w.gathered_state_dict())
        sel = list(range(n)) if samples is None else [j * n // m for j in range(m)]
        assert post == len(sel)
        want = float((torch.expm1(d[sel]) - d[sel]).mean())
        assert metrics["kl_anchor"] == pytest.approx(want, rel=1e-4)
    assert sel == [0, n // 3, 2 * n // 3]
    assert_same(thetas[0], thetas[1], "kl_anchor_samples is a diagnostic only")
