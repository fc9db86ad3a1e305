"""The mixture rollout worker: samples Nash-MD's opponents from the geometric mixture of two models.

Nash-MD-PG (Munos et al., "Nash Learning from Human Feedback", arXiv:2312.00886) draws each
opponent y' from the token-level geometric mixture of the policy and the reference policy,

    pi_mix(. | x, y_<t)  ∝  pi_theta(. | x, y_<t)^(1 - m)  *  pi_ref(. | x, y_<t)^m,     m = algorithm.mixture

(:func:`nlhf.algorithms.losses.geometric_mixture_logits`). vLLM samples one model at a time, so
:class:`MixtureWorker` samples the mixture with HF transformers instead: both models keep a KV
cache (``transformers.DynamicCache``), so each generated token costs **two single-token
forward passes** (one per model) over the cached prefix, not two forwards of the whole
sequence as generation without a cache does. Prompts are left-padded into one batch and
prefilled once per prompt (the cache is then repeated for that prompt's samples); a sequence
leaves the batch (its cache rows are dropped) as soon as it stops.

Sampling, exactly (the order vLLM's sampler uses, with the mixture log-probs as its logits):
    l_t      = log pi_mix(. | x, y_<t)                      (V,) float32
    s_t      = log_softmax(l_t / temperature)               (skipped when temperature == 1)
    nucleus  = tokens whose ascending-sorted cumulative probability under s_t is > 1 - top_p,
               the most probable token always kept (vLLM's ``apply_top_k_top_p_pytorch``);
    log q_t  = log_softmax(s_t restricted to the nucleus)   (skipped when top_p == 1)
    y_t      = the inverse CDF of q_t (float64 cumulative sum, vocabulary order) at one
               uniform u ~ U[0, 1) drawn from the sample's own ``torch.Generator``.
``sampler_token_logprobs`` are log q_t(y_t), the log-probs of the distribution actually
sampled from (as ``RolloutWorker`` reports vLLM's ``processed_logprobs``); with the defaults
temperature = 1 and top_p = 1, q_t = pi_mix and ``sampler_logprob`` = log pi_mix(y | x).
Greedy decoding takes argmax l_t and reports l_t(y_t) (vLLM reports greedy log-probs before
temperature and top-p too).

Game mode (``action_token_ids``, A actions): the response is one token, drawn from the mixture
of the two softmaxes restricted to the actions and renormalised,
``log_softmax((1-m) log_softmax(z_theta[A]) + m log_softmax(z_ref[A]))``, which is also the
full-vocabulary mixture restricted to A and renormalised (the per-model normalisers cancel);
temperature and top_p then apply as above. For one token the token-level mixture is the exact
sequence-level geometric mixture.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from nlhf.batch import Rollout
from nlhf.config import RolloutConfig
from nlhf.rollout.mixture_sampling import draw_tokens, mixture_logprobs, processed_logprobs

SEED_MODULUS = 2**62  # seeds are 62-bit, as nlhf.seeding makes them and RolloutWorker passes them to vLLM


def _on_gpu(cfg: RolloutConfig) -> bool:
    return cfg.num_gpus > 0 and torch.cuda.is_available()


class MixtureWorker:
    """A rollout worker for one pool that samples the geometric mixture of policy and reference.

    Drop-in for :class:`nlhf.rollout.worker.RolloutWorker` in a rollout pool (same
    ``generate`` / ``update_weights`` / ``stats`` / ``shutdown``); a plain class the driver can
    wrap with ``ray.remote``.

    Args:
        model_path: HF folder of the policy pi_theta (its tokenizer is loaded from there too).
        cfg: ``max_new_tokens``, ``temperature``, ``top_p``, ``max_model_len``, ``num_cpus``
            and ``torch_threads`` (torch threads; default ``max(1, int(num_cpus))``), ``num_gpus``
            (> 0 and CUDA available: both models on ``cuda``).
        pool: a label for stats.
        reference_path: HF folder of the frozen reference policy pi_ref (same vocabulary).
        mixture: m in [0, 1]; 0 samples the policy, 1 the reference.
        dtype: ``auto`` (``nlhf.hardware.resolve_dtype``), ``float32`` or ``bfloat16``; both
            models use it, the mixture is formed in float32.
        action_token_ids: game mode: every response is exactly one token from these ids.
        cache_dir: accepted for API parity with ``RolloutWorker`` (transformers needs no cache here).
        seed: recorded only: every sample's randomness comes from its own seed in ``generate``.

    Raises:
        ValueError: ``mixture`` outside [0, 1], empty or duplicate ``action_token_ids`` or ids
            outside the vocabulary, or policy and reference with different vocabulary sizes.
    """

    def __init__(self, model_path: str, cfg: RolloutConfig, *, pool: str, reference_path: str, mixture: float,
                 dtype: str = "auto", action_token_ids: list[int] | None = None, cache_dir: str = ".cache/nlhf",
                 seed: int = 0):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from nlhf.hardware import resolve_dtype
        from nlhf.telemetry.memory import MemoryWatch

        self._memory = MemoryWatch()
        m = float(mixture)
        if not (0.0 <= m <= 1.0):
            raise ValueError(f"mixture must lie in [0, 1], got {mixture!r}")
        if action_token_ids is not None:
            if not action_token_ids or len(set(action_token_ids)) != len(action_token_ids):
                raise ValueError(f"action_token_ids must be non-empty and distinct, got {action_token_ids!r}")
            action_token_ids = [int(t) for t in action_token_ids]
        gpu = _on_gpu(cfg)
        self.dtype = resolve_dtype(dtype, gpu=gpu)
        self.device = torch.device("cuda" if gpu else "cpu")
        self.model_path, self.reference_path = str(model_path), str(reference_path)
        self.cfg, self.pool, self.mixture, self.seed, self.cache_dir = cfg, pool, m, seed, cache_dir
        self.action_token_ids = action_token_ids
        torch.set_num_threads(cfg.torch_threads or max(1, int(cfg.num_cpus)))
        t0 = time.perf_counter()
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        torch_dtype = getattr(torch, self.dtype)
        self.policy = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch_dtype).to(self.device).eval()
        self.reference = AutoModelForCausalLM.from_pretrained(self.reference_path, dtype=torch_dtype).to(self.device).eval()
        for model in (self.policy, self.reference):
            model.requires_grad_(False)
        vocab = self.policy.get_output_embeddings().weight.shape[0]
        ref_vocab = self.reference.get_output_embeddings().weight.shape[0]
        if vocab != ref_vocab:
            raise ValueError(f"reference_path {self.reference_path!r} has {ref_vocab} output tokens, "
                             f"the policy {vocab}: the mixture needs one vocabulary")
        if action_token_ids is not None and not all(0 <= t < vocab for t in action_token_ids):
            raise ValueError(f"action_token_ids must lie in [0, {vocab}), got {action_token_ids!r}")
        self._actions = (None if action_token_ids is None
                         else torch.tensor(action_token_ids, dtype=torch.long, device=self.device))
        self.eos_token_ids = self._eos_ids()
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else next(iter(self.eos_token_ids), 0))
        self.start_seconds = time.perf_counter() - t0
        self._tokens = 0
        self._gen_seconds = 0.0
        self._weight_version = 0
        self._closed = False

    def _eos_ids(self) -> frozenset[int]:
        """The tokenizer's EOS id and the policy's ``generation_config.eos_token_id`` (int or list),
        the ids vLLM stops on by default."""
        ids = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        gen = getattr(self.policy, "generation_config", None)
        extra = getattr(gen, "eos_token_id", None)
        if extra is not None:
            ids.update(int(t) for t in (extra if isinstance(extra, (list, tuple)) else [extra]))
        return frozenset(ids)

    # ------------------------------------------------------------------ sampling
    def generate(self, prompts: list[str], prompt_token_ids: list[list[int]], seeds: list[list[int]], *,
                 greedy: bool = False, max_new_tokens: int | None = None) -> list[list[Rollout]]:
        """Sample ``len(seeds[i])`` responses y ~ pi_mix(. | x_i) for each prompt, sample ``j`` with seed ``seeds[i][j]``.

        Each sample's draws come only from ``torch.Generator().manual_seed(seeds[i][j] % 2**62)``
        (one uniform per token), so a sample does not depend on the rest of the batch up to
        floating-point rounding of the batched forward passes (~1e-6 in the log-probs).

        Cost: one prefill forward per model over the P prompts (left-padded, (P, L)), then per
        generated token two single-token forwards, (R_active, 1), on the KV caches.

        Args:
            prompts: plain-text prompts (copied into each :class:`Rollout`).
            prompt_token_ids: the chat-templated prompts as token ids, one list per prompt.
            seeds: per prompt, one integer seed per sample (>= 1 sample each).
            greedy: argmax of the mixture; decoded once per prompt and returned ``len(seeds[i])``
                times (independent copies, ``seed`` None).
            max_new_tokens: overrides ``cfg.max_new_tokens`` (game mode: always 1); clipped so
                prompt + response fits ``cfg.max_model_len``.

        Returns:
            ``out[i][j]``: sample ``j`` of prompt ``i``, with ``sampler_token_logprobs`` = log q_t(y_t)
            (nats; the mixture's log-probs at temperature 1 and top_p 1), ``sampler_logprob``
            their sum, ``finished`` True when it stopped on an EOS id (always in game mode),
            ``response_text`` decoded with special tokens skipped, ``seed`` the seed used.

        Raises:
            ValueError: ``prompts``/``prompt_token_ids``/``seeds`` of different lengths, an empty
                prompt, an empty ``seeds[i]``, a non-integer seed, ``max_new_tokens < 1``, or a
                prompt that leaves no room in ``max_model_len``.
            RuntimeError: the worker was shut down.
        """
        if self._closed:
            raise RuntimeError(f"mixture worker {self.pool!r} is shut down")
        if len(prompt_token_ids) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(prompt_token_ids)} prompt_token_ids lists")
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds lists: one list of seeds per prompt")
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not prompts:
            return []
        budget = 1 if self.action_token_ids is not None else (max_new_tokens or self.cfg.max_new_tokens)
        ids_list, owner, row_seeds, budgets = [], [], [], []
        for i, ids in enumerate(prompt_token_ids):
            ids = [int(t) for t in ids]
            if not ids:
                raise ValueError(f"prompt_token_ids[{i}] is empty")
            if not seeds[i]:
                raise ValueError(f"seeds[{i}] is empty: each prompt needs at least one sample")
            for j, s in enumerate(seeds[i]):
                if isinstance(s, bool) or not isinstance(s, int) and not hasattr(s, "__index__"):
                    raise ValueError(f"seeds[{i}][{j}] = {s!r} is not an integer")
            room = self.cfg.max_model_len - len(ids)
            if room < 1:
                raise ValueError(f"prompt {i} has {len(ids)} tokens; max_model_len is {self.cfg.max_model_len}")
            ids_list.append(ids)
            for s in (seeds[i][:1] if greedy else seeds[i]):
                owner.append(i)
                row_seeds.append(None if greedy else int(s) % SEED_MODULUS)
                budgets.append(min(budget, room))
        generators = None if greedy else [torch.Generator().manual_seed(s) for s in row_seeds]
        t0 = time.perf_counter()
        tokens, logprobs, finished = self._sample(ids_list, owner, budgets, generators)
        self._gen_seconds += time.perf_counter() - t0
        texts = self.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        result: list[list[Rollout]] = [[] for _ in prompts]
        for r, i in enumerate(owner):
            self._tokens += len(tokens[r])
            result[i].append(Rollout(
                prompt=prompts[i],
                prompt_token_ids=list(ids_list[i]),
                response_token_ids=tokens[r],
                response_text=texts[r],
                sampler_logprob=float(sum(logprobs[r])),
                finished=finished[r],
                sampler_token_logprobs=logprobs[r],
                seed=row_seeds[r],
            ))
        if greedy:
            for i, samples in enumerate(result):
                extra = len(seeds[i]) - 1
                first = samples[0]
                samples.extend(dataclasses.replace(first, response_token_ids=list(first.response_token_ids),
                                                   sampler_token_logprobs=list(first.sampler_token_logprobs))
                               for _ in range(extra))
                self._tokens += extra * len(samples[0].response_token_ids)
        return result

    def _forward(self, model: torch.nn.Module, cache, input_ids: torch.Tensor, attention: torch.Tensor,
                 positions: torch.Tensor) -> torch.Tensor:
        """Logits (R, V) at the last input position; ``cache`` grows by ``input_ids.shape[1]``."""
        out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, past_key_values=cache,
                    use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    @torch.no_grad()
    def _sample(self, prompts: list[list[int]], owner: list[int], budgets: list[int],
                generators: list[torch.Generator] | None) -> tuple[list[list[int]], list[list[float]], list[bool]]:
        """Decode R rows (row r answers prompt ``owner[r]``, at most ``budgets[r]`` tokens).

        Prefill: the P prompts, left-padded to (P, L), one forward per model; the caches are then
        repeated to the R rows. Decode: per step, two (R_active, 1) forwards on the caches.
        ``generators`` None: greedy. Returns per row the tokens, log q_t of each, finished flags.
        """
        from transformers import DynamicCache

        dev, game = self.device, self._actions is not None
        n_prompts, width = len(prompts), max(len(p) for p in prompts)
        input_ids = torch.full((n_prompts, width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((n_prompts, width), dtype=torch.long)
        for k, ids in enumerate(prompts):
            input_ids[k, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention[k, width - len(ids):] = 1
        positions = (attention.cumsum(-1) - 1).clamp_(min=0)
        input_ids, attention, positions = input_ids.to(dev), attention.to(dev), positions.to(dev)
        caches = [DynamicCache(config=self.policy.config), DynamicCache(config=self.reference.config)]
        logits = [self._forward(model, cache, input_ids, attention, positions)
                  for model, cache in zip((self.policy, self.reference), caches)]
        rows = torch.tensor(owner, dtype=torch.long, device=dev)
        mix = mixture_logprobs(logits[0], logits[1], self.mixture, self._actions)[rows]  # (R, V or A)
        decoding = not game and max(budgets) > 1
        if decoding:
            for cache in caches:
                cache.batch_select_indices(rows)
            attention = attention[rows]
            next_pos = attention.sum(-1)  # (R,) the position of the first response token
        active = list(range(len(owner)))
        tokens: list[list[int]] = [[] for _ in owner]
        logps: list[list[float]] = [[] for _ in owner]
        finished = [game] * len(owner)
        while True:
            if generators is None:
                logq = mix
                pick = mix.argmax(-1)
            else:
                logq = processed_logprobs(mix, self.cfg.temperature, self.cfg.top_p)
                pick = draw_tokens(logq, [generators[r] for r in active])
            lp = logq.gather(-1, pick.unsqueeze(-1)).squeeze(-1)
            tok = self._actions[pick] if game else pick
            keep = []
            for k, (r, t, v) in enumerate(zip(active, tok.tolist(), lp.tolist())):
                tokens[r].append(t)
                logps[r].append(v)
                if not game and t in self.eos_token_ids:
                    finished[r] = True
                elif len(tokens[r]) < budgets[r]:
                    keep.append(k)
            if not keep:
                return tokens, logps, finished
            if len(keep) < len(active):
                sel = torch.tensor(keep, dtype=torch.long, device=dev)
                for cache in caches:
                    cache.batch_select_indices(sel)
                attention, next_pos, tok = attention[sel], next_pos[sel], tok[sel]
                active = [active[k] for k in keep]
            attention = torch.cat([attention, attention.new_ones((len(active), 1))], dim=-1)
            step = [self._forward(model, cache, tok.unsqueeze(-1), attention, next_pos.unsqueeze(-1))
                    for model, cache in zip((self.policy, self.reference), caches)]
            next_pos = next_pos + 1
            mix = mixture_logprobs(step[0], step[1], self.mixture)

    # ------------------------------------------------------------------ weights
    def update_weights(self, payload: bytes | str, version: int | None = None) -> dict:
        """Load a full HF state dict of the policy (safetensors bytes, ``nlhf.sync.object_store.pack_state_dict``,
        or the path of the same payload as a file on this node, ``sync.backend: file``).

        The reference stays frozen. Tensors are copied (and cast) into the policy's parameters;
        a tied weight may come under either name.

        Returns:
            ``{"seconds", "bytes", "tensors": tensors stored in the payload, "version": n}``.

        Raises:
            TypeError: ``payload`` is neither bytes nor a path.
            nlhf.sync.files.WeightFileMissingError: a path that is not on this node.
            ValueError: the payload names a tensor the policy lacks, misses one it has, or has a
                tensor of another shape.
        """
        from nlhf.sync.object_store import unpack

        if self._closed:
            raise RuntimeError(f"mixture worker {self.pool!r} is shut down")
        t0 = time.perf_counter()
        if isinstance(payload, str):
            from nlhf.sync.files import read_weight_file

            payload = read_weight_file(payload)
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TypeError(f"update_weights expects safetensors bytes or a weight file path, got {type(payload).__name__}")
        payload = bytes(payload)
        stored = unpack(payload, with_aliases=False)
        state = unpack(payload)
        own = self.policy.state_dict()
        unexpected = sorted(set(state) - set(own))
        if unexpected:
            raise ValueError(f"update_weights: the payload has tensors the policy lacks: {unexpected[:5]}")
        loaded_ptrs = {own[k].data_ptr() for k in state}
        missing = sorted(k for k in own if k not in state and own[k].data_ptr() not in loaded_ptrs)
        if missing:
            raise ValueError(f"update_weights: the payload misses policy tensors: {missing[:5]}")
        for name, tensor in state.items():  # check everything before changing anything
            if tuple(tensor.shape) != tuple(own[name].shape):
                raise ValueError(f"update_weights: {name} has shape {tuple(tensor.shape)}, "
                                 f"the policy's is {tuple(own[name].shape)}")
        with torch.no_grad():
            for name, tensor in state.items():
                own[name].copy_(tensor)
        self._weight_version = self._weight_version + 1 if version is None else int(version)
        return {"seconds": time.perf_counter() - t0, "bytes": len(payload), "tensors": len(stored),
                "version": self._weight_version}

    # ------------------------------------------------------------------ bookkeeping
    def weight_version(self) -> int:
        """The version of the policy weights held: 0 initially (also after a restart), else the
        ``version`` of the last :meth:`update_weights` (set by the driver)."""
        return self._weight_version

    def info(self) -> dict:
        """``{"pool", "dtype", "weight_version", "pid"}``, as :meth:`nlhf.rollout.worker.RolloutWorker.info`."""
        import os

        return {"pool": self.pool, "dtype": self.dtype, "weight_version": self._weight_version, "pid": os.getpid(),
                **self._memory.peaks()}

    def stats(self) -> dict:
        """Generation counters since the previous call (then reset).

        Returns:
            ``{"pool", "tokens", "seconds", "tokens_per_s", "weight_version", "engine_start_s", "mixture"}``;
            tokens are response tokens, seconds wall time inside ``generate``, engine_start_s
            the time to load both models.
        """
        tokens, secs = self._tokens, self._gen_seconds
        self._tokens, self._gen_seconds = 0, 0.0
        return {"pool": self.pool, "tokens": tokens, "seconds": secs,
                "tokens_per_s": tokens / secs if secs > 0 else 0.0,
                "weight_version": self._weight_version, "engine_start_s": self.start_seconds,
                "mixture": self.mixture}

    def shutdown(self) -> None:
        """Drop both models (and free their memory). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.policy = self.reference = None
        import gc

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
