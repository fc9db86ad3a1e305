"""A prompt shared by several responses of a micro-batch runs once (``share_prompts``,
``nlhf.learner.logprobs.prompt_groups``): the batch-1 prompt forward's key/value cache is
repeated for the responses. It must be the same function of the weights as running every row
whole: same sequence and per-token log-probs, same exact KL to a reference, same gradients."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from nlhf.batch import Rollout
from nlhf.learner.logprobs import prompt_groups, score_rollouts, sequence_logprobs


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _rollouts(tok) -> list[Rollout]:
    """3 prompts of different lengths x 3 responses of 1 to 9 tokens (padding and a one-token
    response in each group), then one prompt alone."""
    out = []
    for p, text in enumerate(["Hi", "Name three colours, please.", "Write one sentence about the sea and the sky."]):
        prompt = tok.encode(text)
        for k, resp in enumerate(["ok", "sure thing", "the cat sat on the mat today, quietly"]):
            out.append(Rollout(text, prompt, tok.encode(" " + resp)[: 1 + 4 * k], resp, 0.0))
    out.append(Rollout("alone", tok.encode("A prompt of its own"), tok.encode(" yes no"), "yes no", 0.0))
    return out


def test_prompt_groups_are_runs_of_one_prompt(tok):
    rs = _rollouts(tok)
    groups = prompt_groups(rs)
    assert [(s, e) for s, e, _ in groups] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert [p for *_, p in groups] == [len(rs[i].prompt_token_ids) for i in (0, 3, 6, 9)]
    assert prompt_groups(rs[8:]) is None  # no prompt repeats: nothing to share


@pytest.mark.parametrize("micro_batch_size", [4, 10])
def test_shared_prompt_forward_equals_the_full_forward(tiny_model_dir, tok, micro_batch_size):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # the policy moved away from the reference
    rs = _rollouts(tok)
    shapes = []
    hook = model.get_decoder().register_forward_pre_hook(
        lambda m, a, kw: shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    full = sequence_logprobs(model, rs, micro_batch_size, share_prompts=False)
    n_full = len(shapes)
    shapes.clear()
    shared = sequence_logprobs(model, rs, micro_batch_size, share_prompts=True)
    hook.remove()
    torch.testing.assert_close(shared, full, rtol=1e-5, atol=1e-5)
    # each group's prompt ran as one row, and the full forward ran one call per micro-batch
    assert n_full == -(-len(rs) // micro_batch_size)
    assert (1, len(rs[6].prompt_token_ids)) in shapes and (3, 8) in shapes
    params = [p for p in model.parameters() if p.requires_grad]
    g_full = torch.autograd.grad(full.sum(), params, allow_unused=True)
    g_shared = torch.autograd.grad(shared.sum(), params, allow_unused=True)
    # fp32 sums in another order: one element in 3.1M once differed by 1.1e-6 (of 5e-4) on an AVX2 CPU
    for a, b in zip(g_full, g_shared):
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)

    s_full = score_rollouts(model, rs, micro_batch_size, reference=reference, share_prompts=False)
    s_shared = score_rollouts(model, rs, micro_batch_size, reference=reference)
    assert float(s_full.kl_ref.min()) > 0.0
    for a, b in [(s_full.logp, s_shared.logp), (s_full.logp_ref, s_shared.logp_ref), (s_full.kl_ref, s_shared.kl_ref),
                 *zip(s_full.token_logp, s_shared.token_logp)]:
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_runs_every_row_whole(tiny_model_dir, tok):
    """HF turns the key/value cache off under gradient checkpointing in training mode, so the
    prompt cannot be shared there: each micro-batch is one full forward."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.gradient_checkpointing_enable()
    model.train()
    rs = _rollouts(tok)
    shapes = []
    hook = model.get_decoder().register_forward_pre_hook(
        lambda m, a, kw: shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    lp = sequence_logprobs(model, rs, 10)
    hook.remove()
    assert len(shapes) == 1 and shapes[0][0] == 10
    lp.sum().backward()
