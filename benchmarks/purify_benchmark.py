"""Knowledge-purification benchmark on the multi-teacher demo world (`trl_ext.demo.teachers`).

Three teachers with different strengths (0: addition expert, 1: reversal expert, 2: a generalist that is confidently
wrong on additions whose first operand is >= 5), one weak student, in-domain training prompts (addition with first
operand 0-6, reversal of words starting with a/b) and held-out out-of-domain prompts (first operand 7-9, words
starting with c). One command, eight seeds by default (results averaged; the student's outcome varies a lot between
seeds, so one or two seeds are not enough), 2 CPU cores:

1. Same budget (steps, prompts, completions per prompt, optimizer, learning rate, seed) for
   * each single teacher with GNDPO (`GNDPOTrainer`), the best of which is "best single teacher",
   * naive averaging (`purification="none"`), and
   * the five purifications (`aggregation`, `plackett_luce`, `classifier_router`, `similarity_router`,
     `rl_selection`) of `PurifiedDistillTrainer`.
   After training: the student's greedy reward per task in-domain and out-of-domain (200 prompts per split), its
   expected reward on the same prompts (8 answers each sampled at temperature 1), the sampled training reward over
   the last 10% of steps, and,
   for the purified runs, the routing decisions' accuracy against the signal on in-domain and out-of-domain prompts
   (`trainer.evaluate`: the routers decide, never learn, there).
2. Cost: median CPU time per optimizer step at learning rate 0 (identical policy, so identical completion lengths)
   of GNDPO with one teacher and of every purification with K = 3 teachers (router memories filled to capacity:
   the steady-state cost), and the median CPU time of one teacher's forward pass (scoring the sampled tokens); one
   torch thread, so process CPU time is the work done whatever else runs on the machine; conditions interleaved
   over `--timing-repeats` rounds.

Targets (issue text), as checked in `targets` of the JSON: every purifier beats naive averaging (in-domain greedy
student reward, mean over seeds; per-seed differences reported too); the routers generalize out of domain best (the
best out-of-domain student reward of a router, i.e. plackett_luce, classifier_router or similarity_router, the
paper's routing family, above the other multi-teacher methods; whether it also beats every single teacher is
reported); the cost of K teachers grows no worse than K teacher forward passes (per method: step(K=3) -
step(GNDPO, 1 teacher) <= (K - 1) x teacher forward x (1 + --cost-tolerance); the lenient reading, <= K forwards,
is reported too).

    HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python benchmarks/purify_benchmark.py           # ~40 min, 2 CPU cores
    HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python benchmarks/purify_benchmark.py --quick   # smoke run, ~1 min
    HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python benchmarks/purify_benchmark.py --from-json <purify.json>

Writes `<out-dir>/purify.json` and `<out-dir>/purify.png` (default out-dir: benchmarks/results).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks._shared import paired_differences, quiet, round_floats, versions, write_json  # noqa: E402

RESULT_NAME = "purify"
# One thread: the demo models are tiny, and on a shared machine a spinning thread pool costs more than it gives.
NUM_THREADS = 1
PURIFICATIONS = ("none", "aggregation", "plackett_luce", "classifier_router", "similarity_router", "rl_selection")
ROUTERS = ("plackett_luce", "classifier_router", "similarity_router")  # the paper's routing family
SINGLE = ("single/arithmetic_expert", "single/reversal_expert", "single/blind_spot_generalist")
TASKS_IN, TASKS_OUT = ("arithmetic_in", "reversal_in"), ("arithmetic_out", "reversal_out")

COMMON_TRAINING = dict(
    use_cpu=True,
    bf16=False,
    gradient_checkpointing=False,
    report_to="none",
    save_strategy="no",
    per_device_train_batch_size=32,
    num_generations=8,
    max_completion_length=6,
    logging_steps=5,
    disable_tqdm=True,
    dataloader_num_workers=0,
)
COLORS = {"none": "tab:gray", "aggregation": "tab:brown", "plackett_luce": "tab:purple",
          "classifier_router": "tab:blue", "similarity_router": "tab:green", "rl_selection": "tab:orange",
          "single/arithmetic_expert": "tab:olive", "single/reversal_expert": "tab:pink",
          "single/blind_spot_generalist": "tab:cyan"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=500, help="optimizer steps per training run (default 500)")
    p.add_argument("--seeds", type=str, default="0,1,2,3,4,5,6,7",
                   help="comma-separated seeds; results are averaged (default 0-7: per-seed outcomes differ by "
                        "+-0.1, so 4 seeds cannot resolve the differences between methods)")
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--eval-prompts", type=int, default=200, help="evaluation prompts per split (default 200)")
    p.add_argument("--eval-samples", type=int, default=8,
                   help="sampled answers per evaluation prompt for the sampled (expected) reward (default 8)")
    p.add_argument("--router-eval-prompts", type=int, default=64, help="prompts per split for router accuracy")
    p.add_argument("--conditions", type=str, default=",".join((*SINGLE, *PURIFICATIONS)),
                   help="comma-separated subset of the conditions to train")
    p.add_argument("--timing-steps", type=int, default=30, help="timed optimizer steps per timing run")
    p.add_argument("--timing-warmup", type=int, default=5)
    p.add_argument("--timing-repeats", type=int, default=2, help="interleaved rounds over the timed conditions")
    p.add_argument("--cost-tolerance", type=float, default=0.1,
                   help="cost target: overhead <= (K-1) teacher forwards x (1 + tolerance), for timing noise")
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--timing-into", type=str, default=None,
                   help="re-measure only the cost part and write it into this saved purify.json (targets and plot "
                        "recomputed; training results kept)")
    p.add_argument("--out-dir", type=str, default=str(REPO_ROOT / "benchmarks" / "results"))
    p.add_argument("--quick", action="store_true", help="smoke run: 30 steps, 64 eval prompts, short timing")
    p.add_argument("--from-json", type=str, default=None,
                   help="recompute the targets and the plot of a saved purify.json (no training)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps = min(args.steps, 30)
        args.seeds = args.seeds.split(",")[0]
        args.eval_prompts = min(args.eval_prompts, 64)
        args.router_eval_prompts = min(args.router_eval_prompts, 16)
        args.timing_steps, args.timing_warmup = min(args.timing_steps, 8), min(args.timing_warmup, 2)
        args.timing_repeats = 1
    args.condition_list = [c.strip() for c in args.conditions.split(",") if c.strip()]
    args.seed_list = [int(x) for x in args.seeds.split(",") if x.strip()]
    unknown = set(args.condition_list) - set(SINGLE) - set(PURIFICATIONS)
    if unknown:
        p.error(f"unknown conditions {sorted(unknown)}")
    return args


# ----------------------------------------------------------------------------------------------------------------------
# the world and its evaluation
# ----------------------------------------------------------------------------------------------------------------------
def world(args) -> dict:
    from trl_ext.demo import teachers as world_module

    return {
        "module": world_module,
        "student": world_module.student_path(),
        "teachers": world_module.teacher_paths(),
        "train": world_module.in_domain_dataset(max(4000, args.steps * 8), seed=1),
        "eval_in": world_module.in_domain_dataset(args.eval_prompts, seed=101),
        "eval_out": world_module.out_of_domain_dataset(args.eval_prompts, seed=102),
        "router_in": world_module.in_domain_dataset(args.router_eval_prompts, seed=201),
        "router_out": world_module.out_of_domain_dataset(args.router_eval_prompts, seed=202),
    }


@torch.no_grad()
def task_rewards(model, tokenizer, dataset, samples: int = 0, seed: int = 0) -> dict[str, float]:
    """Mean task reward per task: of greedy answers (samples=0), or of `samples` answers per prompt sampled as in
    training (temperature 1, no top-k/top-p), i.e. the student's expected reward."""
    from trl_ext import demo

    model = model.eval()
    prompts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in dataset["prompt"]]
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    sampling = {"do_sample": False}
    if samples:
        torch.manual_seed(seed)
        sampling = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "num_return_sequences": samples}
    out = model.generate(**encoded, max_new_tokens=COMMON_TRAINING["max_completion_length"],
                         pad_token_id=tokenizer.pad_token_id, **sampling)
    texts = tokenizer.batch_decode(out[:, encoded["input_ids"].size(1):], skip_special_tokens=True)
    repeat = max(samples, 1)  # generate() returns each prompt's samples next to each other
    per_task: dict[str, list[float]] = {}
    for i, text in enumerate(texts):
        task, answer = dataset["task"][i // repeat], dataset["answer"][i // repeat]
        per_task.setdefault(task, []).append(demo.get_task(task).reward(text, answer))
    return {task: float(np.mean(values)) for task, values in sorted(per_task.items())}


def evaluate_model(model, tokenizer, w, samples: int = 0, seed: int = 0) -> dict[str, float]:
    scores = {**task_rewards(model, tokenizer, w["eval_in"], samples, seed),
              **task_rewards(model, tokenizer, w["eval_out"], samples, seed)}
    scores["in_domain"] = float(np.mean([scores[t] for t in TASKS_IN]))
    scores["out_of_domain"] = float(np.mean([scores[t] for t in TASKS_OUT]))
    return scores


def teacher_report(w) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(w["student"])
    report = {}
    for role, path in zip(w["module"].TEACHER_ROLES, w["teachers"]):
        report[role] = evaluate_model(AutoModelForCausalLM.from_pretrained(path), tokenizer, w)
    report["student (before training)"] = evaluate_model(AutoModelForCausalLM.from_pretrained(w["student"]),
                                                         tokenizer, w)
    return report


def task_monitor(task_name: str):
    """A reward function with weight 0 that logs the reward of one task (None on the other task's rows)."""
    from trl_ext import demo

    def monitor(completions, task, answer, **kwargs):
        return [demo.get_task(t).reward(demo.completion_text(c), a) if t == task_name else None
                for c, t, a in zip(completions, task, answer)]

    monitor.__name__ = task_name.split("_")[0]
    return monitor


# ----------------------------------------------------------------------------------------------------------------------
# training runs
# ----------------------------------------------------------------------------------------------------------------------
def build_trainer(condition: str, w, args, lr: float, max_steps: int, output_dir: str, seed: int = 0):
    from transformers.trainer_callback import PrinterCallback

    from trl_ext import demo
    from trl_ext.gndpo import GNDPOConfig, GNDPOTrainer
    from trl_ext.purify import PurifiedDistillConfig, PurifiedDistillTrainer

    reward_funcs = [demo.task_reward, task_monitor("arithmetic_in"), task_monitor("reversal_in")]
    settings = dict(COMMON_TRAINING, output_dir=output_dir, learning_rate=lr, max_steps=max_steps, seed=seed,
                    reward_weights=[1.0, 0.0, 0.0], per_device_eval_batch_size=64)
    if condition.startswith("single/"):
        teacher = w["teachers"][SINGLE.index(condition)]
        trainer = GNDPOTrainer(model=w["student"], reward_funcs=reward_funcs, args=GNDPOConfig(**settings),
                               train_dataset=w["train"], teacher_model=teacher)
    else:
        trainer = PurifiedDistillTrainer(model=w["student"], reward_funcs=reward_funcs,
                                         args=PurifiedDistillConfig(purification=condition, **settings),
                                         train_dataset=w["train"], teacher_models=w["teachers"])
    trainer.remove_callback(PrinterCallback)
    return trainer


def series(log_history: list[dict], key: str) -> list[float]:
    return [float("nan") if e[key] is None else float(e[key]) for e in log_history
            if key in e and "train_runtime" not in e and not any(k.startswith("eval_") for k in e)]


def run_training(condition: str, w, args, seed: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="purify-bench-") as tmp:
        trainer = build_trainer(condition, w, args, args.learning_rate, args.steps, tmp, seed)
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
        history = trainer.state.log_history
        run = {
            "wall_seconds": wall,
            "step": series(history, "step"),
            "reward": series(history, "reward"),
            "reward_arithmetic": series(history, "rewards/arithmetic/mean"),
            "reward_reversal": series(history, "rewards/reversal/mean"),
            "final_greedy": evaluate_model(trainer.model, trainer.processing_class, w),
            "final_sampled": evaluate_model(trainer.model, trainer.processing_class, w, args.eval_samples, seed),
        }
        if not condition.startswith("single/"):
            for key in ("router_accuracy", "disagreement", "decisive_fraction", "fallback_fraction",
                        *(f"choice/teacher_{k}" for k in range(3)), *(f"signal/teacher_{k}" for k in range(3))):
                run[key] = series(history, f"purify/{key}")
            run["router_eval"] = {}
            for split in ("in", "out"):
                metrics = trainer.evaluate(eval_dataset=w[f"router_{split}"])
                run["router_eval"][split] = {
                    "router_accuracy": metrics.get("eval_purify/router_accuracy"),
                    "choice": [metrics.get(f"eval_purify/choice/teacher_{k}") for k in range(3)],
                    "decisive_fraction": metrics.get("eval_purify/decisive_fraction"),
                }
    del trainer
    gc.collect()
    return run


def mean_over_seeds(runs: dict[int, dict]) -> dict:
    """One run-shaped dict whose numbers are the means over seeds (lists elementwise); `per_seed` keeps the runs."""

    def mean(values):
        first = values[0]
        if isinstance(first, dict):
            return {k: mean([v[k] for v in values]) for k in first}
        if isinstance(first, list):
            return [mean(list(items)) for items in zip(*values)]
        if first is None or any(v is None for v in values):
            return None
        return float(np.nanmean(values))

    merged = mean(list(runs.values()))
    merged["per_seed"] = runs
    return merged


# ----------------------------------------------------------------------------------------------------------------------
# cost
# ----------------------------------------------------------------------------------------------------------------------
def fill_router_memory(trainer) -> None:
    """Fill a router's memory to capacity (random unit features, random signals): its steady-state cost."""
    memory = getattr(trainer.purifier, "memory", None)
    if memory is None:
        return
    generator = torch.Generator().manual_seed(0)
    features = torch.nn.functional.normalize(torch.rand(memory.capacity, memory.features.size(1),
                                                        generator=generator), dim=1)
    memory.add(features, torch.rand(memory.capacity, memory.signals.size(1), generator=generator))


# The purification's own work in PurifiedDistillTrainer's rollout hook: everything it adds to GNDPO's hook except
# the K teacher forwards (prompt features, gathering, signal and consensus, the purifier's decision and learning,
# metrics, and the RL selector's re-scoring of the previous batch, whose student forward is counted apart).
PURIFICATION_STEPS = ("_prompt_features", "_gather_prompts", "_log_purification", "_sync_purifier",
                      "_learn_from_improvement")
PURIFIER_STEPS = ("decide", "learn")


def timing_run(condition: str, w, args) -> dict:
    from transformers import TrainerCallback

    steps: dict[str, list[float]] = {"wall": [], "cpu": [], "purification_cpu": [], "extra_forward_cpu": []}
    teacher_cpu: list[float] = []
    current = {"purification": 0.0, "extra_forward": 0.0, "depth": 0}

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0, self.c0 = time.perf_counter(), time.process_time()
            current["purification"] = current["extra_forward"] = 0.0

        def on_step_end(self, *a, **k):
            steps["wall"].append(time.perf_counter() - self.t0)
            steps["cpu"].append(time.process_time() - self.c0)
            steps["purification_cpu"].append(current["purification"] - current["extra_forward"])
            steps["extra_forward_cpu"].append(current["extra_forward"])

    def count_purification(function):
        def timed_function(*a, **k):
            current["depth"] += 1  # a timed call inside another timed call counts once
            c0 = time.process_time()
            try:
                return function(*a, **k)
            finally:
                current["depth"] -= 1
                if current["depth"] == 0:
                    current["purification"] += time.process_time() - c0
        return timed_function

    with tempfile.TemporaryDirectory(prefix="purify-bench-time-") as tmp:
        trainer = build_trainer(condition, w, args, 0.0, args.timing_warmup + args.timing_steps, tmp)
        trainer.add_callback(StepTimer())
        if hasattr(trainer, "purifier"):
            fill_router_memory(trainer)
            # Instance attributes shadow the methods, so the trainer's own calls go through the timers.
            for name in PURIFICATION_STEPS:
                setattr(trainer, name, count_purification(getattr(trainer, name)))
            for name in PURIFIER_STEPS:
                setattr(trainer.purifier, name, count_purification(getattr(trainer.purifier, name)))
        teachers = getattr(trainer, "teacher_models", None) or [trainer.teacher_model]
        original = trainer.score_completions

        def timed(model, rollout):
            c0 = time.process_time()
            out = original(model, rollout)
            if any(model is t for t in teachers):
                teacher_cpu.append(time.process_time() - c0)
            elif current["depth"] > 0:  # a model forward inside the purification: the RL selector's re-scoring
                current["extra_forward"] += time.process_time() - c0
            return out

        trainer.score_completions = timed
        trainer.train()
    skip = args.timing_warmup
    return {**{key: values[skip:] for key, values in steps.items()},
            "teacher_forward_cpu": teacher_cpu[skip * len(teachers):], "num_teachers": len(teachers)}


# Teacher counts for the cost-growth measurement. A 4th teacher is another copy of the first: what a forward pass
# costs does not depend on what the teacher knows.
TEACHER_COUNTS = (2, 3, 4)


def with_teachers(w, count: int) -> dict:
    return {**w, "teachers": (list(w["teachers"]) * 2)[:count]}


def parts_per_step(run: dict) -> list[float]:
    """Per step: CPU seconds of the K teacher forwards + the purification + any extra model forward."""
    k = run["num_teachers"]
    teachers = np.asarray(run["teacher_forward_cpu"], dtype=float)
    teachers = teachers[: len(teachers) // k * k].reshape(-1, k).sum(axis=1)
    n = min(len(teachers), len(run["purification_cpu"]))
    return list(teachers[:n] + np.asarray(run["purification_cpu"][:n]) + np.asarray(run["extra_forward_cpu"][:n]))


def teacher_count_scaling(w, args, log, pooled_at_three: dict) -> dict:
    """How each method's cost grows with the number of teachers K: the teacher forwards plus the purification's
    own work, measured inside the step at K = 2, 3, 4 (K = 3 reuses the main measurement)."""
    parts = {c: {3: [x for r in pooled_at_three[c] for x in parts_per_step(r)]} for c in PURIFICATIONS}
    steps = {c: {3: [x for r in pooled_at_three[c] for x in r["cpu"]]} for c in PURIFICATIONS}
    for repeat in range(args.timing_repeats):
        for count in (k for k in TEACHER_COUNTS if k != 3):
            for condition in (PURIFICATIONS if repeat % 2 == 0 else PURIFICATIONS[::-1]):
                run = timing_run(condition, with_teachers(w, count), args)
                parts[condition].setdefault(count, []).extend(parts_per_step(run))
                steps[condition].setdefault(count, []).extend(run["cpu"])
                log(f"  timing #{repeat} K={count} {condition:24s} {1e3 * np.median(run['cpu']):.1f} ms CPU/step")
                gc.collect()
    low, high = min(TEACHER_COUNTS), max(TEACHER_COUNTS)
    per_method = {}
    for condition in PURIFICATIONS:
        median_parts = {k: float(np.median(v)) for k, v in sorted(parts[condition].items())}
        median_steps = {k: float(np.median(v)) for k, v in sorted(steps[condition].items())}
        per_method[condition] = {
            "parts_seconds_by_k": median_parts, "step_seconds_by_k": median_steps,
            "growth_per_teacher_seconds": (median_parts[high] - median_parts[low]) / (high - low),
            "step_growth_per_teacher_seconds": (median_steps[high] - median_steps[low]) / (high - low),
        }
    return {"teacher_counts": list(TEACHER_COUNTS), "per_method": per_method,
            "measure": "median per-step CPU seconds (1 thread, learning rate 0, router memories full); 'parts' = "
                       "the K teacher forwards + the purification's own work + any extra model forward, measured "
                       "inside the step; 'step' = the whole optimizer step (noisier)"}


def run_timing(w, args, log) -> dict:
    """Per-step CPU time (one thread: process time is the work done, robust to other processes on a shared
    machine), conditions interleaved over `--timing-repeats` rounds, router memories full (steady state)."""
    conditions = ["single/arithmetic_expert", *PURIFICATIONS]
    runs = {c: [] for c in conditions}
    for repeat in range(args.timing_repeats):
        for condition in (conditions if repeat % 2 == 0 else conditions[::-1]):
            run = timing_run(condition, w, args)
            runs[condition].append(run)
            log(f"  timing #{repeat} {condition:28s} {1e3 * np.median(run['cpu']):.1f} ms CPU/step "
                f"({1e3 * np.median(run['wall']):.1f} ms wall)")
            gc.collect()
    measures = ("cpu", "wall", "purification_cpu", "extra_forward_cpu", "teacher_forward_cpu")
    pooled = {c: {key: [x for run in runs[c] for x in run[key]] for key in measures} for c in conditions}
    teacher_forward = float(np.median([t for c in conditions for t in pooled[c]["teacher_forward_cpu"]]))
    step = {c: float(np.median(pooled[c]["cpu"])) for c in conditions}
    base = step["single/arithmetic_expert"]
    summary = {"measure": "median CPU seconds per optimizer step (1 thread), learning rate 0",
               "gndpo_one_teacher_step_seconds": base, "teacher_forward_seconds": teacher_forward,
               "num_teachers": 3, "per_method": {}}
    for condition in PURIFICATIONS:
        purification = float(np.median(pooled[condition]["purification_cpu"]))
        extra_forward = float(np.median(pooled[condition]["extra_forward_cpu"]))
        summary["per_method"][condition] = {
            "step_seconds": step[condition], "overhead_over_gndpo_seconds": step[condition] - base,
            "overhead_in_teacher_forwards": (step[condition] - base) / teacher_forward,
            # Measured inside the step, so other processes' noise in the step times does not enter:
            "purification_seconds": purification,
            "extra_model_forward_seconds": extra_forward,
            "decomposed_overhead_in_teacher_forwards":
                (summary["num_teachers"] - 1) + (purification + extra_forward) / teacher_forward,
        }
    wall = {c: float(np.median(pooled[c]["wall"])) for c in conditions}
    scaling = teacher_count_scaling(w, args, log, runs)
    for condition, v in scaling["per_method"].items():
        v["growth_per_teacher_in_teacher_forwards"] = v["growth_per_teacher_seconds"] / teacher_forward
        v["step_growth_per_teacher_in_teacher_forwards"] = v["step_growth_per_teacher_seconds"] / teacher_forward
    return {"summary": summary, "median_wall_seconds": wall, "runs": pooled, "teacher_count_scaling": scaling,
            "load_average_1min_after": os.getloadavg()[0]}


# ----------------------------------------------------------------------------------------------------------------------
# targets, plot, output
# ----------------------------------------------------------------------------------------------------------------------
def _last_tenth(rewards: list) -> float:
    return float(np.nanmean(np.asarray(rewards[-max(1, len(rewards) // 10):], dtype=float)))


def targets(report: dict, args) -> dict:
    training, out = report["training"], {}
    score = {c: r["final_greedy"] for c, r in training.items()}
    singles = [c for c in SINGLE if c in score]
    if singles:
        best_single = max(singles, key=lambda c: score[c]["in_domain"])
        out["best_single_teacher"] = {"condition": best_single, **{k: score[best_single][k]
                                                                   for k in ("in_domain", "out_of_domain")}}
    # A less noisy cross-check than one greedy evaluation: the sampled training reward over the last 10% of steps.
    # Every training prompt is fresh (the training set holds more prompts than a run draws) and is scored before the
    # student learns from it, so this is the sampled (temperature 1) reward on unseen in-domain prompts, averaged
    # over the last tenth of training rather than taken from the final student.
    out["training_reward_last_10_percent"] = {c: _last_tenth(r["reward"]) for c, r in training.items()}
    if "none" in score:
        purifiers = [c for c in PURIFICATIONS[1:] if c in score]
        seeds = list(training["none"]["per_seed"])

        def paired_minus_none(value) -> dict:
            """Per purifier: `value(run)` minus averaging's, paired by seed (see paired_differences)."""
            baseline = training["none"]["per_seed"]
            return {c: paired_differences([value(training[c]["per_seed"][seed]) - value(baseline[seed])
                                           for seed in seeds]) for c in purifiers}

        beats = {c: score[c]["in_domain"] - score["none"]["in_domain"] for c in purifiers}
        entry = out["every_purifier_beats_naive_averaging"] = {
            "met": bool(purifiers) and all(d > 0 for d in beats.values()),
            "definition": "in-domain greedy student reward, mean over seeds, above purification='none'",
            "in_domain_reward_minus_none": beats,
            "in_domain_reward_minus_none_paired": paired_minus_none(lambda run: run["final_greedy"]["in_domain"]),
            "out_of_domain_reward_minus_none": {c: score[c]["out_of_domain"] - score["none"]["out_of_domain"]
                                                for c in purifiers},
            "none_in_domain": score["none"]["in_domain"],
            # Not the target's definition: the same comparison on the sampled reward (see above).
            "cross_check_sampled_training_reward_minus_none": paired_minus_none(lambda run: _last_tenth(run["reward"])),
        }
        if all("final_sampled" in training[c]["per_seed"][seed] for c in ["none", *purifiers] for seed in seeds):
            # Also not the target: the final student's expected (sampled) reward on the in-domain evaluation prompts.
            entry["cross_check_sampled_final_minus_none"] = paired_minus_none(
                lambda run: run["final_sampled"]["in_domain"])
    routers = [c for c in ROUTERS if c in score]
    # The paper compares its routers with the other purifications and the naive multi-teacher baseline.
    multi_teacher = [c for c in PURIFICATIONS if c in score and c not in ROUTERS]
    if routers and multi_teacher:
        best_router = max(routers, key=lambda c: score[c]["out_of_domain"])
        best_other = max(multi_teacher, key=lambda c: score[c]["out_of_domain"])
        entry = {
            "met": score[best_router]["out_of_domain"] > score[best_other]["out_of_domain"],
            "definition": "best out-of-domain student reward of a router (plackett_luce, classifier_router, "
                          "similarity_router) > best of the other multi-teacher methods (none, aggregation, "
                          "rl_selection)",
            "best_router": best_router, "best_router_out_of_domain": score[best_router]["out_of_domain"],
            "best_other_multi_teacher": best_other,
            "best_other_multi_teacher_out_of_domain": score[best_other]["out_of_domain"],
            "out_of_domain": {c: score[c]["out_of_domain"] for c in score},
            "router_decision_accuracy_out_of_domain": {
                c: run["router_eval"]["out"]["router_accuracy"] for c, run in training.items() if "router_eval" in run
            },
        }
        if singles:
            best = max(singles, key=lambda c: score[c]["out_of_domain"])
            entry["also_beats_every_single_teacher"] = (
                score[best_router]["out_of_domain"] > score[best]["out_of_domain"])
            entry["best_single_teacher_out_of_domain"] = {"condition": best, "reward": score[best]["out_of_domain"]}
        out["routers_generalize_out_of_domain_best"] = entry
    timing = report.get("timing")
    if timing:
        s = timing["summary"]
        k, forward = s["num_teachers"], s["teacher_forward_seconds"]
        budget = (k - 1) * forward * (1 + args.cost_tolerance)
        per_method = {c: {"met": v["overhead_over_gndpo_seconds"] <= budget,
                          "within_k_forwards": v["overhead_over_gndpo_seconds"] <= k * forward, **v}
                      for c, v in s["per_method"].items()}
        decomposed = {c: v["decomposed_overhead_in_teacher_forwards"] for c, v in s["per_method"].items()
                      if "decomposed_overhead_in_teacher_forwards" in v}
        out["k_teachers_cost_at_most_k_teacher_forwards"] = {
            "met": all(v["met"] for v in per_method.values()),
            "definition": "per method: step(K teachers) - step(GNDPO, 1 teacher) <= (K - 1) teacher forwards x "
                          "(1 + tolerance), i.e. the K - 1 extra teachers and the purification cost no more than "
                          "the extra teachers' forward passes",
            "budget_seconds": budget, "tolerance": args.cost_tolerance,
            "lenient_all_within_k_forwards": all(v["within_k_forwards"] for v in per_method.values()),
            "per_method": per_method,
            # The same question answered from the parts measured inside the step: (K - 1) teacher forwards plus the
            # purification's own CPU time plus any extra model forward, in teacher forwards.
            "decomposed_in_teacher_forwards": decomposed,
            "decomposed_met": {c: d <= (k - 1) * (1 + args.cost_tolerance) for c, d in decomposed.items()},
            "decomposed_within_k_forwards": {c: d <= k for c, d in decomposed.items()},
        }
        scaling = timing.get("teacher_count_scaling")
        if scaling:
            growth = {c: v["growth_per_teacher_in_teacher_forwards"] for c, v in scaling["per_method"].items()}
            out["cost_grows_at_most_one_teacher_forward_per_teacher"] = {
                "met": all(g <= 1 + args.cost_tolerance for g in growth.values()),
                "definition": "the literal reading of 'the cost of K teachers grows no worse than K teacher forward "
                              "passes': per method, the slope of (teacher forwards + purification + extra model "
                              f"forward) per step between K={min(scaling['teacher_counts'])} and "
                              f"K={max(scaling['teacher_counts'])} teachers <= 1 teacher forward x (1 + tolerance); "
                              "the part that does not grow with K (e.g. a router's training, the RL selector's "
                              "student forward) is in the stricter target above",
                "growth_per_teacher_in_teacher_forwards": growth,
                "whole_step_growth_per_teacher_in_teacher_forwards": {
                    c: v["step_growth_per_teacher_in_teacher_forwards"] for c, v in scaling["per_method"].items()},
                "per_method_met": {c: g <= 1 + args.cost_tolerance for c, g in growth.items()},
            }
    out["all_met"] = all(v["met"] for v in out.values() if isinstance(v, dict) and "met" in v)
    return out


def smooth(values: list[float], window: int) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    if len(v) < window or window <= 1:
        return v
    return np.convolve(v, np.ones(window) / window, mode="valid")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    training = report["training"]
    fig, axes = plt.subplots(2, 2, figsize=(15, 10))
    ax = axes[0, 0]
    for condition, run in training.items():
        steps = run["step"][: len(smooth(run["reward"], 4))]
        ax.plot(steps[len(steps) - len(smooth(run["reward"], 4)):] if steps else [], smooth(run["reward"], 4),
                color=COLORS.get(condition), label=condition, lw=1.2,
                ls="--" if condition.startswith("single/") else "-")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("task reward of sampled completions (smoothed)")
    ax.set_title("(a) training reward, in-domain prompts")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)

    ax = axes[0, 1]
    names = list(training)
    x = np.arange(len(names))
    for i, (task, hatch) in enumerate(zip((*TASKS_IN, *TASKS_OUT), ("", "", "//", "//"))):
        ax.bar(x + (i - 1.5) * 0.2, [training[n]["final_greedy"][task] for n in names], width=0.2, hatch=hatch,
               label=task, alpha=0.8)
    ax.set_xticks(x, [n.replace("single/", "1:") for n in names], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("greedy reward after training")
    ax.set_title("(b) student per task: in-domain (plain) and out-of-domain (hatched)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")

    ax = axes[1, 0]
    purified = [n for n in names if "router_eval" in training[n]]
    x = np.arange(len(purified))
    for i, (split, label) in enumerate((("in", "in-domain prompts"), ("out", "out-of-domain prompts"))):
        values = [training[n]["router_eval"][split]["router_accuracy"] or 0.0 for n in purified]
        ax.bar(x + (i - 0.5) * 0.35, values, width=0.35, label=label, alpha=0.8)
    ax.set_xticks(x, purified, rotation=25, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("weight on a best teacher (decisive prompts)")
    ax.set_title("(c) routing accuracy against the signal after training (evaluation: no learning)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")

    ax = axes[1, 1]
    timing = report.get("timing")
    if timing:
        s = timing["summary"]
        labels = ["GNDPO\n1 teacher", *[c.replace("_", "\n") for c in PURIFICATIONS]]
        values = [s["gndpo_one_teacher_step_seconds"], *[s["per_method"][c]["step_seconds"] for c in PURIFICATIONS]]
        ax.bar(labels, [1e3 * v for v in values], color=["tab:gray", *[COLORS[c] for c in PURIFICATIONS]], alpha=0.8)
        budget = s["gndpo_one_teacher_step_seconds"] + (s["num_teachers"] - 1) * s["teacher_forward_seconds"]
        ax.axhline(1e3 * budget, color="tab:red", ls="--",
                   label=f"GNDPO + 2 teacher forwards ({1e3 * s['teacher_forward_seconds']:.1f} ms each)")
        parts = [s["per_method"][c] for c in PURIFICATIONS]
        if all("purification_seconds" in v for v in parts):
            # The same cost from the parts measured inside the step, free of the step times' noise.
            decomposed = [budget + v["purification_seconds"] + v["extra_model_forward_seconds"] for v in parts]
            ax.plot(labels[1:], [1e3 * v for v in decomposed], "k_", markersize=28, mew=2,
                    label="GNDPO + 2 forwards + measured purification (+ RL's student forward)")
        ax.set_ylabel("median CPU ms per optimizer step (lr 0, 1 thread)")
        ax.tick_params(axis="x", labelsize=7)
        ax.legend(fontsize=7, loc="lower center", framealpha=0.9)
    else:
        ax.text(0.5, 0.5, "timing skipped", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("(d) cost of K = 3 teachers")
    ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"Knowledge purification on the multi-teacher demo world ({report['config']['steps']} steps, mean "
                 f"over seeds {report['config']['seeds']}, CPU)", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_json:
        path = Path(args.from_json)
        report = json.loads(path.read_text())
        report["targets"] = targets(report, args)
        write_json(report, path)
        plot(report, path.with_suffix(".png"))
        print(json.dumps(round_floats(report["targets"]), indent=1))
        return 0
    torch.set_num_threads(NUM_THREADS)
    quiet()
    started = time.perf_counter()
    if args.timing_into:
        path = Path(args.timing_into)
        report = json.loads(path.read_text())
        report["timing"] = run_timing(world(args), args, print)
        report["timing"]["measured"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        report["targets"] = targets(report, args)
        write_json(report, path)
        plot(report, path.with_suffix(".png"))
        for name in ("k_teachers_cost_at_most_k_teacher_forwards", "cost_grows_at_most_one_teacher_forward_per_teacher"):
            print(name, json.dumps(round_floats(report["targets"][name]), indent=1))
        return 0
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f}s] {msg}", flush=True)

    w = world(args)
    log(f"student {w['student']}; teachers {w['teachers']}")
    report: dict = {
        "benchmark": "purify",
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "environment": {**versions(), "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                        "load_average_1min_at_start": os.getloadavg()[0]},
        "config": {
            "steps": args.steps, "seeds": args.seed_list, "quick": args.quick,
            "training": dict(COMMON_TRAINING, learning_rate=args.learning_rate),
            "teachers": list(w["module"].TEACHER_ROLES),
            "world": "in-domain: addition first operand 0-6 + reversal of words starting a/b; out-of-domain: first "
                     "operand 7-9 + words starting c. Teacher 2 answers a+b+1 when the first operand >= 5.",
            "single": "GNDPOTrainer (global normalization, score_clip 5) with one teacher",
            "purified": "PurifiedDistillTrainer, default settings, the three teachers",
            "final_greedy": f"greedy task reward after training, {args.eval_prompts} prompts per split",
            "final_sampled": f"task reward of {args.eval_samples} answers per prompt sampled at temperature 1 after "
                             f"training (the student's expected reward), same prompts",
            "router_eval": f"trainer.evaluate on {args.router_eval_prompts} prompts per split, "
                           f"{COMMON_TRAINING['num_generations']} samples each",
        },
    }
    log("teachers and student before training (greedy reward per task)")
    report["teacher_report"] = teacher_report(w)
    for name, scores in report["teacher_report"].items():
        log("  " + name + ": " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()))

    report["training"] = {}
    for condition in args.condition_list:
        runs = {}
        for seed in args.seed_list:
            run = runs[seed] = run_training(condition, w, args, seed)
            g = run["final_greedy"]
            extra = f", sampled in-domain {run['final_sampled']['in_domain']:.3f}"
            if "router_eval" in run:
                extra += (f", routing accuracy in {run['router_eval']['in']['router_accuracy']:.2f} / out "
                          f"{run['router_eval']['out']['router_accuracy']:.2f}")
            log(f"{condition:28s} seed {seed}: in-domain {g['in_domain']:.3f} (arith {g['arithmetic_in']:.2f}, rev "
                f"{g['reversal_in']:.2f}), out-of-domain {g['out_of_domain']:.3f} (arith {g['arithmetic_out']:.2f}, "
                f"rev {g['reversal_out']:.2f}){extra}, {run['wall_seconds']:.0f} s")
        report["training"][condition] = mean_over_seeds(runs)
        write_json(report, out_dir / f"{RESULT_NAME}.json")  # partial results survive a later failure

    if not args.skip_timing:
        log("timing (learning rate 0)")
        report["timing"] = run_timing(w, args, log)
    report["targets"] = targets(report, args)
    report["runtime_seconds"] = time.perf_counter() - started
    write_json(report, out_dir / f"{RESULT_NAME}.json")
    plot(report, out_dir / f"{RESULT_NAME}.png")
    for name, target in report["targets"].items():
        if isinstance(target, dict) and "met" in target:
            log(f"target {name}: {'MET' if target['met'] else 'NOT MET'}")
    log(f"wrote {out_dir / (RESULT_NAME + '.json')} and {out_dir / (RESULT_NAME + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
