"""Judge adapters without Ray: matrix, Bradley-Terry (tiny random reward model), LLM-as-judge
(tiny random Llama through vLLM), the factory, and output validation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from nlhf.config import JudgeConfig
from nlhf.judge import Judge, JudgeError, build_judge

ACTIONS = ["A", "B", "C"]
# Rock-paper-scissors-like: A beats B, B beats C, C beats A.
P3 = np.array([[0.5, 0.9, 0.2], [0.1, 0.5, 0.7], [0.8, 0.3, 0.5]])


# ----------------------------------------------------------------------------- validation
class FixedJudge(Judge):
    name = "fixed"

    def __init__(self, value: float) -> None:
        self.value = value

    def _prefer(self, prompts, responses_a, responses_b):
        out = np.full(len(prompts), 0.5)
        out[-1] = self.value
        return out


@pytest.mark.parametrize("bad", [float("nan"), 1.5, -0.1, float("inf")])
def test_invalid_output_raises_naming_judge_and_pair(bad):
    judge = FixedJudge(bad)
    with pytest.raises(JudgeError) as err:
        judge.prefer(["p0", "p1"], ["first a", "second a"], ["first b", "second b"])
    msg = str(err.value)
    assert "judge fixed" in msg and "pair 1" in msg and "second a" in msg and "second b" in msg


def test_request_checks():
    judge = FixedJudge(0.5)
    with pytest.raises(JudgeError, match="same length"):
        judge.prefer(["p"], ["a", "b"], ["c"])
    with pytest.raises(JudgeError, match=r"prompts\[0\] is empty"):
        judge.prefer(["  "], ["a"], ["b"])
    with pytest.raises(JudgeError, match="not a string"):
        judge.prefer(["p"], [3], ["b"])
    assert judge.prefer([], [], []).shape == (0,)


# ----------------------------------------------------------------------------- matrix
def test_matrix_judge_exact_values_and_whitespace():
    judge = build_judge(JudgeConfig(kind="matrix"), matrix=P3, actions=ACTIONS)
    assert judge.name == "matrix"
    p = judge.prefer(["x"] * 4, ["A", " B\n", "C", "A"], ["B", "C", "A", "A"])
    np.testing.assert_array_equal(p, [0.9, 0.7, 0.8, 0.5])
    q = judge.prefer(["x"] * 4, ["B", "C", "A", "A"], ["A", " B\n", "C", "A"])
    np.testing.assert_allclose(p + q, 1.0)
    assert judge.truncations == 0


def test_matrix_judge_unknown_response_names_pair():
    judge = build_judge(JudgeConfig(kind="matrix"), matrix=P3, actions=ACTIONS)
    with pytest.raises(JudgeError) as err:
        judge.prefer(["x", "x"], ["A", "B"], ["C", "Zebra"])
    msg = str(err.value)
    assert "judge matrix" in msg and "responses_b[1]" in msg and "Zebra" in msg and "pair 1" in msg


def test_matrix_judge_rejects_bad_matrix_and_actions():
    bad = P3.copy()
    bad[0, 1] = 0.3  # P + P.T != 1
    with pytest.raises(JudgeError, match="invalid preference matrix"):
        build_judge(JudgeConfig(kind="matrix"), matrix=bad, actions=ACTIONS)
    with pytest.raises(JudgeError, match="2 actions for a 3x3"):
        build_judge(JudgeConfig(kind="matrix"), matrix=P3, actions=["A", "B"])
    with pytest.raises(JudgeError, match="distinct"):
        build_judge(JudgeConfig(kind="matrix"), matrix=P3, actions=["A", "B", "A"])
    with pytest.raises(JudgeError, match="needs matrix"):
        build_judge(JudgeConfig(kind="matrix"))


def test_factory_needs_existing_path(tmp_path):
    with pytest.raises(JudgeError, match="judge.path is required"):
        build_judge(JudgeConfig(kind="bradley-terry"))
    with pytest.raises(FileNotFoundError, match="not a folder"):
        build_judge(JudgeConfig(kind="bradley-terry", path=str(tmp_path / "missing")))


# ----------------------------------------------------------------------------- Bradley-Terry
@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny random LlamaForSequenceClassification (one output) saved with the real tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256, num_labels=1,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)  # make reward differences large enough to see
    out = tmp_path_factory.mktemp("rm") / "tiny-rm"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_bradley_terry_matches_sigmoid_of_reward_difference(reward_model_dir):
    import torch

    judge = build_judge(JudgeConfig(kind="bradley-terry", path=str(reward_model_dir), batch_size=2))
    assert judge.name == "bradley-terry" and judge.uses_chat_template
    assert judge.max_length == 256  # capped by the model's max_position_embeddings
    prompts = ["What is the capital of France?", "Name a colour.", "What is the capital of France?"]
    a = ["Paris.", "Blue", "It is Paris, a city on the Seine."]
    b = ["Lyon.", "A colour is a visual property of light, for example green.", "Paris."]
    p = judge.prefer(prompts, a, b)
    q = judge.prefer(prompts, b, a)
    np.testing.assert_allclose(p + q, 1.0, atol=1e-12)
    assert np.all((p > 0) & (p < 1)) and np.ptp(p) > 1e-4  # not all 1/2
    # Reference: score each text alone (no padding) with the model, through the chat template.
    tok = judge.tokenizer

    def reward(x, y):
        text = tok.apply_chat_template([{"role": "user", "content": x}, {"role": "assistant", "content": y}],
                                       tokenize=False)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            return float(judge.model(input_ids=ids).logits[0, 0])

    expected = [1 / (1 + math.exp(-(reward(x, y1) - reward(x, y2)))) for x, y1, y2 in zip(prompts, a, b)]
    np.testing.assert_allclose(p, expected, atol=1e-5)
    assert judge.prefer(["x"], ["same"], ["same"])[0] == pytest.approx(0.5)


def test_bradley_terry_plain_text_without_chat_template(reward_model_dir):
    judge = build_judge(JudgeConfig(kind="bradley-terry", path=str(reward_model_dir)))
    judge.uses_chat_template = False
    expected = judge.tokenizer("Q?\n\nAnswer", add_special_tokens=True)["input_ids"]
    assert judge.render("Q?", "Answer") == list(expected)


def test_bradley_terry_overlong_truncate_counts_and_reject_raises(reward_model_dir):
    long = "word " * 200
    judge = build_judge(JudgeConfig(kind="bradley-terry", path=str(reward_model_dir), max_length=64))
    p = judge.prefer(["Say something.", "Say something."], [long, "short"], ["short", "also short"])
    assert judge.truncations == 1 and np.all(np.isfinite(p))
    reject = build_judge(JudgeConfig(kind="bradley-terry", path=str(reward_model_dir), max_length=64,
                                     on_overlong="reject"))
    with pytest.raises(JudgeError, match="over max_length=64") as err:
        reject.prefer(["Say something."], ["short"], [long])
    assert "judge bradley-terry" in str(err.value)


def test_bradley_terry_needs_one_output(tmp_path, reward_model_dir):
    cfg = json.loads((reward_model_dir / "config.json").read_text())
    import shutil

    two = tmp_path / "two"
    shutil.copytree(reward_model_dir, two)
    cfg["id2label"] = {"0": "a", "1": "b"}
    cfg["label2id"] = {"a": 0, "b": 1}
    (two / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(JudgeError, match="num_labels=2"):
        from nlhf.judge.bradley_terry import BradleyTerryJudge

        BradleyTerryJudge.from_folder(two)


# ----------------------------------------------------------------------------- LLM-as-judge
def test_water_fill_cuts_longest_first():
    from nlhf.judge.llm import water_fill

    assert water_fill([5, 100, 40], 200) == [5, 100, 40]
    assert water_fill([5, 100, 40], 65) == [5, 30, 30]
    assert water_fill([5, 100, 10], 65) == [5, 50, 10]


@pytest.fixture(scope="module")
def llm_judge(tiny_model_dir, tmp_path_factory):
    import os

    os.environ.setdefault("VLLM_CACHE_ROOT", str(tmp_path_factory.mktemp("vllm-cache")))
    judge = build_judge(JudgeConfig(kind="llm", path=str(tiny_model_dir), max_length=160, batch_size=8))
    yield judge
    judge.close()


def test_llm_judge_is_antisymmetric_and_order_averaged(llm_judge):
    assert llm_judge.name == "llm" and len(set(llm_judge.label_ids)) == 2
    prompts = ["What is 2+2?", "Name a colour."]
    a, b = ["4", "Blue."], ["5", "I cannot help with that."]
    p = llm_judge.prefer(prompts, a, b)
    q = llm_judge.prefer(prompts, b, a)
    np.testing.assert_allclose(p + q, 1.0, atol=1e-9)
    assert np.all((p > 0) & (p < 1))
    # P(a > b) = (p_AB + 1 - p_BA) / 2 with p = P("A") from the two label log-probs.
    ab = llm_judge.prob_first([llm_judge.encode(prompts[0], a[0], b[0])])[0]
    ba = llm_judge.prob_first([llm_judge.encode(prompts[0], b[0], a[0])])[0]
    assert p[0] == pytest.approx((ab + 1 - ba) / 2, abs=1e-6)
    assert llm_judge.prefer(["x?"], ["same"], ["same"])[0] == pytest.approx(0.5, abs=1e-9)


def test_llm_judge_overlong(llm_judge):
    long = "blah " * 400
    before = llm_judge.truncations
    p = llm_judge.prefer(["Say something."], [long], ["short"])
    assert llm_judge.truncations == before + 1 and 0 <= p[0] <= 1
    llm_judge.on_overlong = "reject"
    try:
        with pytest.raises(JudgeError, match="judge llm: pair 0 .* over max_length=160"):
            llm_judge.prefer(["Say something."], ["short"], [long])
    finally:
        llm_judge.on_overlong = "truncate"


# ----------------------------------------------------------------------------- pairwise (through the factory)
def test_factory_builds_pairwise_with_config_limits(tmp_path):
    from nlhf.judge.pairwise import make_tiny_pairwise

    folder = make_tiny_pairwise(tmp_path / "tiny-pairwise")
    judge = build_judge(JudgeConfig(kind="pairwise", path=str(folder), max_length=64, on_overlong="reject",
                                    batch_size=4))
    assert judge.name == "pairwise" and judge.truncations == 0
    p = judge.prefer(["Name a colour."] * 2, ["Blue.", "Red."], ["Red.", "Blue."])
    np.testing.assert_allclose(p[0] + p[1], 1.0, atol=1e-6)
    with pytest.raises(JudgeError):
        judge.prefer(["Name a colour."], ["word " * 200], ["Red."])
