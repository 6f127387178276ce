"""Delightful Policy Gradient and the Kondo gate on token reversal: quality vs samples, backward passes and time.

The Kondo paper's setting in the demo world: a prompt of H symbols over an alphabet of M, the answer is the prompt
reversed, the reward is the fraction of positions answered correctly (dense) and success is an exact reversal. Every
arm starts from the same weak student (SFT'd briefly, so it knows the output format but not yet how to reverse),
trains on the same prompts in the same order with the same optimizer, learning rate and batch, and generates the
same number of completions (`--steps` x completions per step). Arms:

* `grpo`: `trl.GRPOTrainer` as TRL ships it (advantage scaled by the group's reward std, `loss_type="dapo"`).
* `pg`: `trl.GRPOTrainer` with `scale_rewards="none"`: token-mean REINFORCE with the group-mean baseline, which is
  egg's PG baseline (on-policy, one update per rollout, so the PPO ratio is 1).
* `dg`: `trl_ext.DelightTrainer` with its defaults (DG: per-token weight sigmoid(U * surprisal), eta=1).
* `gate<rho>`: DG + Kondo gate `gate="pass_rate", gate_pass_rate=rho` (price = the (1 - rho) quantile of a rolling
  history of completion delights); `price<lam>` (opt-in with `--prices`): `gate="threshold", gate_price=lam` (keep
  delight > lam) or, with `--price-rule price`, the Bernoulli rule `gate="price"`.

Measured per optimizer step: on-policy success and reward of the step's completions (a zero-weight `task_success`
reward logs success), backward passes (micro-batches that ran a forward with gradients, counted by a forward hook,
cross-checked against `trainer.gate_counters`), rows with gradient, and wall/CPU time of the update phase =
time in `training_step` minus time in `_prepare_inputs` (generation, rewards, the no-grad scoring pass and the
gate's packing), summed over the run. The optimizer step (outside `training_step`, the same for every arm) is timed
separately and not part of the update phase. All arms of a seed train in lockstep, one optimizer step each in turn
(`Lockstep`), so that every arm meets the same load on the shared machine; each keeps its own RNG streams, so a run
is the same as when trained alone. "Final success" is the mean on-policy success over the last 10% of the steps;
the final policy's success on fresh samples (T=1) is reported beside it.

Targets (from the issue; thresholds are flags): DG's final success >= GRPO's; some gate arm keeps >= 95% of DG's
final success while skipping >= 70% of DG's backward passes; for every gate arm whose ideal saving is >= 30%, the
update phase's wall-time saving vs DG is >= 80% of the ideal saving (= fraction of backward passes skipped).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/delight_benchmark.py            # ~12 min on 2 shared CPU cores
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/delight_benchmark.py --quick    # smoke run, < 1 min

Writes `<out-dir>/delight.json` and `<out-dir>/delight.png` (default out-dir: benchmarks/results).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks._shared import parse_seeds, quiet, versions, write_json  # noqa: E402

RESULT_NAME = "delight"
SMOOTH = 20  # steps in the rolling mean of the plotted training curves
SUCCESS_LEVELS = (0.25, 0.5)  # report the samples each run needed to reach these (rolling-mean) success rates


# ----------------------------------------------------------------------------------------------------------------------
# arms
# ----------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Arm:
    name: str
    label: str
    trainer: str  # "trl" (GRPOTrainer) or "delight" (DelightTrainer)
    overrides: dict = field(default_factory=dict)

    @property
    def gated(self) -> bool:
        return self.overrides.get("gate", "none") != "none"


def build_arms(args) -> list[Arm]:
    arms = {
        "grpo": Arm("grpo", "GRPO (TRL default, std-scaled)", "trl", {"scale_rewards": "group"}),
        "pg": Arm("pg", "PG (GRPO, scale_rewards=none)", "trl", {"scale_rewards": "none"}),
        "dg": Arm("dg", "DG", "delight", {}),
    }
    for rho in args.pass_rate_list:
        name = f"gate{rho:g}"
        arms[name] = Arm(name, f"DG + gate, pass rate {rho:g}", "delight",
                         {"gate": "pass_rate", "gate_pass_rate": rho})
    for price in args.price_list:
        name = f"price{price:g}"
        rule = "threshold: keep delight >" if args.price_rule == "threshold" else "Bernoulli, price"
        arms[name] = Arm(name, f"DG + gate ({rule} {price:g})", "delight",
                         {"gate": args.price_rule, "gate_price": price})
    unknown = [name for name in args.arm_names if name not in arms]
    if unknown:
        raise SystemExit(f"--arms names unknown arms {unknown}; available: {sorted(arms)}")
    chosen = args.arm_names or list(arms)
    return [arms[name] for name in chosen]


# ----------------------------------------------------------------------------------------------------------------------
# setup
# ----------------------------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps per run (default 400; --quick: 40); every arm generates steps x batch")
    p.add_argument("--seeds", type=str, default=None, help="'3' -> seeds 0,1,2 (default; --quick: 1); or a list '0,5'")
    p.add_argument("--quick", action="store_true", help="smoke run: 40 steps, 1 seed, small evaluation")
    p.add_argument("--out-dir", type=str, default=str(REPO_ROOT / "benchmarks" / "results"))
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on the 2 shared cores, 2 threads ran this tiny model 30-90x "
                        "slower whenever other jobs were running, and made the timing meaningless)")
    # task and student
    p.add_argument("--length", type=int, default=6, help="H: prompt length (symbols)")
    p.add_argument("--alphabet", type=int, default=2, help="M: alphabet size")
    p.add_argument("--pretrain-steps", type=int, default=300,
                   help="SFT steps of the starting student (demo.Pretraining); 0 = untrained")
    p.add_argument("--pretrain-seed", type=int, default=1)
    # optimization (the same for every arm)
    p.add_argument("--learning-rate", type=float, default=3e-4, help="Adam learning rate (egg's 3e-4)")
    p.add_argument("--micro-batch", type=int, default=8, help="per_device_train_batch_size")
    p.add_argument("--accumulation", type=int, default=8, help="gradient_accumulation_steps (= steps_per_generation)")
    p.add_argument("--generations", type=int, default=8, help="num_generations (completions per prompt)")
    # arms
    p.add_argument("--pass-rates", type=str, default="0.5,0.25,0.125", help="Kondo pass rates rho ('' for none)")
    p.add_argument("--prices", type=str, default="", help="gate prices lambda, e.g. '0,0.05' (default: none)")
    p.add_argument("--price-rule", choices=["threshold", "price"], default="threshold",
                   help="rule of the --prices arms: 'threshold' (keep delight > lambda) or 'price' (keep with "
                        "probability sigmoid((delight - lambda) / gate_eta), gate_eta=1)")
    p.add_argument("--arms", type=str, default="", help="subset of arms by name (default: all)")
    # evaluation
    p.add_argument("--eval-samples", type=int, default=1024, help="fresh completions in the final evaluation")
    # targets
    p.add_argument("--keep-quality", type=float, default=0.95, help="target: gate success >= this x DG's")
    p.add_argument("--skip-target", type=float, default=0.70, help="target: fraction of DG's backward passes skipped")
    p.add_argument("--time-efficiency", type=float, default=0.80, help="target: achieved / ideal update-time saving")
    args = p.parse_args(argv)
    if args.quick:
        args.steps = args.steps or 40
        args.seeds = args.seeds or "1"
        args.eval_samples = min(args.eval_samples, 256)
    args.steps = args.steps or 400
    args.seeds = args.seeds or "3"
    args.seed_list = parse_seeds(args.seeds)
    args.pass_rate_list = [float(x) for x in args.pass_rates.split(",") if x.strip()]
    args.price_list = [float(x) for x in args.prices.split(",") if x.strip()]
    args.arm_names = [a.strip() for a in args.arms.split(",") if a.strip()]
    args.batch = args.micro_batch * args.accumulation
    if args.batch % args.generations:
        p.error("--micro-batch x --accumulation must be a multiple of --generations")
    if any(not 0 < rho <= 1 for rho in args.pass_rate_list):
        p.error("--pass-rates must lie in (0, 1]")
    return args


def register_task(args):
    from trl_ext import demo

    name = f"reversal-h{args.length}m{args.alphabet}"
    return demo.register_task(demo.Reversal(name=name, length=args.length, alphabet_size=args.alphabet))


# ----------------------------------------------------------------------------------------------------------------------
# evaluation: fresh samples from the final policy
# ----------------------------------------------------------------------------------------------------------------------
def eval_prompts(task, num_samples: int, seed: int = 10_001) -> tuple[list, int]:
    """Prompts and samples per prompt. When the task has at most `num_samples` distinct prompts (M^H), every prompt
    is used (an exact average over the uniform prompt distribution); otherwise random prompts, one sample each."""
    import itertools
    import random

    question, answer = task.sample(random.Random(0))
    if question != f"rev {answer[::-1]}":  # the enumeration below writes prompts in the task's own format
        raise RuntimeError(f"unexpected reversal prompt format {question!r}; update eval_prompts()")
    space = task.alphabet_size ** task.length
    if space <= num_samples:
        words = ["".join(w) for w in itertools.product(task.alphabet, repeat=task.length)]
        rows = [([{"role": "user", "content": f"rev {w}"}], w[::-1]) for w in words]
        return rows, num_samples // space
    data = task.dataset(num_samples, seed=seed)
    return list(zip(data["prompt"], data["answer"])), 1


@torch.no_grad()
def evaluate(model, task, args, seed: int) -> dict:
    from trl_ext import demo

    tokenizer = demo.build_tokenizer()
    rows, per_prompt = eval_prompts(task, args.eval_samples)
    texts = [tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False) for prompt, _ in rows]
    encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    ids = encoded["input_ids"].repeat_interleave(per_prompt, 0)
    mask = encoded["attention_mask"].repeat_interleave(per_prompt, 0)
    answers = [answer for _, answer in rows for _ in range(per_prompt)]
    was_training = model.training
    model.eval()
    completions = []
    with torch.random.fork_rng():
        torch.manual_seed(10_000 + seed)
        for start in range(0, ids.shape[0], 256):
            out = model.generate(input_ids=ids[start:start + 256], attention_mask=mask[start:start + 256],
                                 do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=task.length,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            completions += tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    model.train(was_training)
    success = [float(c.strip() == a) for c, a in zip(completions, answers)]
    reward = [task.reward(c, a) for c, a in zip(completions, answers)]
    return {"success": float(np.mean(success)), "reward": float(np.mean(reward)), "samples": len(success)}


# ----------------------------------------------------------------------------------------------------------------------
# instrumentation: backward passes, rows with gradient, update-phase time
# ----------------------------------------------------------------------------------------------------------------------
class Meter:
    """Wraps a trainer instance: counts forwards with gradients (= backward passes) and their rows, and times
    `training_step`, `_prepare_inputs` and the optimizer step (wall and process CPU time)."""

    def __init__(self, trainer):
        self.backward_passes = 0
        self.grad_rows = 0
        self.wall = {"training_step": 0.0, "prepare_inputs": 0.0, "optimizer": 0.0}
        self.cpu = {"training_step": 0.0, "prepare_inputs": 0.0, "optimizer": 0.0}
        self._optimizer_started = None
        trainer.model.register_forward_hook(self._count, with_kwargs=True)
        trainer.training_step = self._timed(trainer.training_step, "training_step")
        trainer._prepare_inputs = self._timed(trainer._prepare_inputs, "prepare_inputs")

    def _count(self, module, args, kwargs, output):
        if torch.is_grad_enabled():
            self.backward_passes += 1
            ids = kwargs.get("input_ids", args[0] if args else None)
            self.grad_rows += int(ids.shape[0])

    def _timed(self, method, key):
        def wrapper(*args, **kwargs):
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return method(*args, **kwargs)
            finally:
                self.wall[key] += time.perf_counter() - wall
                self.cpu[key] += time.process_time() - cpu
        return wrapper

    def optimizer_started(self):
        self._optimizer_started = (time.perf_counter(), time.process_time())

    def optimizer_ended(self):
        wall, cpu = self._optimizer_started
        self.wall["optimizer"] += time.perf_counter() - wall
        self.cpu["optimizer"] += time.process_time() - cpu

    def snapshot(self) -> dict:
        return {
            "backward_passes": self.backward_passes,
            "grad_rows": self.grad_rows,
            "update_seconds": self.wall["training_step"] - self.wall["prepare_inputs"],
            "update_cpu_seconds": self.cpu["training_step"] - self.cpu["prepare_inputs"],
            "generation_seconds": self.wall["prepare_inputs"],
            "optimizer_seconds": self.wall["optimizer"],
        }


class Lockstep:
    """Runs several trainers' `train()` in threads that take turns, one optimizer step each, round robin.

    Timing on a shared machine: run one after the other, arms would meet different loads (other people's jobs come
    and go on a minute scale) and the comparison of their update times would measure the load, not the gate.
    Interleaved step by step, every arm sees the same load. Only the thread holding the turn runs (the others wait
    on a condition, using no CPU), so wall and CPU time measured inside a turn belong to that trainer. Each
    trainer keeps its own RNG streams (saved and restored at every switch), so its samples do not depend on which
    other arms run beside it.
    """

    def __init__(self, count: int, seeds: list[int]):
        self.condition = threading.Condition()
        self.turn = 0
        self.active = list(range(count))
        self.seeds = seeds
        self.rng: dict[int, tuple] = {}
        self.held = [0.0] * count  # wall seconds each trainer held the turn: its own run time
        self._since = [0.0] * count

    def acquire(self, index: int) -> None:
        import random

        from transformers import set_seed

        with self.condition:
            self.condition.wait_for(lambda: self.turn == index)
        self._since[index] = time.perf_counter()
        if index not in self.rng:
            set_seed(self.seeds[index])
        else:
            torch_state, numpy_state, python_state = self.rng[index]
            torch.set_rng_state(torch_state)
            np.random.set_state(numpy_state)
            random.setstate(python_state)

    def release(self, index: int, finished: bool = False) -> None:
        import random

        self.rng[index] = (torch.get_rng_state(), np.random.get_state(), random.getstate())
        self.held[index] += time.perf_counter() - self._since[index]
        with self.condition:
            position = self.active.index(index)
            if finished:
                self.active.remove(index)
            if self.active:
                self.turn = self.active[(position + (0 if finished else 1)) % len(self.active)]
            self.condition.notify_all()

    def run(self, jobs: list) -> list:
        """Run `jobs` (callables) in lockstep; returns their results, re-raising the first failure."""
        results, errors = [None] * len(jobs), [None] * len(jobs)

        def target(index):
            self.acquire(index)
            try:
                results[index] = jobs[index](index)
            except BaseException as error:  # noqa: BLE001 - re-raised in the calling thread below
                errors[index] = error
            finally:
                self.release(index, finished=True)

        threads = [threading.Thread(target=target, args=(i,), daemon=True) for i in range(len(jobs))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for error in errors:
            if error is not None:
                raise error
        return results


def make_callback(meter: Meter, record: dict, lockstep: Lockstep, index: int):
    from transformers import TrainerCallback

    class Snapshots(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            meter.optimizer_started()

        def on_optimizer_step(self, args, state, control, **kwargs):
            meter.optimizer_ended()

        def on_step_end(self, args, state, control, **kwargs):
            for key, value in meter.snapshot().items():
                record.setdefault(key, []).append(value)
            lockstep.release(index)  # let the next arm make its step
            lockstep.acquire(index)

    return Snapshots()


# ----------------------------------------------------------------------------------------------------------------------
# one run
# ----------------------------------------------------------------------------------------------------------------------
def build_trainer(arm: Arm, seed: int, args, task, student: str):
    from transformers import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from trl_ext import DelightConfig, DelightTrainer, demo

    prompts_per_step = args.batch // args.generations
    train = task.dataset(args.steps * prompts_per_step, seed=1)  # the same prompts, in the same order, for every arm
    common = dict(
        output_dir=tempfile.mkdtemp(prefix=f"delight-bench-{arm.name}-"),
        use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none", save_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0, logging_steps=1, seed=seed, max_steps=args.steps,
        per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=args.accumulation,
        num_generations=args.generations, max_completion_length=task.length,
        learning_rate=args.learning_rate, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1e9,  # egg: no clipping (Adam, constant lr)
        temperature=1.0, top_k=0, top_p=1.0, beta=0.0, loss_type="dapo",
        reward_weights=[1.0, 0.0],  # task_success is logged, not trained on
    )
    if arm.trainer == "trl":
        config = GRPOConfig(**common, **arm.overrides)
        trainer_cls = GRPOTrainer
    else:
        config = DelightConfig(**common, **arm.overrides)
        trainer_cls = DelightTrainer
    trainer = trainer_cls(model=student, reward_funcs=[demo.task_reward, demo.task_success], args=config,
                          train_dataset=train)
    trainer.remove_callback(PrinterCallback)
    return trainer


def train(trainer, lockstep: Lockstep, index: int) -> dict:
    """`trainer.train()` inside the lockstep; returns the per-step record and the meter's totals."""
    meter = Meter(trainer)
    record = {}
    trainer.add_callback(make_callback(meter, record, lockstep, index))
    trainer.train()
    return {"record": record, "meter": meter}


def collect(arm: Arm, seed: int, trainer, trained: dict, args, task, log) -> dict:
    """Curves, totals and the final evaluation of one trained arm."""
    record, meter, wall = trained["record"], trained["meter"], trained["run_seconds"]
    logs = [entry for entry in trainer.state.log_history if "rewards/task_success/mean" in entry]
    record["success"] = [entry["rewards/task_success/mean"] for entry in logs]
    record["reward"] = [entry["rewards/task_reward/mean"] for entry in logs]
    record["samples"] = [args.batch * (i + 1) for i in range(len(logs))]
    record["grad_norm"] = [entry.get("grad_norm") for entry in logs]  # pre-clip norm (no clipping is applied)
    record["entropy"] = [entry.get("entropy") for entry in logs]
    if arm.gated:
        record["pass_rate"] = [entry.get("delight/pass_rate") for entry in logs]
        record["price"] = [entry.get("delight/price") for entry in logs]
        record["sequence_delight_mean"] = [entry.get("delight/sequence_delight_mean") for entry in logs]
        record["sequence_delight_std"] = [entry.get("delight/sequence_delight_std") for entry in logs]
    final = evaluate(trainer.model, task, args, seed)
    counters = dict(getattr(trainer, "gate_counters", {}))
    totals = meter.snapshot()
    micro_batches = args.steps * args.accumulation
    if counters.get("micro_batches"):
        # The hook and the trainer's own counter must agree: a gated micro-batch runs no forward with gradients.
        expected = counters["micro_batches"] - counters["micro_batches_skipped"]
        if expected != totals["backward_passes"]:
            raise RuntimeError(f"{arm.name}: forward hook counted {totals['backward_passes']} backward passes, "
                               f"gate_counters say {expected}")
    result = {
        "arm": arm.name, "seed": seed, "steps": len(logs), "micro_batches": micro_batches,
        "run_seconds": wall, "final_eval": final, "gate_counters": counters, "totals": totals, "curves": record,
        "final_success": float(np.mean(record["success"][-max(1, len(logs) // 10):])),
        "samples_to_success": {str(level): samples_to(record, level) for level in SUCCESS_LEVELS},
    }
    log(f"{arm.name:>10s} seed {seed}: success over the last 10% of steps {result['final_success']:.3f}, final "
        f"policy {final['success']:.3f} (reward {final['reward']:.3f}); "
        f"backward passes {totals['backward_passes']}/{micro_batches}; update {totals['update_seconds']:.1f} s, "
        f"generation {totals['generation_seconds']:.1f} s")
    return result


# ----------------------------------------------------------------------------------------------------------------------
# summary and targets
# ----------------------------------------------------------------------------------------------------------------------
def mean_std(values) -> dict:
    values = [float(v) for v in values]
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "per_seed": values}


def summarize(runs: dict, arms: list[Arm]) -> dict:
    summary = {}
    dg = runs.get("dg")
    for arm in arms:
        by_seed = runs[arm.name]
        s = {
            "label": arm.label,
            "final_success": mean_std([r["final_success"] for r in by_seed.values()]),
            "final_eval_success": mean_std([r["final_eval"]["success"] for r in by_seed.values()]),
            "final_eval_reward": mean_std([r["final_eval"]["reward"] for r in by_seed.values()]),
            "samples_to_success": {level: [r["samples_to_success"][level] for r in by_seed.values()]
                                   for level in map(str, SUCCESS_LEVELS)},
            "backward_passes": mean_std([r["totals"]["backward_passes"] for r in by_seed.values()]),
            "grad_rows": mean_std([r["totals"]["grad_rows"] for r in by_seed.values()]),
            "update_seconds": mean_std([r["totals"]["update_seconds"] for r in by_seed.values()]),
            "update_cpu_seconds": mean_std([r["totals"]["update_cpu_seconds"] for r in by_seed.values()]),
            "generation_seconds": mean_std([r["totals"]["generation_seconds"] for r in by_seed.values()]),
            "optimizer_seconds": mean_std([r["totals"]["optimizer_seconds"] for r in by_seed.values()]),
            "run_seconds": mean_std([r["run_seconds"] for r in by_seed.values()]),
        }
        if arm.gated:
            s["completions_kept_fraction"] = mean_std(
                [r["gate_counters"]["completions_kept"] / r["gate_counters"]["completions"] for r in by_seed.values()])
        if dg is not None and set(dg) >= set(by_seed):
            # Paired with DG's run of the same seed: the ideal saving is the fraction of DG's work skipped.
            def saving(key):
                return [1 - by_seed[k]["totals"][key] / dg[k]["totals"][key] for k in by_seed]

            s["vs_dg"] = {
                "success_ratio": s["final_success"]["mean"] / max(np.mean(
                    [dg[k]["final_success"] for k in by_seed]), 1e-12),
                "eval_success_ratio": s["final_eval_success"]["mean"] / max(np.mean(
                    [dg[k]["final_eval"]["success"] for k in by_seed]), 1e-12),
                "backward_passes_skipped": mean_std(saving("backward_passes")),
                "grad_rows_skipped": mean_std(saving("grad_rows")),
                "update_wall_saving": mean_std(saving("update_seconds")),
                "update_cpu_saving": mean_std(saving("update_cpu_seconds")),
            }
            ideal = s["vs_dg"]["backward_passes_skipped"]["mean"]
            s["vs_dg"]["wall_saving_over_ideal"] = (s["vs_dg"]["update_wall_saving"]["mean"] / ideal
                                                    if ideal > 0 else None)
            s["vs_dg"]["cpu_saving_over_ideal"] = (s["vs_dg"]["update_cpu_saving"]["mean"] / ideal
                                                   if ideal > 0 else None)
            rows = s["vs_dg"]["grad_rows_skipped"]["mean"]
            s["vs_dg"]["wall_saving_over_ideal_rows"] = (s["vs_dg"]["update_wall_saving"]["mean"] / rows
                                                         if rows > 0 else None)
        summary[arm.name] = s
    return summary


def targets(summary: dict, arms: list[Arm], args) -> dict:
    out = {}
    if "dg" in summary and "grpo" in summary:
        dg, grpo = summary["dg"]["final_success"]["mean"], summary["grpo"]["final_success"]["mean"]
        dg_eval, grpo_eval = (summary[name]["final_eval_success"]["mean"] for name in ("dg", "grpo"))
        out["dg_at_least_matches_grpo"] = {"met": bool(dg >= grpo), "dg_final_success": dg,
                                           "grpo_final_success": grpo, "met_on_final_eval": bool(dg_eval >= grpo_eval),
                                           "dg_final_eval_success": dg_eval, "grpo_final_eval_success": grpo_eval}
    gated = [arm.name for arm in arms if arm.gated and "vs_dg" in summary[arm.name]]
    if gated:
        checks = {}
        for name in gated:
            v = summary[name]["vs_dg"]
            skipped = v["backward_passes_skipped"]["mean"]
            checks[name] = {
                "success_ratio": v["success_ratio"], "eval_success_ratio": v["eval_success_ratio"],
                "backward_passes_skipped": skipped,
                "met": bool(v["success_ratio"] >= args.keep_quality and skipped >= args.skip_target),
                "met_on_final_eval": bool(v["eval_success_ratio"] >= args.keep_quality and skipped >= args.skip_target),
            }
        out["gate_keeps_quality_while_skipping"] = {
            "met": any(c["met"] for c in checks.values()), "per_arm": checks,
            "met_on_final_eval": any(c["met_on_final_eval"] for c in checks.values()),
            "definition": f"some gate arm: final success >= {args.keep_quality} x DG's and >= "
                          f"{args.skip_target} of DG's backward passes skipped (means over seeds)",
        }
        timing = {}
        for name in gated:
            v = summary[name]["vs_dg"]
            ideal = v["backward_passes_skipped"]["mean"]
            if ideal >= 0.3:
                timing[name] = {"ideal": ideal, "achieved_wall": v["update_wall_saving"]["mean"],
                                "achieved_over_ideal": v["wall_saving_over_ideal"],
                                "cpu_achieved_over_ideal": v["cpu_saving_over_ideal"],
                                "met": bool(v["wall_saving_over_ideal"] >= args.time_efficiency)}
        out["update_time_falls_in_proportion"] = {
            "met": bool(timing) and all(t["met"] for t in timing.values()), "per_arm": timing,
            "definition": f"for every gate arm skipping >= 30% of backward passes: (1 - update wall time / DG's) >= "
                          f"{args.time_efficiency} x the fraction of backward passes skipped",
        }
    out["all_met"] = bool(out) and all(v["met"] for v in out.values())
    return out


# ----------------------------------------------------------------------------------------------------------------------
# plot
# ----------------------------------------------------------------------------------------------------------------------
def samples_to(record: dict, level: float):
    """Generated completions when the rolling-mean training success first reached `level` (None: never)."""
    hits = np.nonzero(rolling(record["success"]) >= level)[0]
    return int(record["samples"][hits[0]]) if hits.size else None


def rolling(y, window: int = SMOOTH):
    y = np.asarray(y, dtype=float)
    cumsum = np.cumsum(np.insert(y, 0, 0.0))
    out = np.empty_like(y)
    for i in range(len(y)):
        lo = max(0, i + 1 - window)
        out[i] = (cumsum[i + 1] - cumsum[lo]) / (i + 1 - lo)
    return out


def plot(report: dict, arms: list[Arm], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, summary = report["runs"], report["summary"]
    gated = [a for a in arms if a.gated]
    palette = {"grpo": "tab:gray", "pg": "tab:brown", "dg": "tab:blue"}
    cmap = plt.get_cmap("autumn")
    for i, arm in enumerate(gated):
        palette[arm.name] = cmap(i / max(1, len(gated)))
    fig, axes = plt.subplots(2, 2, figsize=(14, 10))
    panels = [(axes[0, 0], "samples", "generated completions"),
              (axes[0, 1], "backward_passes", "backward passes (micro-batches with forward + backward)"),
              (axes[1, 0], "update_seconds", "update-phase wall time (s; generation and optimizer excluded)")]
    for ax, key, xlabel in panels:
        for arm in arms:
            series = list(runs[arm.name].values())
            x = np.mean([r["curves"][key] for r in series], axis=0)
            y = np.mean([rolling(r["curves"]["success"]) for r in series], axis=0)
            ax.plot(x, y, color=palette[arm.name], label=arm.label, lw=2 if arm.name == "dg" else 1.3)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"training success (exact reversal, rolling {SMOOTH} steps)")
        ax.grid(alpha=0.3)
    axes[0, 0].set_title("(a) success vs samples (same budget for all arms)")
    axes[0, 1].set_title("(b) success vs backward passes")
    axes[1, 0].set_title("(c) success vs update-phase wall time")
    axes[0, 0].legend(fontsize=8, loc="upper left")

    ax = axes[1, 1]
    dg_passes = summary["dg"]["backward_passes"]["mean"] if "dg" in summary else None
    for arm in arms:
        s = summary[arm.name]
        x = s["backward_passes"]["mean"] / dg_passes if dg_passes else s["backward_passes"]["mean"]
        ax.errorbar(x, s["final_success"]["mean"], yerr=s["final_success"]["std"], fmt="o", ms=7, capsize=3,
                    color=palette[arm.name], label=arm.label)
        if "vs_dg" in s:
            time_ratio = 1 - s["vs_dg"]["update_wall_saving"]["mean"]
            ax.annotate(f"time x{time_ratio:.2f}", (x, s["final_success"]["mean"]), textcoords="offset points",
                        xytext=(6, -12), fontsize=8)
    frontier = sorted(((summary[a.name]["backward_passes"]["mean"] / (dg_passes or 1), summary[a.name]
                        ["final_success"]["mean"]) for a in arms if a.trainer == "delight"))
    ax.plot(*zip(*frontier), color="tab:blue", alpha=0.4, ls="--")
    if "dg" in summary:
        ax.axhline(report["config"]["keep_quality"] * summary["dg"]["final_success"]["mean"], color="tab:green",
                   ls=":", lw=1, label=f"{report['config']['keep_quality']:g} x DG's final success")
        ax.axvline(1 - report["config"]["skip_target"], color="tab:red", ls=":", lw=1,
                   label=f"{report['config']['skip_target']:g} of backward passes skipped")
    ax.set_xlabel("backward passes, fraction of DG's" if dg_passes else "backward passes")
    ax.set_ylabel("final success (last 10% of steps; mean +- std over seeds)")
    ax.set_title("(d) quality-cost frontier (annotation: update wall time vs DG)")
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)

    cfg = report["config"]
    fig.suptitle(f"DG and the Kondo gate on token reversal (H={cfg['length']}, M={cfg['alphabet']}): "
                 f"{cfg['steps']} steps x {cfg['batch']} completions, {len(cfg['seeds'])} seed(s), CPU", fontsize=12)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------------
CHOICES = {
    "task": "H=6, M=2 (64 distinct prompts; chance success 1/64). The demo world's tiny RoPE Llama learns reversal "
            "by SFT only after a phase transition (about 250-300 SFT steps of 32 examples for H=6, more than 350 for "
            "H=8). RL from a student before the transition (reward 0.5 = chance) made no progress in 300 steps x 64 "
            "completions with GRPO or DG, so the student is taken just past the transition: 300 SFT steps, success "
            "0.27, reward 0.80. Where the transition falls depends on the build: each step count is its own run (the "
            "learning-rate schedule spans the run), and near the transition a few steps more or less move the "
            "student a lot. With the models today's code builds (2026-11-23, AVX2) 285 steps gave success 0.058, "
            "290 0.091, 295 0.079, 300 0.271 and 310 0.085; 300 was chosen on these starting numbers alone, "
            "before any RL run from it. An earlier build (DEMO_VERSION 2, a cache written by earlier code) gave "
            "0.02-0.04 after 200, 250 and 275 steps, 0.15 after 285 and 0.44 after 300, and the previous reference "
            "used 285 (results/delight_previous_world.json). RL then has a signal but must do most of the work.",
    "learning_rate": "3e-4, egg's value, for every arm (Adam, constant, no clipping, as egg). 1e-3 and 5e-4 made "
                     "runs collapse (success 0.5 -> 0 within a few steps after a gradient-norm spike) more often.",
    "batch": "8 prompts x 8 completions = 64 per optimizer step, as 8 micro-batches of 8 (gradient accumulation 8). "
             "The gate skips whole micro-batches: survivors of an accumulation window are packed into as few as "
             "possible, so the skip granularity is one micro-batch (1/8 of the step). 8 x 8 gives exactly the same "
             "training trajectory as 4 x 16 (same generation batch and normalizer; verified: identical final "
             "success on --quick) but can skip 7/8 instead of 3/4 of the backward passes.",
    "final_success": "mean on-policy success over the last 10% of the steps (2,560 completions per run at the "
                     "defaults), so one late unstable step does not decide a run; the final policy's evaluation "
                     "on fresh samples is reported beside it (final_eval_success) with its own target verdicts.",
    "threads": "torch.set_num_threads(1): with 2 threads on the 2 shared cores, a 20-step DG run took 140-270 s "
               "instead of 3-5 s whenever other jobs were running.",
}


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet()
    started = time.perf_counter()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f}s] {msg}", flush=True)

    from transformers import AutoModelForCausalLM

    from trl_ext import demo

    arms = build_arms(args)
    task = register_task(args)
    recipe = demo.Pretraining(tasks=(task.name,), steps=args.pretrain_steps, seed=args.pretrain_seed)
    student = demo.pretrained_model(recipe)
    log(f"student {student} ready")
    initial = evaluate(AutoModelForCausalLM.from_pretrained(student), task, args, seed=0)
    log(f"initial student: success {initial['success']:.3f}, reward {initial['reward']:.3f}")
    report = {
        "benchmark": "delight",
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "environment": {**versions(), "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                        "platform": platform.platform(), "load_average_1min_at_start": os.getloadavg()[0]},
        "config": {
            "task": task.name, "length": args.length, "alphabet": args.alphabet, "steps": args.steps,
            "seeds": args.seed_list, "batch": args.batch, "micro_batch": args.micro_batch,
            "accumulation": args.accumulation, "generations": args.generations,
            "learning_rate": args.learning_rate, "samples_per_run": args.steps * args.batch,
            "price_rule": args.price_rule, "threads": args.threads,
            "pretraining": {"steps": args.pretrain_steps, "seed": args.pretrain_seed, "path": student},
            "eval_samples": args.eval_samples, "keep_quality": args.keep_quality, "skip_target": args.skip_target,
            "time_efficiency": args.time_efficiency, "quick": args.quick,
            "arms": {arm.name: {"label": arm.label, "trainer": arm.trainer, "overrides": arm.overrides}
                     for arm in arms},
            "choices": CHOICES,
            "definitions": {
                "success": "exact reversal. curves: the on-policy completions of each step (all of them, gated or "
                           "not); final_success: their mean over the last 10% of steps; final_eval_success: fresh "
                           "samples (T=1) of the final policy, every prompt when M^H <= eval_samples",
                "entropy": "TRL's logged entropy; with the gate it covers only the micro-batches that ran (the "
                           "survivors), so it is not comparable with the ungated arms",
                "backward_passes": "model forwards with gradients enabled (one per micro-batch that is not skipped)",
                "update_seconds": "wall time in training_step minus wall time in _prepare_inputs (generation, "
                                  "rewards, scoring, gate packing); the optimizer step is timed separately",
                "ideal_saving": "fraction of DG's backward passes that the gate arm skipped (same seed)",
            },
        },
        "initial_student": initial,
    }
    runs = {arm.name: {} for arm in arms}
    for seed in args.seed_list:
        # All arms of a seed train in lockstep (one optimizer step each, in turn): see Lockstep.
        trainers = [build_trainer(arm, seed, args, task, student) for arm in arms]
        lockstep = Lockstep(len(arms), [seed] * len(arms))
        trained = lockstep.run([lambda i: train(trainers[i], lockstep, i) for _ in arms])
        for arm, trainer, result, held in zip(arms, trainers, trained, lockstep.held):
            result["run_seconds"] = held  # the run's own time: the turns it held
            runs[arm.name][seed] = collect(arm, seed, trainer, result, args, task, log)
        trainers.clear()  # free this seed's models before the next seed builds its own
        report["runs"] = runs
        write_json(report, out_dir / f"{RESULT_NAME}.json")  # partial results survive an interruption
    report["summary"] = summarize(runs, arms)
    report["targets"] = targets(report["summary"], arms, args)
    report["runtime_seconds"] = time.perf_counter() - started
    report["environment"]["load_average_1min_at_end"] = os.getloadavg()[0]
    write_json(report, out_dir / f"{RESULT_NAME}.json")
    plot(report, arms, out_dir / f"{RESULT_NAME}.png")

    for arm in arms:
        s = report["summary"][arm.name]
        line = (f"{arm.name:>10s}: final success {s['final_success']['mean']:.3f} +- {s['final_success']['std']:.3f}, "
                f"backward passes {s['backward_passes']['mean']:.0f}, update {s['update_seconds']['mean']:.1f} s")
        if "vs_dg" in s and arm.gated:
            v = s["vs_dg"]
            line += (f"; vs DG: success x{v['success_ratio']:.3f}, skipped {v['backward_passes_skipped']['mean']:.1%}"
                     f", update time saved {v['update_wall_saving']['mean']:.1%} "
                     f"({v['wall_saving_over_ideal'] or 0:.2f} of ideal)")
        log(line)
    for name, target in report["targets"].items():
        if name != "all_met":
            log(f"target {name}: {'MET' if target['met'] else 'NOT met'}")
    log(f"wrote {out_dir / (RESULT_NAME + '.json')} and {out_dir / (RESULT_NAME + '.png')} "
        f"in {report['runtime_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
