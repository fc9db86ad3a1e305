"""KubeRay deployment: RayJob, RayCluster, NetworkPolicy, GCS fault tolerance, ConfigMap, PVC.

No cluster is needed: the manifests are parsed and checked for what KubeRay (v1.6, ray.io/v1)
requires, for the security settings (Ray token auth from the Secret on every Ray container,
non-root pods, ingress only from the same Ray cluster) and against the code they launch (CLI
command, configs), so they cannot silently drift from it. docker compose, the Dockerfiles and
Grafana: tests/test_deploy_local.py.
"""

from __future__ import annotations

import copy
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from deploy_files import (
    KUBERAY,
    LOOPBACK,
    REPO,
    TOKEN_SECRET,
    check_cli_runs,
    check_container_security,
    check_pod_security,
    check_token_env,
    load_all,
    load_one,
    train_command,
)

INSTANCE = "app.kubernetes.io/instance"
HEAD_PORTS = {6379: "gcs-server", 8265: "dashboard", 10001: "client", 8080: "metrics"}


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


def _check_ray_pod(group: dict, where: str) -> None:
    """Token auth on every container and a non-root pod."""
    for c in _containers(group):
        check_token_env(c.get("env", []), f"{where} container {c['name']}")
    check_pod_security(group["template"]["spec"], where)


def _check_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == "2.60.0"
    # Token auth through KubeRay (>= 1.6): the operator authenticates its own job-API calls
    # with this Secret; Ray needs >= 2.52 for it.
    assert spec.get("authOptions") == {"mode": "token", "secretName": TOKEN_SECRET}
    assert "gcsFaultToleranceOptions" not in spec, "GCS FT needs Redis: keep it in gcs-ft.yaml, off by default"
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
    _check_ray_pod(head, "head")
    if head["rayStartParams"].get("dashboard-host", "0.0.0.0") not in LOOPBACK:
        # the dashboard / job API listen on the pod network: only with authentication
        assert {e["name"]: e.get("value") for e in head_c["env"]}["RAY_AUTH_MODE"] == "token"
    assert "RAY_REDIS_ADDRESS" not in {e["name"] for e in head_c["env"]}
    if spec.get("enableInTreeAutoscaling"):
        opts = spec["autoscalerOptions"]  # the autoscaler sidecar talks to the GCS too
        check_token_env(opts["env"], "autoscaler")
        check_container_security(opts["securityContext"], "autoscaler")

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
        _check_ray_pod(group, f"worker group {group['groupName']}")
    assert gpu_groups >= 1, "no worker group asks for nvidia.com/gpu"


def _pod_templates(manifest: dict) -> dict[str, dict]:
    """name -> pod template of every pod a RayJob / RayCluster manifest creates."""
    spec = manifest["spec"]
    cluster = spec.get("rayClusterSpec", spec)
    out = {"head": cluster["headGroupSpec"]["template"]}
    out |= {g["groupName"]: g["template"] for g in cluster["workerGroupSpecs"]}
    if "submitterPodTemplate" in spec:
        out["submitter"] = spec["submitterPodTemplate"]
    return out


def _instance(manifest: dict) -> str:
    """The app.kubernetes.io/instance label shared by all pods of the manifest."""
    values = {name: t["metadata"]["labels"].get(INSTANCE) for name, t in _pod_templates(manifest).items()}
    assert len(set(values.values())) == 1 and None not in values.values(), f"pods disagree on {INSTANCE}: {values}"
    return next(iter(values.values()))


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return load_one(KUBERAY / "rayjob.yaml")


@pytest.fixture(scope="module")
def raycluster() -> dict:
    return load_one(KUBERAY / "raycluster.yaml")


def test_rayjob_manifest(rayjob: dict) -> None:
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    assert rayjob["metadata"]["name"]
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    # a failed attempt is retried on a fresh cluster (KubeRay's default is 0: no retry)
    assert isinstance(spec["backoffLimit"], int) and spec["backoffLimit"] >= 1
    assert isinstance(spec["submitterConfig"]["backoffLimit"], int) and spec["submitterConfig"]["backoffLimit"] >= 0
    assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode"
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    argv = shlex.split(spec["entrypoint"])
    config, _ = train_command(argv)
    assert config.startswith("/configs/"), "the config comes from the ConfigMap mounted at /configs"
    _check_cluster_spec(spec["rayClusterSpec"])


def test_rayjob_submitter_pod_has_the_token_and_runs_non_root(rayjob: dict) -> None:
    """The submitter runs `ray job submit` against the authenticated job API."""
    tmpl = rayjob["spec"]["submitterPodTemplate"]
    assert tmpl["spec"]["restartPolicy"] == "Never"
    (c,) = tmpl["spec"]["containers"]
    assert c["image"] == rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert "command" not in c, "KubeRay generates the `ray job submit` command"
    check_token_env(c["env"], "submitter")
    check_pod_security(tmpl["spec"], "submitter")


def test_rayjob_entrypoint_is_a_real_cli_command(rayjob: dict) -> None:
    check_cli_runs(shlex.split(rayjob["spec"]["entrypoint"]))


def _without_instance_labels(obj):
    if isinstance(obj, dict):
        return {k: _without_instance_labels(v) for k, v in obj.items() if k != INSTANCE}
    if isinstance(obj, list):
        return [_without_instance_labels(v) for v in obj]
    return obj


def test_raycluster_manifest_matches_rayjob_cluster(rayjob: dict, raycluster: dict) -> None:
    assert raycluster["apiVersion"] == "ray.io/v1" and raycluster["kind"] == "RayCluster"
    assert raycluster["metadata"]["name"]
    _check_cluster_spec(raycluster["spec"])
    job_spec = rayjob["spec"]["rayClusterSpec"]
    assert _without_instance_labels(raycluster["spec"]) == _without_instance_labels(job_spec), (
        "raycluster.yaml and rayjob.yaml's rayClusterSpec have drifted"
    )
    # distinct instance labels keep the two clusters' NetworkPolicies apart
    assert _instance(raycluster) != _instance(rayjob)


def test_no_manifest_holds_a_token() -> None:
    """The token lives only in the cluster's Secret: no Secret manifest, no literal value."""
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in load_all(path):
            assert doc.get("kind") != "Secret", f"{path.name}: do not commit Secrets; create {TOKEN_SECRET} with kubectl"
        text = path.read_text()
        assert not re.search(r"RAY_AUTH_TOKEN\s*[,}]?\s*value\s*:", text), f"{path.name}: literal RAY_AUTH_TOKEN"
        assert not re.search(r"\b[0-9a-fA-F]{32,}\b", text), f"{path.name}: looks like a committed token"


# -- NetworkPolicy -----------------------------------------------------------------------------

NAMESPACE = "nlhf"  # the namespace the manifests are applied in (they name none)


def _labels_match(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, f"the evaluator handles matchLabels only: {selector}"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _peer_admits(peer: dict, ns: str, pod_labels: dict) -> bool:
    assert set(peer) <= {"podSelector", "namespaceSelector"}, f"unexpected peer {peer}"
    ns_labels = {"kubernetes.io/metadata.name": ns}
    if "namespaceSelector" in peer:
        if not _labels_match(peer["namespaceSelector"], ns_labels):
            return False
    elif ns != NAMESPACE:  # a podSelector alone selects pods of the policy's namespace
        return False
    return _labels_match(peer.get("podSelector", {}), pod_labels)


def _admitted(policies: list[dict], target: dict, ns: str, pod_labels: dict, port: int) -> bool:
    """Kubernetes NetworkPolicy semantics: is TCP ingress from the pod (ns, labels) to ``port``
    of the pod labelled ``target`` allowed? Pods no policy selects admit everything."""
    selecting = [p for p in policies if _labels_match(p["spec"]["podSelector"], target)]
    selecting = [p for p in selecting if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            peers = rule.get("from", [])
            ports = rule.get("ports", [])
            assert all(p.get("protocol", "TCP") == "TCP" and isinstance(p["port"], int) for p in ports), ports
            if (not peers or any(_peer_admits(q, ns, pod_labels) for q in peers)) and (
                not ports or any(p["port"] == port for p in ports)
            ):
                return True
    return False


@pytest.fixture(scope="module")
def policies() -> list[dict]:
    docs = load_all(KUBERAY / "networkpolicy.yaml")
    assert all(d["apiVersion"] == "networking.k8s.io/v1" and d["kind"] == "NetworkPolicy" for d in docs)
    assert len({d["metadata"]["name"] for d in docs}) == len(docs)
    for d in docs:
        for rule in d["spec"]["ingress"]:
            assert rule.get("from"), f"{d['metadata']['name']}: an ingress rule without `from` admits every pod"
    return docs


@pytest.mark.parametrize("manifest", ["rayjob.yaml", "raycluster.yaml"])
def test_networkpolicy_admits_only_the_same_ray_cluster(policies: list[dict], manifest: str) -> None:
    own = load_one(KUBERAY / manifest)
    other = load_one(KUBERAY / ("raycluster.yaml" if manifest == "rayjob.yaml" else "rayjob.yaml"))
    pods = {name: t["metadata"]["labels"] for name, t in _pod_templates(own).items()}
    head = pods["head"]
    assert {p["containerPort"] for p in _pod_templates(own)["head"]["spec"]["containers"][0]["ports"]} >= set(HEAD_PORTS)
    # every pod of the cluster is selected by a policy (the head in particular)
    for name, labels in pods.items():
        assert any(_labels_match(p["spec"]["podSelector"], labels) for p in policies), f"{manifest}: {name} unprotected"
    ray_ports = [*HEAD_PORTS, 8000, 52365, 20001]  # + Serve, dashboard agent, a worker port
    for src in pods.values():  # Ray's own traffic between the pods of the cluster
        for port in ray_ports:
            assert _admitted(policies, head, NAMESPACE, src, port), f"{manifest}: head:{port} refuses {src}"
    strangers = {
        "another pod of the namespace": (NAMESPACE, {"app": "something-else"}),
        "the other nlhf cluster": (NAMESPACE, _pod_templates(other)["head"]["metadata"]["labels"]),
        "a look-alike in another namespace": ("elsewhere", head),
        "an operator look-alike in this namespace": (NAMESPACE, {"app.kubernetes.io/name": "kuberay-operator"}),
    }
    for what, (ns, labels) in strangers.items():
        for port in ray_ports:
            assert not _admitted(policies, head, ns, labels, port), f"{manifest}: {what} reaches head:{port}"
    operator = ("ray-system", {"app.kubernetes.io/name": "kuberay-operator"})
    assert _admitted(policies, head, *operator, 8265), "the KubeRay operator must reach the job API"
    prometheus = ("monitoring", {"app.kubernetes.io/name": "prometheus"})
    assert _admitted(policies, head, *prometheus, 8080), "Prometheus must reach the metrics port"
    for port in (6379, 10001, 8000, 20001):
        assert not _admitted(policies, head, *operator, port), f"the operator reaches head:{port}"
    for port in (6379, 8265, 10001, 8000):
        assert not _admitted(policies, head, *prometheus, port), f"the monitoring namespace reaches head:{port}"


# -- GCS fault tolerance (optional overlay) ----------------------------------------------------


def _merge_patch(target, patch):
    """RFC 7386 JSON merge patch (what `kubectl patch --type merge` applies)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge_patch(out.get(key), value)
    return out


def test_gcs_fault_tolerance_overlay(raycluster: dict) -> None:
    patch = load_one(KUBERAY / "gcs-ft.yaml")
    assert list(patch) == ["spec"] and list(patch["spec"]) == ["gcsFaultToleranceOptions"], (
        "gcs-ft.yaml only adds spec.gcsFaultToleranceOptions"
    )
    patched = _merge_patch(raycluster, patch)
    ft = patched["spec"]["gcsFaultToleranceOptions"]
    assert re.fullmatch(r"(rediss?://)?[a-z0-9]([-a-z0-9.]*[a-z0-9])?:\d+", ft["redisAddress"]), ft["redisAddress"]
    assert "value" not in ft["redisPassword"], "the Redis password comes from a Secret"
    assert ft["redisPassword"]["valueFrom"]["secretKeyRef"]["name"]
    # KubeRay rejects GCS FT given twice (annotation + options, or RAY_REDIS_ADDRESS + options)
    assert "ray.io/ft-enabled" not in patched["metadata"].get("annotations", {})
    head_env = {e["name"] for e in patched["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    assert "RAY_REDIS_ADDRESS" not in head_env
    spec_without_ft = {k: v for k, v in patched["spec"].items() if k != "gcsFaultToleranceOptions"}
    assert spec_without_ft == raycluster["spec"], "the overlay must leave the rest of the cluster alone"
    _check_cluster_spec(spec_without_ft)


def test_gcs_fault_tolerance_overlay_with_kubectl(raycluster: dict) -> None:
    """The command deploy/README.md gives renders what the overlay test checks."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed: the documented `kubectl patch --local` is not run")
    out = subprocess.run(
        ["kubectl", "patch", "--local", "--type", "merge", "-f", str(KUBERAY / "raycluster.yaml"),
         "--patch-file", str(KUBERAY / "gcs-ft.yaml"), "-o", "yaml"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(out.stdout) == _merge_patch(raycluster, load_one(KUBERAY / "gcs-ft.yaml"))


# -- ConfigMap, PVC ----------------------------------------------------------------------------


def test_configmap_holds_the_repo_config(rayjob: dict) -> None:
    cm = load_one(KUBERAY / "configmap.yaml")
    assert cm["apiVersion"] == "v1" and cm["kind"] == "ConfigMap"
    assert cm["metadata"]["name"] == "nlhf-configs"
    entry = Path(shlex.split(rayjob["spec"]["entrypoint"])[3]).name
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
    pvc = load_one(KUBERAY / "pvc.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["metadata"]["name"] == "nlhf-runs"
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
