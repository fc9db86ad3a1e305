"""vLLM worker extension that receives new policy weights inside the engine's worker.

vLLM mixes this class into its worker (``worker_extension_cls=
"nlhf.rollout.extension.WeightReceiver"``), so ``self`` is the vLLM worker (``self.rank``,
``self.device``, ``self.model_runner``, ``self.reload_weights``). Methods are called through
``llm.collective_rpc("method", args=(...))`` and run on every tensor-parallel rank.

Weights are always pushed through the worker's ``reload_weights(weights_iterator=...)``,
which runs the model's own checkpoint loader and its post-load processing: on CPU vLLM
repacks linear weights (their ``.weight`` becomes shape [0]), so copying into parameters or
``model.load_weights`` alone would fail. After a reload on CPU, layers that keep their
weight next to a packed copy (embeddings and a tied LM head) are re-packed, see
``_nlhf_repack_cpu_shared``.
"""

from __future__ import annotations

import time
from typing import Iterable

import torch


class WeightReceiver:
    """Mixin for the vLLM worker: object-store bytes and NCCL-bucket weight loading."""

    def _nlhf_reload(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        count = 0

        def counted():
            nonlocal count
            for item in weights:
                count += 1
                yield item

        reload = getattr(self, "reload_weights", None) or self.model_runner.reload_weights
        reload(weights_iterator=counted())
        self._nlhf_repack_cpu_shared()
        return count

    @torch.no_grad()
    def _nlhf_repack_cpu_shared(self) -> int:
        """Re-run the CPU GEMM packing of layers that keep their weight (embeddings, LM head).

        On CPU vLLM packs every linear/embedding weight into a kernel closure
        (``layer.cpu_linear``). ``reload_weights`` re-packs the layers it loads, but a tied
        ``lm_head`` receives no tensor of its own (its weight *is* ``embed_tokens.weight``),
        so its packed copy would keep the OLD embedding and the logits would be wrong.
        Returns the number of layers re-packed (0 off CPU, where tied weights share storage).
        """
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return 0
        model = self.model_runner.get_model()
        n = 0
        for module in model.modules():
            weight = getattr(module, "weight", None)
            method = getattr(module, "quant_method", None)
            if (hasattr(module, "cpu_linear") and method is not None and isinstance(weight, torch.Tensor)
                    and weight.dim() == 2 and weight.numel() > 0):
                method.process_weights_after_loading(module)
                n += 1
        return n

    def load_safetensors_bytes(self, payload: bytes) -> dict:
        """Load a full HF state dict given as safetensors bytes (see ``nlhf.sync.object_store``).

        Tied-weight aliases recorded by ``pack_state_dict`` are not fed (the engine ties them itself).

        Returns:
            ``{"tensors": number of tensors loaded, "seconds": reload wall time}``.
        """
        from nlhf.sync.object_store import unpack

        t0 = time.perf_counter()
        sd = unpack(payload, with_aliases=False)
        n = self._nlhf_reload(sd.items())
        return {"tensors": n, "seconds": time.perf_counter() - t0}

    def init_weight_group(self, master_addr: str, master_port: int, rank_offset: int, world_size: int,
                          backend: str = "nccl") -> int:
        """Join the pool's weight-sync group as rank ``rank_offset + self.rank`` (blocks until all joined).

        Returns:
            This worker's rank in the group.
        """
        from nlhf.sync.nccl import NcclWeightReceiver

        rank = rank_offset + int(getattr(self, "rank", 0))
        device = getattr(self, "device", None) if backend == "nccl" else None
        self._nlhf_receiver = NcclWeightReceiver(master_addr, master_port, rank, world_size,
                                                 backend=backend, device=device)
        return rank

    def receive_weights(self, meta: object = None) -> dict:
        """Receive one broadcast sync (the sender sends the bucket plan first) and reload.

        Args:
            meta: unused; the plan travels inside the group (kept for driver symmetry).

        Returns:
            ``{"tensors", "seconds"}``.

        Raises:
            RuntimeError: ``init_weight_group`` was not called.
        """
        receiver = getattr(self, "_nlhf_receiver", None)
        if receiver is None:
            raise RuntimeError("receive_weights before init_weight_group")
        t0 = time.perf_counter()
        stream = receiver.receive()
        n = self._nlhf_reload(stream)
        for _ in stream:  # every rank must take part in every broadcast, even if the loader stopped early
            n += 1
        if torch.cuda.is_available() and receiver.channel.device.type == "cuda":
            torch.cuda.synchronize(receiver.channel.device)
        return {"tensors": n, "seconds": time.perf_counter() - t0}

    def close_weight_group(self) -> None:
        """Drop the weight-sync communicator (no-op without one)."""
        receiver = getattr(self, "_nlhf_receiver", None)
        if receiver is not None:
            receiver.close()
            self._nlhf_receiver = None
