"""Sequence log-probabilities log pi(y | x) = sum_t log pi(y_t | x, y_<t) of rollouts under a causal LM.

Responses are scored exactly as the rollout pool sampled them: the chat-templated prompt ids
followed by the response ids, right-padded into micro-batches; only response positions count.
In game mode the pool samples among a fixed set of action tokens only, so the (single)
response token is scored under the softmax restricted to those tokens and renormalised.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def _response_logprobs(split: tuple[torch.nn.Module, torch.nn.Module], input_ids: torch.Tensor,
                       attention: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                       actions: torch.Tensor | None) -> torch.Tensor:
    """Per-row sum of response-token log-probs, applying the LM head only where a response
    token is predicted: (M, H) @ (H, V) for the M response tokens of the micro-batch instead of
    (N, T, H) @ (H, V) for every position (most positions are prompt or padding)."""
    decoder, head = split
    hidden = decoder(input_ids=input_ids, attention_mask=attention).last_hidden_state[:, :-1]  # (N, T-1, H)
    rows, cols = mask.nonzero(as_tuple=True)  # the M positions that predict a response token
    h = hidden[rows, cols]  # (M, H)
    tgt = targets[rows, cols]  # (M,)
    if actions is None:
        logits = head(h).float()  # (M, V)
        tok = logits.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    else:  # game mode: one response token per row, scored under the softmax restricted to the actions
        weight = getattr(head, "weight", None)
        if isinstance(head, torch.nn.Linear) and weight is not None and not hasattr(weight, "ds_id"):
            bias = None if head.bias is None else head.bias[actions]
            sub_logits = torch.nn.functional.linear(h, weight[actions], bias)  # (M, A): only the action rows
        else:  # a head that is not a plain Linear: full logits, then the action columns
            sub_logits = head(h)[:, actions]
        sub = sub_logits.float().log_softmax(-1)  # (M, A)
        which = (tgt.unsqueeze(-1) == actions).float().argmax(-1)
        tok = sub[torch.arange(len(tgt), device=tgt.device), which]
    return torch.zeros(input_ids.shape[0], dtype=tok.dtype, device=tok.device).index_add(0, rows, tok)


def sequence_logprobs(model: torch.nn.Module, rollouts: Sequence[Rollout], micro_batch_size: int,
                      action_token_ids: Sequence[int] | None = None, pad_token_id: int = 0) -> torch.Tensor:
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
    split = _decoder_and_head(model)
    out = []
    for start in range(0, len(rollouts), micro_batch_size):
        chunk = rollouts[start:start + micro_batch_size]
        input_ids, attention, targets, mask = _micro_batch_inputs(chunk, pad_token_id, device)
        if split is not None:
            out.append(_response_logprobs(split, input_ids, attention, targets, mask, actions))
            continue
        logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1]  # (N, T-1, V)
        if actions is None:
            # logp(target) = logit[target] - logsumexp(logits), in float32, without a (N, T, V) float copy
            # surviving beyond this expression.
            logits = logits.float()
            tok = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
            out.append((tok * mask).sum(-1))
        else:
            # one response token at the single masked position of each row
            pos = mask.float().argmax(-1)  # (N,)
            rows = torch.arange(len(chunk), device=device)
            sub = logits[rows, pos][:, actions].float().log_softmax(-1)  # (N, A)
            which = (targets[rows, pos].unsqueeze(-1) == actions).float().argmax(-1)  # index into actions
            out.append(sub[rows, which])
    if not out:
        return torch.zeros(0, device=device)
    return torch.cat(out)
