"""The pairwise judge model: antisymmetry, intransitivity, save/load, truncation (tiny random BERT)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nlhf.judge.base import JudgeError
from nlhf.judge.pairwise import (HEADS, SEG_FIRST, SEG_SECOND, PairwiseJudge, PairwiseJudgeModel, allocate,
                                 load_folder, make_tiny_pairwise, save_folder)

PROMPTS = ["What is the capital of France?", "Write a haiku about rain.", "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?"]
A = ["Paris.", "Rain falls soft and slow", "I am fine, thanks!"]
B = ["It is Lyon, I think, or maybe Marseille.", "", "Go away."]


@pytest.fixture(scope="module", params=HEADS)
def tiny_dir(request, tmp_path_factory):
    return make_tiny_pairwise(tmp_path_factory.mktemp("judge") / request.param, head=request.param, seed=0)


def test_folder_reused_and_head_recorded(tiny_dir):
    judge = PairwiseJudge.from_folder(tiny_dir)
    assert judge.head == tiny_dir.name and judge.name == "pairwise"
    mtime = (tiny_dir / "model.safetensors").stat().st_mtime_ns
    make_tiny_pairwise(tiny_dir, head=tiny_dir.name, seed=0)
    assert (tiny_dir / "model.safetensors").stat().st_mtime_ns == mtime


def test_antisymmetric_exactly(tiny_dir):
    judge = PairwiseJudge.from_folder(tiny_dir)
    p_ab = judge.prefer(PROMPTS, A, B)
    p_ba = judge.prefer(PROMPTS, B, A)
    assert p_ab.shape == (3,) and p_ab.dtype == np.float64
    np.testing.assert_allclose(p_ab + p_ba, 1.0, atol=1e-6)
    assert not np.allclose(p_ab, 0.5)  # a random model is not indifferent
    assert np.all(judge.prefer(PROMPTS, A, A) == 0.5)
    # both orders asked in one call (batch sharing) agree with separate calls
    both = judge.prefer(PROMPTS + PROMPTS, A + B, B + A)
    np.testing.assert_allclose(both, np.concatenate([p_ab, p_ba]), atol=1e-6)


def test_model_logit_antisymmetric_without_canonical_order(tiny_dir):
    """The construction itself (not the adapter's canonical ordering) negates under a swap."""
    judge = PairwiseJudge.from_folder(tiny_dir)
    d_ab = judge.model.logits(judge.encoder.encode(PROMPTS, A, B))
    d_ba = judge.model.logits(judge.encoder.encode(PROMPTS, B, A))
    torch.testing.assert_close(d_ab, -d_ba, atol=1e-5, rtol=0)
    d_aa = judge.model.logits(judge.encoder.encode(PROMPTS, A, A))
    torch.testing.assert_close(d_aa, torch.zeros(3), atol=1e-6, rtol=0)


def _fit_cycle(head: str, steps: int = 80) -> np.ndarray:
    """Fit rock < paper < scissors < rock; return P(winner > loser) for the three pairs."""
    folder_model, tok, _ = load_folder(make_tiny_pairwise(_fit_cycle.tmp / head, head=head, seed=1))
    folder_model.eval()  # no dropout: a deterministic fit
    judge = PairwiseJudge(folder_model, tok, max_length=32)
    x = ["Pick one."] * 3
    winners, losers = ["paper", "scissors", "rock"], ["rock", "paper", "scissors"]
    batch = judge.encoder.encode(x, winners, losers)
    opt = torch.optim.Adam(folder_model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(steps):
        loss = torch.nn.functional.softplus(-folder_model.logits(batch)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return judge.prefer(x, winners, losers)


def test_pairwise_head_fits_a_cycle_bradley_terry_cannot(tmp_path):
    _fit_cycle.tmp = tmp_path
    p_pair = _fit_cycle("pairwise")
    p_bt = _fit_cycle("bradley-terry")
    assert np.all(p_pair > 0.8), p_pair
    # a per-response score is transitive: at most two of the three cyclic preferences hold
    assert np.sum(p_bt > 0.5) <= 2, p_bt
    assert np.min(p_bt) < 0.5 + 1e-6


def test_save_load_round_trip_identical(tiny_dir, tmp_path):
    model, tok, cfg = load_folder(tiny_dir)
    with torch.no_grad():  # move away from the stored weights
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    before = PairwiseJudge(model, tok, cfg["max_length"]).prefer(PROMPTS, A, B)
    out = save_folder(model, tok, tmp_path / "copy", cfg["max_length"])
    assert {"model.safetensors", "judge_config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert not list(tmp_path.glob("copy.tmp*"))
    after = PairwiseJudge.from_folder(out).prefer(PROMPTS, A, B)
    np.testing.assert_array_equal(before, after)
    assert not np.allclose(after, PairwiseJudge.from_folder(tiny_dir).prefer(PROMPTS, A, B))


def test_allocate_budgets():
    assert allocate(10, 20, 30, 100) == (10, 20, 30)  # everything fits
    p, a, b = allocate(500, 500, 500, 100)
    assert p + a + b == 100 and p == 25 and min(a, b) >= 37  # both responses seen
    p, a, b = allocate(500, 5, 500, 100)
    assert (a, p + b) == (5, 95) and p == 25  # a short response leaves its share to the other
    p, a, b = allocate(500, 5, 5, 100)
    assert (p, a, b) == (90, 5, 5)  # unused response budget goes back to the prompt
    assert allocate(500, 500, None, 100) == (25, 75, 0)


def test_truncation_counted_and_both_responses_kept(tiny_dir):
    judge = PairwiseJudge.from_folder(tiny_dir, max_length=64)
    long_a, long_b = " ".join(["apple"] * 200), " ".join(["banana"] * 200)
    judge.prefer(PROMPTS[:1], A[:1], B[:1])
    assert judge.truncations == 0
    judge.prefer(PROMPTS[:2], [long_a, A[1]], [long_b, B[1]])
    assert judge.truncations == 1
    batch = judge.encoder.encode([PROMPTS[0]], [long_a], [long_b])
    assert batch.input_ids.shape[1] == 64 and bool(batch.truncated[0])
    if judge.head == "pairwise":
        assert (batch.segments[0] == SEG_FIRST).sum() >= 20 and (batch.segments[0] == SEG_SECOND).sum() >= 20


def test_reject_mode_names_the_pair(tiny_dir):
    judge = PairwiseJudge.from_folder(tiny_dir, max_length=64, on_overlong="reject")
    judge.prefer(PROMPTS, A, B)  # short pairs pass
    with pytest.raises(JudgeError, match=r"pair 1 does not fit max_length 64.*banana"):
        judge.prefer(PROMPTS[:2], A[:2], [B[0], "banana " * 300])


def test_max_length_beyond_positions_refused(tiny_dir):
    with pytest.raises(ValueError, match="positions"):
        PairwiseJudge.from_folder(tiny_dir, max_length=10_000)


def test_length_feature_is_antisymmetric(tmp_path):
    model, tok, _ = load_folder(make_tiny_pairwise(tmp_path / "t", head="pairwise"))
    m2 = PairwiseJudgeModel(model.encoder.config, "pairwise", length_feature=True)
    m2.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        m2.length_coef.fill_(2.0)
    judge = PairwiseJudge(m2, tok, 64)
    p = judge.prefer(PROMPTS, A, B)
    np.testing.assert_allclose(p + judge.prefer(PROMPTS, B, A), 1.0, atol=1e-6)
    out = save_folder(m2, tok, tmp_path / "lf", 64)
    np.testing.assert_array_equal(PairwiseJudge.from_folder(out).prefer(PROMPTS, A, B), p)
