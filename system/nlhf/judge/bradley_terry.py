"""Bradley-Terry judge: any HF reward model with one output, P(a > b | x) = sigmoid(r(x, a) - r(x, b)).

The reward model is an ``AutoModelForSequenceClassification`` folder with ``num_labels == 1``
(e.g. a Llama, Qwen or DeBERTa reward model). Each (prompt, response) is rendered with the
tokenizer's chat template (a user turn and an assistant turn) when the tokenizer has one, else
as ``prompt + "\\n\\n" + response``. Identical (prompt, response) texts in a batch are scored
once, so the usual call pattern (one response compared with several others) costs less.

Over-long inputs (more than ``max_length`` tokens) follow ``on_overlong``: ``"truncate"`` keeps
the LAST ``max_length`` tokens (the start of the prompt is dropped first, so the model still
reads the response and its end-of-turn, where it pools) and counts the pair in
:attr:`BradleyTerryJudge.truncations`; ``"reject"`` raises :class:`JudgeError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from nlhf.judge.base import Judge, JudgeError

OnOverlong = Literal["truncate", "reject"]


def check_on_overlong(name: str, on_overlong: str) -> None:
    """Raise :class:`JudgeError` unless ``on_overlong`` is ``"truncate"`` or ``"reject"``."""
    if on_overlong not in ("truncate", "reject"):
        raise JudgeError(f"judge {name}: on_overlong must be 'truncate' or 'reject', got {on_overlong!r}")


def model_max_length(tokenizer: Any, config: Any, default: int = 512) -> int:
    """The longest input (tokens) a model folder accepts: the tokenizer's ``model_max_length`` when
    it is a real number (HF uses ~1e30 for "unset"), else ``max_position_embeddings``, else ``default``."""
    n = getattr(tokenizer, "model_max_length", None)
    if isinstance(n, int) and 0 < n < 1_000_000:
        return n
    n = getattr(config, "max_position_embeddings", None)
    if isinstance(n, int) and n > 0:
        return n
    return default


def stable_sigmoid(x: np.ndarray) -> np.ndarray:
    """Elementwise 1 / (1 + exp(-x)) without overflow; float64. sigmoid(x) + sigmoid(-x) == 1
    up to rounding (~1e-16)."""
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    e = np.exp(x[~pos])
    out[~pos] = e / (1.0 + e)
    return out


class BradleyTerryJudge(Judge):
    """P(a > b | x) = sigmoid(r(x, a) - r(x, b)) from a scalar reward model.

    Build with :meth:`from_folder`; the constructor takes an already loaded model and tokenizer.

    Attributes:
        truncations: number of pairs (since construction) in which at least one side was
            truncated to ``max_length`` tokens.
    """

    name = "bradley-terry"

    def __init__(self, model: Any, tokenizer: Any, *, max_length: int = 512, on_overlong: OnOverlong = "truncate",
                 batch_size: int = 32) -> None:
        check_on_overlong(self.name, on_overlong)
        if max_length < 2:
            raise JudgeError(f"judge {self.name}: max_length must be >= 2, got {max_length}")
        if batch_size < 1:
            raise JudgeError(f"judge {self.name}: batch_size must be >= 1, got {batch_size}")
        num_labels = getattr(model.config, "num_labels", None)
        if num_labels != 1:
            raise JudgeError(f"judge {self.name}: the reward model must have exactly one output, "
                             f"it has num_labels={num_labels}")
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token_id is None:
                raise JudgeError(f"judge {self.name}: the tokenizer has neither a pad nor an eos token")
            tokenizer.pad_token = tokenizer.eos_token
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.on_overlong = on_overlong
        self.batch_size = int(batch_size)
        self.truncations = 0
        self.uses_chat_template = bool(getattr(tokenizer, "chat_template", None))

    @classmethod
    def from_folder(cls, path: str | Path, max_length: int | None = None, on_overlong: OnOverlong = "truncate",
                    batch_size: int = 32) -> "BradleyTerryJudge":
        """Load a reward model folder (``AutoModelForSequenceClassification`` + tokenizer), float32, CPU.

        Args:
            path: HF folder with config, weights and tokenizer files.
            max_length: token limit per (prompt, response) text; None: the model's own limit,
                and never more than it.
            on_overlong: ``"truncate"`` or ``"reject"`` (see the module docstring).
            batch_size: texts per forward pass.
        Raises:
            FileNotFoundError: ``path`` is not a folder.
            JudgeError: the model does not have exactly one output.
        """
        import torch
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"judge {cls.name}: reward model folder not found: {path}")
        num_labels = AutoConfig.from_pretrained(folder).num_labels
        if num_labels != 1:
            raise JudgeError(f"judge {cls.name}: the reward model at {path} must have exactly one output, "
                             f"it has num_labels={num_labels}")
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32)
        limit = model_max_length(tokenizer, model.config)
        length = limit if max_length is None else min(int(max_length), limit)
        return cls(model, tokenizer, max_length=length, on_overlong=on_overlong, batch_size=batch_size)

    # ------------------------------------------------------------------ text
    def render(self, prompt: str, response: str) -> list[int]:
        """Token ids of one (prompt, response) text, before any truncation."""
        tok = self.tokenizer
        if self.uses_chat_template:
            ids = tok.apply_chat_template(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                tokenize=True, add_generation_prompt=False, return_dict=False,
            )
            if hasattr(ids, "keys"):  # some tokenizers return a BatchEncoding regardless
                ids = ids["input_ids"]
            return [int(t) for t in ids]
        return [int(t) for t in tok(prompt + "\n\n" + response, add_special_tokens=True)["input_ids"]]

    # ------------------------------------------------------------------ scoring
    def rewards(self, prompts: Sequence[str], responses: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Scalar rewards r(x_i, y_i).

        Returns:
            (rewards float64 (B,), truncated bool (B,)).
        Raises:
            JudgeError: a text is longer than ``max_length`` tokens and ``on_overlong == "reject"``.
        """
        import torch

        encoded: list[list[int]] = []
        truncated = np.zeros(len(prompts), dtype=bool)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            ids = self.render(p, r)
            if len(ids) > self.max_length:
                if self.on_overlong == "reject":
                    raise JudgeError(
                        f"judge {self.name}: text {i} is {len(ids)} tokens, over max_length={self.max_length} "
                        f"(prompt {p[:60]!r}, response {r[:60]!r}); on_overlong='reject'"
                    )
                ids = ids[-self.max_length:]
                truncated[i] = True
            encoded.append(ids)
        out = np.zeros(len(encoded), dtype=np.float64)
        order = np.argsort([len(e) for e in encoded], kind="stable")
        pad = int(self.tokenizer.pad_token_id)
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                width = max(len(encoded[j]) for j in idx)
                input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for row, j in enumerate(idx):
                    seq = encoded[j]
                    input_ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
                    mask[row, :len(seq)] = 1
                logits = self.model(input_ids=input_ids, attention_mask=mask).logits  # (b, 1)
                out[idx] = logits.float().reshape(-1).numpy()
        return out, truncated

    def _prefer(self, prompts: list[str], responses_a: list[str], responses_b: list[str]) -> np.ndarray:
        keys: dict[tuple[str, str], int] = {}
        for p, a, b in zip(prompts, responses_a, responses_b):
            keys.setdefault((p, a), len(keys))
            keys.setdefault((p, b), len(keys))
        unique = list(keys)
        r, trunc = self.rewards([k[0] for k in unique], [k[1] for k in unique])
        ia = np.array([keys[(p, a)] for p, a in zip(prompts, responses_a)])
        ib = np.array([keys[(p, b)] for p, b in zip(prompts, responses_b)])
        self.truncations += int(np.count_nonzero(trunc[ia] | trunc[ib]))
        return stable_sigmoid(r[ia] - r[ib])
