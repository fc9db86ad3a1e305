"""Prompt sets for rollouts, loaded with HF ``datasets`` and rendered with the policy's chat template.

Supported files (``../shared/data/prompts/``): AlpacaEval (``instruction``), Arena-Hard
(``turns[0].content``), Vicuna-bench and MT-Bench (``turns[0]``, first turn only). Files the
data README marks evaluation-only (MT-Bench, self-instruct) are refused for training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

EVALUATION_ONLY = ("mt-bench", "self-instruct")


@dataclass
class Prompt:
    """A prompt as the judge reads it (``text``) and as the policy reads it (``token_ids``,
    the chat-templated prompt with the assistant header appended)."""

    text: str
    token_ids: list[int]


def _prompt_text(row: dict[str, Any], path: str) -> str:
    if row.get("instruction"):
        extra = row.get("input") or ""
        return f"{row['instruction']}\n\n{extra}".strip() if extra else str(row["instruction"])
    turns = row.get("turns")
    if turns:
        first = turns[0]
        return str(first["content"] if isinstance(first, dict) else first)
    raise ValueError(f"{path}: a row has neither `instruction` nor `turns`: keys {sorted(row)}")


def load_prompt_texts(path: str | Path) -> list[str]:
    """Read one prompt file with ``datasets`` and return its prompts (first turn), in file order.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a row carries no prompt field.
    """
    from nlhf.data import load_json_rows

    path = str(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    ds = load_json_rows(path)
    texts = [_prompt_text(row, path).strip() for row in ds]
    return [t for t in texts if t]


def check_trainable(path: str | Path) -> None:
    """Raise ValueError if ``path`` is an evaluation-only prompt set (see ../shared/data/README.md)."""
    name = Path(path).name.lower()
    if any(tag in name for tag in EVALUATION_ONLY):
        raise ValueError(f"data.train_prompts: {path} is evaluation-only (see ../shared/data/README.md); never train on it")


def render_prompts(texts: list[str], tokenizer: Any, max_prompt_tokens: int,
                   system_prompt: str | None = None) -> list[Prompt]:
    """Apply the tokenizer's chat template (user turn + generation prompt) and drop prompts
    longer than ``max_prompt_tokens`` tokens."""
    out = []
    for text in texts:
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": text}
        ]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        ids = list(ids)
        if len(ids) <= max_prompt_tokens:
            out.append(Prompt(text=text, token_ids=ids))
    return out


class PromptSampler:
    """Endless seeded sampling of prompts without replacement within an epoch.

    ``next(k)`` returns ``k`` prompts; each epoch is a fresh permutation. The position and the
    generator's state round-trip through :meth:`state_dict` / :meth:`load_state_dict` (JSON), so
    a resumed run continues with exactly the prompts an uninterrupted one would see, across
    epoch wraps too.

    Raises:
        ValueError: ``prompts`` is empty.
    """

    def __init__(self, prompts: list[Prompt], seed: int = 0) -> None:
        if not prompts:
            raise ValueError("no prompts left after filtering (check data.train_prompts and data.max_prompt_tokens)")
        self.prompts = prompts
        self.rng = np.random.default_rng(seed)
        self._order: list[int] = []
        self.drawn = 0

    def next(self, k: int) -> list[Prompt]:
        batch = []
        while len(batch) < k:
            if not self._order:
                self._order = [int(i) for i in self.rng.permutation(len(self.prompts))]
            batch.append(self.prompts[self._order.pop()])
        self.drawn += k
        return batch

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position: the generator state, the rest of the epoch, prompts drawn."""
        return {"rng": self.rng.bit_generator.state, "order": list(self._order), "drawn": self.drawn,
                "num_prompts": len(self.prompts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` output.

        Raises:
            ValueError: the state was saved for a prompt set of another size.
        """
        if int(state["num_prompts"]) != len(self.prompts):
            raise ValueError(f"prompt sampler state is for {state['num_prompts']} prompts, this run has "
                             f"{len(self.prompts)} (the prompt files or data.max_prompt_tokens changed)")
        self.rng.bit_generator.state = state["rng"]
        self._order = [int(i) for i in state["order"]]
        self.drawn = int(state["drawn"])


def load_training_prompts(files: list[str], tokenizer: Any, max_prompt_tokens: int,
                          system_prompt: str | None = None) -> list[Prompt]:
    """All training prompts of ``files`` (deduplicated, chat-templated, length-filtered).

    Raises:
        ValueError: an evaluation-only file is named, or nothing is left.
    """
    texts: list[str] = []
    for f in files:
        check_trainable(f)
        texts.extend(load_prompt_texts(f))
    unique = list(dict.fromkeys(texts))
    return render_prompts(unique, tokenizer, max_prompt_tokens, system_prompt)


def training_prompt_sampler(data: Any, tokenizer: Any, seed: int) -> PromptSampler:
    """The run's sampler over its training prompts: :func:`load_training_prompts` of
    ``data.train_prompts`` (``data``: the config's ``data`` section) drawn by a
    :class:`PromptSampler` seeded with the run seed. The driver and ``nlhf bench train``'s replay
    of a run's requests both build it here, so they draw the same prompts in the same order."""
    prompts = load_training_prompts(data.train_prompts, tokenizer, data.max_prompt_tokens, data.system_prompt)
    return PromptSampler(prompts, seed=seed)
