"""Time TRL's NashMDTrainer (trl 1.13.0) on the prompts and model nlhf trains on, on CPU.

Run with the peer venv made by ``setup.sh`` (not the nlhf venv), from the repository root:

    benchmarks/peers/trl_nashmd/.venv/bin/python benchmarks/peers/trl_nashmd/bench_trl_nashmd.py \
        --model /work/main/.cache/nlhf/models/smollm2-135m-instruct-bfloat16 \
        --out docs/bench/trl_nashmd.json [--gradient-checkpointing] [--steps 4]

One NashMD training step (Munos et al. 2024, arXiv:2312.00886, as TRL implements it): for each of
``batch`` prompts, one response from the policy (KV cache on unless gradient checkpointing) and one
from the geometric mixture of policy and reference logits (TRL generates it without a KV cache);
the reward model scores both, sigmoid(score difference) is the preference probability, and the
REINFORCE loss with a KL-to-reference term is backpropagated and AdamW steps. So one step holds
``batch`` judged pairs that feed the loss ("training comparisons").

The judge is a reward model: TRL 1.13's NashMDTrainer scores completions only with
``trl.experimental.utils.get_reward`` (it needs an ``nn.Module`` with a backbone and a ``score``
head, fed the policy's token ids; judges were removed from the trainer and reward callables fail
there), so it must share the policy's tokenizer. We load ``LlamaForSequenceClassification`` on the
same SmolLM2 weights with a randomly initialised (seeded) 1-output head: right for timing, not for
learning.

Phases are timed by overriding the trainer's own methods in a subclass (each override calls the
TRL method unchanged) and by a ``TrainerCallback`` for the whole optimizer step; see ``PHASE_NOTES``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

PROMPT_FILES = (
    "../shared/data/prompts/alpaca-eval-805.json",
    "../shared/data/prompts/arena-hard-v0.1.jsonl",
    "../shared/data/prompts/vicuna-bench.jsonl",
)

PHASE_NOTES = {
    "step": "TrainerCallback on_step_begin -> on_step_end: training_step (templating, tokenising, "
            "generation, reward scoring, log-probs, loss, backward) + grad clipping + AdamW step + zero_grad",
    "generation": "NashMDTrainer._generate_completions: policy sampling (transformers generate, KV cache "
                  "unless gradient checkpointing) + geometric-mixture sampling (GeometricMixtureWrapper, no KV cache)",
    "generation_policy": "generation minus generation_mixture",
    "generation_mixture": "GeometricMixtureWrapper.generate (policy and reference forward over the whole "
                          "sequence at every new token)",
    "judge": "NashMDTrainer._compute_rewards: reward model forward on policy and mixture sequences",
    "learn": "learn_forward + learn_backward + learn_optimizer",
    "learn_forward": "NashMDTrainer._compute_logprobs + _compute_losses: policy (with grad) and reference "
                     "(no grad) forward on the policy sequences, REINFORCE + KL loss",
    "learn_backward": "accelerator.backward(loss)",
    "learn_optimizer": "step minus training_step: grad clipping, AdamW step, LR scheduler, zero_grad, callbacks",
    "other": "training_step minus generation, judge, learn_forward, learn_backward: chat template, "
             "tokenising, collating, truncating completions, TRL statistics",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF folder of SmolLM2-135M-Instruct (nlhf's smollm2_folder)")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps run in all, warm-up included")
    p.add_argument("--warmup-steps", type=int, default=1, help="first steps left out of the figures")
    p.add_argument("--batch", type=int, default=4, help="prompts per step (per-device batch)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--min-new-tokens", type=int, default=0,
                   help="EOS suppressed before this many tokens (0: off, responses stop at EOS as in training)")
    p.add_argument("--max-prompt-tokens", type=int, default=128, help="longer chat-templated prompts are dropped")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompts", nargs="+", default=list(PROMPT_FILES), help="training prompt files")
    args = p.parse_args(argv)
    if args.steps <= args.warmup_steps:
        p.error(f"--steps must exceed --warmup-steps (got steps={args.steps}, warmup-steps={args.warmup_steps})")
    for name in ("batch", "max_new_tokens", "max_prompt_tokens", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
    if not 0 <= args.min_new_tokens <= args.max_new_tokens:
        p.error(f"--min-new-tokens must lie in [0, --max-new-tokens] (got {args.min_new_tokens})")
    if args.warmup_steps < 0:
        p.error(f"--warmup-steps must be >= 0 (got {args.warmup_steps})")
    if not (Path(args.model) / "config.json").is_file():
        p.error(f"--model: no config.json in {args.model}")
    return args


class RssSampler:
    """Peak resident set size of this process and its children: psutil sampling every ``interval`` s,
    and the kernel's ru_maxrss (self and reaped children) at the end."""

    def __init__(self, interval: float = 0.2) -> None:
        import psutil

        self._proc = psutil.Process()
        self._interval = interval
        self.peak_self = 0
        self.peak_total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        rss_self = self._proc.memory_info().rss
        total = rss_self
        for child in self._proc.children(recursive=True):
            try:
                total += child.memory_info().rss
            except Exception:  # a child may exit between listing and reading
                pass
        self.peak_self = max(self.peak_self, rss_self)
        self.peak_total = max(self.peak_total, total)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def start(self) -> "RssSampler":
        self._sample()
        self._thread.start()
        return self

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        self._sample()
        gb = 1024.0**3
        ru_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        ru_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        trainer = max(self.peak_self, ru_self)
        return {"trainer": trainer / gb, "total": max(self.peak_total, trainer + ru_children) / gb}


def prompt_text(row: dict) -> str:
    """The first user turn of a prompt row, read as nlhf reads it (nlhf.data.prompts)."""
    if row.get("instruction"):
        extra = row.get("input") or ""
        return f"{row['instruction']}\n\n{extra}".strip() if extra else str(row["instruction"])
    turns = row.get("turns")
    if turns:
        first = turns[0]
        return str(first["content"] if isinstance(first, dict) else first)
    raise ValueError(f"a prompt row has neither `instruction` nor `turns`: keys {sorted(row)}")


def load_prompts(files: list[str], tokenizer, max_prompt_tokens: int, n: int, seed: int) -> list[str]:
    """nlhf's training prompt set: files read with HF datasets, first turns deduplicated,
    chat-templated prompts longer than ``max_prompt_tokens`` dropped, seeded permutation, first ``n``."""
    import numpy as np
    from datasets import load_dataset

    texts: list[str] = []
    for f in files:
        if not Path(f).is_file():
            raise FileNotFoundError(f"--prompts: file not found: {f} (run from the repository root)")
        texts.extend(t for t in (prompt_text(r).strip() for r in load_dataset("json", data_files=f, split="train")) if t)
    kept = []
    for text in dict.fromkeys(texts):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        if len(ids) <= max_prompt_tokens:
            kept.append(text)
    if len(kept) < n:
        raise ValueError(f"only {len(kept)} prompts of <= {max_prompt_tokens} tokens, need {n}")
    order = np.random.default_rng(seed).permutation(len(kept))[:n]
    return [kept[i] for i in order]


def check_trl_tokenises_like_nlhf(texts: list[str], tokenizer) -> None:
    """TRL applies the chat template itself (maybe_apply_chat_template + tokenize_row); make sure the
    policy then reads the same token ids nlhf renders."""
    from trl.data_utils import maybe_apply_chat_template
    from trl.experimental.nash_md import NashMDTrainer

    for text in texts:
        messages = [{"role": "user", "content": text}]
        ours = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ours = list(ours["input_ids"] if hasattr(ours, "keys") else ours)
        row = maybe_apply_chat_template({"prompt": messages}, tokenizer)
        theirs = NashMDTrainer.tokenize_row(row, False, tokenizer)["prompt_input_ids"]
        if theirs != ours:
            raise RuntimeError(f"TRL tokenises a prompt differently from nlhf: {theirs[:8]}... vs {ours[:8]}...")


def timed_trainer_class():
    """NashMDTrainer with per-step phase timers; every override calls TRL's method unchanged."""
    from transformers import TrainerCallback
    from trl.experimental.nash_md import NashMDTrainer
    from trl.experimental.nash_md import nash_md_trainer as nm

    clock = time.perf_counter
    current: dict[str, float] = {}

    def add(key: str, seconds: float) -> None:
        current[key] = current.get(key, 0.0) + seconds

    def timed(key, fn):
        def wrapper(*a, **kw):
            t0 = clock()
            try:
                return fn(*a, **kw)
            finally:
                add(key, clock() - t0)
        return wrapper

    if not getattr(nm.GeometricMixtureWrapper.generate, "_bench_timed", False):
        wrapped = timed("generation_mixture", nm.GeometricMixtureWrapper.generate)
        wrapped._bench_timed = True
        nm.GeometricMixtureWrapper.generate = wrapped

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.steps: list[dict[str, float]] = []
            self._t0 = 0.0

        def on_step_begin(self, args, state, control, **kw):
            current.clear()
            self._t0 = clock()

        def on_step_end(self, args, state, control, **kw):
            record = dict(current)
            record["step"] = clock() - self._t0
            self.steps.append(record)

    class TimedNashMDTrainer(NashMDTrainer):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.step_timer = StepTimer()
            self.add_callback(self.step_timer)
            self.accelerator.backward = timed("learn_backward", self.accelerator.backward)

        def training_step(self, *a, **kw):
            return timed("training_step", super().training_step)(*a, **kw)

        def _generate_completions(self, *a, **kw):
            return timed("generation", super()._generate_completions)(*a, **kw)

        def _process_completions(self, model_output, mixture_output, prompts):
            model_data, mixture_data = super()._process_completions(model_output, mixture_output, prompts)
            n = prompts["input_ids"].shape[1]
            add("tokens_policy", float(model_data["attention_mask"][:, n:].sum()))
            add("tokens_mixture", float(mixture_data["attention_mask"][:, n:].sum()))
            add("tokens_prompt", float(prompts["attention_mask"].sum()))
            add("decode_steps_policy", float(model_output.shape[1] - n))  # the longest response in the batch
            add("decode_steps_mixture", float(mixture_output.shape[1] - n))
            return model_data, mixture_data

        def _compute_rewards(self, *a, **kw):
            return timed("judge", super()._compute_rewards)(*a, **kw)

        def _compute_logprobs(self, *a, **kw):
            return timed("learn_forward", super()._compute_logprobs)(*a, **kw)

        def _compute_losses(self, *a, **kw):
            return timed("learn_forward", super()._compute_losses)(*a, **kw)

    return TimedNashMDTrainer


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def summarise(steps: list[dict[str, float]], batch: int) -> dict:
    """Per-step means over the measured steps: phases (s), tokens per prompt / per response (up to
    and including EOS), and decoding steps (the batch's longest response: generate runs that long)."""
    mean = lambda key: statistics.fmean(s.get(key, 0.0) for s in steps)  # noqa: E731
    gen, mix, judge = mean("generation"), mean("generation_mixture"), mean("judge")
    fwd, bwd, ts, step = mean("learn_forward"), mean("learn_backward"), mean("training_step"), mean("step")
    opt = step - ts
    detail = {"generation_policy": gen - mix, "generation_mixture": mix, "learn_forward": fwd,
              "learn_backward": bwd, "learn_optimizer": opt, "other": ts - gen - judge - fwd - bwd}
    tokens = {"prompt": mean("tokens_prompt") / batch, "policy_per_response": mean("tokens_policy") / batch,
              "mixture_per_response": mean("tokens_mixture") / batch, "policy_decode_steps": mean("decode_steps_policy"), "mixture_decode_steps": mean("decode_steps_mixture")}
    return {"phases": {"generation": gen, "judge": judge, "learn": fwd + bwd + opt},
            "phases_detail": detail, "tokens_mean": tokens}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    rss = RssSampler().start()
    t_start = time.perf_counter()

    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.nash_md import NashMDConfig

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    texts = load_prompts(args.prompts, tokenizer, args.max_prompt_tokens, args.steps * args.batch, args.seed)
    check_trl_tokenises_like_nlhf(texts, tokenizer)
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": t}] for t in texts]})

    policy = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    reward_model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=1, dtype=torch.float32)
    workdir = tempfile.mkdtemp(prefix="trl-nashmd-")  # the Trainer wants one; nothing is saved there
    config = NashMDConfig(
        output_dir=workdir,
        per_device_train_batch_size=args.batch, gradient_accumulation_steps=1, max_steps=args.steps,
        max_new_tokens=args.max_new_tokens, temperature=1.0, beta=[0.1], mixture_coef=[0.5],
        generation_kwargs={"min_new_tokens": args.min_new_tokens} if args.min_new_tokens else None,
        learning_rate=1e-5, max_grad_norm=1.0, gradient_checkpointing=args.gradient_checkpointing,
        use_cpu=True, bf16=False, fp16=False, seed=args.seed, data_seed=args.seed,
        train_sampling_strategy="sequential", dataloader_num_workers=0,
        report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
    )
    trainer = timed_trainer_class()(model=policy, reward_funcs=reward_model, args=config, train_dataset=dataset,
                                    processing_class=tokenizer)
    load_s = time.perf_counter() - t_start
    print(f"[trl-nashmd] loaded in {load_s:.1f} s; {args.steps} steps ({args.warmup_steps} warm-up), batch "
          f"{args.batch}, {args.max_new_tokens} new tokens, gradient checkpointing {args.gradient_checkpointing}, "
          f"torch threads {torch.get_num_threads()}, cpu {torch.backends.cpu.get_cpu_capability()}", flush=True)
    try:
        trainer.train()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    peak = rss.stop()

    steps = trainer.step_timer.steps
    if len(steps) != args.steps:
        raise RuntimeError(f"expected {args.steps} optimizer steps, the trainer ran {len(steps)}")
    for i, s in enumerate(steps):
        print(f"[trl-nashmd] step {i}{' (warm-up)' if i < args.warmup_steps else ''}: {s['step']:.2f} s "
              f"(generation {s.get('generation', 0):.2f}, mixture {s.get('generation_mixture', 0):.2f}, "
              f"judge {s.get('judge', 0):.2f})", flush=True)
    measured = steps[args.warmup_steps:]
    per_step = [s["step"] for s in measured]
    median = statistics.median(per_step)
    result = {
        "tool": "trl-nashmd", "tool_version": trl.__version__,
        "model": args.model, "dtype": "float32",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_model": cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "batch_prompts": args.batch, "max_new_tokens": args.max_new_tokens, "min_new_tokens": args.min_new_tokens,
        "gradient_checkpointing": args.gradient_checkpointing,
        "warmup_steps": args.warmup_steps, "steps_measured": len(measured),
        "training_comparisons_per_step": args.batch,
        "seconds_per_step": {"median": median, "mean": statistics.fmean(per_step), "all": per_step},
        "seconds_per_training_comparison": median / args.batch,
        **summarise(measured, args.batch),
        "peak_rss_gb": {"trainer": peak["trainer"]}, "peak_rss_total_gb": peak["total"],
        "phase_notes": PHASE_NOTES,
        "judge": "reward model: LlamaForSequenceClassification on the policy's weights, random 1-output head "
                 "(TRL 1.13 NashMD accepts only a reward model sharing the policy tokenizer)",
        "settings": {"beta": 0.1, "mixture_coef": 0.5, "temperature": 1.0, "learning_rate": 1e-5,
                     "optimizer": config.optim, "max_grad_norm": 1.0, "max_prompt_tokens": args.max_prompt_tokens,
                     "prompts": args.prompts, "seed": args.seed},
        "warmup_seconds": [s["step"] for s in steps[:args.warmup_steps]],
        "load_seconds": load_s,
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
                     "python": platform.python_version()},
        "platform": platform.platform(), "cpus": os.cpu_count(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"[trl-nashmd] median {median:.2f} s/step, {median / args.batch:.2f} s/comparison, peak RSS "
          f"{peak['total']:.2f} GB -> {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
