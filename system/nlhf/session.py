"""One training run's live state: the Ray cluster, the actors of every role, prompts, metrics.

:class:`Session` is what ``driver.train`` iterates with. It starts (or joins) the cluster,
resolves models, starts the judge service, the learner group and both rollout pools in one
placement group, and owns logging, checkpoints, evaluation and the final summary.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from nlhf.batch import Rollout
from nlhf.config import TrainConfig
from nlhf.data.prompts import Prompt, PromptSampler

# Environment forwarded from the driver to every actor when set here.
FORWARDED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME", "VLLM_CACHE_ROOT",
                 "TORCH_EXTENSIONS_DIR", "NLHF_CACHE")


def opponent_pairs(groups: int, r: int, shift: int) -> list[int]:
    """For ``groups`` prompts with ``r`` responses each (flattened prompt-major), the index of the
    response ``shift`` places further within the same prompt (wrapping). ``shift=1`` pairs each
    response with another response to the same prompt."""
    return [g * r + (i + shift) % r for g in range(groups) for i in range(r)]


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
    from nlhf.config import cluster_capacity

    cpus, gpus = cluster_capacity(cfg)
    ray.init(num_cpus=cpus, num_gpus=gpus, include_dashboard=cfg.cluster.dashboard,
             dashboard_host=cfg.cluster.dashboard_host, _node_ip_address="127.0.0.1", log_to_driver=True)
    url = ray.get_runtime_context().dashboard_url if hasattr(ray.get_runtime_context(), "dashboard_url") else None
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


class Session:
    """The live run; use :meth:`start` as a context manager (actors are shut down on exit)."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.t_start = time.time()
        self.out = Path(cfg.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.actors_started: list[Any] = []
        self.game: dict[str, Any] | None = None
        self.eval_prompts: list[Prompt] = []
        self.eval_initial: list[list[Rollout]] = []
        self.last_metrics: dict[str, float] = {}
        self.history: list[dict[str, float]] = []

    # ------------------------------------------------------------------ start-up
    @classmethod
    def start(cls, cfg: TrainConfig) -> "Session":
        s = cls(cfg)
        try:
            s._start()
        except BaseException:
            s.close()
            raise
        return s

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _start(self) -> None:
        from transformers import AutoTokenizer

        from nlhf.learner.group import LearnerGroup
        from nlhf.models import resolve_model
        from nlhf.pipeline import JudgeClient, RolloutPool, WeightSync, make_placement_group
        from nlhf.telemetry.metrics import RunLogger
        from nlhf.telemetry.progress import Progress

        cfg = self.cfg
        (self.out / "config.yaml").write_text(_dump_yaml(cfg.model_dump(mode="json")))
        self.progress = Progress(cfg.iterations, mode=cfg.progress)
        self.progress.phase("start-up")
        self.cluster = connect_ray(cfg)
        self.note(self.cluster)

        self.policy_path = _abs(resolve_model(cfg.policy, cfg.cache_dir))
        self.reference_path = (self.policy_path if cfg.reference is None
                               else _abs(resolve_model(cfg.reference, cfg.cache_dir, field="reference")))
        self.tokenizer = AutoTokenizer.from_pretrained(self.policy_path)
        action_ids = self._setup_prompts()

        self.judge_app = f"{cfg.run_name}-judge"
        self.judge = JudgeClient(self._start_judge())
        self.note(f"judge service {self.judge_app} up ({cfg.judge.kind}, {cfg.judge.serve.replicas} replica(s))")
        from nlhf.preflight import check_gpu_roles

        check_gpu_roles(cfg)  # the GPUs Ray hands out work, before the first GPU actor starts
        env = actor_env()
        self.pg = make_placement_group(cfg)
        self.learners = LearnerGroup(cfg, self.policy_path, self.reference_path, action_token_ids=action_ids,
                                     placement_group=self.pg, env=env)
        first = cfg.learner.num_learners
        self.current = RolloutPool("current", cfg, self.policy_path, placement_group=self.pg, first_bundle=first,
                                   action_token_ids=action_ids, env=env)
        self.extrapolated = RolloutPool("extrapolated", cfg, self.policy_path, placement_group=self.pg,
                                        first_bundle=first + cfg.rollout.num_workers, action_token_ids=action_ids, env=env)
        self.sync = WeightSync(cfg, self.learners, {"current": self.current, "extrapolated": self.extrapolated})
        self.logger = RunLogger(str(self.out), cfg.run_name)
        if self.game is not None:
            self._setup_game_reference()
        self.note(f"actors up in {time.time() - self.t_start:.1f}s; policy {self.policy_path}")

    def _setup_prompts(self) -> list[int] | None:
        """Training prompts (language mode) or the single game prompt and action tokens (game mode)."""
        from nlhf.data.prompts import load_prompt_texts, load_training_prompts, render_prompts

        cfg = self.cfg
        if cfg.data is not None:
            prompts = load_training_prompts(cfg.data.train_prompts, self.tokenizer, cfg.data.max_prompt_tokens,
                                            cfg.data.system_prompt)
            self.prompts = PromptSampler(prompts, seed=cfg.seed)
            if cfg.data.eval_prompts:
                texts = load_prompt_texts(cfg.data.eval_prompts)[: cfg.data.eval_num_prompts]
                self.eval_prompts = render_prompts(texts, self.tokenizer, cfg.data.max_prompt_tokens, cfg.data.system_prompt)
            self.note(f"{len(prompts)} training prompts, {len(self.eval_prompts)} held-out prompts")
            return None
        g = cfg.game
        assert g is not None
        from nlhf.algorithms.games import make_game, validate_preference_matrix

        P = validate_preference_matrix(np.load(g.matrix)) if g.matrix else make_game(g.kind, g.n, g.seed)
        ids, names = pick_action_tokens(self.tokenizer, P.shape[0])
        self.game = {"P": P, "action_token_ids": ids, "actions": names}
        # The game prompt is plain tokens (no chat template): a few tokens instead of ~35, which
        # makes every learner pass over the ~1000 one-token samples an iteration needs cheap.
        self.prompts = PromptSampler([Prompt(g.prompt, self.tokenizer.encode(g.prompt))], seed=cfg.seed)
        return ids

    def _start_judge(self) -> Any:
        """Train the judge first when its folder is missing, then start the Serve deployment."""
        from nlhf.judge.serve import start_judge_service
        from nlhf.references import resolve_judge_path

        j = self.cfg.judge.model_copy(deep=True)
        if j.kind != "matrix" and j.path is not None:
            if j.kind == "pairwise" and not Path(j.path).exists() and j.train is not None:
                from nlhf.judge.train import train_judge

                self.progress.phase("judge training")
                self.note(f"judge folder {j.path} missing: training it first (nlhf judge train)")
                train_judge(j)
            j.path = resolve_judge_path(j, self.cfg.cache_dir, check_only=False)  # hub ids: a snapshot folder
        if self.game is not None:
            return start_judge_service(j, name=self.judge_app, matrix=self.game["P"],
                                       actions=self.game["actions"])
        return start_judge_service(j, name=self.judge_app)

    def _setup_game_reference(self) -> None:
        """Exact game quantities: pi_ref = the initial policy restricted to the action tokens, pi*."""
        from nlhf.algorithms.equilibrium import solve_nash

        assert self.game is not None
        pi_ref = self.action_distribution("reference")
        self.game["pi_ref"] = pi_ref
        self.game["pi_star"] = solve_nash(self.game["P"], pi_ref, self.cfg.algorithm.beta)

    def action_distribution(self, which: str) -> np.ndarray:
        """Game mode: the learner's policy/reference/anchor probabilities over the actions, shape (n,)."""
        assert self.game is not None
        prompt = self.prompts.prompts[0]
        rollouts = [Rollout(prompt.text, prompt.token_ids, [t], a, 0.0) for t, a in
                    zip(self.game["action_token_ids"], self.game["actions"])]
        logp = np.asarray(self.learners.sequence_logprobs(rollouts, which), dtype=np.float64)
        p = np.exp(logp - logp.max())
        return p / p.sum()

    # ------------------------------------------------------------------ per-iteration helpers
    def seed(self, k: int, phase: int) -> int:
        """Per-iteration, per-phase sampling seed (reproducible runs)."""
        return self.cfg.seed * 1_000_003 + 10 * k + phase

    def note(self, text: str) -> None:
        """A log line that never fights the live progress display."""
        self.progress.note(text) if hasattr(self, "progress") else print(text, flush=True)

    @staticmethod
    def flatten(groups: list[list[Rollout]]) -> tuple[list[Rollout], list[int]]:
        """Prompt-major flat list of responses and, for each, the index of another response to the same prompt."""
        r = len(groups[0])
        return [y for g in groups for y in g], opponent_pairs(len(groups), r, 1)

    def judge_pairs(self, prompts: list[Prompt], ys: list[list[Rollout]], opp: list[list[Rollout]],
                    shift: int) -> list[float]:
        """P(ys[p][i] > opp[p][(i + shift) % R] | prompt p), flattened prompt-major."""
        a, b, x = [], [], []
        for p, ya, yb in zip(prompts, ys, opp):
            r = len(ya)
            for i in range(r):
                x.append(p.text)
                a.append(ya[i].response_text)
                b.append(yb[(i + shift) % len(yb)].response_text)
        return [float(v) for v in self.judge.prefer(x, a, b)]

    def should_measure_win(self, k: int) -> bool:
        every = self.cfg.win_rate_every
        return bool(every) and ((k + 1) % every == 0 or k + 1 == self.cfg.iterations)

    def win_probability(self, k: int, prompts: list[Prompt], ys: list[list[Rollout]]) -> float:
        """P(pi_{k+1} > pi_k) under the judge: one fresh response of pi_{k+1} per prompt against
        pi_k's first response to it, averaged over the iteration's prompts."""
        new = self.current.generate(prompts, n=1, seed=self.seed(k, 2))
        probs = self.judge.prefer([p.text for p in prompts], [g[0].response_text for g in new],
                                  [g[0].response_text for g in ys])
        return float(np.mean(probs))

    def log(self, k: int, half: dict[str, float], full: dict[str, float], win: float | None,
            ys: list[list[Rollout]], times: dict[str, float]) -> None:
        """One metrics.jsonl line (and TensorBoard, Ray metrics, progress) for iteration k."""
        cur, ext = self.current.stats(), self.extrapolated.stats()
        lengths = [len(y.response_token_ids) for g in ys for y in g]
        m: dict[str, float] = {
            "charts/queries": float(self.judge.queries),
            "charts/kl_ref": float(full.get("kl_ref", half.get("kl_ref", float("nan")))),
            "charts/kl_anchor": float(full.get("kl_anchor", float("nan"))),
            "charts/response_len": float(np.mean(lengths)),
            "losses/half_step": float(half.get("loss", float("nan"))),
            "losses/full_step": float(full.get("loss", float("nan"))),
            "perf/tokens_per_s_current": cur["tokens_per_s"],
            "perf/tokens_per_s_extrapolated": ext["tokens_per_s"],
            "sync/bytes": float(self.sync.bytes),
            "sync/seconds": float(self.sync.seconds),
            "judge/requests": float(self.judge.requests),
            "judge/latency_s": self.judge.take_latency(),
            "time/iteration": float(sum(times.values())),
            **{f"time/{phase}": float(v) for phase, v in times.items()},
        }
        if win is not None:
            m["charts/win_prob"] = win
        if self.game is not None:
            from nlhf.algorithms.equilibrium import kl

            pi = self.action_distribution("policy")
            m["game/kl_to_nash"] = float(kl(self.game["pi_star"], pi))
            self.game["last_policy"] = pi
        self.logger.log(k + 1, m)
        self.progress.update(k + 1, m)
        self.last_metrics = m
        self.history.append(m)

    def save_checkpoint(self, name: str) -> str:
        """HF-format checkpoint (config.json, safetensors, tokenizer) under output_dir/checkpoints/name."""
        path = str((self.out / "checkpoints" / name).resolve())
        self.learners.save_checkpoint(path)
        return path

    # ------------------------------------------------------------------ evaluation and summary
    def evaluate_initial_policy(self) -> None:
        """Language mode: responses of the initial policy on the held-out prompts, kept for the final win rate."""
        if self.eval_prompts:
            self.progress.phase("eval (initial policy)")
            self.eval_initial = self.current.generate(self.eval_prompts, n=1, seed=self.seed(-1, 3))

    def final_win_rate(self) -> dict[str, float] | None:
        """Win rate of the final policy against the initial one on held-out prompts under the judge,
        with a 95% normal-approximation confidence interval over prompts."""
        if not self.eval_initial:
            return None
        self.progress.phase("eval (final policy)")
        final = self.current.generate(self.eval_prompts, n=1, seed=self.seed(-1, 3))
        probs = self.judge.prefer([p.text for p in self.eval_prompts], [g[0].response_text for g in final],
                                  [g[0].response_text for g in self.eval_initial])
        n = len(probs)
        mean = float(np.mean(probs))
        se = float(np.std(probs, ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
        return {"win_rate": mean, "ci95_low": mean - 1.96 * se, "ci95_high": mean + 1.96 * se, "num_prompts": n,
                "final_mean_len": float(np.mean([len(g[0].response_token_ids) for g in final])),
                "initial_mean_len": float(np.mean([len(g[0].response_token_ids) for g in self.eval_initial]))}

    def finish(self) -> dict[str, Any]:
        """Final checkpoint, evaluation and ``summary.json``."""
        ckpt = self.save_checkpoint("final")
        summary: dict[str, Any] = {
            "run_name": self.cfg.run_name,
            "iterations": self.cfg.iterations,
            "algorithm": self.cfg.algorithm.model_dump(),
            "policy": self.policy_path,
            "cluster": self.cluster,
            "checkpoint": ckpt,
            "preference_queries": self.judge.queries,
            "final_metrics": self.last_metrics,
        }
        hist = self.history
        for key in ("rollout", "judge", "learn", "sync"):
            summary[f"mean_seconds_{key}"] = float(np.mean([h.get(f"time/{key}", 0.0) for h in hist])) if hist else 0.0
        for pool in ("current", "extrapolated"):
            vals = [h[f"perf/tokens_per_s_{pool}"] for h in hist if h.get(f"perf/tokens_per_s_{pool}")]
            summary[f"mean_tokens_per_s_{pool}"] = float(np.mean(vals)) if vals else 0.0
        wins = [h["charts/win_prob"] for h in hist if "charts/win_prob" in h]
        summary["mean_win_prob_vs_previous"] = float(np.mean(wins)) if wins else None
        summary["win_rate_vs_initial"] = self.final_win_rate()
        if self.game is not None:
            from nlhf.algorithms.equilibrium import exploitability, kl

            P, ref, star = self.game["P"], self.game["pi_ref"], self.game["pi_star"]
            final = self.action_distribution("policy")
            summary["game"] = {
                "actions": self.game["actions"],
                "initial_distribution": ref.tolist(),
                "final_distribution": final.tolist(),
                "nash": star.tolist(),
                "kl_to_nash_initial": float(kl(star, ref)),
                "kl_to_nash": float(kl(star, final)),
                "exploitability": float(exploitability(final, P, ref, self.cfg.algorithm.beta)),
                "win_rate_vs_initial_exact": float(final @ P @ ref),
            }
        summary["wall_seconds"] = time.time() - self.t_start
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        self.progress.phase("done")
        return summary

    def close(self) -> None:
        """Shut every actor down (engines first, so /dev/shm is freed), then the judge and Ray
        (only a cluster this run started)."""
        for name in ("current", "extrapolated"):
            pool = getattr(self, name, None)
            if pool is not None:
                pool.shutdown()
        learners = getattr(self, "learners", None)
        if learners is not None:
            try:
                learners.shutdown()
            except Exception:  # noqa: BLE001 - best effort during teardown
                pass
        for attr in ("logger", "progress"):
            obj = getattr(self, attr, None)
            if obj is not None:
                obj.close()
        try:
            import ray
            from ray import serve

            if ray.is_initialized():
                if getattr(self, "judge", None) is not None:
                    serve.delete(self.judge_app)  # only our app: a shared cluster may serve others
                ray.shutdown()  # disconnects; stops the cluster only if this process started it
        except Exception:  # noqa: BLE001
            pass


def _abs(path: str) -> str:
    return str(Path(path).resolve()) if Path(path).exists() else path


def _dump_yaml(data: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)
