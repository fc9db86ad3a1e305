"""The judge as a Ray Serve service: handle and HTTP requests, batching, stats, bearer-token
auth, bad requests, and the standalone ``nlhf judge serve`` process.

One local Ray cluster (127.0.0.1, 2 CPUs, no dashboard) serves the whole module; two apps run on
it: an exact matrix judge (open HTTP under /matrix) and a tiny text judge (pairwise cross-encoder,
or a Bradley-Terry reward model while pairwise is unavailable) under / with a bearer token.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from nlhf.config import ConfigError, JudgeConfig
from nlhf.judge import JudgeError

pytestmark = pytest.mark.ray

ACTIONS = ["A", "B", "C"]
P3 = np.array([[0.5, 0.9, 0.2], [0.1, 0.5, 0.7], [0.8, 0.3, 0.5]])
TOKEN = "test-token-123"
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_reward_model(out: Path, tokenizer_dir: Path) -> Path:
    """A tiny random one-output LlamaForSequenceClassification with the real tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256, num_labels=1,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def text_judge_cfg(tmp_path_factory, tokenizer_dir) -> JudgeConfig:
    """A small text judge folder: the tiny pairwise cross-encoder when available, else Bradley-Terry."""
    base = tmp_path_factory.mktemp("judges")
    try:
        from nlhf.judge.pairwise import make_tiny_pairwise

        return JudgeConfig(kind="pairwise", path=str(make_tiny_pairwise(base / "tiny-pairwise")), max_length=128)
    except (ImportError, FileNotFoundError, ModuleNotFoundError):
        return JudgeConfig(kind="bradley-terry", path=str(make_reward_model(base / "tiny-rm", tokenizer_dir)),
                           max_length=128)


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    port = free_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def matrix_app(cluster):
    from nlhf.judge.serve import start_judge_service

    cfg = JudgeConfig(kind="matrix", serve={"max_batch_size": 8, "batch_wait_timeout_s": 0.05,
                                            "http": {"enabled": True, "port": cluster}})
    handle = start_judge_service(cfg, name="matrix", matrix=P3, actions=ACTIONS, route_prefix="/matrix")
    return handle, f"http://127.0.0.1:{cluster}/matrix/prefer"


@pytest.fixture(scope="module")
def text_app(cluster, text_judge_cfg):
    from nlhf.judge.serve import start_judge_service

    cfg = text_judge_cfg.model_copy(deep=True)
    cfg.serve.http.enabled = True
    cfg.serve.http.port = cluster
    cfg.serve.http.token = TOKEN
    cfg.on_overlong = "reject"
    cfg.serve.torch_threads = 2  # Ray's OMP_NUM_THREADS would give the 0.25-CPU replica 1
    handle = start_judge_service(cfg, name="judge")
    return handle, f"http://127.0.0.1:{cluster}/prefer", cfg.kind


def real_pairs(shared_data: Path, n: int = 4) -> tuple[list[str], list[str], list[str]]:
    """The first ``n`` MT-Bench pairs, trimmed so they fit the tiny judge's 128 tokens."""
    rows = json.loads((shared_data / "preferences" / "llmbar" / "Processed__MT-Bench.json").read_text())[:n]
    return ([r["input"][:150] for r in rows], [r["output_1"][:150] for r in rows],
            [r["output_2"][:150] for r in rows])


# ----------------------------------------------------------------------------- no cluster needed
def test_loopback_and_bearer_helpers():
    from nlhf.judge.serve import _digest, bearer_ok, is_loopback

    assert all(is_loopback(h) for h in ("127.0.0.1", "127.3.4.5", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.5", "example.org", "128.0.0.1"))
    digest = _digest("s3cret")
    assert bearer_ok("Bearer s3cret", digest) and bearer_ok("bearer  s3cret ", digest)
    assert not bearer_ok(None, digest) and not bearer_ok("Bearer nope", digest) and not bearer_ok("s3cret", digest)
    assert not bearer_ok("Basic s3cret", digest) and bearer_ok(None, None)


def test_non_loopback_without_token_refuses_to_start(monkeypatch):
    from nlhf.judge.serve import serve_judge, start_judge_service

    monkeypatch.delenv("NLHF_JUDGE_TOKEN", raising=False)
    cfg = JudgeConfig(kind="matrix", serve={"http": {"enabled": True, "host": "0.0.0.0"}})
    with pytest.raises(ConfigError, match="'0.0.0.0' is not a loopback address, so a bearer token is required"):
        start_judge_service(cfg, matrix=P3, actions=ACTIONS)
    with pytest.raises(ConfigError, match="NLHF_JUDGE_TOKEN"):
        serve_judge(JudgeConfig(kind="matrix", serve={"http": {"host": "10.1.2.3"}}))
    # A token from the environment is accepted (checked here without starting anything).
    from nlhf.judge.serve import check_http_security

    monkeypatch.setenv("NLHF_JUDGE_TOKEN", "from-env")
    assert check_http_security(cfg.serve.http) == "from-env"


# ----------------------------------------------------------------------------- matrix app
def test_matrix_service_handle_http_and_batching(matrix_app):
    import httpx

    handle, url = matrix_app
    assert handle.prefer.remote(["x", "x"], ["A", "C"], ["B", " A "]).result() == [0.9, 0.8]
    r = httpx.post(url, json={"prompts": ["x"], "responses_a": ["B"], "responses_b": ["C"]}, timeout=30)
    assert r.status_code == 200 and r.json() == {"probabilities": [0.7]}  # open: no token configured here

    # 12 concurrent calls of 3 pairs each: merged into batches of at most max_batch_size=8 pairs.
    before = handle.stats.remote().result()
    a = ["A", "B", "C"]
    with ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(lambda: handle.prefer.remote(["x"] * 3, a, a[::-1]).result()) for _ in range(12)]
        results = [f.result() for f in futures]
    assert all(res == [0.2, 0.5, 0.8] for res in results)
    # A call larger than max_batch_size is split into chunks and reassembled in order.
    big = handle.prefer.remote(["x"] * 20, (a * 7)[:20], (a[::-1] * 7)[:20]).result()
    assert big == ([0.2, 0.5, 0.8] * 7)[:20]
    s = handle.stats.remote().result()
    assert s["requests"] - before["requests"] == 13 and s["pairs"] - before["pairs"] == 56
    assert s["batches"] - before["batches"] < 12 + 3  # some merging happened
    assert s["mean_batch_pairs"] <= 8 and s["mean_latency_s"] > 0 and s["replicas"] == 1


def test_matrix_service_errors_name_the_pair(matrix_app):
    handle, url = matrix_app
    with pytest.raises(JudgeError, match=r"judge matrix: responses_b\[1\] = 'Zebra' is not an action"):
        handle.prefer.remote(["x", "x"], ["A", "B"], ["C", "Zebra"]).result()
    # A bad call merged with a good one: only the bad caller gets the error.
    with ThreadPoolExecutor(2) as pool:
        good = pool.submit(lambda: handle.prefer.remote(["x"], ["A"], ["B"]).result())
        bad = pool.submit(lambda: handle.prefer.remote(["x"], ["Q"], ["B"]).result())
        assert good.result() == [0.9]
        with pytest.raises(JudgeError, match="'Q' is not an action"):
            bad.result()
    assert handle.stats.remote().result()["errors"] >= 2


# ----------------------------------------------------------------------------- text app
def test_text_service_real_pairs_are_antisymmetric(text_app, shared_data):
    handle, _, kind = text_app
    prompts, a, b = real_pairs(shared_data)
    p = np.array(handle.prefer.remote(prompts, a, b).result())
    q = np.array(handle.prefer.remote(prompts, b, a).result())
    assert p.shape == (4,) and np.all((p >= 0) & (p <= 1))
    np.testing.assert_allclose(p + q, 1.0, atol=1e-6)
    info = handle.info.remote().result()
    assert info["judge"] == kind and info["config"]["serve"]["http"]["token"] is None
    assert info["torch_threads"] == 2


def test_http_bearer_token(text_app, shared_data):
    import httpx

    _, url, _ = text_app
    prompts, a, b = real_pairs(shared_data, 2)
    body = {"prompts": prompts, "responses_a": a, "responses_b": b}
    missing = httpx.post(url, json=body, timeout=30)
    assert missing.status_code == 401 and "bearer token" in missing.json()["error"]
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = httpx.post(url, json=body, headers={"Authorization": "Bearer not-it"}, timeout=30)
    assert wrong.status_code == 401
    right = httpx.post(url, json=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert right.status_code == 200
    probs = right.json()["probabilities"]
    assert len(probs) == 2 and all(0 <= v <= 1 for v in probs)


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "not valid JSON"),
    (json.dumps([1, 2]).encode(), 400, "must be a JSON object"),
    (json.dumps({"prompts": ["p"], "responses_a": ["a"]}).encode(), 400, "missing ['responses_b']"),
    (json.dumps({"prompts": "p", "responses_a": ["a"], "responses_b": ["b"]}).encode(), 400, "prompts must be a list"),
    (json.dumps({"prompts": ["p", "q"], "responses_a": ["a"], "responses_b": ["b"]}).encode(), 422, "same length"),
    (json.dumps({"prompts": [" "], "responses_a": ["a"], "responses_b": ["b"]}).encode(), 422, "prompts[0] is empty"),
    (json.dumps({"prompts": ["p"], "responses_a": [1], "responses_b": ["b"]}).encode(), 422, "not a string"),
    (json.dumps({"prompts": ["p"], "responses_a": ["word " * 400], "responses_b": ["b"]}).encode(), 422,
     "max_length"),
])
def test_http_bad_requests_get_4xx_with_message(text_app, body, status, message):
    import httpx

    _, url, _ = text_app
    r = httpx.post(url, content=body, headers={"Authorization": f"Bearer {TOKEN}",
                                               "Content-Type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


def test_http_wrong_route_and_method(text_app):
    import httpx

    _, url, _ = text_app
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert httpx.get(url, headers=auth, timeout=30).status_code == 405
    r = httpx.post(url.replace("/prefer", "/other"), json={}, headers=auth, timeout=30)
    assert r.status_code == 404 and "POST /prefer" in r.json()["error"]


# ----------------------------------------------------------------------------- standalone CLI
def test_cli_serve_starts_answers_and_stops_on_ctrl_c(tmp_path, text_judge_cfg):
    """``nlhf judge serve`` in its own process and cluster: prints the URL, answers, exits 0 on SIGINT."""
    import signal

    import httpx
    import yaml

    port = free_port()
    cfg = {"kind": text_judge_cfg.kind, "path": text_judge_cfg.path, "max_length": 128,
           "serve": {"http": {"enabled": True, "port": port}}}
    (tmp_path / "judge.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "nlhf.cli", "judge", "serve", "--config",
                             str(tmp_path / "judge.yaml")], stdout=log, stderr=subprocess.STDOUT, env=env,
                            cwd=REPO, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/prefer"
        deadline = time.time() + 120
        while f"serving at POST {url}" not in (tmp_path / "serve.log").read_text():
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.5)
        r = httpx.post(url, json={"prompts": ["Hi?"], "responses_a": ["Hello!"], "responses_b": ["Go away."]},
                       timeout=30)
        assert r.status_code == 200 and len(r.json()["probabilities"]) == 1
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0, (tmp_path / "serve.log").read_text()[-3000:]
        assert "judge: shutting down" in (tmp_path / "serve.log").read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
