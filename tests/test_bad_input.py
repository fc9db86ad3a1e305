"""Bad input is caught before any actor starts: `nlhf train --check` (a subprocess, as a user runs
it) exits 2 with one line naming the field and the value, and no traceback. Also the run-folder
rules at start-up, and the inputs of `nlhf judge train`, `nlhf eval` and `nlhf bench`."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
LANG = "configs/smollm2-cpu.yaml"
GAME = "configs/game-cpu.yaml"
# A cold `datasets` cache, as on a fresh checkout: building it must not print in front of the error.
DATASETS_CACHE = tempfile.mkdtemp(prefix="nlhf-bad-input-datasets-")


def nlhf(*args: str, env: dict[str, str] | None = None, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ, HF_DATASETS_CACHE=DATASETS_CACHE, **(env or {}))
    full_env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "nlhf.cli", *args], cwd=REPO, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), lines
    assert "Traceback" not in proc.stderr + proc.stdout
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    files = {
        "empty": d / "empty.jsonl",
        "blank": d / "blank.jsonl",
        "latin1": d / "latin1.jsonl",
        "a_file": d / "a_file.txt",
        "not_complementary": d / "bad_matrix.npy",
        "nan_matrix": d / "nan_matrix.npy",
    }
    files["empty"].write_text("")
    files["blank"].write_text("\n\n  \n")
    files["latin1"].write_bytes('{"instruction": "caf\xe9 au lait?"}\n'.encode("latin-1"))
    files["a_file"].write_text("I am a file")
    np.save(files["not_complementary"], np.full((4, 4), 0.7))
    m = np.full((3, 3), 0.5)
    m[0, 1] = np.nan
    np.save(files["nan_matrix"], m)
    return files


CASES = [
    # (id, config, overrides, env, needles in the error line)
    ("empty prompt file", LANG, ["data.train_prompts=[{empty}]"], {}, ["data.train_prompts[0]", "empty"]),
    ("blank prompt file", LANG, ["data.train_prompts=[{blank}]"], {}, ["data.train_prompts[0]", "empty"]),
    ("non-UTF-8 prompt file", LANG, ["data.train_prompts=[{latin1}]"], {}, ["data.train_prompts[0]", "latin1.jsonl", "UTF-8"]),
    ("missing prompt file", LANG, ["data.train_prompts=[nope.jsonl]"], {}, ["data.train_prompts[0]", "nope.jsonl"]),
    ("evaluation-only prompts", LANG, ["data.train_prompts=[../shared/data/prompts/mt-bench.jsonl]"], {},
     ["data.train_prompts[0]", "evaluation-only"]),
    ("non-UTF-8 eval prompts", LANG, ["data.eval_prompts={latin1}"], {}, ["data.eval_prompts", "UTF-8"]),
    ("prompt budget above model length", LANG, ["data.max_prompt_tokens=600", "rollout.max_model_len=512"], {},
     ["data.max_prompt_tokens", "600", "rollout.max_model_len"]),
    ("output_dir is a file", LANG, ["output_dir={a_file}"], {}, ["output_dir", "a_file.txt", "is a file"]),
    ("output_dir unwritable", LANG, ["output_dir=/proc/nlhf-run"], {}, ["output_dir", "/proc/nlhf-run"]),
    ("judge HTTP off loopback without token", LANG,
     ["judge.serve.http.enabled=true", "judge.serve.http.host=0.0.0.0"], {"NLHF_JUDGE_TOKEN": ""},
     ["judge.serve.http.host", "0.0.0.0", "token"]),
    ("dashboard off loopback without Ray auth", LANG, ["cluster.dashboard_host=0.0.0.0"], {"RAY_AUTH_MODE": "disabled"},
     ["cluster.dashboard_host", "0.0.0.0", "RAY_AUTH_MODE"]),
    ("policy path missing", LANG, ["policy.source=./no/such/model"], {}, ["policy.source", "./no/such/model"]),
    ("policy source unknown", LANG, ["policy.source=not-a-model"], {}, ["policy.source", "not-a-model"]),
    ("unknown pypi model", LANG, ["policy.source=pypi:llm-nothing"], {}, ["policy.source", "pypi:llm-nothing"]),
    ("judge missing, cannot be trained", LANG, ["judge.path=./no/judge", "judge.train=null"], {}, ["judge.path", "./no/judge"]),
    ("judge training file missing", LANG, ["judge.path=./no/judge", "judge.train.train_files=[nope.json]"], {},
     ["judge.train.train_files[0]", "nope.json"]),
    ("regression estimator with R=2", LANG, ["algorithm.estimator=regression", "responses_per_prompt=2"], {},
     ["responses_per_prompt", "regression", "got 2"]),
    ("unknown key", LANG, ["algorithm.etaa=0.1"], {}, ["algorithm.etaa"]),
    ("wrong type", LANG, ["iterations=many"], {}, ["iterations", "many"]),
    ("unknown algorithm", LANG, ["algorithm.name=ppo"], {}, ["algorithm.name", "ppo"]),
    ("matrix not complementary", GAME, ["game.matrix={not_complementary}"], {}, ["game.matrix", "bad_matrix.npy"]),
    ("matrix with NaN", GAME, ["game.matrix={nan_matrix}"], {}, ["game.matrix", "nan_matrix.npy"]),
    ("matrix file missing", GAME, ["game.matrix=nope.npy"], {}, ["game.matrix", "nope.npy"]),
    ("too many game actions", GAME, ["game.n=100"], {}, ["game.n", "100"]),
    ("too many actors", GAME, ["rollout.num_workers=8"], {}, ["resources", "cluster.num_cpus"]),
]


@pytest.mark.parametrize("config,overrides,env,needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_train_check_rejects(config, overrides, env, needles, bad_files, tmp_path):
    subs = {k: str(v) for k, v in bad_files.items()}
    args = [o.format(**subs) for o in overrides]
    if not any(a.startswith("output_dir=") for a in args):
        args.append(f"output_dir={tmp_path / 'run'}")
    proc = nlhf("train", "--config", config, "--check", *args, env=env)
    assert_one_line_error(proc, *[n.format(**subs) for n in needles])


def test_check_accepts_the_shipped_configs(tmp_path):
    for config in (LANG, GAME):
        proc = nlhf("train", "--config", config, "--check", f"output_dir={tmp_path / 'x'}")
        assert proc.returncode == 0, proc.stderr
        assert "config ok" in proc.stdout


def test_non_empty_output_dir_is_refused_before_anything_starts(tmp_path):
    out = tmp_path / "old-run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"iteration": 1}\n')
    proc = nlhf("train", "--config", GAME, f"output_dir={out}", "cluster.dashboard=false")
    assert_one_line_error(proc, "output_dir", str(out), "--resume", "--overwrite")
    assert (out / "metrics.jsonl").read_text() == '{"iteration": 1}\n'  # nothing lost
    proc = nlhf("train", "--config", GAME, f"output_dir={out}", "--resume")
    assert_one_line_error(proc, "resume", "no complete checkpoint")
    assert (out / "metrics.jsonl").read_text() == '{"iteration": 1}\n'


def test_judge_train_eval_and_bench_inputs(tmp_path, bad_files):
    proc = nlhf("judge", "train", "--config", "configs/judge-minilm.yaml", f"path={tmp_path / 'j'}",
                "train.train_files=[nope.json]")
    assert_one_line_error(proc, "judge.train.train_files[0]", "nope.json")
    proc = nlhf("judge", "train", "--config", "configs/judge-minilm.yaml", f"path={tmp_path / 'j'}",
                "train.train_files=[../shared/data/preferences/llmbar/Processed__MT-Bench.json]")
    assert_one_line_error(proc, "judge.train.train_files[0]", "evaluation-only")
    proc = nlhf("judge", "train", "--config", "configs/judge-minilm.yaml", f"path={bad_files['a_file']}")
    assert_one_line_error(proc, "judge.path", "a_file.txt")
    proc = nlhf("eval", "--policy", str(tmp_path / "nothing"), "--config", LANG)
    assert_one_line_error(proc, "--policy", "nothing")
    proc = nlhf("eval", "--policy", str(tmp_path), "--config", LANG, "data.eval_prompts={}".format(bad_files["latin1"]))
    assert_one_line_error(proc, "--policy")
    proc = nlhf("bench", "warp", "--config", LANG, "--out", str(tmp_path / "b.json"))
    assert_one_line_error(proc, "bench", "warp")
    proc = nlhf("bench", "rollout", "--config", LANG, "--out", str(bad_files["a_file"] / "b.json"))
    assert_one_line_error(proc, "--out")
    proc = nlhf("bench", "rollout", "--config", LANG, "--out", str(tmp_path / "b.json"), "data.train_prompts=[{}]".format(bad_files["empty"]))
    assert_one_line_error(proc, "data.train_prompts[0]", "empty")
