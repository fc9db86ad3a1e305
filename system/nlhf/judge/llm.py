"""LLM-as-judge through vLLM: ask a causal LM which of two responses is better.

For each pair the judge prompt shows the user prompt and the two responses labelled "A" and
"B" and asks for one letter. The probability that A is better is read from the next-token
log-probabilities of the two label tokens (softmax over just those two), and the question is
asked in both presentation orders to remove position bias::

    p_AB = P("A" | x, A=a, B=b)          p_BA = P("A" | x, A=b, B=a)
    P(a > b | x) = (p_AB + (1 - p_BA)) / 2

so ``P(a, b) + P(b, a) == 1`` holds by construction.

The engine runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, ``enforce_eager=True``);
call :meth:`LLMJudge.close` when done so vLLM's shared-memory segments are released.

Over-long judge prompts (more than ``max_length`` tokens) follow ``on_overlong``: ``"truncate"``
shortens the user prompt and the two responses (the longest first, each keeping its beginning;
the instructions and the answer cue are never cut) and counts the pair in
:attr:`LLMJudge.truncations`; ``"reject"`` raises :class:`JudgeError`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np

from nlhf.judge.base import Judge, JudgeError
from nlhf.judge.bradley_terry import check_on_overlong, model_max_length

DEFAULT_INSTRUCTIONS = (
    "You are an impartial judge. Compare two responses to the same user prompt and decide which "
    "one is better: more helpful, more accurate, and more honest. Ignore the order in which they "
    "are shown and their length."
)
QUESTION_TEMPLATE = (
    "{instructions}\n\n[User prompt]\n{prompt}\n\n[Response A]\n{response_a}\n\n[Response B]\n{response_b}\n\n"
    "Which response is better? Answer with a single letter: A or B."
)
LABELS = ("A", "B")
_SAFETY_TOKENS = 4  # re-tokenising a truncated field can merge or split a token at its ends


def water_fill(lengths: list[int], budget: int) -> list[int]:
    """Largest caps c_i <= lengths[i] with sum(c_i) <= budget that cut the longest fields first.

    Fields at most ``budget / k`` long (k fields still uncapped) keep their length; the rest
    share what is left equally. Returns the per-field token allowance.
    """
    caps = list(lengths)
    if sum(lengths) <= budget:
        return caps
    remaining, left = budget, sorted(range(len(lengths)), key=lambda i: lengths[i])
    while left:
        share = max(remaining, 0) // len(left)
        i = left[0]
        if lengths[i] <= share:
            caps[i] = lengths[i]
            remaining -= lengths[i]
            left.pop(0)
        else:
            for j in left:
                caps[j] = share
            break
    return caps


class LLMJudge(Judge):
    """LLM-as-judge over a local causal-LM folder served by vLLM (CPU or GPU).

    Args:
        model_path: HF folder of a causal LM (instruction-tuned, ideally) with its tokenizer.
        max_length: token limit of one judge prompt (the reverse presentation order may take up to
            4 tokens more); None: what the model's context allows.
        on_overlong: ``"truncate"`` or ``"reject"`` (see the module docstring).
        batch_size: most sequences vLLM runs at once (``max_num_seqs``).
        dtype: vLLM weight dtype (``"float32"``, ``"bfloat16"``, ``"auto"``).
        kv_cache_gb: KV-cache memory for the engine (GiB).
        instructions: the judging instructions placed before the pair.
        seed: vLLM seed (the judge is greedy; only matters for ties in kernels).
        gpu_memory_utilization: fraction of GPU memory vLLM may take (GPU only).
    Raises:
        FileNotFoundError: ``model_path`` is not a folder.
        JudgeError: the labels "A"/"B" are not single tokens after the judge prompt, or bad arguments.

    Attributes:
        truncations: number of pairs (since construction) whose fields were shortened.
        label_ids: token ids of "A" and "B" as the model would emit them after the prompt.
    """

    name = "llm"

    def __init__(self, model_path: str | Path, *, max_length: int | None = None,
                 on_overlong: Literal["truncate", "reject"] = "truncate", batch_size: int = 32,
                 dtype: str = "float32", kv_cache_gb: float = 0.25, instructions: str = DEFAULT_INSTRUCTIONS,
                 seed: int = 0, gpu_memory_utilization: float = 0.3) -> None:
        check_on_overlong(self.name, on_overlong)
        folder = Path(model_path)
        if not folder.is_dir():
            raise FileNotFoundError(f"judge {self.name}: model folder not found: {model_path}")
        if batch_size < 1:
            raise JudgeError(f"judge {self.name}: batch_size must be >= 1, got {batch_size}")
        from transformers import AutoConfig, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        limit = model_max_length(self.tokenizer, AutoConfig.from_pretrained(folder), default=2048) - _SAFETY_TOKENS - 1
        self.max_length = limit if max_length is None else min(int(max_length), limit)
        self.on_overlong = on_overlong
        self.batch_size = int(batch_size)
        self.instructions = instructions
        self.uses_chat_template = bool(getattr(self.tokenizer, "chat_template", None))
        self.truncations = 0
        self.label_ids = self._find_label_ids()
        overhead = len(self.encode("", "", ""))
        self._field_budget = self.max_length - overhead - _SAFETY_TOKENS
        if self._field_budget < 3:
            raise JudgeError(f"judge {self.name}: max_length={self.max_length} leaves no room for the pair "
                             f"(the judge template alone takes {overhead} tokens)")

        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM, SamplingParams

        self.llm: Any = LLM(
            model=str(folder), dtype=dtype, enforce_eager=True, seed=seed,
            max_model_len=self.max_length + _SAFETY_TOKENS + 1,
            max_num_seqs=self.batch_size, kv_cache_memory_bytes=int(kv_cache_gb * (1 << 30)),
            gpu_memory_utilization=gpu_memory_utilization,
        )
        self.sampling = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=list(self.label_ids))

    # ------------------------------------------------------------------ prompt
    def render(self, prompt: str, response_a: str, response_b: str) -> str:
        """The full judge prompt text (chat template applied when the tokenizer has one)."""
        question = QUESTION_TEMPLATE.format(instructions=self.instructions, prompt=prompt,
                                            response_a=response_a, response_b=response_b)
        if self.uses_chat_template:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                      add_generation_prompt=True)
        return question + "\nAnswer:"

    def encode(self, prompt: str, response_a: str, response_b: str) -> list[int]:
        """Token ids of :meth:`render` (special tokens come from the template, else the tokenizer adds them)."""
        text = self.render(prompt, response_a, response_b)
        return [int(t) for t in self.tokenizer(text, add_special_tokens=not self.uses_chat_template)["input_ids"]]

    def _find_label_ids(self) -> tuple[int, int]:
        base = self.encode("x", "y", "z")
        text = self.render("x", "y", "z")
        for prefix in ("", " "):
            ids = []
            for label in LABELS:
                full = [int(t) for t in self.tokenizer(text + prefix + label,
                                                       add_special_tokens=not self.uses_chat_template)["input_ids"]]
                if full[:len(base)] != base or len(full) != len(base) + 1:
                    break
                ids.append(full[-1])
            if len(ids) == 2 and ids[0] != ids[1]:
                return ids[0], ids[1]
        raise JudgeError(f"judge {self.name}: the labels {LABELS} are not single tokens after the judge prompt "
                         "for this tokenizer")

    def _fit(self, k: int, prompt: str, a: str, b: str) -> tuple[str, str, str, bool]:
        """Shorten the three fields of pair ``k`` so that the judge prompt fits ``max_length`` tokens.

        Returns (prompt, response_a, response_b, truncated). Raises JudgeError in reject mode."""
        fields = [prompt, a, b]
        if len(self.encode(*fields)) <= self.max_length:
            return prompt, a, b, False
        if self.on_overlong == "reject":
            raise JudgeError(
                f"judge {self.name}: pair {k} makes a {len(self.encode(*fields))}-token judge prompt, over "
                f"max_length={self.max_length} (prompt {prompt[:60]!r}, response_a {a[:60]!r}, "
                f"response_b {b[:60]!r}); on_overlong='reject'"
            )
        ids = [self.tokenizer(f, add_special_tokens=False)["input_ids"] for f in fields]
        budget = self._field_budget
        for _ in range(8):
            caps = water_fill([len(x) for x in ids], budget)
            fields = [self.tokenizer.decode(x[:c], skip_special_tokens=False) if c < len(x) else f
                      for x, c, f in zip(ids, caps, [prompt, a, b])]
            if len(self.encode(*fields)) <= self.max_length:
                return fields[0], fields[1], fields[2], True
            budget -= _SAFETY_TOKENS
        raise JudgeError(f"judge {self.name}: could not shorten pair {k} to max_length={self.max_length} tokens")

    # ------------------------------------------------------------------ scoring
    def prob_first(self, token_id_lists: list[list[int]]) -> np.ndarray:
        """P(label "A") for each tokenised judge prompt: softmax over the two label log-probs. (N,) float64."""
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in token_id_lists], self.sampling,
                                    use_tqdm=False)
        out = np.empty(len(outputs), dtype=np.float64)
        ia, ib = self.label_ids
        for i, o in enumerate(outputs):
            step = o.outputs[0].logprobs[0]
            la, lb = float(step[ia].logprob), float(step[ib].logprob)
            if not (math.isfinite(la) or math.isfinite(lb)):
                out[i] = float("nan")  # validate_probabilities names the pair
                continue
            m = max(la, lb)
            ea, eb = math.exp(la - m), math.exp(lb - m)
            out[i] = ea / (ea + eb)
        return out

    def _prefer(self, prompts: list[str], responses_a: list[str], responses_b: list[str]) -> np.ndarray:
        unique: dict[tuple[int, ...], int] = {}
        rows_ab, rows_ba = [], []
        for k, (p, a, b) in enumerate(zip(prompts, responses_a, responses_b)):
            p, a, b, cut = self._fit(k, p, a, b)
            self.truncations += int(cut)
            for rows, (first, second) in ((rows_ab, (a, b)), (rows_ba, (b, a))):
                key = tuple(self.encode(p, first, second))
                rows.append(unique.setdefault(key, len(unique)))
        probs = self.prob_first([list(k) for k in unique])
        p_ab, p_ba = probs[np.array(rows_ab)], probs[np.array(rows_ba)]
        return (p_ab + (1.0 - p_ba)) / 2.0

    def close(self) -> None:
        """Shut the vLLM engine down (idempotent). The judge cannot be used afterwards."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001 - best effort at teardown
            pass
