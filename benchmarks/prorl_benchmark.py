"""ProRL benchmark on the embedded demo world: a long run of GRPO vs ProRL with the same budget of generated samples.

What is compared (same student, data, batch, optimizer and rollout reuse; the recipe differs, and each method runs at
the learning rates of its own grid):

* GRPO: `trl.GRPOTrainer` with TRL's defaults for the recipe knobs (symmetric clip 0.2, no KL, temperature 1.0,
  token-level "dapo" loss, no dynamic sampling).
* ProRL: `trl_ext.ProRLTrainer` with ProRLConfig's defaults (clip-higher 0.2/0.4, KL beta=1e-4 to a reference,
  temperature 1.2, dynamic sampling with refill, at most 10 generation rounds) plus a reference + optimizer reset
  every `--reset-every` optimizer steps.

Setting (defaults): the demo `reversal` task (reverse 5 symbols over an alphabet of 3) from the weak demo student,
trained on the binary exact-answer reward (`--reward success`, like the paper's math rewards; the student solves
~0.5% of samples, so ~94% of 16-sample groups are all-wrong and carry no signal: the regime dynamic sampling is
for), 16 samples per prompt, 64 completions per optimizer step and 4 optimizer steps per rollout (ProRL's
256/64 [S], so ratios move off 1 and the clip acts), constant learning rates. A run stops when it has
*generated* `--samples` completions, refill rounds included, so ProRL makes far fewer optimizer steps than GRPO for
the same sampling budget. At `--evals` points along the budget (and for the initial student), each policy is
evaluated on `--eval-prompts` evaluation prompts (a separate draw from the task's questions, which training
covers too) with `--eval-n` samples per prompt at temperature `--eval-temperature` (the same for both methods):

* pass@k for k = 1..16, from the n samples per prompt with the unbiased estimator 1 - C(n-c, k) / C(n, k)
  (Chen et al., 2021), averaged over prompts (success = exact reversal);
* the policy's mean per-token entropy on its own samples;
* the mean task reward (per-position accuracy).

Timing: wall time per optimizer step (training only, evaluation excluded) and, for ProRL, the time spent in refill
rounds (`DynamicSamplingResult.seconds_refilling`: extra generation + scoring + merge), reported as a share of
ProRL's step time, with the share of its samples spent on refill and the mean generation rounds per rollout.

The default budget, 358,400 samples (5,600 GRPO steps of 64), is "prolonged" for this task: ProRL makes ~1,400
optimizer steps. At a quarter of it (`--samples 89600`, the earlier reference kept as `results/prorl_short.json`)
ProRL made ~150 steps and its pass@1 was still rising at the end.

Learning rate: each method runs at every rate of its grid (`--grpo-learning-rates`, `--prorl-learning-rates`), and
the targets compare each method at its own best rate, the one with the highest mean final pass@1 (selected on the
evaluation it reports, the same optimistic tuning for both). One shared rate is not a fair baseline here: ProRL makes
a quarter of GRPO's optimizer steps for the same samples, so a rate that suits one recipe is too large or too small
for the other (benchmarks/README.md). The default grids hold each method's best rate strictly inside them.

Targets (from the issue; our operationalization): entropy does not collapse: no ProRL seed ends with eval entropy
below `--entropy-floor` x the initial student's while its pass@1 is below `--solved-pass-at-1` (each prompt has one
right answer, so a policy that solves the task must lose its entropy; that is not a collapse); ProRL's final pass@1
and pass@16 are higher than GRPO's (means over seeds); the refill overhead is reported. Each eval also records the
entropy on the prompts none of its samples solved (`entropy_unsolved_prompts`), where exploration is still needed.

Runs go `--workers` at a time in separate processes (results are identical to `--workers 1`; step times then carry
the noise of sharing the CPU). Torch runs single-threaded by default (`--threads 1`): on 2 shared cores, two threads
per process oversubscribe the CPU and run ~10x slower for this tiny model.
`--task arithmetic` is available but uninformative for pass@16: the student already reaches pass@16 ~ 1 there.

    HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python benchmarks/prorl_benchmark.py            # ~3 h (8 seeds, 9 rates)
    HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python benchmarks/prorl_benchmark.py --quick    # ~1 min smoke run
    HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python benchmarks/prorl_benchmark.py --from-json <prorl.json>
    # runs split over invocations (other rates, methods or seeds), merged and scored as one:
    PYTHONPATH=. .venv/bin/python benchmarks/prorl_benchmark.py --from-json a.json b.json --rescore-to c.json

Writes `<out-dir>/prorl.json` and `<out-dir>/prorl.png` (default out-dir: benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
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

from benchmarks._shared import (  # noqa: E402
    map_in_processes, paired_differences, parse_seeds, quiet, round_floats, versions, weights_sha256, worker_evaluator,
    write_json,
)

RESULT_NAME = "prorl"
METHODS = ("grpo", "prorl")
LABELS = {"grpo": "GRPO (TRL defaults)", "prorl": "ProRL"}
COLORS = {"grpo": "tab:gray", "prorl": "tab:blue", "initial": "black"}
K_VALUES = list(range(1, 17))
# Each method's learning-rate grid: its best rate (by mean final pass@1 of the reference run) lies strictly inside it.
DEFAULT_LEARNING_RATES = {"grpo": "5e-5,1e-4,2e-4,3e-4", "prorl": "1e-4,2e-4,3e-4,5e-4,1e-3"}


# ----------------------------------------------------------------------------------------------------------------------
# pass@k
# ----------------------------------------------------------------------------------------------------------------------
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al., 2021): 1 - C(n-c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per prompt, got n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


# ----------------------------------------------------------------------------------------------------------------------
# setup
# ----------------------------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="reversal", choices=["arithmetic", "reversal"])
    p.add_argument("--length", type=int, default=None,
                   help="reversal only: symbols per question (default: the demo task's 5); with --alphabet, a "
                        "variant registered as reversal-h<L>m<M>")
    p.add_argument("--alphabet", type=int, default=None, help="reversal only: alphabet size (default: the demo's 3)")
    p.add_argument("--student-steps", type=int, default=None,
                   help="SFT steps of the starting student on the task (default: the demo student, "
                        "demo.student_path)")
    p.add_argument("--reward", default="success", choices=["success", "task"],
                   help="training reward: 'success' = exact answer (binary, default), 'task' = the task's own reward")
    p.add_argument("--samples", type=int, default=64 * 5600,
                   help="generated completions per run, refill included (default 358400 = 5600 GRPO steps of 64; "
                        "the earlier short reference used 89600)")
    p.add_argument("--seeds", type=str, default="8", help="number of seeds ('8' -> 0..7) or a list '0,5'")
    p.add_argument("--batch", type=int, default=64, help="completions per optimizer step (default 64 = 4 prompts x 16)")
    p.add_argument("--num-generations", type=int, default=16)
    for method, grid in DEFAULT_LEARNING_RATES.items():
        p.add_argument(f"--{method}-learning-rates", type=str, default=None,
                       help=f"comma list of constant learning rates {LABELS[method]} runs at; the targets compare each "
                            f"method at its best rate (highest mean final pass@1) (default '{grid}', a grid whose "
                            "best rate is inside it; --quick: '3e-4')")
    p.add_argument("--steps-per-generation", type=int, default=4,
                   help="optimizer steps per rollout (ProRL: batch 256 / mini-batch 64 = 4 [S]); >1 makes the clip act")
    p.add_argument("--reset-every", type=int, default=20,
                   help="ProRL reference + optimizer reset period in optimizer steps (default 20: ~70 resets in the "
                        "default budget, ~7 in the short one)")
    p.add_argument("--prorl-overrides", type=json.loads, default={},
                   help='JSON dict of extra ProRLConfig fields, e.g. \'{"beta": 0.01}\' (default: none)')
    p.add_argument("--methods", type=str, default="grpo,prorl", help="subset to run (targets need both)")
    p.add_argument("--evals", type=int, default=8, help="evaluation points along the sample budget")
    p.add_argument("--eval-prompts", type=int, default=128)
    p.add_argument("--eval-n", type=int, default=32, help="samples per prompt for pass@k (>= 16)")
    p.add_argument("--eval-temperature", type=float, default=1.0)
    p.add_argument("--entropy-floor", type=float, default=0.5,
                   help="target: a seed has collapsed if its final entropy is below this fraction of the initial "
                        "student's while its pass@1 is below --solved-pass-at-1")
    p.add_argument("--solved-pass-at-1", type=float, default=0.5,
                   help="final pass@1 from which low entropy counts as the task being solved, not a collapse "
                        "(the right answer is then, on average, at least as likely as all wrong ones together)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workers", type=int, default=2, help="runs in parallel (processes; 1 = all in this process)")
    p.add_argument("--quick", action="store_true", help="~1 minute smoke run: small budget, 1 seed, small eval")
    p.add_argument("--out-dir", type=str, default=str(REPO_ROOT / "benchmarks" / "results"))
    p.add_argument("--from-json", type=str, nargs="+", default=None,
                   help="recompute the summary, targets and plot of saved prorl.json files with this version's "
                        "definitions and the target flags given here, no training. One file is rewritten in place "
                        "(and its .png); several, run with the same settings but other learning rates or seeds, are "
                        "merged into --rescore-to")
    p.add_argument("--rescore-to", type=str, default=None,
                   help="with --from-json: where the re-scored (merged) JSON goes, its plot beside it (default: the "
                        "single input file; required for several)")
    args = p.parse_args(argv)
    if args.quick:
        args.samples, args.seeds, args.evals, args.eval_prompts, args.eval_n = 64 * 160, "1", 2, 32, 16
        args.reset_every = 8
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not set(args.method_list) <= set(METHODS):
        p.error(f"--methods must name a subset of {METHODS}")
    args.seed_list = parse_seeds(args.seeds)
    args.lr_grid = {}
    for method, grid in DEFAULT_LEARNING_RATES.items():
        flag, text = f"--{method}-learning-rates", getattr(args, f"{method}_learning_rates")
        text = text if text is not None else ("3e-4" if args.quick else grid)
        try:
            rates = sorted({float(lr) for lr in text.split(",") if lr.strip()})
        except ValueError:
            p.error(f"{flag} must be a comma list of numbers, got {text!r}")
        if not rates or min(rates) <= 0:
            p.error(f"{flag} needs positive rates, got {text!r}")
        args.lr_grid[method] = rates
    if args.from_json and len(args.from_json) > 1 and not args.rescore_to:
        p.error("--from-json with several files merges them: name the output with --rescore-to")
    if (args.length or args.alphabet) and args.task != "reversal":
        p.error("--length/--alphabet apply to --task reversal only")
    if args.eval_n < max(K_VALUES):
        p.error(f"--eval-n must be >= {max(K_VALUES)} for pass@{max(K_VALUES)}")
    if args.batch % args.num_generations:
        p.error("--batch must be a multiple of --num-generations")
    return args


# ----------------------------------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------------------------------
class Evaluator:
    """pass@k, entropy and reward of a policy on fixed evaluation prompts (its own samples, fixed seed)."""

    def __init__(self, task: str, args):
        from trl_ext import demo

        self.task = demo.get_task(task)
        self.tokenizer = demo.build_tokenizer()
        rows = self.task.dataset(args.eval_prompts, seed=10_001)  # training (seed 1) has these questions too
        texts = [self.tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
                 for p in rows["prompt"]]
        encoded = self.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left",
                                 add_special_tokens=False)
        self.input_ids, self.attention_mask = encoded["input_ids"], encoded["attention_mask"]
        self.answers = rows["answer"]
        self.n, self.temperature = args.eval_n, args.eval_temperature
        self.max_new_tokens = max_completion_length(task)

    @torch.no_grad()
    def __call__(self, model, seed: int = 0, chunk_prompts: int = 32) -> dict:
        was_training = model.training
        model.eval()
        correct, rewards, sample_entropy, sample_tokens = [], [], [], []
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            for start in range(0, len(self.answers), chunk_prompts):
                ids = self.input_ids[start:start + chunk_prompts].repeat_interleave(self.n, 0)
                mask = self.attention_mask[start:start + chunk_prompts].repeat_interleave(self.n, 0)
                out = model.generate(
                    input_ids=ids, attention_mask=mask, do_sample=True, temperature=self.temperature, top_k=0,
                    top_p=1.0, max_new_tokens=self.max_new_tokens, output_logits=True, return_dict_in_generate=True,
                    eos_token_id=eos, pad_token_id=pad,
                )
                completions = out.sequences[:, ids.size(1):]
                logits = torch.stack(out.logits, dim=1)[:, : completions.size(1)].float() / self.temperature
                # Tokens up to and including the first EOS were sampled from the policy; the rest is padding.
                is_eos = completions == eos
                after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0
                active = ~after_eos
                logp = logits.log_softmax(-1)
                entropy = -(logp.exp() * logp).sum(-1)
                sample_entropy.extend((entropy * active).sum(1).tolist())
                sample_tokens.extend(active.sum(1).tolist())
                texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
                for i, text in enumerate(texts):
                    answer = self.answers[start + i // self.n]
                    correct.append(float(text.strip() == answer))
                    rewards.append(self.task.reward(text, answer))
        model.train(was_training)
        per_prompt = np.asarray(correct).reshape(-1, self.n).sum(1).astype(int)
        entropy_by_prompt = np.asarray(sample_entropy).reshape(-1, self.n).sum(1)
        tokens_by_prompt = np.asarray(sample_tokens).reshape(-1, self.n).sum(1)
        unsolved = per_prompt == 0
        return {
            "pass_at_k": [float(np.mean([pass_at_k(self.n, int(c), k) for c in per_prompt])) for k in K_VALUES],
            "entropy": float(entropy_by_prompt.sum() / max(tokens_by_prompt.sum(), 1)),
            # Entropy where exploration is still needed: on the prompts none of the n samples solved. A policy that
            # is sure of a wrong answer there has collapsed; on solved prompts low entropy is the answer learned.
            "entropy_unsolved_prompts": (
                float(entropy_by_prompt[unsolved].sum() / max(tokens_by_prompt[unsolved].sum(), 1))
                if unsolved.any() else None),
            "reward": float(np.mean(rewards)),
            "solved_prompts": int((per_prompt > 0).sum()),
        }


def max_completion_length(task: str) -> int:
    return 4 if task == "arithmetic" else 8  # longest answer + EOS, with a margin (reversal: up to 7 symbols)


def task_name(args) -> str:
    """The demo task trained on; a reversal of another shape is registered under its own name."""
    if args.task != "reversal" or not (args.length or args.alphabet):
        return args.task
    from trl_ext import demo

    default = demo.get_task("reversal")
    length, alphabet = args.length or default.length, args.alphabet or default.alphabet_size
    if length + 1 > max_completion_length("reversal"):
        raise SystemExit(f"--length {length} does not fit max_completion_length {max_completion_length('reversal')}")
    return demo.register_task(demo.Reversal(name=f"reversal-h{length}m{alphabet}", length=length,
                                            alphabet_size=alphabet)).name


def student_path(args) -> str:
    from trl_ext import demo

    if args.student_steps is None:
        return demo.student_path(args.task_name)
    return demo.pretrained_model(demo.Pretraining(tasks=(args.task_name,), steps=args.student_steps, seed=1))


# ----------------------------------------------------------------------------------------------------------------------
# training with a sample budget
# ----------------------------------------------------------------------------------------------------------------------
class CountingReward:
    """The training reward, counting every completion it scores (= every completion generated, refill included)."""

    def __init__(self, kind: str):
        from trl_ext import demo

        # "success": 1 for an exact answer (binary, as the paper's math rewards); "task": the task's own reward
        # (reversal: per-position accuracy, dense).
        self.reward = demo.task_success if kind == "success" else demo.task_reward
        self.__name__ = self.reward.__name__
        self.count = 0

    def __call__(self, completions, **kwargs):
        self.count += len(completions)
        return self.reward(completions, **kwargs)


def make_budget_callback(counter, budget: int, milestones: list[int], evaluate, record: dict):
    from transformers import TrainerCallback

    class SampleBudget(TrainerCallback):
        """Evaluates at sample milestones, times steps (evaluation excluded), stops at the sample budget."""

        def __init__(self):
            self.trainer = None
            self.next = 0
            self.step_started = 0.0
            self.last_result = None

        def on_step_begin(self, args, state, control, **kwargs):
            self.step_started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            record["step_seconds"].append(time.perf_counter() - self.step_started)
            record["samples_after_step"].append(counter.count)
            result = getattr(self.trainer, "last_dynamic_sampling", None)
            if result is not None and result is not self.last_result:  # a new rollout was generated this step
                self.last_result = result
                record["refill_seconds"].append(result.seconds_refilling)
                record["generation_rounds"].append(result.rounds)
                record["groups_masked"].append(result.selection.masked)
                record["informative_fraction"].append(result.informative_per_round[0] / len(result.selection.keep))
            while self.next < len(milestones) and counter.count >= milestones[self.next]:
                point = evaluate(self.trainer.model)
                point.update(step=state.global_step, samples=counter.count)
                record["evals"].append(point)
                self.next += 1
            if counter.count >= budget:
                control.should_training_stop = True

    return SampleBudget()


def lr_key(lr: float) -> str:
    """A learning rate as the JSON key of its runs ('0.0003')."""
    return f"{lr:g}"


def run(method: str, lr: float, seed: int, args, evaluator, initial: dict, log) -> dict:
    from transformers import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from trl_ext import demo
    from trl_ext.prorl import ProRLConfig, ProRLTrainer

    counter = CountingReward(args.reward)
    train = demo.get_task(args.task_name).dataset(max(4000, args.samples // args.num_generations), seed=1)
    common = dict(
        output_dir=tempfile.mkdtemp(prefix=f"prorl-bench-{method}-"),
        use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none", save_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0, logging_steps=10, seed=seed,
        per_device_train_batch_size=args.batch, num_generations=args.num_generations,
        max_completion_length=max_completion_length(args.task), learning_rate=lr,
        lr_scheduler_type="constant", steps_per_generation=args.steps_per_generation,
        max_steps=args.samples // args.batch + 1,  # the sample budget stops earlier
    )
    if method == "grpo":
        config = GRPOConfig(**common)  # epsilon=0.2 (symmetric), beta=0, temperature=1.0, loss_type="dapo"
        trainer = GRPOTrainer(model=student_path(args), reward_funcs=[counter], args=config,
                              train_dataset=train)
    else:
        config = ProRLConfig(**{**common, "ref_reset_steps": args.reset_every, **args.prorl_overrides})
        trainer = ProRLTrainer(model=student_path(args), reward_funcs=[counter], args=config,
                               train_dataset=train)
    record = {"evals": [dict(initial, step=0, samples=0)], "step_seconds": [], "samples_after_step": [],
              "refill_seconds": [], "generation_rounds": [], "groups_masked": [], "informative_fraction": []}
    milestones = [round(args.samples * (i + 1) / args.evals) for i in range(args.evals)]
    eval_seconds = []

    def timed_eval(model):
        started = time.perf_counter()
        point = evaluator(model, seed=seed)
        eval_seconds.append(time.perf_counter() - started)
        return point

    callback = make_budget_callback(counter, args.samples, milestones, timed_eval, record)
    callback.trainer = trainer
    trainer.add_callback(callback)
    trainer.remove_callback(PrinterCallback)  # keep the benchmark's own lines readable
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    shutil.rmtree(common["output_dir"], ignore_errors=True)
    record["config"] = {k: getattr(config, k) for k in ("epsilon", "epsilon_high", "beta", "temperature", "loss_type",
                                                        "num_generations", "learning_rate")}
    record["steps"] = trainer.state.global_step
    record["samples"] = counter.count
    record["wall_seconds"] = wall
    record["train_seconds"] = wall - sum(eval_seconds)
    record["train_log"] = [{k: v for k, v in entry.items() if k in ("step", "reward", "entropy", "kl", "prorl/kl",
                                                                     "prorl/resets", "frac_reward_zero_std")}
                           for entry in trainer.state.log_history if "reward" in entry]
    if method == "prorl":
        record["resets"] = trainer.reference_reset.history if trainer.reference_reset else []
    final = record["evals"][-1]
    log(f"{method:6s} lr {lr:g} seed {seed}: {record['steps']} steps, {counter.count} samples, "
        f"{record['train_seconds']:.0f} s train; pass@1 {initial['pass_at_k'][0]:.3f} -> {final['pass_at_k'][0]:.3f}, "
        f"pass@16 {initial['pass_at_k'][15]:.3f} -> {final['pass_at_k'][15]:.3f}, entropy {initial['entropy']:.3f} -> "
        f"{final['entropy']:.3f}")
    return record


# ----------------------------------------------------------------------------------------------------------------------
# summary, targets, plot
# ----------------------------------------------------------------------------------------------------------------------
def mean_initial(points: list[dict]) -> dict:
    """The initial student's evaluation averaged over seeds (pass@k per k, entropy, reward)."""
    return {"pass_at_k": np.mean([p["pass_at_k"] for p in points], axis=0).tolist(),
            **{key: float(np.mean([p[key] for p in points])) for key in ("entropy", "reward")}}


def summarize_runs(method: str, by_seed: dict) -> dict:
    """One method at one learning rate: final pass@k, entropy and reward over seeds, step counts and times, and for
    ProRL what refill cost."""
    finals = [r["evals"][-1] for r in by_seed.values()]
    summary = {
        "final_pass_at_k": np.mean([f["pass_at_k"] for f in finals], axis=0).tolist(),
        "final_pass_at_k_std_over_seeds": np.std([f["pass_at_k"] for f in finals], axis=0).tolist(),
        "final_entropy": float(np.mean([f["entropy"] for f in finals])),
        "final_entropy_per_seed": [f["entropy"] for f in finals],
        "final_pass_at_1_per_seed": [f["pass_at_k"][0] for f in finals],
        "final_pass_at_16_per_seed": [f["pass_at_k"][15] for f in finals],
        "seeds": [int(seed) for seed in by_seed],
        "final_entropy_unsolved_prompts_per_seed": [f.get("entropy_unsolved_prompts") for f in finals],
        "final_reward": float(np.mean([f["reward"] for f in finals])),
        "steps": float(np.mean([r["steps"] for r in by_seed.values()])),
        "mean_step_seconds": float(np.mean([np.mean(r["step_seconds"]) for r in by_seed.values()])),
        "train_seconds": float(np.mean([r["train_seconds"] for r in by_seed.values()])),
    }
    if method == "prorl":
        refill = [sum(r["refill_seconds"]) for r in by_seed.values()]
        steps_time = [sum(r["step_seconds"]) for r in by_seed.values()]
        summary["refill_seconds_total"] = float(np.mean(refill))
        summary["refill_share_of_step_time"] = float(np.mean([a / b for a, b in zip(refill, steps_time)]))
        rounds = np.concatenate([r["generation_rounds"] for r in by_seed.values()])
        summary["mean_generation_rounds_per_rollout"] = float(rounds.mean())
        summary["share_of_rollouts_with_refill"] = float((rounds > 1).mean())
        summary["share_of_samples_spent_on_refill"] = float(1.0 - 1.0 / rounds.mean())
        summary["groups_masked_total"] = float(np.mean([sum(r["groups_masked"]) for r in by_seed.values()]))
        summary["mean_first_round_informative_fraction"] = float(np.mean(np.concatenate(
            [r["informative_fraction"] for r in by_seed.values()])))
    return summary


def summarize(runs: dict, initial: dict) -> dict:
    """Every (method, learning rate), and each method at its selected rate: the highest mean final pass@1 of the grid.

    The selection uses the same final evaluation it reports, the same optimistic tuning for both methods; without it
    a rate that suits one recipe and not the other decides the comparison (see benchmarks/README.md)."""
    seed_sets = {(m, lr): sorted(by_seed) for m in METHODS for lr, by_seed in runs[m].items()}
    if len({tuple(seeds) for seeds in seed_sets.values()}) > 1:
        raise SystemExit(f"every (method, learning rate) needs the same seeds to be compared, got {seed_sets}")
    by_lr = {m: {lr: summarize_runs(m, runs[m][lr]) for lr in sorted(runs[m], key=float)} for m in METHODS}
    selected = {m: max(by_lr[m], key=lambda lr, m=m: (by_lr[m][lr]["final_pass_at_k"][0], -float(lr)))
                for m in METHODS}
    out = {m: {"learning_rate": float(selected[m]), **by_lr[m][selected[m]]} for m in METHODS}
    out["by_learning_rate"] = by_lr
    out["initial"] = {"pass_at_k": initial["pass_at_k"], "entropy": initial["entropy"], "reward": initial["reward"]}
    return out


def targets(summary: dict, args) -> dict:
    """The issue's targets, each method at its selected learning rate; the grid's other rates are listed beside."""
    grpo, prorl, initial = summary["grpo"], summary["prorl"], summary["initial"]
    by_lr = summary["by_learning_rate"]
    floor = args.entropy_floor * initial["entropy"]

    def collapsed(method: dict) -> list[bool]:
        # Entropy collapse = near-deterministic without being right. The task has one right answer per prompt, so a
        # policy that solves it must lose its entropy; falling below the floor counts only while pass@1 is low.
        return [bool(h < floor and p1 < args.solved_pass_at_1)
                for h, p1 in zip(method["final_entropy_per_seed"], method["final_pass_at_1_per_seed"])]

    def higher(k: int) -> dict:
        # The target compares means; the seed-paired difference says how far that comparison is from noise.
        per_seed = f"final_pass_at_{k}_per_seed"
        return {
            "met": bool(prorl["final_pass_at_k"][k - 1] > grpo["final_pass_at_k"][k - 1]),
            "prorl": prorl["final_pass_at_k"][k - 1], "grpo": grpo["final_pass_at_k"][k - 1],
            "initial": initial["pass_at_k"][k - 1],
            "prorl_minus_grpo_paired_by_seed": paired_differences(
                [a - b for a, b in zip(prorl[per_seed], grpo[per_seed], strict=True)]),
            "prorl_learning_rate": prorl["learning_rate"], "grpo_learning_rate": grpo["learning_rate"],
            "at_each_learning_rate": {method: {lr: s["final_pass_at_k"][k - 1] for lr, s in by_lr[method].items()}
                                      for method in METHODS},
        }

    prorl_collapsed = collapsed(prorl)
    out = {
        "prorl_entropy_does_not_collapse": {
            "met": not any(prorl_collapsed),
            "prorl_learning_rate": prorl["learning_rate"], "grpo_learning_rate": grpo["learning_rate"],
            "prorl_collapsed_seeds": sum(prorl_collapsed), "grpo_collapsed_seeds": sum(collapsed(grpo)),
            "collapsed_seeds_at_each_learning_rate": {method: {lr: sum(collapsed(s)) for lr, s in by_lr[method].items()}
                                                      for method in METHODS},
            "prorl_final_entropy_per_seed": prorl["final_entropy_per_seed"],
            "grpo_final_entropy_per_seed": grpo["final_entropy_per_seed"],
            "prorl_final_entropy": prorl["final_entropy"], "grpo_final_entropy": grpo["final_entropy"],
            "initial_entropy": initial["entropy"], "floor": floor, "solved_pass_at_1": args.solved_pass_at_1,
            "definition": f"no ProRL seed ends with eval entropy < {args.entropy_floor} x the initial student's while "
                          f"its pass@1 < {args.solved_pass_at_1} (below that entropy with pass@1 at or above it, "
                          "the single right answer is being learned, not a collapse)",
        },
        "prorl_higher_final_pass_at_1": higher(1),
        "prorl_higher_final_pass_at_16": higher(16),
        "refill_overhead_reported": {
            "met": True,
            "refill_share_of_prorl_step_time": prorl["refill_share_of_step_time"],
            "share_of_prorl_samples_spent_on_refill": prorl["share_of_samples_spent_on_refill"],
            "prorl_mean_step_seconds": prorl["mean_step_seconds"],
            "grpo_mean_step_seconds": grpo["mean_step_seconds"],
            "step_time_ratio_prorl_over_grpo": prorl["mean_step_seconds"] / grpo["mean_step_seconds"],
        },
    }
    out["all_met"] = all(v["met"] for v in out.values())
    return out


def finish_axes(ax, xlabel: str, ylabel: str, title: str) -> None:
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def plot_grid(axes, report: dict) -> None:
    """Panels (e) and (f): final pass@k and per-seed entropy over each method's learning-rate grid."""
    summary = report["summary"]
    by_lr = summary["by_learning_rate"]
    ax = axes[0]
    for method in METHODS:
        rates = sorted(by_lr[method], key=float)
        for k, style in ((1, "-"), (16, "--")):
            ax.plot([float(lr) for lr in rates], [by_lr[method][lr]["final_pass_at_k"][k - 1] for lr in rates], style,
                    color=COLORS[method], marker="o", ms=4, label=f"{LABELS[method]} pass@{k}")
        chosen = summary[method]
        ax.scatter([chosen["learning_rate"]], [chosen["final_pass_at_k"][0]], s=140, facecolors="none",
                   edgecolors=COLORS[method], linewidths=2)
    ax.set_xscale("log")
    finish_axes(ax, "learning rate (constant)", "final pass@k (mean over seeds)",
                "(e) learning-rate grid; circled: each method's selected rate")

    ax = axes[1]
    collapsed = report["targets"]["prorl_entropy_does_not_collapse"]["collapsed_seeds_at_each_learning_rate"]
    for offset, method in zip((0.96, 1.04), METHODS):
        for lr in sorted(by_lr[method], key=float):
            seeds = by_lr[method][lr]["final_entropy_per_seed"]
            ax.scatter([float(lr) * offset] * len(seeds), seeds, color=COLORS[method], s=12, alpha=0.7,
                       label=LABELS[method] if lr == min(by_lr[method], key=float) else None)
            ax.text(float(lr) * offset, 0.97, f"{collapsed[method][lr]} collapsed", transform=ax.get_xaxis_transform(),
                    fontsize=7, color=COLORS[method], ha="center", va="top", rotation=90)
    ax.axhline(report["targets"]["prorl_entropy_does_not_collapse"]["floor"], color="tab:red", ls=":", lw=1,
               label="collapse floor")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.35 * max(max(s["final_entropy_per_seed"]) for by in by_lr.values() for s in by.values()))
    finish_axes(ax, "learning rate (constant)", "final entropy per seed", "(f) final entropy per seed over the grid")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = report["summary"]
    # Panels (a)-(d): each method at its selected learning rate; (e)-(f), when some method ran several: the grid.
    runs = {m: report["runs"][m][lr_key(summary[m]["learning_rate"])] for m in METHODS}
    label = {m: f"{LABELS[m]}, lr {summary[m]['learning_rate']:g}" for m in METHODS}
    by_lr = summary["by_learning_rate"]
    several_rates = any(len(by_lr[m]) > 1 for m in METHODS)
    fig, axes = plt.subplots(2, 3 if several_rates else 2, figsize=(19 if several_rates else 13, 9))

    def curve(method, key):
        series = [r["evals"] for r in runs[method].values()]
        x = np.mean([[e["samples"] for e in s] for s in series], axis=0)
        y = np.array([[key(e) for e in s] for s in series])
        return x, y.mean(0), y.min(0), y.max(0)

    ax = axes[0, 0]
    for method in METHODS:
        for k, style in ((1, "-"), (16, "--")):
            x, y, lo, hi = curve(method, lambda e, k=k: e["pass_at_k"][k - 1])
            ax.plot(x, y, style, color=COLORS[method], marker="o", ms=3, label=f"{label[method]} pass@{k}")
            if len(runs[method]) > 1:
                ax.fill_between(x, lo, hi, color=COLORS[method], alpha=0.1)
    finish_axes(ax, "generated samples (refill included)", "pass@k on the evaluation prompts",
                "(a) pass@1 and pass@16 over training, same sample budget")

    ax = axes[0, 1]
    for method in METHODS:
        x, y, lo, hi = curve(method, lambda e: e["entropy"])
        ax.plot(x, y, color=COLORS[method], marker="o", ms=3, label=label[method])
        if len(runs[method]) > 1:
            ax.fill_between(x, lo, hi, color=COLORS[method], alpha=0.1)
    ax.axhline(report["targets"]["prorl_entropy_does_not_collapse"]["floor"], color="tab:red", ls=":", lw=1,
               label=f"collapse floor ({report['config']['entropy_floor']} x initial; counts while pass@1 < "
                     f"{report['config']['solved_pass_at_1']})")
    finish_axes(ax, "generated samples",
                f"per-token entropy of own samples (T={report['config']['eval_temperature']})", "(b) policy entropy")

    ax = axes[1, 0]
    ax.plot(K_VALUES, summary["initial"]["pass_at_k"], color=COLORS["initial"], ls=":", marker=".",
            label="initial student")
    for method in METHODS:
        ax.errorbar(K_VALUES, summary[method]["final_pass_at_k"],
                    yerr=summary[method]["final_pass_at_k_std_over_seeds"],
                    color=COLORS[method], marker="o", ms=3, capsize=2, label=f"{label[method]} (final)")
    ax.set_xscale("log", base=2)
    ax.set_xticks([1, 2, 4, 8, 16], ["1", "2", "4", "8", "16"])
    finish_axes(ax, "k", "pass@k", "(c) final pass@k, k = 1..16 (mean +- std over seeds)")

    ax = axes[1, 1]
    g, p = summary["grpo"], summary["prorl"]
    refill = p["refill_seconds_total"] / max(p["steps"], 1)
    bars = ax.bar(["GRPO step", "ProRL step"], [g["mean_step_seconds"], p["mean_step_seconds"]],
                  color=[COLORS["grpo"], COLORS["prorl"]], alpha=0.7)
    ax.bar(["ProRL step"], [refill], color="tab:orange", alpha=0.8, label="of which refill rounds")
    for bar, v in zip(bars, [g["mean_step_seconds"], p["mean_step_seconds"]]):
        ax.text(bar.get_x() + bar.get_width() / 2, v, f"{1e3 * v:.0f} ms", ha="center", va="bottom", fontsize=9)
    ax.text(0.02, 0.97,
            f"ProRL: {p['mean_generation_rounds_per_rollout']:.2f} generation rounds/rollout, refill in "
            f"{100 * p['share_of_rollouts_with_refill']:.0f}% of rollouts\n"
            f"refill = {100 * p['refill_share_of_step_time']:.0f}% of ProRL step time, "
            f"{100 * p['share_of_samples_spent_on_refill']:.0f}% of its samples\n"
            f"optimizer steps for the budget: GRPO {g['steps']:.0f}, ProRL {p['steps']:.0f}",
            transform=ax.transAxes, va="top", fontsize=8)
    ax.set_ylabel("mean wall time per optimizer step (s, eval excluded)")
    ax.set_title("(d) cost of dynamic sampling (refill)")
    ax.set_ylim(0, max(g["mean_step_seconds"], p["mean_step_seconds"]) * 1.45)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3, axis="y")

    if several_rates:
        plot_grid(axes[:, 2], report)

    cfg = report["config"]
    fig.suptitle(f"ProRL vs GRPO on the demo {cfg['task']} task: {cfg['samples']} generated samples per run, "
                 f"{len(cfg['seeds'])} seed(s), learning rates "
                 + "; ".join(f"{m} {', '.join(f'{lr:g}' for lr in cfg['learning_rates'][m])}" for m in METHODS)
                 + ", CPU", fontsize=12)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def run_job(job) -> tuple:
    """One (method, lr, seed) run in a worker process; task_name() registers a --length/--alphabet variant there too."""
    method, lr, seed, args, initial = job
    evaluator = worker_evaluator(args.threads, lambda: Evaluator(task_name(args), args))
    return method, lr, seed, run(method, lr, seed, args, evaluator, initial,
                                 lambda msg: print(f"[worker {os.getpid()}] {msg}", flush=True))


def run_jobs(jobs: list, workers: int, evaluator, log):
    """Yields (method, lr, seed, record) as runs finish: in this process, or `workers` at a time in spawned processes.

    Runs are deterministic per seed either way; parallel runs share the CPU, so their step times carry that noise
    (the refill share is a ratio within one run and is less affected)."""
    if workers <= 1:
        for method, lr, seed, args, initial in jobs:
            yield method, lr, seed, run(method, lr, seed, args, evaluator, initial, log)
        return
    yield from map_in_processes(run_job, jobs, workers)


# Config entries that may differ between saved runs that are merged: what ran (rates, seeds), how many at a time,
# scoring flags re-applied here, and the prose descriptions of the methods and of pass@k.
MERGEABLE_CONFIG = ("learning_rate", "learning_rates", "seeds", "workers", "entropy_floor", "solved_pass_at_1",
                    "methods", "pass_at_k", "student", "student_weights_sha256")


def student_weights(config: dict) -> str | None:
    """The sha256 of a report's student weights: recorded, or (older reports hold none) read from the cache while it
    still holds the student."""
    return config.get("student_weights_sha256") or weights_sha256(config.get("student"))


def same_student(config: dict, other: dict) -> bool:
    """Whether two runs started from the same student: the same cache entry, or bit-identical weights under another
    key (the key also hashes the code that builds the model, so an unrelated edit to that code renames an unchanged
    model). `config` has its hash filled in already."""
    if config.get("student") == other.get("student"):
        return True
    mine = config["student_weights_sha256"]
    return mine is not None and mine == student_weights(other)


def in_order(runs: dict) -> dict:
    """{method: {lr: {seed: record}}} with every method, rates ascending, seeds ascending and no empty cell (seeds
    are ints in a run, strings once read back from JSON)."""
    return {method: {lr: dict(sorted(by_seed.items(), key=lambda item: int(item[0])))
                     for lr, by_seed in sorted(runs.get(method, {}).items(), key=lambda item: float(item[0]))
                     if by_seed}
            for method in METHODS}


def load_runs(path: Path) -> tuple[dict, dict]:
    """A saved report and its runs as {method: {lr: {seed: record}}}; files written before the learning-rate grid
    keyed runs by seed only, under config["learning_rate"]."""
    report = json.loads(path.read_text())
    runs = report["runs"]
    if any("evals" in record for by_key in runs.values() for record in by_key.values()):
        runs = {method: {lr_key(report["config"]["learning_rate"]): by_seed} for method, by_seed in runs.items()}
    return report, runs


def rescore(paths: list[Path], out: Path, args) -> int:
    """--from-json: the summary, targets and plot of saved runs, recomputed (the initial student is the runs' own).

    Several files are merged when they were run with the same settings apart from MERGEABLE_CONFIG; runs are
    deterministic per (method, lr, seed), so a merge scores what one invocation over the union would (step times
    aside, which carry each invocation's CPU load)."""
    def source(path: Path, saved: dict) -> dict:
        return {"file": str(path), **{k: saved.get(k) for k in ("command", "created", "runtime_seconds")}}

    report, runs = load_runs(paths[0])
    report["config"]["student_weights_sha256"] = student_weights(report["config"])
    sources = [source(paths[0], report)]
    fixed = {k: v for k, v in report["config"].items() if k not in MERGEABLE_CONFIG}
    for path in paths[1:]:
        other, other_runs = load_runs(path)
        differing = sorted(k for k in set(fixed) | set(other["config"])
                           if k not in MERGEABLE_CONFIG and fixed.get(k) != other["config"].get(k))
        if not same_student(report["config"], other["config"]):
            differing.append("student (different weights, or unknown: not in the report and not cached)")
        if differing:
            raise SystemExit(f"--from-json: {path} was run with other settings ({', '.join(differing)}); "
                             f"only runs that differ in {MERGEABLE_CONFIG} can be merged")
        for method, by_lr in other_runs.items():
            for lr, by_seed in by_lr.items():
                twice = set(by_seed) & set(runs.get(method, {}).get(lr, {}))
                if twice:
                    raise SystemExit(f"--from-json: {method} at lr {lr} seeds {sorted(twice)} are in two files")
                runs.setdefault(method, {}).setdefault(lr, {}).update(by_seed)
        sources.append(source(path, other))
    runs = in_order(runs)
    if len(paths) > 1:
        report["merged_from"] = sources
        # A merged file's commands (a list) are the invocations that made its runs, merged files flattened.
        report["command"] = [command for s in sources
                             for command in (s["command"] if isinstance(s["command"], list) else [s["command"]])]
        report.pop("runtime_seconds", None)  # each source's is kept in merged_from
    report["runs"] = runs
    initial = mean_initial([r["evals"][0] for by_lr in runs.values() for by_seed in by_lr.values()
                            for r in by_seed.values()])
    report["config"].pop("learning_rate", None)
    report["config"].update(entropy_floor=args.entropy_floor, solved_pass_at_1=args.solved_pass_at_1,
                            learning_rates={m: sorted(float(lr) for lr in runs[m]) for m in METHODS},
                            seeds=sorted({int(seed) for by_lr in runs.values() for by_seed in by_lr.values()
                                          for seed in by_seed}))
    report["summary"] = summarize(runs, initial)
    report["targets"] = targets(report["summary"], args)
    write_json(report, out)
    plot(report, out.with_suffix(".png"))
    print(json.dumps(round_floats(report["targets"]), indent=1))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_json:
        return rescore([Path(f) for f in args.from_json], Path(args.rescore_to or args.from_json[0]), args)
    torch.set_num_threads(args.threads)
    quiet()
    started = time.perf_counter()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f}s] {msg}", flush=True)

    from transformers import AutoModelForCausalLM

    args.task_name = task_name(args)
    student = student_path(args)
    evaluator = Evaluator(args.task_name, args)
    report = {
        "benchmark": "prorl",
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "environment": {**versions(), "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                        "platform": platform.platform(), "load_average_1min_at_start": os.getloadavg()[0]},
        "config": {
            "task": args.task_name, "student_steps": args.student_steps, "reward": args.reward,
            "samples": args.samples, "seeds": args.seed_list,
            "batch": args.batch,
            "num_generations": args.num_generations, "learning_rates": args.lr_grid,
            "steps_per_generation": args.steps_per_generation,
            "reset_every": args.reset_every, "prorl_overrides": args.prorl_overrides, "evals": args.evals,
            "eval_prompts": args.eval_prompts,
            "eval_n": args.eval_n, "eval_temperature": args.eval_temperature, "entropy_floor": args.entropy_floor,
            "solved_pass_at_1": args.solved_pass_at_1, "workers": args.workers,
            "quick": args.quick, "student": student, "student_weights_sha256": weights_sha256(student),
            "methods": {
                "grpo": "trl.GRPOTrainer, GRPOConfig defaults for the recipe (epsilon=0.2, beta=0, temperature=1.0, "
                        "loss_type='dapo'), same batch, learning-rate grid, constant schedule",
                "prorl": "trl_ext.ProRLTrainer, ProRLConfig defaults (epsilon 0.2/0.4, beta=1e-4, temperature=1.2, "
                         "dynamic_sampling='refill', max 10 rounds) + ref_reset_steps=reset_every + prorl_overrides",
            },
            "pass_at_k": "unbiased estimator from eval_n samples per evaluation prompt (a separate draw from the "
                         "task's questions, which training covers too), exact-match success",
        },
    }
    runs = {}
    initial_by_seed = {}
    for seed in args.seed_list:
        initial_by_seed[seed] = evaluator(AutoModelForCausalLM.from_pretrained(student), seed=seed)
        log(f"initial student (seed {seed}): pass@1 {initial_by_seed[seed]['pass_at_k'][0]:.3f}, pass@16 "
            f"{initial_by_seed[seed]['pass_at_k'][15]:.3f}, entropy {initial_by_seed[seed]['entropy']:.3f}")
    jobs = [(method, lr, seed, args, initial_by_seed[seed])
            for seed in args.seed_list for method in args.method_list for lr in args.lr_grid[method]]
    for method, lr, seed, record in run_jobs(jobs, args.workers, evaluator, log):
        runs.setdefault(method, {}).setdefault(lr_key(lr), {})[seed] = record
        runs = in_order(runs)  # runs finish in any order
        report["runs"] = runs
        write_json(report, out_dir / f"{RESULT_NAME}.json")  # partial results survive an interruption
    initial = mean_initial([initial_by_seed[s] for s in args.seed_list])
    if set(args.method_list) != set(METHODS):
        log("not all methods ran: no summary, targets or plot")
        return 0
    report["summary"] = summarize(runs, initial)
    report["targets"] = targets(report["summary"], args)
    report["runtime_seconds"] = time.perf_counter() - started
    write_json(report, out_dir / f"{RESULT_NAME}.json")
    plot(report, out_dir / f"{RESULT_NAME}.png")

    s = report["summary"]
    for method in METHODS:
        for lr, m in s["by_learning_rate"][method].items():
            chosen = " (selected)" if float(lr) == s[method]["learning_rate"] else ""
            log(f"{method:6s} lr {lr}{chosen}: final pass@1 {m['final_pass_at_k'][0]:.3f}, pass@4 "
                f"{m['final_pass_at_k'][3]:.3f}, pass@16 {m['final_pass_at_k'][15]:.3f}, entropy "
                f"{m['final_entropy']:.3f}, {m['steps']:.0f} steps, {1e3 * m['mean_step_seconds']:.0f} ms/step")
    p = s["prorl"]
    log(f"refill: {p['mean_generation_rounds_per_rollout']:.2f} rounds/rollout, "
        f"{100 * p['refill_share_of_step_time']:.0f}% "
        f"of ProRL step time, {100 * p['share_of_samples_spent_on_refill']:.0f}% of its samples")
    for name, t in report["targets"].items():
        if isinstance(t, dict):
            log(f"target {name}: {'MET' if t['met'] else 'NOT MET'}")
    log(f"wrote {out_dir / (RESULT_NAME + '.json')} and {out_dir / (RESULT_NAME + '.png')} in "
        f"{report['runtime_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
