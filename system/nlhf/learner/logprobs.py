"""Log-probabilities of rollouts under a causal LM, per token and per sequence, and the exact
per-token KL to a reference model at the sampled positions.

Responses are scored exactly as the rollout pool sampled them: the chat-templated prompt ids
followed by the response ids, right-padded into micro-batches; only response positions count.
In game mode the pool samples among a fixed set of action tokens only, so the (single)
response token is scored under the softmax restricted to those tokens and renormalised.

Two entry points:

- :func:`sequence_logprobs`: ``log pi(y|x) = sum_t log pi(y_t | x, y_<t)``, differentiable
  (the learner's gradient pass);
- :func:`score_rollouts`: no-grad scoring pass that returns, per rollout, the sequence
  log-prob, the per-token log-probs and, fused with a reference model in the same
  micro-batch loop, ``log pi_ref(y|x)`` and the exact KL
  ``sum_t KL(pi(.|x, y_<t) || pi_ref(.|x, y_<t))`` over the vocabulary (or the action set).
  Logits are materialised ``chunk_tokens`` response positions at a time, so memory stays
  bounded by ``chunk_tokens x V`` floats per model whatever the batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from nlhf.batch import Rollout


def _micro_batch_inputs(rollouts: Sequence[Rollout], pad_id: int, device: torch.device
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask`` (N, T), and for the response tokens the
    ``targets`` (N, T-1) and a ``mask`` (N, T-1) that is 1 where position t predicts a response token."""
    lengths = [len(r.prompt_token_ids) + len(r.response_token_ids) for r in rollouts]
    n, t = len(rollouts), max(lengths)
    input_ids = torch.full((n, t), pad_id, dtype=torch.long)
    attention = torch.zeros((n, t), dtype=torch.long)
    mask = torch.zeros((n, t - 1), dtype=torch.bool)
    for i, r in enumerate(rollouts):
        p, length = len(r.prompt_token_ids), lengths[i]
        input_ids[i, :length] = torch.tensor(list(r.prompt_token_ids) + list(r.response_token_ids), dtype=torch.long)
        attention[i, :length] = 1
        mask[i, p - 1:length - 1] = True  # logits at position s predict token s+1
    targets = input_ids[:, 1:].clone()
    return input_ids.to(device), attention.to(device), targets.to(device), mask.to(device)


def _check(rollouts: Sequence[Rollout], action_token_ids: Sequence[int] | None) -> None:
    for i, r in enumerate(rollouts):
        if not r.prompt_token_ids:
            raise ValueError(f"rollout {i} has an empty prompt (nothing conditions the first response token)")
        if not r.response_token_ids:
            raise ValueError(f"rollout {i} has an empty response")
        if action_token_ids is not None:
            if len(r.response_token_ids) != 1:
                raise ValueError(f"game mode: rollout {i} has {len(r.response_token_ids)} response tokens, expected 1")
            if r.response_token_ids[0] not in action_token_ids:
                raise ValueError(f"game mode: rollout {i} response token {r.response_token_ids[0]} is not an action token")


def _decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """The HF decoder stack and output embedding of ``model`` (unwrapping a DeepSpeed engine),
    or None when logits are not simply ``head(last_hidden_state)`` (soft-capped or scaled logits)
    or the parameters are ZeRO-3 partitions (calling submodules outside the engine's forward gave
    a different gradient for the tied head there)."""
    hf = getattr(model, "module", model)
    if any(hasattr(p, "ds_id") for p in hf.parameters()):
        return None  # ZeRO-3 partitions parameters (a tied head too): keep the engine's own forward
    config = getattr(hf, "config", None)
    if config is None or any(getattr(config, a, None) for a in ("final_logit_softcapping", "logit_scale")):
        return None
    get_decoder, get_head = getattr(hf, "get_decoder", None), getattr(hf, "get_output_embeddings", None)
    if get_decoder is None or get_head is None:
        return None
    decoder, head = get_decoder(), get_head()
    if decoder is None or head is None or decoder is hf:
        return None
    return decoder, head


def prompt_groups(rollouts: Sequence[Rollout]) -> list[tuple[int, int, int]] | None:
    """Runs of consecutive rollouts with the same prompt, as ``(first row, end row, prompt
    length)``; None when no two consecutive rollouts share their prompt (nothing to share)."""
    groups: list[tuple[int, int, int]] = []
    for i, r in enumerate(rollouts):
        if groups:
            first = rollouts[groups[-1][0]].prompt_token_ids
            if r.prompt_token_ids is first or list(r.prompt_token_ids) == list(first):
                groups[-1] = (groups[-1][0], i + 1, groups[-1][2])
                continue
        groups.append((i, i + 1, len(r.prompt_token_ids)))
    return groups if len(groups) < len(rollouts) else None


def _can_share_prompt(decoder: torch.nn.Module) -> bool:
    """The prompt's key/value cache can carry gradients: not under gradient checkpointing (HF
    turns the cache off there in training mode)."""
    return not any(getattr(m, "gradient_checkpointing", False) is True for m in decoder.modules())


def _shared_prompt_hidden(decoder: torch.nn.Module, input_ids: torch.Tensor, attention: torch.Tensor,
                          rows: torch.Tensor, cols: torch.Tensor, groups: list[tuple[int, int, int]]) -> torch.Tensor:
    """Last hidden states (M, H) at the positions ``(rows, cols)`` that predict response tokens,
    computing each group's shared prompt once: a batch-1 forward over the prompt's P tokens
    (its key/value cache repeated for the group's n responses), then an n-row forward over the
    response tokens attending to it. The same function of the weights as the full forward of
    every row (gradients reach the prompt's activations through the cache and the prompt's last
    hidden state, which predicts every response's first token); the prompt's share of the
    FLOPs drops from n copies to one."""
    out = []
    lengths = attention.sum(-1)
    for s, e, p in groups:
        n = e - s
        end = int(lengths[s:e].max())  # the group's longest prompt + response
        first = decoder(input_ids=input_ids[s:s + 1, :p], attention_mask=attention[s:s + 1, :p], use_cache=True)
        h_last = first.last_hidden_state[:, p - 1:p]  # (1, 1, H): predicts each response's first token
        parts = [h_last.expand(n, 1, h_last.shape[-1])]
        if end - 1 > p:  # response tokens that predict a later one
            cache = first.past_key_values
            cache.batch_repeat_interleave(n)
            pos = torch.arange(p, end - 1, device=input_ids.device).unsqueeze(0).expand(n, -1)
            parts.append(decoder(input_ids=input_ids[s:e, p:end - 1], attention_mask=attention[s:e, :end - 1],
                                 position_ids=pos, past_key_values=cache, use_cache=True).last_hidden_state)
        hidden = torch.cat(parts, dim=1)  # (n, end - p, H): column j is position p - 1 + j
        sel = (rows >= s) & (rows < e)
        out.append(hidden[rows[sel] - s, cols[sel] - (p - 1)])
    return torch.cat(out)


def _response_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention: torch.Tensor,
                     mask: torch.Tensor, actions: torch.Tensor | None,
                     groups: list[tuple[int, int, int]] | None = None
                     ) -> tuple[torch.Tensor, Callable[[int, int], torch.Tensor]]:
    """One forward pass of ``model`` over a micro-batch.

    Returns ``(rows, logits_of)``: ``rows`` (M,) is the micro-batch row of each of the M
    positions that predict a response token (row-major order, so each row's tokens are in
    order), and ``logits_of(s, e)`` gives the logits of positions ``s:e`` as a (e-s, V) tensor,
    or (e-s, A) restricted to ``actions`` in game mode. Where the model splits into decoder and
    head, the head runs only on the requested positions, and with ``groups`` (from
    :func:`prompt_groups`, rows sharing a prompt) each shared prompt is run once
    (:func:`_shared_prompt_hidden`); otherwise the full (N, T, V) logits of the forward are indexed.
    """
    rows, cols = mask.nonzero(as_tuple=True)
    split = _decoder_and_head(model)
    if split is not None:
        decoder, head = split
        if groups is not None and _can_share_prompt(decoder):
            h = _shared_prompt_hidden(decoder, input_ids, attention, rows, cols, groups)  # (M, H)
        else:
            hidden = decoder(input_ids=input_ids, attention_mask=attention).last_hidden_state[:, :-1]  # (N, T-1, H)
            h = hidden[rows, cols]  # (M, H)
        weight = getattr(head, "weight", None)
        if actions is not None and isinstance(head, torch.nn.Linear) and weight is not None:
            w_a = weight[actions]  # (A, H): only the action rows of the head
            b_a = None if head.bias is None else head.bias[actions]
            return rows, lambda s, e: torch.nn.functional.linear(h[s:e], w_a, b_a)
        if actions is not None:
            return rows, lambda s, e: head(h[s:e])[:, actions]
        return rows, lambda s, e: head(h[s:e])
    logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1]  # (N, T-1, V)
    sel = logits[rows, cols]  # (M, V)
    if actions is not None:
        sel = sel[:, actions]
    return rows, lambda s, e: sel[s:e]


def _target_index(tgt: torch.Tensor, actions: torch.Tensor | None) -> torch.Tensor:
    """Column of each target token in the logits: the token id, or its index among the actions."""
    if actions is None:
        return tgt
    return (tgt.unsqueeze(-1) == actions).float().argmax(-1)


def _sequence_sums(logits: torch.Tensor, tgt: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    """(n,) per-row sums of ``log_softmax(logits)[tgt]`` over the M response positions
    (``logits`` (M, V) float32, ``tgt`` (M,) column indices, ``rows`` (M,) row of each position);
    differentiable in ``logits``."""
    tok = logits.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (M,)
    return torch.zeros(n, dtype=tok.dtype, device=tok.device).index_add(0, rows, tok)


def sequence_logprobs(model: torch.nn.Module, rollouts: Sequence[Rollout], micro_batch_size: int,
                      action_token_ids: Sequence[int] | None = None, pad_token_id: int = 0,
                      share_prompts: bool = True) -> torch.Tensor:
    """log pi(y_i | x_i) for every rollout, summed over its response tokens, in nats.

    Args:
        model: a causal LM called as ``model(input_ids=..., attention_mask=...)`` returning
            ``.logits`` of shape (N, T, V); a DeepSpeed engine works too. Gradients flow when
            called outside ``torch.no_grad()``.
        rollouts: B rollouts; ``prompt_token_ids + response_token_ids`` is what gets scored.
        micro_batch_size: rollouts per forward pass (right-padded to the longest of the pass).
        action_token_ids: game mode: the A token ids the pool samples among. Each response must
            then be one token from this set, scored as
            ``log_softmax(logits[action_token_ids])[response]`` (softmax restricted to the actions).
        pad_token_id: id written into padding positions (masked out; any valid id works).
        share_prompts: run a prompt shared by consecutive rollouts of a micro-batch once
            (:func:`prompt_groups`; the same values up to float rounding, fewer FLOPs). Off,
            or where the model does not split into decoder and head (ZeRO-3) or checkpoints
            its activations, every row runs its whole sequence.

    Returns:
        Tensor of shape (B,), float32, on the model's device. Log-softmax is taken in float32
        whatever the model's dtype.

    Raises:
        ValueError: empty prompt or response, ``micro_batch_size < 1``, or in game mode a
            response that is not exactly one action token.
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    _check(rollouts, action_token_ids)
    device = next(iter(model.parameters())).device
    actions = None if action_token_ids is None else torch.tensor(list(action_token_ids), dtype=torch.long, device=device)
    out = []
    for start in range(0, len(rollouts), micro_batch_size):
        chunk = rollouts[start:start + micro_batch_size]
        input_ids, attention, targets, mask = _micro_batch_inputs(chunk, pad_token_id, device)
        groups = prompt_groups(chunk) if share_prompts else None
        rows, logits_of = _response_logits(model, input_ids, attention, mask, actions, groups)
        out.append(_sequence_sums(logits_of(0, len(rows)).float(), _target_index(targets[mask], actions), rows,
                                  len(chunk)))
    if not out:
        return torch.zeros(0, device=device)
    return torch.cat(out)


@dataclass
class Scores:
    """What one scoring pass over B rollouts returns (all float32, on the policy's device).

    Attributes:
        logp: (B,) log pi(y_i|x_i), nats, summed over response tokens.
        token_logp: B tensors, ``token_logp[i]`` of shape (L_i,): log pi(y_{i,t} | x_i, y_{i,<t}).
        logp_ref: (B,) log pi_ref(y_i|x_i), or None without a reference model.
        kl_ref: (B,) ``sum_t KL(pi(.|x_i, y_{i,<t}) || pi_ref(.|x_i, y_{i,<t}))`` (exact over the
            vocabulary, or over the actions in game mode; >= 0), or None without a reference.
    """

    logp: torch.Tensor
    token_logp: list[torch.Tensor]
    logp_ref: torch.Tensor | None = None
    kl_ref: torch.Tensor | None = None


@dataclass
class MicroScores:
    """One micro-batch of a scoring pass (see :func:`scored_micro_batches`).

    Attributes:
        start: index of the micro-batch's first rollout in the pass's rollouts.
        logp, token_logp, logp_ref, kl_ref: as :class:`Scores`, for the micro-batch's n
            rollouts (detached).
        logp_grad: (n,) ``log pi(y_i|x_i)`` carrying the policy forward's autograd graph
            (``grad=True``), else None.
    """

    start: int
    logp: torch.Tensor
    token_logp: list[torch.Tensor]
    logp_ref: torch.Tensor | None
    kl_ref: torch.Tensor | None
    logp_grad: torch.Tensor | None = None


def scored_micro_batches(model: torch.nn.Module, rollouts: Sequence[Rollout], micro_batch_size: int,
                         action_token_ids: Sequence[int] | None = None, pad_token_id: int = 0,
                         reference: torch.nn.Module | None = None, chunk_tokens: int = 64,
                         reference_context: Callable[[], contextlib.AbstractContextManager] | None = None,
                         grad: bool = False, share_prompts: bool = True) -> Iterator[MicroScores]:
    """The scoring pass of :func:`score_rollouts`, one micro-batch at a time.

    With ``grad=True`` the policy forward keeps its autograd graph and each item's
    ``logp_grad`` is differentiable (the caller back-propagates it before asking for the next
    micro-batch, so one micro-batch's activations are alive at a time); the reference forward and
    the per-token reductions never record a graph. The detached values are those of a no-grad
    pass at the same weights (same forward; the model's train/eval mode is the caller's).
    ``share_prompts``: as :func:`sequence_logprobs` (for the policy and the reference forward).

    Yields:
        :class:`MicroScores` per micro-batch of ``micro_batch_size`` rollouts, in order.

    Raises:
        ValueError: as :func:`score_rollouts`.
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    _check(rollouts, action_token_ids)
    device = next(iter(model.parameters())).device
    actions = None if action_token_ids is None else torch.tensor(list(action_token_ids), dtype=torch.long, device=device)
    in_ref = reference_context or contextlib.nullcontext
    for start in range(0, len(rollouts), micro_batch_size):
        chunk = rollouts[start:start + micro_batch_size]
        n = len(chunk)
        input_ids, attention, targets, mask = _micro_batch_inputs(chunk, pad_token_id, device)
        tgt = _target_index(targets[mask], actions)
        groups = prompt_groups(chunk) if share_prompts else None
        logp_grad = None
        with torch.set_grad_enabled(grad):
            rows, pol_of = _response_logits(model, input_ids, attention, mask, actions, groups)
            if grad:  # the differentiable sum, as sequence_logprobs computes it
                logits = pol_of(0, len(rows)).float()  # (M, V) or (M, A)
                logp_grad = _sequence_sums(logits, tgt, rows, n)
                detached = logits.detach()
                pol_of = (lambda s, e, _l=detached: _l[s:e])
        with torch.no_grad():
            ref_of = None
            if reference is not None:
                with in_ref():
                    _, ref_inner = _response_logits(reference, input_ids.to(_device_of(reference)),
                                                    attention.to(_device_of(reference)), mask.to(_device_of(reference)),
                                                    None if actions is None else actions.to(_device_of(reference)),
                                                    groups)

                def ref_of(s: int, e: int, _inner=ref_inner) -> torch.Tensor:
                    with in_ref():
                        return _inner(s, e)
            tok = torch.empty(len(rows), dtype=torch.float32, device=device)
            tok_ref = torch.empty_like(tok)
            kl = torch.empty_like(tok)
            for s in range(0, len(rows), chunk_tokens):
                e = min(s + chunk_tokens, len(rows))
                lp = pol_of(s, e).float().log_softmax(-1)  # (c, V)
                idx = tgt[s:e].unsqueeze(-1)
                tok[s:e] = lp.gather(-1, idx).squeeze(-1)
                if ref_of is not None:
                    lr = ref_of(s, e).float().to(device).log_softmax(-1)
                    tok_ref[s:e] = lr.gather(-1, idx).squeeze(-1)
                    # exact KL(pi || pi_ref) of each position's next-token distribution; clamp: rounding only
                    kl[s:e] = (lp.exp() * (lp - lr)).sum(-1).clamp(min=0.0)
                    del lr
                del lp
            counts = [len(r.response_token_ids) for r in chunk]
            per_seq = (lambda v: torch.zeros(n, device=device).index_add(0, rows, v))
            item = MicroScores(start, per_seq(tok), list(torch.split(tok, counts)),
                               per_seq(tok_ref) if reference is not None else None,
                               per_seq(kl) if reference is not None else None, logp_grad)
        yield item  # outside the no-grad block: grad mode is global, a suspended `with` would leak it


@torch.no_grad()
def score_rollouts(model: torch.nn.Module, rollouts: Sequence[Rollout], micro_batch_size: int,
                   action_token_ids: Sequence[int] | None = None, pad_token_id: int = 0,
                   reference: torch.nn.Module | None = None, chunk_tokens: int = 64,
                   reference_context: Callable[[], contextlib.AbstractContextManager] | None = None,
                   share_prompts: bool = True) -> Scores:
    """No-grad scoring pass: sequence and per-token log-probs under ``model`` and, when
    ``reference`` is given, ``log pi_ref`` and the exact per-token KL(pi || pi_ref), fused in one
    micro-batch loop (each micro-batch runs both forwards, then both sets of logits are reduced
    ``chunk_tokens`` positions at a time).

    Args:
        model: the policy (an HF causal LM or a DeepSpeed engine's module).
        rollouts: B rollouts (see :func:`sequence_logprobs`).
        micro_batch_size: rollouts per forward pass, >= 1.
        action_token_ids: game mode action tokens (softmaxes restricted to them).
        pad_token_id: padding id.
        reference: frozen reference model pi_ref (any dtype; log-softmax in float32), or None.
        chunk_tokens: response positions whose (chunk, V) logits are alive at once, >= 1.
        reference_context: a factory of the context every call of ``reference`` runs in
            (forward and output head), e.g. ``peft_model.disable_adapter`` when the reference is
            the policy's own base model with its LoRA adapter disabled (``reference`` is then
            the policy module itself). None: no context.
        share_prompts: as :func:`sequence_logprobs`.

    Returns:
        :class:`Scores`.

    Raises:
        ValueError: as :func:`sequence_logprobs`, or ``chunk_tokens < 1``.
    """
    device = next(iter(model.parameters())).device
    parts = list(scored_micro_batches(model, rollouts, micro_batch_size, action_token_ids, pad_token_id,
                                      reference, chunk_tokens, reference_context, share_prompts=share_prompts))
    cat = (lambda xs: torch.cat(xs) if xs else torch.zeros(0, device=device))
    tokens = [t for p in parts for t in p.token_logp]
    if reference is None:
        return Scores(cat([p.logp for p in parts]), tokens)
    return Scores(cat([p.logp for p in parts]), tokens, cat([p.logp_ref for p in parts]),
                  cat([p.kl_ref for p in parts]))


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(iter(model.parameters())).device
