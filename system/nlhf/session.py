"""One training run's live objects: the Ray cluster, the actors of every role, prompts, logging.

:class:`Session` is what ``driver.train`` iterates with. It prepares and locks the run folder,
starts (or joins) the cluster, resolves models, starts the judge service, the learner group and
both rollout pools in one placement group, and owns logging, checkpoints, evaluation and the
summary. Everything a resume restores lives in ``session.state`` (:class:`nlhf.run_state.RunState`);
the rest is live objects rebuilt at start-up.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from nlhf.batch import Rollout
from nlhf.checkpoints import TRAINER_DIR, Checkpoint, RunFolderLock, clean_partial, latest_checkpoint, prune, write_checkpoint
from nlhf.config import ConfigError, TrainConfig
from nlhf.data.prompts import Prompt, PromptSampler
from nlhf.run_state import RunState
from nlhf.seeding import Phase, sample_seeds

# Environment forwarded from the driver to every actor when set here.
FORWARDED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME", "HF_HUB_CACHE",
                 "VLLM_CACHE_ROOT", "TORCH_EXTENSIONS_DIR", "NLHF_CACHE")
# What a run folder may hold and still count as empty (a fresh run may start there).
_IGNORED_IN_EMPTY = {".nlhf.lock"}


def actor_env() -> dict[str, str]:
    """The driver's offline/cache settings, forwarded to every actor. Role-specific variables
    are set where they matter: the rollout worker sets vLLM's (in-process engine core and KV
    cache size on CPU), the learner group sets ``DS_ACCELERATOR=cpu`` on CPU."""
    return {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}


def connect_ray(cfg: TrainConfig) -> str:
    """Join the configured cluster, the job's cluster (inside ``ray job submit``) or
    ``RAY_ADDRESS``; otherwise start a local cluster bound to 127.0.0.1. Returns a description."""
    import ray

    if ray.is_initialized():
        return "already connected"
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return f"connected to {address}"
    # A local cluster: every listener on loopback; no machine-wide token auth side effect.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from nlhf.checks import cluster_capacity

    cpus, gpus = cluster_capacity(cfg)
    ray.init(num_cpus=cpus, num_gpus=gpus, include_dashboard=cfg.cluster.dashboard,
             dashboard_host=cfg.cluster.dashboard_host, _node_ip_address="127.0.0.1", log_to_driver=True)
    url = getattr(ray.get_runtime_context(), "dashboard_url", None)
    return f"started a local cluster on 127.0.0.1 ({cpus:g} CPUs, {gpus:g} GPUs)" + (f", dashboard {url}" if url else "")


def pick_action_tokens(tokenizer: Any, n: int) -> tuple[list[int], list[str]]:
    """``n`` token ids whose decoded text is a distinct single visible word that re-encodes to
    that one token (letters A, B, C, ... first). Returns (token ids, action strings)."""
    candidates = [chr(c) for c in range(ord("A"), ord("Z") + 1)] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    candidates += [str(d) for d in range(10)]
    ids, names = [], []
    for text in candidates:
        enc = tokenizer.encode(text, add_special_tokens=False)
        if len(enc) == 1 and tokenizer.decode(enc, skip_special_tokens=True).strip() == text:
            ids.append(enc[0])
            names.append(text)
        if len(ids) == n:
            return ids, names
    raise ValueError(f"game.n: at most {len(ids)} single-token actions are available, got {n}")


def prepare_run_folder(cfg: TrainConfig, lock: RunFolderLock, *, overwrite: bool) -> Checkpoint | None:
    """Lock ``output_dir`` (``lock``, held until the caller releases it), then decide what it is
    for: a fresh run (empty or new folder), a resume (returns the newest complete checkpoint), or an
    overwrite (``overwrite``: the old contents are deleted). The lock is taken before the folder is
    touched, so a run refused because another one holds the folder deletes nothing of it (not the
    other run's checkpoint being written, not its files under ``--overwrite``). A folder this call
    created is removed again when it raises.

    Raises:
        ConfigError: another run holds the folder; a non-empty folder without ``resume`` or
            ``--overwrite``; ``resume`` with no complete checkpoint; ``output_dir`` a file.
    """
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir: {cfg.output_dir} is a file, not a folder")
    created = not out.exists()
    lock.acquire()
    try:
        return _prepare_locked_folder(cfg, out, overwrite=overwrite)
    except BaseException:
        lock.release()
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise


def _prepare_locked_folder(cfg: TrainConfig, out: Path, *, overwrite: bool) -> Checkpoint | None:
    contents = [p for p in out.iterdir() if p.name not in _IGNORED_IN_EMPTY] if out.is_dir() else []
    if cfg.resume:
        clean_partial(out / "checkpoints")
        ckpt = latest_checkpoint(out / "checkpoints")
        if ckpt is None:
            raise ConfigError(f"resume: {cfg.output_dir} holds no complete checkpoint to resume from "
                              "(set save_every to checkpoint during a run)")
        return ckpt
    if contents and not overwrite:
        raise ConfigError(f"output_dir: {cfg.output_dir} is not empty (a previous run?); resume it with --resume, "
                          "or pass --overwrite to replace it, or choose another output_dir")
    if contents:
        for p in contents:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    return None


class Session:
    """The live run; use :meth:`start` as a context manager (actors are shut down on exit).

    Attributes:
        state: the resumable :class:`RunState` (iteration, prompt sampler, counters, history, ...).
        current, extrapolated: the two :class:`nlhf.pipeline.RolloutPool`.
        learners: the :class:`nlhf.learner.group.LearnerGroup`.
        judge: the :class:`nlhf.pipeline.JudgeClient`.
        sync: the :class:`nlhf.pipeline.WeightSync`.
        game: game mode only: ``P``, action ids/names, ``pi_ref``, ``pi_star``.
    """

    def __init__(self, cfg: TrainConfig, *, resume_command: str = "") -> None:
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.resume_command = resume_command or "nlhf train --config <config> --resume"
        self.t_start = time.time()
        self.state = RunState()
        self.resumed_from: Checkpoint | None = None
        self.last_checkpoint: Checkpoint | None = None
        self.game: dict[str, Any] | None = None
        self.eval_prompts: list[Prompt] = []
        self.lock = RunFolderLock(self.out)
        self.progress: Any = None
        self.logger: Any = None
        self.learners: Any = None
        self.current: Any = None
        self.extrapolated: Any = None
        self.judge: Any = None
        self.sync: Any = None
        self.judge_app: str | None = None
        self.lease: Any = None
        self.last_busy: dict[str, float] = {}  # running totals of actor busy time, for per-iteration deltas
        self.peak_rss_gb: dict[str, float] = {}  # per actor, filled as the run goes

    # ------------------------------------------------------------------ start-up
    @classmethod
    def start(cls, cfg: TrainConfig, *, overwrite: bool = False, resume_command: str = "") -> "Session":
        """Prepare the run folder, start every actor (and restore a checkpoint when resuming)."""
        s = cls(cfg, resume_command=resume_command)
        try:
            s._start(overwrite)
        except BaseException:
            s.close(graceful=False)
            raise
        return s

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close(graceful=exc[0] is None)

    def _start(self, overwrite: bool) -> None:
        from transformers import AutoTokenizer

        from nlhf.models import resolve_model
        from nlhf.pipeline import RolloutPool, WeightSync, make_placement_group
        from nlhf.telemetry.metrics import RunLogger
        from nlhf.telemetry.progress import Progress

        cfg = self.cfg
        self.resumed_from = prepare_run_folder(cfg, self.lock, overwrite=overwrite)
        if self.resumed_from is not None:
            self.state = RunState.load(self.resumed_from.path)
            self.last_checkpoint = self.resumed_from
        (self.out / "config.yaml").write_text(_dump_yaml(redacted(cfg.model_dump(mode="json"))))
        self.progress = Progress(cfg.iterations, mode=cfg.progress)
        self.progress.phase("start-up")
        self.cluster = connect_ray(cfg)
        self.note(self.cluster)
        if self.resumed_from is not None:
            self.note(f"resuming from {self.resumed_from.path} (iteration {self.state.iteration})")

        self.policy_path = _abs(resolve_model(cfg.policy, cfg.cache_dir))
        self.reference_path = (self.policy_path if cfg.reference is None
                               else _abs(resolve_model(cfg.reference, cfg.cache_dir, field="reference")))
        self.tokenizer = AutoTokenizer.from_pretrained(self.policy_path)
        action_ids = self._setup_prompts()

        from nlhf.judge.lifecycle import judge_app_name, reap_orphaned_judges, take_lease
        from nlhf.preflight import check_gpu_roles

        self.lease = take_lease(self.state.run_id)
        for name in reap_orphaned_judges(self.state.run_id):
            self.note(f"deleted judge app {name}: its driver is gone")
        self.judge_app = judge_app_name(cfg.run_name, self.state.run_id)
        judge_cfg = self._judge_config()  # trains the judge first when its folder is missing
        # On CPU the judge service, the learners and both pools start together (start-up is
        # mostly imports and loading, single-threaded: ~30 s less on 2 cores). On a GPU vLLM
        # sizes its KV cache from the memory free at start-up, so each role starts alone there.
        together = cfg.rollout.num_gpus == 0 and cfg.learner.num_gpus == 0
        if not together:
            self._start_judge(judge_cfg)
        check_gpu_roles(cfg)  # the GPUs Ray hands out work, before the first GPU actor starts
        self.env = actor_env()
        self.action_ids = action_ids
        prefix = f"{cfg.run_name}-{self.state.run_id}"  # unique per run: two runs on one cluster never collide
        self.pg = make_placement_group(cfg, f"{prefix}-pg")
        self._create_learners(wait=not together)
        first = cfg.learner.num_learners
        pools: dict[str, RolloutPool] = {}
        for i, name in enumerate(("current", "extrapolated")):
            shares = pools["current"] if name == "extrapolated" and cfg.rollout.share_engines else None
            pools[name] = RolloutPool(name, cfg, self.policy_path, placement_group=self.pg,
                                      first_bundle=first + i * cfg.rollout.num_workers, action_token_ids=action_ids,
                                      env=self.env, counters=self.state.counters, note=self.note,
                                      reference_path=self.reference_path, actor_prefix=prefix, wait=not together,
                                      shares=shares)
        self.current, self.extrapolated = pools["current"], pools["extrapolated"]
        if together:
            self._start_judge(judge_cfg)  # Serve deploys it while the learner and engine actors build
            self.learners.wait_ready()
            self.current.wait_ready()
            self.extrapolated.wait_ready()
        self._restore_trainer_state()
        self.note(f"rollout engines in {self.current.dtype} (policy.dtype {cfg.policy.dtype}), learner in "
                  f"{self.learners.precision} (learner.precision {cfg.learner.precision}); "
                  f"CPU capability {_cpu_capability()}")
        self.sync = WeightSync(cfg, self.learners, pools, self.state.counters, self.state.weight_versions)
        if self.resumed_from is not None:
            self.restore_pool_weights()
        self.logger = RunLogger(str(self.out), cfg.run_name)
        self.logger.rewind(self.state.iteration)  # a resumed run logs each iteration once
        if self.game is not None:
            self._setup_game_reference()
        self.note(f"actors up in {time.time() - self.t_start:.1f}s; policy {self.policy_path}")

    def _start_learners(self) -> None:
        """The learner group from theta_0, or from the resume checkpoint (weights + trainer state)."""
        self._create_learners(wait=True)
        self._restore_trainer_state()

    def _create_learners(self, wait: bool) -> None:
        """The learner actors from theta_0 or the resume checkpoint's weights (``wait``: see
        :class:`~nlhf.learner.group.LearnerGroup`)."""
        from nlhf.learner.group import LearnerGroup

        ckpt = self.last_checkpoint
        policy = str(ckpt.path) if ckpt is not None else self.policy_path
        self.learners = LearnerGroup(self.cfg, policy, self.reference_path, action_token_ids=self.action_ids,
                                     placement_group=self.pg, env=self.env, wait=wait)

    def _restore_trainer_state(self) -> None:
        """Resuming: the checkpoint's optimiser and scheduler state into the (ready) learners."""
        if self.last_checkpoint is not None:
            self.learners.load_trainer_state(str(self.last_checkpoint.path / TRAINER_DIR))

    def recover_learners(self) -> None:
        """After a learner death: a new learner group from the last complete checkpoint, the run
        state rewound to it (prompts, counters, history, metrics.jsonl), both pools re-pushed."""
        assert self.last_checkpoint is not None
        self.learners.shutdown(graceful=False)
        restarts = self.state.counters.learner_restarts
        self.adopt_state(RunState.load(self.last_checkpoint.path))
        self.state.counters.learner_restarts = restarts
        self.prompts.load_state_dict(self.state.sampler)
        self.logger.rewind(self.state.iteration)
        self._start_learners()
        self.sync.learners = self.learners
        self.restore_pool_weights()

    def adopt_state(self, state: RunState) -> None:
        """Make ``state`` the run's state, everywhere it is referenced (counters, weight versions)."""
        self.state = state
        self.judge.counters = state.counters
        self.sync.counters, self.sync.versions = state.counters, state.weight_versions
        for name, pool in (("current", self.current), ("extrapolated", self.extrapolated)):
            pool.counters = state.counters
            pool.expected_version = state.weight_versions[name]

    def restore_pool_weights(self) -> None:
        """Push the learner's weights to both pools under the versions the run state records
        (after a resume or a learner restart)."""
        for name, pool in (("current", self.current), ("extrapolated", self.extrapolated)):
            version = self.state.weight_versions[name]
            if version > 0:
                pool.load_weights(self.sync.payload(name, version), version)

    def _setup_prompts(self) -> list[int] | None:
        """Training prompts (language mode) or the single game prompt and action tokens (game mode)."""
        from nlhf.data.prompts import load_prompt_texts, render_prompts, training_prompt_sampler

        cfg = self.cfg
        if cfg.data is not None:
            self.prompts = training_prompt_sampler(cfg.data, self.tokenizer, cfg.seed)
            if cfg.data.eval_prompts:
                texts = load_prompt_texts(cfg.data.eval_prompts)[: cfg.data.eval_num_prompts]
                self.eval_prompts = render_prompts(texts, self.tokenizer, cfg.data.max_prompt_tokens, cfg.data.system_prompt)
            self.note(f"{len(self.prompts.prompts)} training prompts, {len(self.eval_prompts)} held-out prompts")
            ids = None
        else:
            g = cfg.game
            assert g is not None
            from nlhf.algorithms.games import make_game, validate_preference_matrix

            P = validate_preference_matrix(np.load(g.matrix)) if g.matrix else make_game(g.kind, g.n, g.seed)
            ids, names = pick_action_tokens(self.tokenizer, P.shape[0])
            self.game = {"P": P, "action_token_ids": ids, "actions": names}
            # The game prompt is plain tokens (no chat template): a few tokens instead of ~35.
            self.prompts = PromptSampler([Prompt(g.prompt, self.tokenizer.encode(g.prompt))], seed=cfg.seed)
        if self.state.sampler:
            self.prompts.load_state_dict(self.state.sampler)
        return ids

    def _start_judge(self, j: Any) -> None:
        """Start the Serve deployment of judge config ``j`` (from :meth:`_judge_config`);
        sets :attr:`judge`."""
        from nlhf.judge.serve import start_judge_service
        from nlhf.pipeline import JudgeClient

        cfg, ft = self.cfg, self.cfg.fault_tolerance
        if self.game is not None:
            handle = start_judge_service(j, name=self.judge_app, matrix=self.game["P"], actions=self.game["actions"])
        else:
            handle = start_judge_service(j, name=self.judge_app)
        self.judge = JudgeClient(handle, self.state.counters, timeout_s=ft.judge_timeout_s,
                                 retries=ft.judge_retries, note=self.note)
        self.note(f"judge service {self.judge_app} up ({cfg.judge.kind}, {cfg.judge.serve.replicas} replica(s))")

    def _judge_config(self) -> Any:
        """The judge config with its path resolved (hub ids: a snapshot folder), after training
        the judge when its folder is missing."""
        from nlhf.references import resolve_judge_path

        j = self.cfg.judge.model_copy(deep=True)
        if j.kind != "matrix" and j.path is not None:
            if j.kind == "pairwise" and not Path(j.path).exists() and j.train is not None:
                from nlhf.judge.train import train_judge

                self.progress.phase("judge training")
                self.note(f"judge folder {j.path} missing: training it first (nlhf judge train; "
                          f"continues {j.path}.partial if an earlier run was interrupted)")
                train_judge(j, reuse_existing=True, note=self.note)
            j.path = resolve_judge_path(j, self.cfg.cache_dir, check_only=False)  # hub ids: a snapshot folder
        return j

    def _setup_game_reference(self) -> None:
        """Exact game quantities: pi_ref = the reference restricted to the action tokens, pi*."""
        from nlhf.algorithms.equilibrium import solve_nash

        assert self.game is not None
        pi_ref = self.action_distribution("reference")
        self.game["pi_ref"] = pi_ref
        self.game["pi_star"] = solve_nash(self.game["P"], pi_ref, self.cfg.algorithm.beta)

    def action_distribution(self, which: str) -> np.ndarray:
        """Game mode: the learner's policy/reference probabilities over the actions, shape (n,)."""
        assert self.game is not None
        prompt = self.prompts.prompts[0]
        rollouts = [Rollout(prompt.text, prompt.token_ids, [t], a, 0.0) for t, a in
                    zip(self.game["action_token_ids"], self.game["actions"])]
        logp = np.asarray(self.learners.sequence_logprobs(rollouts, which), dtype=np.float64)
        p = np.exp(logp - logp.max())
        return p / p.sum()

    # ------------------------------------------------------------------ per-iteration helpers
    def seeds(self, iteration: int, phase: Phase, prompts: int, samples: int) -> list[list[int]]:
        """Per-response sampling seeds (:func:`nlhf.seeding.sample_seeds`), recorded in the run state."""
        seeds = sample_seeds(self.cfg.seed, phase, iteration, prompts, samples)
        self.state.record_seeds(phase.name, seeds)
        return seeds

    def next_prompts(self) -> list[Prompt]:
        """The iteration's training prompts (the sampler's position is part of the run state)."""
        batch = self.prompts.next(self.cfg.prompts_per_iteration)
        return batch

    def note(self, text: str) -> None:
        """A log line that never fights the live progress display."""
        self.progress.note(text) if self.progress is not None else print(text, flush=True)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, name: str) -> Checkpoint:
        """Atomic checkpoint ``output_dir/checkpoints/name`` (HF folder + trainer state + run state),
        then prune ``iter_*`` beyond ``keep_last``."""
        self.state.sampler = self.prompts.state_dict()
        root = self.out / "checkpoints"

        def fill(tmp: Path) -> None:
            self.learners.save_checkpoint(str(tmp.resolve()))
            self.learners.save_trainer_state(str((tmp / TRAINER_DIR).resolve()))
            self.state.save(tmp)

        from nlhf import interrupts

        with interrupts.shielded():  # a Ctrl-C/SIGTERM stops the run after the checkpoint, not inside it
            ckpt = write_checkpoint(root, name, self.state.iteration, fill)
            prune(root, self.cfg.keep_last)
            self.last_checkpoint = ckpt
        return ckpt

    def resume_hint(self) -> str:
        """Where the run can continue from, and how."""
        last = self.last_checkpoint
        where = f"last complete checkpoint: {last.path} (iteration {last.iteration})" if last else "no checkpoint yet"
        cmd = f"resume with: {self.resume_command}" if last else "set save_every to make resumable checkpoints"
        return f"{where}; {cmd}"

    # ------------------------------------------------------------------ teardown
    def close(self, graceful: bool = True) -> None:
        """Shut every actor down (engines first, so /dev/shm is freed), then the judge app (only
        ours: a shared cluster may serve others) and Ray (only a cluster this run started)."""
        for pool in (self.current, self.extrapolated):
            if pool is not None:
                pool.shutdown(graceful=graceful)
        if self.learners is not None:
            try:
                self.learners.shutdown(graceful=graceful)
            except Exception:  # noqa: BLE001 - best effort during teardown
                pass
        if self.sync is not None:
            self.sync.remove_files()
        for obj in (self.logger, self.progress):
            if obj is not None:
                obj.close()
        try:
            import ray
            from ray import serve

            if ray.is_initialized():
                if self.judge is not None and self.judge_app:
                    serve.delete(self.judge_app, _blocking=graceful)
                ray.shutdown()  # disconnects; stops the cluster only if this process started it
        except Exception:  # noqa: BLE001
            pass
        self.lock.release()


def redacted(tree: Any) -> Any:
    """``tree`` with every secret (keys named ``token``, ``password`` or ``secret``) replaced by
    ``"***"``: what is written to ``config.yaml`` and logs."""
    if isinstance(tree, dict):
        return {k: ("***" if isinstance(k, str) and k.lower() in ("token", "password", "secret") and v else redacted(v))
                for k, v in tree.items()}
    if isinstance(tree, list):
        return [redacted(v) for v in tree]
    return tree


def _cpu_capability() -> str:
    from nlhf.hardware import cpu_capability

    return cpu_capability()


def _abs(path: str) -> str:
    return str(Path(path).resolve()) if Path(path).exists() else path


def _dump_yaml(data: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)
