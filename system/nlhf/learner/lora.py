"""LoRA adapter of the learner's policy (``learner.lora``), through ``peft``.

LoRA (Hu et al., arXiv:2106.09685, eq. 3): each targeted linear layer ``y = W x`` becomes
``y = W x + s B A dropout(x)`` with ``A`` (r, in), ``B`` (out, r), scale ``s = alpha / r`` and
``B = 0`` at the start, so the adapted policy starts exactly at the base model. Only ``A`` and
``B`` train; ``W`` stays frozen. So:

- the reference policy pi_ref is the base model, i.e. the same module with the adapter
  disabled (``PeftModel.disable_adapter``): no reference copy is kept;
- the optimiser, the theta_k snapshot and the trainer state cover the adapter's tensors only
  (:func:`nlhf.learner.snapshot.state_tensors` lists trainable parameters);
- what leaves the learner for the rollout engines and HF checkpoints is the merged weight
  ``W + s B A`` under the base model's own names (:func:`merged_named_weights`), so vLLM and
  ``transformers`` load it as any full checkpoint.

peft's layer API used here (peft 0.21): ``peft.tuners.lora.LoraLayer`` with ``base_layer``,
``active_adapters``, ``disable_adapters``, ``merged`` and ``get_delta_weight(adapter)``
(``transpose(B @ A, fan_in_fan_out) * scaling[adapter]``).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from nlhf.config import LoraConfig


def wrap_with_lora(model: torch.nn.Module, cfg: LoraConfig) -> torch.nn.Module:
    """``model`` (an HF causal LM, its weights frozen here) wrapped in a peft LoRA adapter
    ``default`` from ``cfg`` (rank, alpha, dropout, target_modules; no bias terms trained).

    Returns:
        the ``peft.PeftModel``; its trainable parameters are exactly the adapter's ``A`` and ``B``.

    Raises:
        ValueError: naming ``learner.lora.target_modules`` when no module matches, when a
            matched module is not a plain linear layer, or when it is the output embedding
            (its merged weight could not stay tied to the input embedding).
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer

    peft_cfg = PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                              target_modules=list(cfg.target_modules), bias="none", init_lora_weights=True)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    try:
        wrapped = get_peft_model(model, peft_cfg)
    except ValueError as e:
        raise ValueError(f"learner.lora.target_modules {list(cfg.target_modules)}: {e}") from None
    for name, module in wrapped.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        base = module.get_base_layer()
        if base is head or not isinstance(base, torch.nn.Linear):
            what = "the output embedding" if base is head else f"a {type(base).__name__}"
            raise ValueError(f"learner.lora.target_modules {list(cfg.target_modules)}: {name} is {what}; "
                             "only linear layers of the decoder can carry the adapter")
    return wrapped


def lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """HF module name (as in the base model, e.g. ``model.layers.0.self_attn.q_proj``) -> its peft LoRA layer."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    return {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}


def _hf_name(name: str) -> str:
    return name.replace(".base_layer.", ".")


@torch.no_grad()
def merged_named_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(HF name, tensor)`` of the merged policy, in the base model's parameter order: every
    parameter (tied ones once, as ``named_parameters`` gives them) and persistent buffer, each
    LoRA-adapted ``*.weight`` replaced by ``W + s B A`` (a fresh tensor of W's shape, in the wider
    of W's and the adapter's dtypes, e.g. fp32 for a bf16 base with an fp32 adapter, computed when
    the pair is reached, so one merged tensor is alive at a time); the adapter's
    own ``lora_*`` tensors are left out. Names are exactly those of the base model's
    ``state_dict`` without peft (``...q_proj.weight``, not ``...q_proj.base_layer.weight``).

    Args:
        model: a ``peft.PeftModel`` from :func:`wrap_with_lora`, adapter not merged in place.
    """
    base = model.get_base_model()
    layers = lora_layers(model)
    keys = set(base.state_dict().keys())
    for name, p in base.named_parameters():
        if ".lora_" in name:
            continue
        hf = _hf_name(name)
        owner = hf.rsplit(".", 1)[0]
        layer = layers.get(owner)
        if layer is not None and hf.endswith(".weight") and not layer.disable_adapters and not layer.merged:
            deltas = [layer.get_delta_weight(a) for a in layer.active_adapters if a in layer.lora_A]
            dtype = torch.promote_types(p.dtype, deltas[0].dtype) if deltas else p.dtype
            w = p.detach().to(dtype=dtype, copy=True)
            for d in deltas:
                w += d.to(dtype)
            yield hf, w
        else:
            yield hf, p
    for name, b in base.named_buffers():
        if name in keys:
            yield _hf_name(name), b
