"""Helpers shared by the deployment tests (tests/test_deploy*.py): loading the manifests, the
``nlhf train`` command they launch, and the Ray token-auth settings every Ray container needs."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
KUBERAY = DEPLOY / "kuberay"

# The Kubernetes Secret holding the Ray token; `auth_token` is the key KubeRay's
# authOptions.secretName expects.
TOKEN_SECRET = "nlhf-ray-token"
TOKEN_KEY = "auth_token"
RUN_AS_USER = 1000
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def load_all(path: Path) -> list[dict]:
    """Every non-empty YAML document of ``path`` (each must be a mapping)."""
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs), f"{path}: expected YAML mappings"
    return docs


def load_one(path: Path) -> dict:
    """The single YAML document of ``path``."""
    docs = load_all(path)
    assert len(docs) == 1, f"{path}: expected one YAML document, got {len(docs)}"
    return docs[0]


def train_command(argv: list[str]) -> tuple[str, list[str]]:
    """``nlhf train --config X [k=v ...]`` -> (X, overrides); fails on anything else."""
    assert argv[:2] == ["nlhf", "train"], argv
    rest = argv[2:]
    assert "--config" in rest, argv
    i = rest.index("--config")
    config = rest[i + 1]
    overrides = rest[:i] + rest[i + 2 :]
    assert all("=" in o and not o.startswith("-") for o in overrides), overrides
    return config, overrides


def check_cli_runs(argv: list[str], config_dir: Path = REPO / "configs") -> None:
    """The command is a real ``nlhf`` command, its config exists in the repo and loads."""
    import typer.main
    from nlhf.cli import app
    from nlhf.config import load_train_config

    click_app = typer.main.get_command(app)
    assert "train" in click_app.commands, f"`nlhf train` is not a command of nlhf.cli.app: {sorted(click_app.commands)}"
    config, overrides = train_command(argv)
    local = config_dir / Path(config).name
    assert local.is_file(), f"{config} is launched but {local.relative_to(REPO)} is not in the repo"
    # The config and the overrides must validate (paths are checked where it runs, not here).
    load_train_config(local, overrides, check=False)


def check_token_env(env: list[dict], where: str) -> None:
    """``env`` (a Kubernetes container env list) turns on Ray token auth with the token taken
    from the Secret, never written literally."""
    by_name = {e["name"]: e for e in env}
    assert len(by_name) == len(env), f"{where}: duplicate env names"
    mode = by_name.get("RAY_AUTH_MODE")
    assert mode is not None and mode.get("value") == "token", f"{where}: RAY_AUTH_MODE must be 'token', got {mode}"
    token = by_name.get("RAY_AUTH_TOKEN")
    assert token is not None, f"{where}: RAY_AUTH_TOKEN is not set"
    assert "value" not in token, f"{where}: RAY_AUTH_TOKEN is a literal; take it from the Secret {TOKEN_SECRET}"
    ref = token.get("valueFrom", {}).get("secretKeyRef", {})
    assert (ref.get("name"), ref.get("key")) == (TOKEN_SECRET, TOKEN_KEY), (
        f"{where}: RAY_AUTH_TOKEN must come from secretKeyRef {TOKEN_SECRET}/{TOKEN_KEY}, got {ref}"
    )
    assert not ref.get("optional"), f"{where}: the token Secret must not be optional"
    assert "RAY_AUTH_TOKEN_PATH" not in by_name, f"{where}: set the token once (RAY_AUTH_TOKEN)"


def check_container_security(sc: dict | None, where: str) -> None:
    """A container securityContext that cannot become root or gain privileges."""
    assert sc, f"{where}: no securityContext"
    assert sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation must be false"
    assert not sc.get("privileged"), f"{where}: privileged"
    assert sc.get("runAsNonRoot") is not False and sc.get("runAsUser", RUN_AS_USER) != 0, f"{where}: runs as root"
    caps = sc.get("capabilities", {})
    assert caps.get("drop") == ["ALL"] and not caps.get("add"), f"{where}: capabilities must drop ALL and add none"


def check_pod_security(pod_spec: dict, where: str) -> None:
    """Pod-level non-root user (the images' UID 1000) and a safe context for each container."""
    sc = pod_spec.get("securityContext", {})
    assert sc.get("runAsNonRoot") is True, f"{where}: pod securityContext.runAsNonRoot must be true"
    assert sc.get("runAsUser") == RUN_AS_USER, f"{where}: pod securityContext.runAsUser must be {RUN_AS_USER}"
    assert not pod_spec.get("hostNetwork") and not pod_spec.get("hostPID") and not pod_spec.get("hostIPC"), where
    for c in pod_spec.get("initContainers", []) + pod_spec["containers"]:
        check_container_security(c.get("securityContext"), f"{where} container {c['name']}")
