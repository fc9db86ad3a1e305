"""Everything about a config that can be checked before any actor starts.

``nlhf train --check`` and the start of every run call :func:`check_train_config`; ``nlhf judge
train``, ``nlhf eval`` and ``nlhf bench`` call the parts they need. Each problem raises one
:class:`~nlhf.config.ConfigError` line naming the field and the value; nothing is written and
no data is touched.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from nlhf.config import PYPI_SMOLLM2, ConfigError, HttpConfig, JudgeConfig, TrainConfig, is_local_path

# Distinct single-token actions pick_action_tokens can find (A-Z, a-z, 0-9), an upper bound for game.n.
MAX_GAME_ACTIONS = 62


# ----------------------------------------------------------------------------- network security
def is_loopback(host: str) -> bool:
    """True for ``localhost``, 127.0.0.0/8 and ::1 (the only hosts served without authentication)."""
    h = host.strip().strip("[]").lower()
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def resolve_token(http: HttpConfig) -> str | None:
    """The bearer token: ``http.token``, else the environment variable ``http.token_env``; None if
    neither is set (an empty string counts as unset)."""
    token = (http.token or os.environ.get(http.token_env, "")).strip()
    return token or None


def check_http_security(http: HttpConfig) -> str | None:
    """Return the judge's HTTP token to require (None: open, loopback only).

    Raises:
        ConfigError: ``http.host`` is not loopback and no token is configured.
    """
    token = resolve_token(http)
    if token is None and not is_loopback(http.host):
        raise ConfigError(
            f"judge.serve.http.host: {http.host!r} is not a loopback address, so a bearer token is required: "
            f"set judge.serve.http.token or the environment variable {http.token_env}"
        )
    return token


def check_dashboard_security(cfg: TrainConfig) -> None:
    """The Ray dashboard (and its job API) never listens beyond loopback without Ray's token auth.

    Raises:
        ConfigError: ``cluster.dashboard_host`` is not loopback while ``RAY_AUTH_MODE`` is not ``token``.
    """
    host = cfg.cluster.dashboard_host
    if cfg.cluster.dashboard and not is_loopback(host) and os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        raise ConfigError(f"cluster.dashboard_host: {host!r} is not loopback and Ray token authentication is off: "
                          "anyone who reaches it could submit jobs; set RAY_AUTH_MODE=token (and a token) or use 127.0.0.1")


# ----------------------------------------------------------------------------- files
def check_output_dir(output_dir: str, field: str = "output_dir") -> None:
    """``output_dir`` is a folder (or can become one) that this process can write.

    Raises:
        ConfigError: it is a file, or its nearest existing ancestor is not writable.
    """
    p = Path(output_dir).expanduser()
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{field}: {output_dir} is a file, not a folder")
    probe = p.absolute()
    while not probe.exists():
        probe = probe.parent
    import tempfile

    try:  # a real write (root passes every access() check, even on read-only or virtual file systems)
        if not probe.is_dir():
            raise NotADirectoryError(str(probe))
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError:
        raise ConfigError(f"{field}: {output_dir} cannot be created or written ({probe} is not a writable folder)") from None


def check_text_file(path: str, field: str) -> None:
    """``path`` is a readable UTF-8 file that holds something.

    Raises:
        ConfigError: missing, empty, unreadable or not UTF-8 (the byte offset is named).
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{field}: file not found: {path}")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{field}: cannot read {path}: {e.strerror}") from None
    if path.endswith(".gz"):
        return  # compressed: datasets decodes it
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{field}: {path} is not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r})") from None
    if not text.strip():
        raise ConfigError(f"{field}: {path} is empty")


def check_prompt_file(path: str, field: str, *, training: bool) -> None:
    """A prompt file that loads and holds at least one prompt (and, for training, is not evaluation-only).

    Raises:
        ConfigError: naming the field and the file.
    """
    from nlhf.data.prompts import EVALUATION_ONLY, load_prompt_texts

    check_text_file(path, field)
    if training and any(tag in Path(path).name.lower() for tag in EVALUATION_ONLY):
        raise ConfigError(f"{field}: {path} is evaluation-only (see ../shared/data/README.md); never train on it")
    try:
        texts = load_prompt_texts(path)
    except Exception as e:  # noqa: BLE001 - datasets raises many types for a malformed file
        raise ConfigError(f"{field}: {path} is not a prompt file nlhf reads ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:200]})") from None
    if not texts:
        raise ConfigError(f"{field}: {path} holds no prompts")


# ----------------------------------------------------------------------------- models and judge
def check_model_source(field: str, source: str, cache_dir: str | None = None) -> None:
    """A policy/reference/tokenizer source resolves as it will at start-up
    (:func:`nlhf.references.resolve_reference`): a known built source, an existing path, or a hub
    id that is cached (offline) or exists on the hub (online).

    Raises:
        ConfigError: naming the field and the source.
    """
    from nlhf.references import resolve_reference

    if source.startswith("pypi:") and source != PYPI_SMOLLM2:
        raise ConfigError(f"{field}: unknown PyPI model {source!r} (known: {PYPI_SMOLLM2})")
    resolve_reference(field, source, cache_dir, check_only=True)


def check_judge(j: JudgeConfig, cache_dir: str | None = None) -> None:
    """The judge resolves as it will at start-up (:func:`nlhf.references.resolve_judge_path`: a
    folder, a hub id for ``bradley-terry``/``llm``, or a pairwise judge to train from readable,
    trainable files); its HTTP front is safe.

    Raises:
        ConfigError: naming the field and the value.
    """
    from nlhf.references import resolve_judge_path

    if j.serve.http.enabled:
        check_http_security(j.serve.http)
    resolve_judge_path(j, cache_dir, check_only=True)
    if j.kind == "pairwise" and j.path is not None and not Path(j.path).expanduser().exists():
        check_judge_training(j)


def check_judge_training(j: JudgeConfig) -> None:
    """The files ``nlhf judge train`` reads exist, are UTF-8, and are not evaluation-only.

    Raises:
        ConfigError: naming the field and the file.
    """
    from nlhf.data.preferences import check_trainable

    if j.train is None:
        raise ConfigError("judge.train: required to train a judge")
    if not j.train.train_files:
        raise ConfigError("judge.train.train_files: empty; name at least one preference file")
    for i, f in enumerate(j.train.train_files):
        field = f"judge.train.train_files[{i}]"
        check_text_file(f, field)
        try:
            check_trainable(f)
        except ValueError as e:
            raise ConfigError(f"{field}: {str(e).removeprefix('judge.train.train_files: ')}") from None
    encoder = j.train.encoder
    if is_local_path(encoder) and not Path(encoder).expanduser().exists():
        raise ConfigError(f"judge.train.encoder: model path does not exist: {encoder}")


def check_game(cfg: TrainConfig) -> None:
    """Game mode: ``game.n`` within the available single-token actions; a ``game.matrix`` file that
    holds a valid preference matrix (square, finite, in [0, 1], P + P^T = 1).

    Raises:
        ConfigError: naming the field and the value.
    """
    g = cfg.game
    if g is None:
        return
    if g.matrix:
        import numpy as np

        from nlhf.algorithms.games import validate_preference_matrix

        if not Path(g.matrix).is_file():
            raise ConfigError(f"game.matrix: file not found: {g.matrix}")
        try:
            P = validate_preference_matrix(np.load(g.matrix, allow_pickle=False))
        except (ValueError, OSError) as e:
            raise ConfigError(f"game.matrix: {g.matrix}: {' '.join(str(e).split())}") from None
        n = P.shape[0]
        field = "game.matrix"
    else:
        n, field = g.n, "game.n"
    if n > MAX_GAME_ACTIONS:
        raise ConfigError(f"{field}: {n} actions, but at most {MAX_GAME_ACTIONS} single-token actions exist")


# ----------------------------------------------------------------------------- resources
def cluster_capacity(cfg: TrainConfig) -> tuple[float, float]:
    """(CPUs, GPUs) the run may use: the config's local-cluster size, else this machine's."""
    cpus = cfg.cluster.num_cpus if cfg.cluster.num_cpus is not None else float(os.cpu_count() or 1)
    gpus = cfg.cluster.num_gpus if cfg.cluster.num_gpus is not None else 0.0
    return cpus, gpus


def required_resources(cfg: TrainConfig) -> tuple[float, float]:
    """(CPUs, GPUs) the actors of ``cfg`` reserve: learners, the rollout engines (two pools, or one
    set with ``rollout.share_engines``), judge replicas."""
    r, lrn, srv = cfg.rollout, cfg.learner, cfg.judge.serve
    engines = r.num_engines
    cpus = lrn.num_learners * lrn.num_cpus + engines * r.num_cpus + srv.replicas * srv.num_cpus
    gpus = lrn.num_learners * lrn.num_gpus + engines * r.tensor_parallel_size * r.num_gpus + srv.replicas * srv.num_gpus
    return cpus, gpus


def check_resources(cfg: TrainConfig) -> None:
    """The actors fit the cluster: the size stated in ``cluster.num_cpus``/``num_gpus``, else this
    machine when nlhf starts the cluster itself (skipped when joining a cluster of unstated size).

    Raises:
        ConfigError: naming what is asked and what is there.
    """
    stated = cfg.cluster.num_cpus is not None or cfg.cluster.num_gpus is not None
    if not stated and (cfg.cluster.address or os.environ.get("RAY_ADDRESS")):
        return  # joining a cluster of unknown (possibly autoscaling) size
    have_cpu, have_gpu = cluster_capacity(cfg)
    need_cpu, need_gpu = required_resources(cfg)
    if need_cpu > have_cpu + 1e-9:
        raise ConfigError(
            f"resources: actors need {need_cpu:g} CPUs (learner.num_learners*learner.num_cpus + "
            f"engines*rollout.num_cpus + judge.serve.replicas*judge.serve.num_cpus; engines: "
            f"2*rollout.num_workers, or 1* with rollout.share_engines) "
            f"but cluster.num_cpus is {have_cpu:g}"
        )
    if need_gpu > have_gpu + 1e-9:
        raise ConfigError(f"resources: actors need {need_gpu:g} GPUs but cluster.num_gpus is {have_gpu:g}")


# ----------------------------------------------------------------------------- all of it
def check_train_config(cfg: TrainConfig) -> None:
    """Every check a training config gets before any actor starts (``nlhf train --check`` and the
    start of a run): output folder, models, prompt files, game, judge (files and HTTP security),
    dashboard security, resources.

    Raises:
        ConfigError: the first problem found, naming the field and the value.
    """
    check_output_dir(cfg.output_dir)
    check_output_dir(cfg.cache_dir, "cache_dir")
    models = [("policy", cfg.policy)] + ([("reference", cfg.reference)] if cfg.reference is not None else [])
    for name, m in models:
        check_model_source(f"{name}.source", m.source, cfg.cache_dir)
        if m.tokenizer is not None:
            check_model_source(f"{name}.tokenizer", m.tokenizer, cfg.cache_dir)
    if cfg.data is not None:
        for i, f in enumerate(cfg.data.train_prompts):
            check_prompt_file(f, f"data.train_prompts[{i}]", training=True)
        if cfg.data.eval_prompts:
            check_prompt_file(cfg.data.eval_prompts, "data.eval_prompts", training=False)
    check_game(cfg)
    check_judge(cfg.judge, cfg.cache_dir)
    check_dashboard_security(cfg)
    check_resources(cfg)


def check_out_file(out: str, field: str = "--out") -> None:
    """A result file can be written at ``out`` (its folder exists or can be created, is writable).

    Raises:
        ConfigError: naming the option and the path.
    """
    p = Path(out)
    if p.is_dir():
        raise ConfigError(f"{field}: {out} is a folder, not a file")
    try:
        check_output_dir(str(p.parent), field)
    except ConfigError:
        raise ConfigError(f"{field}: cannot write {out} (its folder is not writable or is a file)") from None


def check_eval_inputs(cfg: TrainConfig, out: str | None) -> None:
    """``nlhf eval``: held-out prompts and judge usable, ``--out`` writable.

    Raises:
        ConfigError: naming the field and the value.
    """
    if cfg.data is None or not cfg.data.eval_prompts:
        raise ConfigError("data.eval_prompts: nlhf eval needs held-out prompts (a config with a data section)")
    check_prompt_file(cfg.data.eval_prompts, "data.eval_prompts", training=False)
    check_judge(cfg.judge, cfg.cache_dir)
    if out is not None:
        check_out_file(out)


def check_bench_inputs(cfg: TrainConfig, out: str) -> None:
    """``nlhf bench``: the config's models, prompts and judge, and ``--out`` writable.

    Raises:
        ConfigError: naming the field and the value.
    """
    check_out_file(out)
    check_output_dir(cfg.cache_dir, "cache_dir")
    check_model_source("policy.source", cfg.policy.source, cfg.cache_dir)
    if cfg.data is not None:
        for i, f in enumerate(cfg.data.train_prompts):
            check_prompt_file(f, f"data.train_prompts[{i}]", training=True)
    check_judge(cfg.judge, cfg.cache_dir)
