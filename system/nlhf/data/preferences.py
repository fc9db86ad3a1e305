"""Human (and AI) preference pairs, loaded with HF ``datasets`` and normalised to one record type.

Training sources (``../shared/data/preferences/``, see its README):

* ``hh-rlhf-harmless-base-test.jsonl.gz``: ``chosen``/``rejected`` whole dialogues; the prompt is
  everything up to the last ``"\\n\\nAssistant:"`` (multi-turn context kept as text), the response
  is the last assistant turn.
* ``pandalm-testset-v1.json``: majority vote of ``annotator1..3`` (1 or 2; 0 is a tie vote);
  pairs without a strict majority for one side are dropped. Prompt = instruction + input.
* ``alpaca-eval-gpt4/annotations_gpt4judge__*.json``: ``preference`` "1"/"2"; "0" (tie) dropped.

Evaluation only (never for training): LLMBar-format files (``input, output_1, output_2, label``)
read by :func:`load_llmbar`; :func:`check_trainable` refuses them and MT-Bench/self-instruct.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ASSISTANT = "\n\nAssistant:"
EVALUATION_ONLY = ("llmbar", "mt-bench", "mt_bench", "self-instruct", "self_instruct")


@dataclass(frozen=True)
class PreferencePair:
    """One labelled comparison: ``chosen`` was preferred to ``rejected`` for ``prompt``.

    ``source`` names the file it came from (for per-source counts)."""

    prompt: str
    chosen: str
    rejected: str
    source: str = ""


def check_trainable(path: str | Path) -> None:
    """Raise ValueError if ``path`` is an evaluation-only set (anything under ``llmbar/``, MT-Bench,
    self-instruct; see ../shared/data/README.md)."""
    parts = [p.lower() for p in Path(path).parts]
    name = Path(path).name.lower()
    if "llmbar" in parts or any(tag in name for tag in EVALUATION_ONLY):
        raise ValueError(f"judge.train.train_files: {path} is evaluation-only (see ../shared/data/README.md); "
                         "never train on it")


def _load_rows(path: str | Path) -> list[dict[str, Any]]:
    from nlhf.data import load_json_rows

    path = str(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"preference file not found: {path}")
    ds = load_json_rows(path)
    return list(ds)


def split_dialogue(dialogue: str) -> tuple[str, str]:
    """(prompt, last assistant turn) of an hh-rlhf dialogue ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``.

    The prompt keeps every earlier turn and ends with the last human turn (without the final
    ``Assistant:`` header). Raises ValueError if there is no assistant turn.
    """
    i = dialogue.rfind(ASSISTANT)
    if i < 0:
        raise ValueError(f"no '\\n\\nAssistant:' turn in dialogue {dialogue[:80]!r}")
    return dialogue[:i].strip(), dialogue[i + len(ASSISTANT):].strip()


def _hh(rows: Iterable[dict], src: str) -> list[PreferencePair]:
    out = []
    for r in rows:
        pc, c = split_dialogue(r["chosen"])
        pr, rj = split_dialogue(r["rejected"])
        if pc != pr:  # the two dialogues must share the context; skip the rare malformed pair
            continue
        out.append(PreferencePair(pc, c, rj, src))
    return out


def _instruction(row: dict) -> str:
    extra = (row.get("input") or "").strip()
    ins = str(row.get("instruction") or "").strip()
    return f"{ins}\n\n{extra}" if extra else ins


def _pandalm(rows: Iterable[dict], src: str) -> list[PreferencePair]:
    out = []
    for r in rows:
        votes = [int(r[f"annotator{k}"]) for k in (1, 2, 3)]
        one, two = votes.count(1), votes.count(2)
        if one == two:
            continue
        a, b = str(r["response1"]).strip(), str(r["response2"]).strip()
        chosen, rejected = (a, b) if one > two else (b, a)
        out.append(PreferencePair(_instruction(r), chosen, rejected, src))
    return out


def _alpaca_eval(rows: Iterable[dict], src: str) -> list[PreferencePair]:
    out = []
    for r in rows:
        pref = r.get("preference")
        try:
            pref = float(pref)
        except (TypeError, ValueError):
            continue
        if pref not in (1.0, 2.0):  # 0 = tie (and any fractional preference) dropped
            continue
        a, b = str(r["output_1"]).strip(), str(r["output_2"]).strip()
        chosen, rejected = (a, b) if pref == 1.0 else (b, a)
        out.append(PreferencePair(_instruction(r), chosen, rejected, src))
    return out


def load_preference_file(path: str | Path) -> list[PreferencePair]:
    """Load one training file (format recognised from its columns), ties dropped, not deduplicated.

    Raises:
        FileNotFoundError: missing file.
        ValueError: an evaluation-only file, or unknown columns.
    """
    check_trainable(path)
    rows = _load_rows(path)
    src = Path(path).name
    if not rows:
        return []
    keys = set(rows[0])
    if {"chosen", "rejected"} <= keys:
        pairs = _hh(rows, src)
    elif {"response1", "response2", "annotator1"} <= keys:
        pairs = _pandalm(rows, src)
    elif {"output_1", "output_2", "preference"} <= keys:
        pairs = _alpaca_eval(rows, src)
    else:
        raise ValueError(f"{path}: unrecognised preference format, columns {sorted(keys)}")
    return [p for p in pairs if p.prompt and p.chosen != p.rejected]


def deduplicate(pairs: Iterable[PreferencePair]) -> list[PreferencePair]:
    """Keep the first pair for each (prompt, unordered {response, response}); order preserved.

    (The AlpacaEval files share their reference outputs, and a pair seen in both orders or with
    contradicting labels is kept once, first label wins.)"""
    seen, out = set(), []
    for p in pairs:
        key = (p.prompt, frozenset((p.chosen, p.rejected)))
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def load_preferences(paths: Sequence[str | Path]) -> list[PreferencePair]:
    """All training pairs of ``paths``, concatenated in order and deduplicated."""
    pairs: list[PreferencePair] = []
    for p in paths:
        pairs.extend(load_preference_file(p))
    return deduplicate(pairs)


def split_by_prompt(pairs: Sequence[PreferencePair], validation_fraction: float, seed: int = 0
                    ) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Seeded (train, validation) split that keeps all pairs of one prompt on the same side.

    A prompt goes to validation when a seeded hash of it falls below ``validation_fraction``, so
    the split does not depend on file order or on which other files are loaded.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    train, val = [], []
    for p in pairs:
        h = hashlib.sha256(f"{seed}\0{p.prompt}".encode()).digest()
        u = int.from_bytes(h[:8], "big") / 2.0**64
        (val if u < validation_fraction else train).append(p)
    return train, val


def subsample(pairs: Sequence[PreferencePair], n: int | None, seed: int = 0) -> list[PreferencePair]:
    """A seeded random subset of ``n`` pairs (all of them, shuffled, when ``n`` is None or larger)."""
    out = list(pairs)
    random.Random(seed).shuffle(out)
    return out if n is None else out[:n]


@dataclass(frozen=True)
class LabelledPair:
    """An evaluation pair: ``label`` 1 means ``output_1`` is better, 2 means ``output_2``."""

    prompt: str
    output_1: str
    output_2: str
    label: int


def load_llmbar(path: str | Path) -> tuple[list[LabelledPair], int]:
    """Read an LLMBar-format evaluation file (``input, output_1, output_2, label``).

    Returns:
        (pairs with label 1 or 2, number of rows dropped as ties / unlabelled).
    """
    rows = _load_rows(path)
    out, dropped = [], 0
    for r in rows:
        try:
            label = int(r["label"])
        except (TypeError, ValueError, KeyError):
            label = 0
        if label not in (1, 2) or not str(r.get("input") or "").strip():
            dropped += 1
            continue
        out.append(LabelledPair(str(r["input"]).strip(), str(r["output_1"]), str(r["output_2"]), label))
    return out, dropped
