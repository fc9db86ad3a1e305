"""The rollout worker: one vLLM engine sampling responses from one policy (pi_k or pi_{k+1/2}).

A plain class; the driver wraps it with ``ray.remote(num_cpus=..., num_gpus=...)`` and calls
``generate`` / ``update_weights`` as actor methods. Un-wrapped it runs in-process (tests).

Log-probabilities: the engine runs with ``logprobs_mode="processed_logprobs"``, so the
per-token log-probabilities it reports are those of the distribution it actually samples
from, after the allowed-token restriction, temperature and top-p (renormalised). With
temperature 1 and top_p 1 in language mode this equals log pi(y|x) of the model; in game
mode it is the log-probability under pi restricted to the action tokens. ``sampler_logprob``
is therefore the right behaviour-policy term for importance weights.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

from nlhf.batch import Rollout
from nlhf.config import RolloutConfig

EXTENSION_CLS = "nlhf.rollout.extension.WeightReceiver"


def _on_gpu(cfg: RolloutConfig) -> bool:
    import torch

    return cfg.num_gpus > 0 and torch.cuda.is_available()


class RolloutWorker:
    """A vLLM engine for one rollout pool.

    Args:
        model_path: HF folder (or hub id) of the policy; its tokenizer is loaded from there too.
        cfg: engine and sampling settings (``max_new_tokens``, ``temperature``, ``top_p``,
            ``max_model_len``, ``tensor_parallel_size``, ``gpu_memory_utilization``,
            ``cpu_kvcache_gb``).
        pool: a label for logs and stats (``"current"`` / ``"extrapolated"``).
        seed: engine seed (each request carries its own sampling seed, see ``generate``).
        dtype: ``"float32"`` or ``"bfloat16"`` engine dtype.
        action_token_ids: game mode: every response is exactly one token from these ids.
        cache_dir: vLLM's cache root goes to ``<cache_dir>/vllm``.
        weight_transfer: ``"nccl"`` (``sync.backend: nccl``): build the engine with vLLM's
            ``weight_transfer_config`` (nccl backend) so the learner can push weights over NCCL
            (:mod:`nlhf.sync.weight_transfer`); None: object-store pushes only.

    On CPU (``cfg.num_gpus == 0`` or no CUDA) the engine core runs in this process
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) with ``cfg.cpu_kvcache_gb`` GiB of KV cache
    (``kv_cache_memory_bytes``; fractions allowed; the cache is resident memory of the engine's
    process, 1 GiB of its RSS at 1.0). On GPU the engine uses
    ``cfg.gpu_memory_utilization`` and vLLM's default executor; tensor parallelism > 1 inside
    a Ray actor needs vLLM's own placement (not exercised here).
    Engine start takes ~2.5 s for a tiny model on CPU.

    Raises:
        ValueError: empty or duplicate ``action_token_ids``, or an unknown ``weight_transfer``.
        nlhf.sync.weight_transfer.NcclUnavailableError: ``weight_transfer="nccl"`` without CUDA.
    """

    def __init__(self, model_path: str, cfg: RolloutConfig, *, pool: str, seed: int = 0, dtype: str = "float32",
                 action_token_ids: list[int] | None = None, cache_dir: str = ".cache/nlhf",
                 weight_transfer: str | None = None):
        from nlhf.telemetry.memory import MemoryWatch

        self._memory = MemoryWatch()
        if weight_transfer not in (None, "nccl"):
            raise ValueError(f"weight_transfer must be None or 'nccl' (sync.backend), got {weight_transfer!r}")
        if weight_transfer == "nccl" and not _on_gpu(cfg):
            import torch

            from nlhf.sync.weight_transfer import NcclUnavailableError

            raise NcclUnavailableError(f"sync.backend 'nccl': rollout worker {pool!r} runs on CPU "
                                       f"(rollout.num_gpus={cfg.num_gpus}, CUDA available: "
                                       f"{torch.cuda.is_available()}); use sync.backend: object_store")
        if action_token_ids is not None:
            if not action_token_ids or len(set(action_token_ids)) != len(action_token_ids):
                raise ValueError(f"action_token_ids must be non-empty and distinct, got {action_token_ids!r}")
            action_token_ids = [int(t) for t in action_token_ids]
        from nlhf.hardware import resolve_dtype

        dtype = resolve_dtype(dtype, gpu=_on_gpu(cfg))
        self.model_path, self.cfg, self.pool, self.seed, self.dtype = str(model_path), cfg, pool, seed, dtype
        self.action_token_ids = action_token_ids
        gpu = _on_gpu(cfg)
        os.environ.setdefault("VLLM_CACHE_ROOT", str(Path(cache_dir).resolve() / "vllm"))
        if not gpu:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            # the KV cache is sized in bytes (kv_cache_memory_bytes below); vLLM's legacy variable,
            # whole GiB only, would override it
            os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
            if cfg.torch_threads:  # else inherited: Ray's OMP_NUM_THREADS, floor(num_cpus) >= 1, in an actor
                import torch

                # the engine runs in this process; vLLM's CPU worker forbids changing it afterwards
                torch.set_num_threads(cfg.torch_threads)
            if cfg.retain_freed_memory:
                from nlhf.hardware import retain_freed_memory

                retain_freed_memory()
        from vllm import LLM

        kwargs = dict(
            model=self.model_path,
            tokenizer=self.model_path,
            dtype=dtype,
            seed=seed,
            enforce_eager=cfg.enforce_eager,
            max_model_len=cfg.max_model_len,
            max_num_seqs=cfg.max_num_seqs,
            tensor_parallel_size=cfg.tensor_parallel_size,
            worker_extension_cls=EXTENSION_CLS,
            logprobs_mode="processed_logprobs",
        )
        if gpu:
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        else:
            kwargs["kv_cache_memory_bytes"] = int(cfg.cpu_kvcache_gb * 2**30)
        self.weight_transfer = weight_transfer
        if weight_transfer is not None:
            kwargs["weight_transfer_config"] = {"backend": weight_transfer}
        t0 = time.perf_counter()
        self.llm = LLM(**kwargs)
        self.start_seconds = time.perf_counter() - t0
        self._calls = 0
        self._tokens = 0
        self._gen_seconds = 0.0
        self._weight_version = 0
        self._closed = False

    # ------------------------------------------------------------------ sampling
    def generate(self, prompts: list[str], prompt_token_ids: list[list[int]], seeds: list[list[int]], *,
                 greedy: bool = False, max_new_tokens: int | None = None) -> list[list[Rollout]]:
        """Sample ``len(seeds[i])`` responses for each prompt ``i``, sample ``j`` with seed ``seeds[i][j]``.

        Every sample is its own engine request with its own seed (``n=1``), so its randomness
        comes from that seed alone, whatever else is in the batch (see :mod:`nlhf.seeding`).

        Args:
            prompts: plain-text user prompts (copied into each :class:`Rollout` for the judge).
            prompt_token_ids: the chat-templated prompts as token ids (what the engine reads),
                one list per prompt.
            seeds: per prompt, one seed per sample (>= 1 sample each).
            greedy: temperature 0; the argmax response is decoded once per prompt and returned
                ``len(seeds[i])`` times (as independent copies, ``seed`` None).
            max_new_tokens: overrides ``cfg.max_new_tokens`` (ignored in game mode: always 1);
                clipped so prompt + response fits ``cfg.max_model_len``.

        Returns:
            ``out[i][j]``: sample ``j`` for prompt ``i``. ``sampler_logprob`` is the sum of the
            sampled tokens' engine log-probs in nats and ``sampler_token_logprobs`` the
            per-token values; ``finished`` is True when the engine stopped on EOS/stop (always
            True in game mode, where the single action token is the whole response).

        Raises:
            ValueError: mismatched ``prompts``/``prompt_token_ids``/``seeds``, an empty prompt, a
                prompt without samples, ``max_new_tokens < 1``, or a prompt that leaves no room
                in ``max_model_len``.
            RuntimeError: the worker was shut down.
        """
        from vllm import SamplingParams

        if self._closed:
            raise RuntimeError(f"rollout worker {self.pool!r} is shut down")
        if len(prompts) != len(prompt_token_ids) or len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts, {len(prompt_token_ids)} prompt_token_ids lists and "
                             f"{len(seeds)} seed lists: one of each per prompt")
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not prompts:
            return []
        budget = 1 if self.action_token_ids is not None else (max_new_tokens or self.cfg.max_new_tokens)
        self._calls += 1
        params, inputs, owner = [], [], []
        for i, ids in enumerate(prompt_token_ids):
            ids = [int(t) for t in ids]
            if not ids:
                raise ValueError(f"prompt_token_ids[{i}] is empty")
            if not seeds[i]:
                raise ValueError(f"seeds[{i}] is empty: each prompt needs at least one sample")
            room = self.cfg.max_model_len - len(ids)
            if room < 1:
                raise ValueError(f"prompt {i} has {len(ids)} tokens; max_model_len is {self.cfg.max_model_len}")
            for seed in (seeds[i][:1] if greedy else seeds[i]):
                params.append(SamplingParams(
                    n=1,
                    temperature=0.0 if greedy else self.cfg.temperature,
                    top_p=1.0 if greedy else self.cfg.top_p,
                    max_tokens=min(budget, room),
                    logprobs=0,  # the sampled token's log-prob only
                    seed=None if greedy else int(seed) % (2**62),
                    allowed_token_ids=self.action_token_ids,
                    skip_special_tokens=True,
                ))
                inputs.append({"prompt_token_ids": ids})
                owner.append(i)
        t0 = time.perf_counter()
        outputs = []
        for lo, hi in self._waves([(len(x["prompt_token_ids"]), 1) for x in inputs]):
            outputs.extend(self.llm.generate(inputs[lo:hi], params[lo:hi], use_tqdm=False))
        self._gen_seconds += time.perf_counter() - t0
        game = self.action_token_ids is not None  # a one-token action is a complete response
        result: list[list[Rollout]] = [[] for _ in prompts]
        for i, par, out in zip(owner, params, outputs):
            comp = out.outputs[0]
            toks = list(comp.token_ids)
            token_lp = [float(pos[tok].logprob) for tok, pos in zip(toks, comp.logprobs or [])]
            self._tokens += len(toks)
            result[i].append(Rollout(
                prompt=prompts[i],
                prompt_token_ids=[int(t) for t in prompt_token_ids[i]],
                response_token_ids=toks,
                response_text=comp.text,
                sampler_logprob=float(sum(token_lp)),
                finished=game or comp.finish_reason == "stop",
                sampler_token_logprobs=token_lp,
                seed=par.seed,
            ))
        if greedy:
            for i, samples in enumerate(result):
                extra = len(seeds[i]) - 1
                samples.extend(dataclasses.replace(samples[0]) for _ in range(extra))
                self._tokens += extra * len(samples[0].response_token_ids)
        return result

    def _waves(self, requests: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Split requests, given as (prompt tokens, samples), into consecutive index ranges
        whose prefills fit one engine step.

        vLLM (CPU, 0.32) raises "CPU Generator does not use offset" when a request with its own
        seed has its prefill split across steps (chunked prefill), which happens as soon as a
        call's prompts exceed ``max_num_batched_tokens``. Submitting waves that fit the step's
        token and sequence budgets keeps every prefill whole; a single over-long prompt still
        goes alone (and may be chunked, as vLLM requires).
        """
        sched = self.llm.llm_engine.vllm_config.scheduler_config
        budget, max_seqs = int(sched.max_num_batched_tokens), int(sched.max_num_seqs)
        waves, lo, tokens, seqs = [], 0, 0, 0
        for i, (prompt_len, n) in enumerate(requests):  # a request with n samples prefills n sequences
            if i > lo and (tokens + prompt_len * n > budget or seqs + n > max_seqs):
                waves.append((lo, i))
                lo, tokens, seqs = i, 0, 0
            tokens += prompt_len * n
            seqs += n
        waves.append((lo, len(requests)))
        return waves

    # ------------------------------------------------------------------ weights
    def update_weights(self, payload: bytes | str | dict | list, version: int | None = None) -> dict:
        """Load new policy weights: object-store bytes or a weight file (CPU paths), or one chunk
        of a vLLM weight transfer.

        ``payload`` as bytes: a full HF state dict as safetensors bytes
        (``nlhf.sync.object_store.pack_state_dict``); under Ray, pass the ``ObjectRef`` of the bytes
        (``ray.put`` once per pool): Ray resolves it. As a ``str``: the path of the same payload as
        a safetensors file on this node (``sync.backend: file``, :mod:`nlhf.sync.files`), which
        the engine process reads itself. The prefix cache is reset so no KV block of the old
        weights is reused, and ``version`` becomes the engine's weight version.

        ``payload`` as a dict (or list of dicts): vLLM's update info of the ``nccl`` transfer
        (``names`` / ``dtype_names`` / ``shapes``), sent by :class:`nlhf.sync.weight_transfer.PoolClient`
        between :meth:`start_weight_update` and :meth:`finish_weight_update`, which sets the version.

        Args:
            payload: safetensors bytes of the full state dict, a weight file's path, or vLLM
                update info.
            version: bytes or file only: the weight version these weights are (set by the driver, which
                checks it before using the pool's rollouts); None: the previous version + 1.

        Returns:
            ``{"seconds": wall time, "bytes": payload size, "tensors": tensors loaded, "version": n}``
            (update info: ``{"seconds", "tensors"}``).

        Raises:
            TypeError: another payload type. RuntimeError: shut down, or update info without
                ``weight_transfer="nccl"``. nlhf.sync.files.WeightFileMissingError: a path
                that is not on this node (checked before the engine is touched).
        """
        if self._closed:
            raise RuntimeError(f"rollout worker {self.pool!r} is shut down")
        if isinstance(payload, (dict, list)):
            self._need_transfer("update_weights")
            t0 = time.perf_counter()
            self.llm.update_weights({"update_info": payload})
            names = payload.get("names", []) if isinstance(payload, dict) else payload[0].get("names", [])
            return {"seconds": time.perf_counter() - t0, "tensors": len(names)}
        t0 = time.perf_counter()
        if isinstance(payload, str):
            from nlhf.sync.files import weight_file_size

            size = weight_file_size(payload)  # raises here, with the node named, if it is elsewhere
            res = self.llm.collective_rpc("load_safetensors_file", args=(payload,))
        elif isinstance(payload, (bytes, bytearray, memoryview)):
            size = len(payload)
            res = self.llm.collective_rpc("load_safetensors_bytes", args=(bytes(payload),))
        else:
            raise TypeError(f"update_weights expects safetensors bytes or a weight file path, got {type(payload).__name__}")
        self.llm.reset_prefix_cache()
        self._weight_version = self._weight_version + 1 if version is None else int(version)
        self.llm.update_weight_version(str(self._weight_version))
        return {"seconds": time.perf_counter() - t0, "bytes": size, "tensors": res[0]["tensors"],
                "version": self._weight_version}

    # ------------------------------------------------------------------ vLLM weight transfer (GPU)
    def _need_transfer(self, op: str) -> None:
        if self._closed:
            raise RuntimeError(f"rollout worker {self.pool!r} is shut down")
        if self.weight_transfer is None:
            raise RuntimeError(f"{op}: rollout worker {self.pool!r} was built without weight_transfer "
                               "(sync.backend: nccl)")

    def check_weight_transfer(self) -> list[dict]:
        """Before joining a transfer group: every engine rank has CUDA, the NCCL library and a
        weight-transfer engine (vLLM's PyNcclCommunicator would silently disable itself otherwise).

        Raises:
            NcclUnavailableError: NCCL cannot run on some rank. RuntimeError: no ``weight_transfer``.
        """
        self._need_transfer("check_weight_transfer")
        return self.llm.collective_rpc("nlhf_transfer_preflight")

    def init_weight_transfer_engine(self, init_info: dict) -> list[int]:
        """Join the pool's vLLM ``nccl`` transfer group (blocks until the trainer opens it).

        Args:
            init_info: vLLM's ``NCCLWeightTransferInitInfo`` fields (``master_address``,
                ``master_port``, ``rank_offset``: this engine's, ``world_size``, ``packed``, ...).

        Returns:
            The group ranks of this engine's workers (``rank_offset + tp_rank``).

        Raises:
            NcclUnavailableError: a worker's communicator came back disabled.
        """
        self._need_transfer("init_weight_transfer_engine")
        self.llm.init_weight_transfer_engine({"init_info": dict(init_info)})
        return self.llm.collective_rpc("nlhf_check_transfer_group")

    def start_weight_update(self) -> None:
        """Open a weight update (vLLM's layerwise reload)."""
        self._need_transfer("start_weight_update")
        self.llm.start_weight_update()

    def finish_weight_update(self, weight_version: int) -> dict:
        """Close the update, set ``weight_version`` as the engine's version (and :meth:`weight_version`),
        reset the prefix cache.

        Returns:
            ``{"version": weight_version}``.
        """
        self._need_transfer("finish_weight_update")
        self.llm.finish_weight_update(weight_version=str(int(weight_version)))
        self.llm.reset_prefix_cache()
        self._weight_version = int(weight_version)
        return {"version": self._weight_version}

    def shutdown_weight_transfer_engine(self) -> None:
        """Leave the transfer group (the engine keeps serving)."""
        self._need_transfer("shutdown_weight_transfer_engine")
        self.llm.shutdown_weight_transfer_engine()

    # ------------------------------------------------------------------ bookkeeping
    def weight_version(self) -> int:
        """The version of the weights the engine holds: 0 for the initial weights (also after a
        restart of this actor), else the version of the last push (:meth:`update_weights` with bytes, or
        :meth:`finish_weight_update` of a vLLM weight transfer)."""
        return self._weight_version

    def info(self) -> dict:
        """``{"pool", "dtype" (the resolved engine dtype), "weight_version", "engine_weight_version" (vLLM's,
        a string; "default" before the first push), "pid", "torch_threads", "peak_rss_gb", "peak_private_gb",
        "peak_shared_gb"}`` (peak RSS of this actor process and its sampled private / object-store
        parts, GiB: :mod:`nlhf.telemetry.memory`)."""
        import torch

        return {"pool": self.pool, "dtype": self.dtype, "weight_version": self._weight_version,
                "engine_weight_version": self.llm.get_weight_version() if self.llm is not None else None,
                "pid": os.getpid(), "torch_threads": torch.get_num_threads(), **self._memory.peaks()}

    def stats(self) -> dict:
        """Generation counters since the previous call (then reset).

        Returns:
            ``{"pool", "tokens", "seconds", "tokens_per_s", "weight_version", "engine_start_s"}``;
            tokens are generated (response) tokens, seconds are wall time inside ``generate``.
        """
        tokens, secs = self._tokens, self._gen_seconds
        self._tokens, self._gen_seconds = 0, 0.0
        return {"pool": self.pool, "tokens": tokens, "seconds": secs,
                "tokens_per_s": tokens / secs if secs > 0 else 0.0,
                "weight_version": self._weight_version, "engine_start_s": self.start_seconds}

    def shutdown(self) -> None:
        """Stop the engine core and free its memory (/dev/shm segments). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.weight_transfer is not None:
            try:
                self.llm.shutdown_weight_transfer_engine()
            except Exception:
                pass
        try:
            self.llm.llm_engine.engine_core.shutdown()
        finally:
            self.llm = None
            import gc

            gc.collect()
