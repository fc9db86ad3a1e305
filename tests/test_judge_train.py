"""Preference data loaders, a short train_judge run (tiny model) and evaluate_judge's report."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from nlhf.config import JudgeConfig, JudgeTrainConfig
from nlhf.data.preferences import (PreferencePair, check_trainable, deduplicate, load_llmbar, load_preference_file,
                                   load_preferences, split_by_prompt, split_dialogue)
from nlhf.judge.evaluate import agreement, evaluate_judge
from nlhf.judge.pairwise import PairwiseJudge, make_tiny_pairwise
from nlhf.judge.train import train_judge

PREFS = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "preferences").resolve()
needs_data = pytest.mark.skipif(not PREFS.is_dir(), reason="../shared/data/preferences not present")


# ----------------------------------------------------------------------------- data
def test_split_dialogue_keeps_context():
    d = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: and now?\n\nAssistant: Now this."
    assert split_dialogue(d) == ("Human: hi\n\nAssistant: hello\n\nHuman: and now?", "Now this.")
    with pytest.raises(ValueError):
        split_dialogue("\n\nHuman: no answer")


@needs_data
def test_hh_rlhf_loader_real_file():
    path = PREFS / "hh-rlhf-harmless-base-test.jsonl.gz"
    pairs = load_preference_file(path)
    with gzip.open(path, "rt") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 2312 and 2290 <= len(pairs) <= 2312
    p = pairs[0]
    assert p.prompt.startswith("Human:") and "\n\nAssistant:" in p.prompt  # multi-turn context kept
    assert not p.chosen.startswith("Assistant") and p.chosen != p.rejected
    assert rows[0]["chosen"].strip().endswith(p.chosen)


@needs_data
def test_pandalm_majority_vote_drops_ties():
    path = PREFS / "pandalm-testset-v1.json"
    rows = json.loads(path.read_text())
    votes = [[r[f"annotator{k}"] for k in (1, 2, 3)] for r in rows]
    expected = sum(v.count(1) != v.count(2) for v in votes)
    pairs = load_preference_file(path)
    assert len(pairs) == expected and expected < len(rows)
    r0 = rows[0]  # all three annotators chose response 2
    assert pairs[0].chosen == r0["response2"].strip() and pairs[0].prompt.startswith(r0["instruction"])
    assert r0["input"].strip() in pairs[0].prompt


@needs_data
def test_alpaca_eval_ties_dropped_and_dedup():
    path = PREFS / "alpaca-eval-gpt4" / "annotations_gpt4judge__alpaca-7b_vs_text_davinci_003.json"
    rows = json.loads(path.read_text())
    pairs = load_preference_file(path)
    assert len(pairs) <= sum(str(r["preference"]) in ("1", "2", "1.0", "2.0") for r in rows) < len(rows)
    r = next(r for r in rows if str(r["preference"]) == "2")
    assert any(p.chosen == r["output_2"].strip() and p.rejected == r["output_1"].strip() for p in pairs)
    assert len(load_preferences([path, path])) == len(deduplicate(pairs))


def test_dedup_and_split_by_prompt():
    pairs = [PreferencePair("p", "a", "b"), PreferencePair("p", "b", "a"), PreferencePair("q", "a", "b")]
    assert deduplicate(pairs) == [pairs[0], pairs[2]]
    many = [PreferencePair(f"prompt {i % 50}", f"a{i}", f"b{i}") for i in range(500)]
    tr, va = split_by_prompt(many, 0.2, seed=0)
    assert len(tr) + len(va) == 500 and 0 < len(va) < 250
    assert not {p.prompt for p in tr} & {p.prompt for p in va}  # a prompt stays on one side
    assert split_by_prompt(many, 0.2, seed=0) == (tr, va)
    assert split_by_prompt(many, 0.2, seed=1) != (tr, va)


@needs_data
def test_llmbar_loader_and_eval_only_refused():
    pairs, ties = load_llmbar(PREFS / "llmbar" / "Processed__MT-Bench.json")
    assert len(pairs) == 200 and ties == 0 and {p.label for p in pairs} == {1, 2}
    for bad in ("../shared/data/preferences/llmbar/LLMBar__Natural.json", "/x/prompts/mt-bench.jsonl",
                "/x/self-instruct-user-oriented.jsonl"):
        with pytest.raises(ValueError, match="evaluation-only"):
            check_trainable(bad)
    check_trainable(PREFS / "pandalm-testset-v1.json")


# ----------------------------------------------------------------------------- train + eval
def _hh_file(path: Path, n: int) -> Path:
    rows = []
    for i in range(n):
        ctx = f"\n\nHuman: question number {i} about topic {i % 7}?"
        rows.append({"chosen": f"{ctx}\n\nAssistant: A careful helpful answer number {i}.",
                     "rejected": f"{ctx}\n\nAssistant: no"})
    with gzip.open(path, "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _llmbar_file(path: Path) -> Path:
    rows = [{"input": f"question {i}", "output_1": "a long and helpful answer" if i % 2 else "no",
             "output_2": "no" if i % 2 else "a long and helpful answer", "label": 1 if i % 2 else 2} for i in range(10)]
    rows.append({"input": "tie", "output_1": "x", "output_2": "y", "label": 0})
    path.write_text(json.dumps(rows))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("jt")
    tiny = make_tiny_pairwise(d / "tiny", head="pairwise")
    cfg = JudgeConfig(path=str(d / "out"), head="pairwise", train=JudgeTrainConfig(
        encoder=str(tiny), train_files=[str(_hh_file(d / "hh.jsonl.gz", 60))], validation_fraction=0.2,
        max_length=48, batch_size=8, max_train_pairs=24, lr=1e-3, seed=0, num_threads=1))
    return cfg, train_judge(cfg), d


def test_train_judge_short_run(trained):
    cfg, report, d = trained
    assert report["n_train"] == 24 and report["n_val"] > 0 and report["steps"] == 3
    assert 0.0 <= report["val"]["accuracy"] <= 1.0 and report["total_seconds"] > 0
    out = Path(cfg.path)
    assert (out / "model.safetensors").is_file() and not list(d.glob("out.tmp*"))
    stored = json.loads((out / "judge_config.json").read_text())
    assert stored["head"] == "pairwise" and stored["train_report"]["n_train"] == 24
    judge = PairwiseJudge.from_folder(out)
    p = judge.prefer(["q"], ["yes"], ["no"])
    assert p.shape == (1,) and abs(p[0] + judge.prefer(["q"], ["no"], ["yes"])[0] - 1) < 1e-6


def test_train_judge_refuses_eval_only_files(trained, tmp_path):
    cfg, _, _ = trained
    for bad in ("../shared/data/preferences/llmbar/Processed__MT-Bench.json", "../shared/data/prompts/mt-bench.jsonl"):
        c = cfg.model_copy(update={"path": str(tmp_path / "x"),
                                   "train": cfg.train.model_copy(update={"train_files": [bad]})})
        with pytest.raises(ValueError, match="evaluation-only"):
            train_judge(c)
    assert not (tmp_path / "x").exists()


def test_agreement_metrics():
    labels = np.array([1, 2, 1, 2])
    m = agreement(np.array([0.9, 0.1, 0.4, 0.6]), np.array([0.1, 0.9, 0.3, 0.6]), labels)
    assert m["n"] == 4 and m["accuracy_12"] == 0.5 and m["accuracy_21"] == 1.0
    assert m["accuracy"] == 0.5 and m["accuracy_per_order"] == 0.75 and m["consistency"] == 0.5


def test_evaluate_judge_report_shape(trained, tmp_path):
    cfg, _, _ = trained
    f = _llmbar_file(tmp_path / "toy.json")
    rep = evaluate_judge(cfg.path, [str(f)], baselines=True)
    e = rep["files"]["toy.json"]
    assert e["ties_excluded"] == 1 and set(e) >= {"judge", "longer_wins", "random", "truncated_pairs"}
    assert e["judge"]["n"] == 10 and e["longer_wins"]["accuracy"] == 1.0
    assert e["judge"]["consistency"] == 1.0  # antisymmetric: the two orders never disagree
    for k in ("accuracy", "accuracy_12", "accuracy_21", "accuracy_per_order"):
        assert 0.0 <= e["random"][k] <= 1.0
    assert rep["overall"]["judge"]["n"] == 10
    assert set(evaluate_judge(cfg.path, [str(f)], baselines=False)["files"]["toy.json"]) >= {"judge"}


# ----------------------------------------------------------------------------- resumable training
@pytest.fixture(scope="module")
def resumable(tmp_path_factory):
    """A 9-step run (3 epochs of 3 batches, dropout on) and its uninterrupted weights."""
    from safetensors.torch import load_file

    d = tmp_path_factory.mktemp("resume")
    tiny = make_tiny_pairwise(d / "tiny", head="pairwise")
    cfg = JudgeConfig(path=str(d / "ref"), head="pairwise", train=JudgeTrainConfig(
        encoder=str(tiny), train_files=[str(_hh_file(d / "hh.jsonl.gz", 60))], validation_fraction=0.2,
        max_length=48, batch_size=8, max_train_pairs=24, epochs=3, lr=1e-3, seed=0, num_threads=1,
        checkpoint_every_s=None))
    report = train_judge(cfg, note=lambda s: None)
    assert report["steps"] == 9 and report["resumed_from_step"] is None
    return cfg, load_file(str(Path(cfg.path) / "model.safetensors")), d


def _interrupt_at_loss(monkeypatch, call: int, exc: type[BaseException]) -> None:
    """Make the ``call``-th training loss raise ``exc`` (after that step's forward pass and dropout)."""
    import torch

    real, calls = torch.nn.functional.softplus, []

    def softplus(x, *a, **k):
        calls.append(1)
        if len(calls) == call:
            raise exc("interrupted by the test")
        return real(x, *a, **k)

    monkeypatch.setattr(torch.nn.functional, "softplus", softplus)


def _same_weights(folder: str, ref: dict) -> None:
    import torch
    from safetensors.torch import load_file

    got = load_file(str(Path(folder) / "model.safetensors"))
    assert got.keys() == ref.keys()
    for k, want in ref.items():
        assert torch.equal(got[k], want), k  # bit-exact: same batches, dropout masks and learning rates


@pytest.mark.parametrize("exc,call,every,saved_step", [
    (KeyboardInterrupt, 4, None, 3),  # Ctrl-C during step 4: progress saved on the way out (epoch boundary)
    (RuntimeError, 6, 0.0, 5),        # a crash (nothing saved on the way out): the periodic save of step 5
])
def test_interrupted_judge_training_resumes_bit_exact(resumable, tmp_path, monkeypatch, exc, call, every, saved_step):
    cfg, ref, _ = resumable
    c = cfg.model_copy(update={"path": str(tmp_path / "judge"),
                               "train": cfg.train.model_copy(update={"checkpoint_every_s": every})})
    partial = tmp_path / "judge.partial"
    _interrupt_at_loss(monkeypatch, call, exc)
    with pytest.raises(exc):
        train_judge(c, note=lambda s: None)
    monkeypatch.undo()
    assert not (tmp_path / "judge").exists()
    saved = json.loads((partial / "progress.json").read_text())
    assert saved["step"] == saved_step
    notes: list[str] = []
    report = train_judge(c, note=notes.append)
    assert f"resuming judge training from step {saved_step}" in notes[0]
    assert report["steps"] == 9 and report["resumed_from_step"] == saved_step  # not 9 more steps
    assert report["train_seconds"] >= round(saved["train_seconds"], 1) - 0.1
    _same_weights(c.path, ref)
    assert not partial.exists() and sorted(p.name for p in tmp_path.iterdir()) == [".judge.lock", "judge"]


def test_progress_of_another_config_is_discarded(resumable, tmp_path, monkeypatch):
    cfg, _, _ = resumable
    c = cfg.model_copy(update={"path": str(tmp_path / "judge")})
    _interrupt_at_loss(monkeypatch, 3, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        train_judge(c, note=lambda s: None)
    monkeypatch.undo()
    assert json.loads((tmp_path / "judge.partial" / "progress.json").read_text())["step"] == 2
    other = c.model_copy(update={"train": c.train.model_copy(update={"lr": 2e-3})})
    notes: list[str] = []
    report = train_judge(other, note=notes.append)
    assert any("discarding judge training progress" in n for n in notes)
    assert report["resumed_from_step"] is None and report["steps"] == 9
    assert not (tmp_path / "judge.partial").exists()


def test_reuse_existing_judge_skips_training(resumable, monkeypatch):
    cfg, _, _ = resumable
    _interrupt_at_loss(monkeypatch, 1, AssertionError)  # any training step would fail the test
    report = train_judge(cfg, reuse_existing=True)
    assert report["reused"] is True and report["steps"] == 9
