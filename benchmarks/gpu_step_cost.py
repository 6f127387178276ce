"""What each trainer's optimizer step costs on one GPU, against GRPO's, measured side by side in one run.

The demo models are too small for a GPU to say anything, so every method here trains the same mid-sized random
Llama (demo tokenizer, `--hidden`/`--layers`: ~190M parameters by default, bf16), with same-sized random teachers
for the distillation methods. Same generation batch for all (`--prompts` x `--generations` completions of up to
`--completion-length` tokens, in `--accumulation` micro-batches per optimizer step), `learning_rate=0` so the policy
and with it the completion lengths stay the same across methods, and a pseudo-random 0/1 reward of each completion's
text, so about half of each group succeeds (every method has signal: PGPO finds successful siblings, ProRL's groups
are informative, the Kondo gate sees delights of both signs).

Methods: GRPO (TRL), GNDPO (one teacher), PGPO (EMA self-teacher, top-20 divergence), DG, DG with the Kondo gate at
pass rate 0.25, purified distillation with 1, 2 and 3 teachers (`purification="none"`: the K-teacher scoring cost
itself), ProRL (refill dynamic sampling, KL to a reference model). Per method, after `--warmup` steps, the median
over `--steps` optimizer steps of: the step's wall time (CUDA synchronized), its generation phase (TRL's
`_prepare_inputs`: sampling, rewards and the no-grad scoring passes run after generation: GNDPO's and purification's
teachers, DG's surprisal, ProRL's reference), the update phase (the rest of the step: forward with gradient,
backward, optimizer, and what a method computes inside its loss, such as PGPO's self-teacher forward on the
privileged prompt), the number of backward passes, and the peak GPU memory.

    HF_HUB_OFFLINE=1 PYTHONPATH=. python benchmarks/gpu_step_cost.py            # one GPU, ~3 min on an H100
    HF_HUB_OFFLINE=1 PYTHONPATH=. python benchmarks/gpu_step_cost.py --quick    # smoke run, also on CPU

Writes `<out-dir>/gpu_step_cost.json` and `.png` (default out-dir: benchmarks/results). On a CPU (no CUDA) it runs
in float32 and its figures are a smoke test only.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
from benchmarks._shared import offline_environment  # noqa: E402

offline_environment()  # before the Hugging Face libraries are imported

import torch  # noqa: E402
from transformers import PrinterCallback, TrainerCallback  # noqa: E402

from benchmarks._shared import quiet, versions, write_json  # noqa: E402

METHODS = ("grpo", "gndpo", "pgpo", "delight", "delight_gate", "purify_1", "purify_2", "purify_3", "prorl")


def coin_reward(completions, **kwargs) -> list[float]:
    """0 or 1 from a hash of the completion's text: deterministic, about half of every group succeeds."""
    from trl_ext.demo import completion_text

    return [float(hashlib.sha256(completion_text(c).encode()).digest()[0] & 1) for c in completions]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: a tiny model, 1 warm-up and 2 measured steps")
    p.add_argument("--methods", type=str, default=",".join(METHODS), help="comma-separated subset of " + str(METHODS))
    p.add_argument("--hidden", type=int, default=1024, help="hidden size of the random Llama")
    p.add_argument("--layers", type=int, default=16, help="transformer blocks")
    p.add_argument("--completion-length", type=int, default=64, help="max_completion_length")
    p.add_argument("--prompts", type=int, default=4, help="prompts per optimizer step")
    p.add_argument("--generations", type=int, default=8, help="num_generations (completions per prompt)")
    p.add_argument("--accumulation", type=int, default=4, help="micro-batches per optimizer step")
    p.add_argument("--warmup", type=int, default=2, help="optimizer steps not measured")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps measured")
    p.add_argument("--out-dir", type=str, default=str(REPO_ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.completion_length, args.warmup, args.steps = 64, 2, 8, 1, 2
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        p.error(f"unknown --methods {unknown}; choose from {METHODS}")
    if (args.prompts * args.generations) % args.accumulation:
        p.error("--prompts x --generations must be a multiple of --accumulation")
    return args


# ----- models -------------------------------------------------------------------------------------------------------
def save_random_model(directory: Path, hidden: int, layers: int, seed: int) -> tuple[str, int]:
    """A random Llama with the demo tokenizer (heads of 64 dimensions, 2:1 grouped-query attention): its path and
    parameter count."""
    from trl_ext import demo

    tokenizer = demo.build_tokenizer()
    heads = max(1, hidden // 64)
    architecture = demo.TinyArchitecture(hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                                         num_hidden_layers=layers, num_attention_heads=heads,
                                         num_key_value_heads=max(1, heads // 2), max_position_embeddings=512)
    model = demo.build_model(tokenizer, architecture, seed=seed)
    path = directory / f"random-{hidden}x{layers}-seed{seed}"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path), sum(p.numel() for p in model.parameters())


# ----- instrumentation ----------------------------------------------------------------------------------------------
def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepMeter(TrainerCallback):
    """Per optimizer step: wall time, time in `_prepare_inputs` (generation phase) and forwards with gradient."""

    def __init__(self, trainer):
        self.steps: list[dict] = []
        self._generation = 0.0
        self._backward = 0
        self._started = 0.0
        trainer.model.register_forward_hook(self._count)
        prepare = trainer._prepare_inputs

        def timed_prepare(*args, **kwargs):
            synchronize()
            start = time.perf_counter()
            try:
                return prepare(*args, **kwargs)
            finally:
                synchronize()
                self._generation += time.perf_counter() - start

        trainer._prepare_inputs = timed_prepare

    def _count(self, module, args, output):
        if torch.is_grad_enabled():
            self._backward += 1

    def on_step_begin(self, args, state, control, **kwargs):
        synchronize()
        self._generation, self._backward, self._started = 0.0, 0, time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        synchronize()
        seconds = time.perf_counter() - self._started
        self.steps.append({"seconds": seconds, "generation_seconds": self._generation,
                           "update_seconds": seconds - self._generation, "backward_passes": self._backward})


# ----- one method -----------------------------------------------------------------------------------------------------
def build_trainer(method: str, student: str, teachers: list[str], dataset, args, output_dir: str):
    """The trainer of `method`, with the shared batch geometry and no learning (lr 0)."""
    from trl import GRPOConfig, GRPOTrainer

    from trl_ext import (DelightConfig, DelightTrainer, GNDPOConfig, GNDPOTrainer, PGPOConfig, PGPOTrainer,
                         PurifiedDistillConfig, PurifiedDistillTrainer)
    from trl_ext.prorl import ProRLConfig, ProRLTrainer

    gpu = torch.cuda.is_available()
    common = dict(output_dir=output_dir, use_cpu=not gpu, bf16=gpu, learning_rate=0.0, lr_scheduler_type="constant",
                  max_steps=args.warmup + args.steps, per_device_train_batch_size=args.prompts * args.generations
                  // args.accumulation, gradient_accumulation_steps=args.accumulation,
                  num_generations=args.generations, max_completion_length=args.completion_length,
                  gradient_checkpointing=False, report_to="none", save_strategy="no", logging_steps=1,
                  disable_tqdm=True, seed=0)
    rewards = [coin_reward]
    if method == "grpo":
        return GRPOTrainer(model=student, reward_funcs=rewards, train_dataset=dataset, args=GRPOConfig(**common))
    if method == "gndpo":
        return GNDPOTrainer(model=student, reward_funcs=rewards, train_dataset=dataset, teacher_model=teachers[0],
                            args=GNDPOConfig(**common))
    if method == "pgpo":
        return PGPOTrainer(model=student, reward_funcs=rewards, train_dataset=dataset,
                           args=PGPOConfig(**common, distillation_topk=20))
    if method.startswith("delight"):
        gate = {"gate": "pass_rate", "gate_pass_rate": 0.25} if method == "delight_gate" else {}
        return DelightTrainer(model=student, reward_funcs=rewards, train_dataset=dataset,
                              args=DelightConfig(**common, **gate))
    if method.startswith("purify_"):
        k = int(method.split("_")[1])
        return PurifiedDistillTrainer(model=student, reward_funcs=rewards, train_dataset=dataset,
                                      teacher_models=teachers[:k],
                                      args=PurifiedDistillConfig(**common, purification="none"))
    if method == "prorl":
        return ProRLTrainer(model=student, reward_funcs=rewards, train_dataset=dataset,
                            args=ProRLConfig(**common, steps_per_generation=args.accumulation))
    raise ValueError(method)


def measure(method: str, student: str, teachers: list[str], dataset, args, work_dir: Path) -> dict:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer = build_trainer(method, student, teachers, dataset, args, str(work_dir / method))
    meter = StepMeter(trainer)
    trainer.add_callback(meter)
    trainer.remove_callback(PrinterCallback)  # disable_tqdm's per-step printout of every logged metric
    trainer.train()
    measured = meter.steps[args.warmup:]
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    result = {
        "seconds_per_step": statistics.median(s["seconds"] for s in measured),
        "generation_seconds": statistics.median(s["generation_seconds"] for s in measured),
        "update_seconds": statistics.median(s["update_seconds"] for s in measured),
        "backward_passes_per_step": statistics.median(s["backward_passes"] for s in measured),
        "mean_completion_length": statistics.fmean(lengths[args.warmup:]) if lengths else None,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "steps": measured,
    }
    del trainer
    gc.collect()
    return result


# ----- report ---------------------------------------------------------------------------------------------------------
def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    generation = [results[n]["generation_seconds"] for n in names]
    update = [results[n]["update_seconds"] for n in names]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.bar(names, generation, label="generation phase (sampling, rewards, no-grad scoring after generation)")
    ax.bar(names, update, bottom=generation, label="update phase (loss incl. in-loss teachers, backward, optimizer)")
    for i, name in enumerate(names):
        ratio = results[name].get("relative_to_grpo")
        if ratio is not None:
            ax.text(i, generation[i] + update[i], f"x{ratio:.2f}", ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("seconds per optimizer step (median)")
    ax.set_title(title, fontsize=10)
    ax.set_ylim(0, 1.15 * max(g + u for g, u in zip(generation, update)))
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    plt.setp(ax.get_xticklabels(), rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    args = parse_args(argv)
    quiet()
    from trl_ext import demo

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    dataset = demo.with_feedback(demo.get_task("arithmetic").dataset(512, seed=0))
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work_dir = Path(tmp)
        student, parameters = save_random_model(work_dir, args.hidden, args.layers, seed=0)
        teachers = [save_random_model(work_dir, args.hidden, args.layers, seed=s)[0] for s in (1, 2, 3)]
        for method in args.methods:
            results[method] = measure(method, student, teachers, dataset, args, work_dir)
            print(f"{method:>13}: {results[method]['seconds_per_step']:.3f} s/step "
                  f"(generation {results[method]['generation_seconds']:.3f}, update "
                  f"{results[method]['update_seconds']:.3f}, backward passes "
                  f"{results[method]['backward_passes_per_step']:.0f})", flush=True)
    if "grpo" in results:
        for r in results.values():
            r["relative_to_grpo"] = r["seconds_per_step"] / results["grpo"]["seconds_per_step"]
    if "gndpo" in results:  # the comparison for K teachers: GNDPO with one teacher
        gndpo_seconds = results["gndpo"]["seconds_per_step"]
        for name in (m for m in results if m.startswith("purify_")):
            results[name]["relative_to_gndpo"] = results[name]["seconds_per_step"] / gndpo_seconds
    title = (f"{device}: random Llama {args.hidden}x{args.layers} ({parameters / 1e6:.1f}M parameters), "
             f"{args.prompts}x{args.generations} completions of <= {args.completion_length} tokens per step, "
             f"{args.accumulation} micro-batches")
    settings = {k: v for k, v in vars(args).items() if k != "out_dir"}
    report = {"device": device, "versions": versions(), "parameters": parameters, "settings": settings,
              "results": results}
    write_json(report, out_dir / "gpu_step_cost.json")
    plot(results, out_dir / "gpu_step_cost.png", title)
    print(f"wrote {out_dir / 'gpu_step_cost.json'} and .png")


if __name__ == "__main__":
    main()
