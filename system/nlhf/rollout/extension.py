"""vLLM worker extension that receives new policy weights inside the engine's worker.

vLLM mixes this class into its worker (``worker_extension_cls=
"nlhf.rollout.extension.WeightReceiver"``), so ``self`` is the vLLM worker (``self.rank``,
``self.device``, ``self.model_runner``, ``self.reload_weights``). Methods are called through
``llm.collective_rpc("method", args=(...))`` and run on every tensor-parallel rank.

Object-store bytes and weight files (the CPU paths) are pushed through the worker's ``reload_weights(weights_iterator=...)``,
which runs the model's own checkpoint loader and its post-load processing: on CPU vLLM
repacks linear weights (their ``.weight`` becomes shape [0]), so copying into parameters or
``model.load_weights`` alone would fail. After a reload on CPU, layers that keep their
weight next to a packed copy (embeddings and a tied LM head) are re-packed, see
``_nlhf_repack_cpu_shared``.

On GPU with ``sync.backend: nccl`` the weights arrive through vLLM's own weight-transfer engine
(``vllm/distributed/weight_transfer/``; the engine loads them with the model's ``load_weights``
under its layerwise reload); this class only adds the NCCL checks around it.
"""

from __future__ import annotations

import time
from typing import Iterable

import torch


class WeightReceiver:
    """Mixin for the vLLM worker: object-store bytes loading (CPU path) and the NCCL checks of the
    vLLM weight-transfer path (GPU)."""

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

    def load_safetensors_file(self, path: str) -> dict:
        """Load a full HF state dict from a weight file on this node (``sync.backend: file``,
        :mod:`nlhf.sync.files`), one tensor at a time from the memory-mapped file.

        Returns:
            ``{"tensors": number of tensors loaded, "seconds": reload wall time}``.

        Raises:
            nlhf.sync.files.WeightFileMissingError: the file is not on this node.
        """
        from nlhf.sync.files import iter_weight_file

        t0 = time.perf_counter()
        n = self._nlhf_reload(iter_weight_file(path))
        return {"tensors": n, "seconds": time.perf_counter() - t0}

    # ------------------------------------------------------------------ vLLM weight transfer (GPU)
    # The transfer itself is vLLM's: its GPU worker has init_weight_transfer_engine /
    # start_weight_update / update_weights / finish_weight_update (engine built with
    # weight_transfer_config). These two checks close the gap PyNcclCommunicator leaves open.
    def nlhf_transfer_preflight(self) -> dict:
        """Before the rendezvous: this rank can run NCCL and its engine has a weight-transfer engine.

        Returns:
            ``{"rank", "device", "nccl"}`` (NCCL version string).

        Raises:
            nlhf.sync.weight_transfer.NcclUnavailableError: no CUDA or no NCCL library here.
            RuntimeError: the engine was built without ``weight_transfer_config``.
        """
        from nlhf.sync.weight_transfer import require_nccl

        rank = int(getattr(self, "rank", 0))
        version = require_nccl(f"rollout worker rank {rank}")
        if getattr(self, "weight_transfer_engine", None) is None:
            raise RuntimeError("the rollout engine was built without weight_transfer_config "
                               "(RolloutWorker(weight_transfer='nccl'))")
        return {"rank": rank, "device": str(getattr(self, "device", "?")), "nccl": version}

    def nlhf_check_transfer_group(self) -> int:
        """After ``init_weight_transfer_engine``: the communicator is live (not silently disabled).

        Returns:
            This rank's rank in the transfer group.

        Raises:
            nlhf.sync.weight_transfer.NcclUnavailableError: no communicator, or a disabled one.
        """
        from nlhf.sync.weight_transfer import check_communicator

        engine = getattr(self, "weight_transfer_engine", None)
        comm = getattr(engine, "model_update_group", None)
        check_communicator(comm, f"rollout worker rank {int(getattr(self, 'rank', 0))}")
        return int(comm.rank)
