"""Bad configs fail before any actor starts, with one line naming the field and the value."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nlhf.config import ConfigError, TrainConfig, load_model, load_train_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)


def test_shipped_configs_validate(shared_data: Path) -> None:
    # cluster-gpu names hub models: tests/test_cluster_startup.py checks it against a cache of stand-ins
    for name in ("game-cpu", "smollm2-cpu"):
        cfg = load_train_config(REPO / "configs" / f"{name}.yaml")
        assert isinstance(cfg, TrainConfig)
    cfg = load_train_config(REPO / "configs" / "smollm2-cpu.yaml")
    assert cfg.judge.kind == "pairwise" and cfg.judge.train is not None  # included from judge-minilm.yaml
    assert cfg.judge.serve.max_batch_size == 32  # ...with the train config's override on top


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("learner.zero_stage=5", "learner.zero_stage"),
        ("learner.bogus=1", "learner.bogus: Extra inputs are not permitted"),
        ("algorithm.beta=-0.1", "algorithm.beta"),
        ("iterations=many", "iterations"),
        ("rollout.num_workers=4", "resources: actors need"),
        ("learner.num_gpus=1", "GPUs"),
        ("policy.source=./no/such/model", "policy.source: model path does not exist: ./no/such/model"),
        ("game.matrix=./missing.npy", "game.matrix: file not found: ./missing.npy"),
        ("judge.kind=pairwise", "judge.kind must be 'matrix' in game mode"),
        ("sync.backend=nccl", "sync.backend 'nccl' needs"),
    ],
)
def test_bad_game_config_names_field(override: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=None) as err:
        load_train_config(REPO / "configs" / "game-cpu.yaml", [override])
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_data_path_named(shared_data: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_train_config(REPO / "configs" / "smollm2-cpu.yaml", ["data.eval_prompts=../shared/data/prompts/nope.jsonl"])
    assert str(err.value) == "data.eval_prompts: file not found: ../shared/data/prompts/nope.jsonl"


def test_missing_judge_without_training_named(shared_data: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_train_config(REPO / "configs" / "smollm2-cpu.yaml", [f"judge.path={tmp_path}/none", "judge.train=null"])
    assert "judge.path: does not exist" in str(err.value)


def test_bad_override_and_file() -> None:
    with pytest.raises(ConfigError, match="not of the form key.sub=value"):
        load_train_config(REPO / "configs" / "game-cpu.yaml", ["iterations"])
    with pytest.raises(ConfigError, match="--config: file not found: nope.yaml"):
        load_train_config("nope.yaml")


def test_exactly_one_mode() -> None:
    with pytest.raises(ConfigError, match="exactly one of `data`"):
        load_model(TrainConfig, None)


def test_tiny_head_dim_checked() -> None:
    with pytest.raises(ConfigError, match="policy.tiny: .*>= 32"):
        load_train_config(REPO / "configs" / "game-cpu.yaml", ["policy.tiny.num_heads=4"])


def test_cli_bad_config_is_one_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "nlhf.cli", "train", "--config", "configs/game-cpu.yaml", "learner.zero_stage=7", "--check"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["error: learner.zero_stage: Input should be 0, 1, 2 or 3 (got 7)"]


def test_cli_check_ok() -> None:
    proc = subprocess.run([sys.executable, "-m", "nlhf.cli", "train", "--config", "configs/game-cpu.yaml", "--check"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "config ok" in proc.stdout


def test_evaluation_only_training_prompts_refused(shared_data: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_train_config(REPO / "configs" / "smollm2-cpu.yaml",
                          ["data.train_prompts=[../shared/data/prompts/mt-bench.jsonl]"])
    assert str(err.value).startswith("data.train_prompts[0]: ../shared/data/prompts/mt-bench.jsonl is evaluation-only")


def test_shared_engines_count_once_and_refuse_what_cannot_share() -> None:
    game = REPO / "configs" / "game-cpu.yaml"
    with pytest.raises(ConfigError, match="resources: actors need 2.75 CPUs"):  # 8 engines x 0.25 + learner + judge
        load_train_config(game, ["rollout.num_workers=4"])
    cfg = load_train_config(game, ["rollout.num_workers=4", "rollout.share_engines=true"])  # 4 engines: fits
    assert cfg.rollout.num_engines == 4
    for extra, needle in ((["algorithm.name=nash-md-pg"], "rollout.share_engines: nash-md-pg samples"),
                          (["sync.backend=nccl", "learner.num_gpus=1", "rollout.num_gpus=1"],
                           "rollout.share_engines: the engines receive weights over one NCCL group per pool")):
        with pytest.raises(ConfigError) as err:
            load_train_config(game, ["rollout.share_engines=true", *extra], check=False)
        assert needle in str(err.value) and "\n" not in str(err.value)
