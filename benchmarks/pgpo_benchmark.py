"""PGPO benchmark on the embedded demo world: GRPO vs SDPO vs PGPO, with correct and with partly misleading feedback.

What is compared (same self-teacher-capable student, data order, batch, learning rate, optimizer and number of
optimizer steps; only the method differs):

* GRPO: `trl.GRPOTrainer` (TRL's defaults, beta = 0).
* SDPO: `trl_ext.PGPOTrainer` with `step_size_modulation=False` (the official SDPO science-run defaults: JSD alpha 0.5,
  top-k with tail, EMA teacher 0.05, distillation only; top-k 20 because the demo vocabulary has 88 tokens).
* PGPO (verified / agreement / correction): the same plus the step-size multiplier with PGPOConfig's defaults, each
  information estimator in turn (everything else, including reference, exponent and bounds, identical).

Setting (defaults): the demo `arithmetic` task from `demo.self_teacher_path()`, a tiny model pretrained so that a
worked solution or the environment's feedback in its prompt lets it answer (~0.99 success with the answer shown,
~0.2 without). Every training prompt carries feedback ("expected <answer>"). In the "misleading" setting the feedback
source is wrong on a seeded `--misleading` share of optimizer batches: prompts are read in order
(`shuffle_dataset=False`) in blocks of one batch's prompts, so corrections are informative on some batches and
misleading on others. SDPO shows feedback only to groups without a successful sibling (official default). Each
setting runs at each of `--learning-rates` (constant): at the larger one SDPO's self-teacher loses its skill of
reading the context during training and SDPO collapses late (the failure PGPO's paper reports). At `--evals` points
each policy is evaluated on prompts WITHOUT feedback (the student's view; a separate draw, but training shows the same
small set of questions): success rate of `--eval-n` samples per prompt at temperature 1.

Reported per (setting, method), means over seeds: the eval success curve, best-within-run and final success (late
collapse = final < best - `--collapse-drop`), the training reward curve, the m_k and I_k trajectories, the
correlation between I_k and the share of the step's teacher contexts that came from misleading feedback, and the
wall time per optimizer step relative to GRPO (generation included, evaluation excluded; runs share the machine with
`--workers` parallel runs, so timings carry that noise).

Targets (from the issue; our operationalization): PGPO's final and best success >= SDPO's - `--tie` in every setting,
PGPO's final > SDPO's under misleading feedback, and no collapsed seed in any setting (in particular where SDPO
collapses).

    HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python benchmarks/pgpo_benchmark.py            # ~27 min on 2 cores
    HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python benchmarks/pgpo_benchmark.py --quick    # ~1 min smoke run

Writes `<out-dir>/pgpo.json` and `<out-dir>/pgpo.png` (default out-dir: benchmarks/results).
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
    map_in_processes, parse_seeds, quiet, versions, worker_evaluator, write_json,
)

RESULT_NAME = "pgpo"
METHODS = ("grpo", "sdpo", "pgpo-agreement", "pgpo-correction", "pgpo-verified")
LABELS = {"grpo": "GRPO", "sdpo": "SDPO", "pgpo-agreement": "PGPO (agreement)", "pgpo-correction": "PGPO (correction)",
          "pgpo-verified": "PGPO (verified)"}
COLORS = {"grpo": "tab:gray", "sdpo": "tab:orange", "pgpo-agreement": "tab:blue", "pgpo-correction": "tab:green",
          "pgpo-verified": "tab:purple"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="arithmetic")
    p.add_argument("--steps", type=int, default=1000,
                   help="optimizer steps per run (one rollout per step); 1000 is long enough for SDPO's late collapse "
                        "at both learning rates")
    p.add_argument("--seeds", type=str, default="3", help="number of seeds ('3' -> 0,1,2) or a list '0,5'")
    p.add_argument("--batch", type=int, default=32, help="completions per optimizer step")
    p.add_argument("--num-generations", type=int, default=4)
    p.add_argument("--learning-rates", type=str, default="1e-4,3e-4",
                   help="each setting runs at each of these constant learning rates (SDPO collapses at the larger)")
    p.add_argument("--misleading", type=float, default=0.5,
                   help="share of feedback blocks (default: of optimizer batches) whose feedback is wrong")
    p.add_argument("--block-size", type=int, default=None,
                   help="consecutive prompts sharing one feedback source (default: the prompts of one optimizer step, "
                        "read in order, so the feedback is reliable on some batches and misleading on others); 1 with "
                        "--shuffle gives independent rows")
    p.add_argument("--shuffle", action="store_true", help="shuffle the training prompts (TRL's default)")
    p.add_argument("--topk", type=int, default=20, help="distillation top-k (the demo vocabulary has 88 tokens)")
    p.add_argument("--methods", type=str, default=",".join(METHODS))
    p.add_argument("--settings", type=str, default="correct,misleading")
    p.add_argument("--pgpo-overrides", type=json.loads, default={},
                   help='JSON dict of extra PGPOConfig fields for the PGPO runs, e.g. \'{"multiplier_max": 3.0}\'')
    p.add_argument("--evals", type=int, default=10, help="evaluation points along the run (plus the initial model)")
    p.add_argument("--eval-prompts", type=int, default=128)
    p.add_argument("--eval-n", type=int, default=4)
    p.add_argument("--collapse-drop", type=float, default=0.15, help="final < best - this counts as a collapse")
    p.add_argument("--tie", type=float, default=0.02, help="'at least matches' tolerance on success rates")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workers", type=int, default=2, help="runs in parallel (processes)")
    p.add_argument("--quick", action="store_true", help="~1 minute smoke run")
    p.add_argument("--replot", type=str, default=None, metavar="JSON",
                   help="redraw the PNG beside a saved report from its JSON, without training")
    p.add_argument("--out-dir", type=str, default=str(REPO_ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.seeds, args.evals, args.eval_prompts, args.learning_rates = 12, "1", 2, 32, "3e-4"
    args.seed_list = parse_seeds(args.seeds)
    args.method_list = [m for m in args.methods.split(",") if m]
    args.lr_list = [float(x) for x in args.learning_rates.split(",") if x]
    args.setting_list = [f"{feedback} @ lr {lr:g}" for feedback in args.settings.split(",") if feedback
                         for lr in args.lr_list]
    if not set(args.method_list) <= set(METHODS):
        p.error(f"--methods must name a subset of {METHODS}")
    if args.block_size is None:
        args.block_size = args.batch // args.num_generations
    return args


# ----------------------------------------------------------------------------------------------------------------------
# evaluation: prompts without feedback (what the student sees at test time)
# ----------------------------------------------------------------------------------------------------------------------
class Evaluator:
    def __init__(self, args):
        from trl_ext import demo

        self.tokenizer = demo.build_tokenizer()
        # Its own seed, but training (seed 1) shows these questions too: the task has few distinct ones.
        rows = demo.get_task(args.task).dataset(args.eval_prompts, seed=10_001)
        texts = [self.tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
                 for p in rows["prompt"]]
        encoded = self.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left",
                                 add_special_tokens=False)
        self.input_ids, self.attention_mask = encoded["input_ids"], encoded["attention_mask"]
        self.answers, self.n = rows["answer"], args.eval_n

    @torch.no_grad()
    def __call__(self, model, seed: int = 0) -> float:
        was_training = model.training
        model.eval()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            out = model.generate(
                input_ids=self.input_ids.repeat_interleave(self.n, 0),
                attention_mask=self.attention_mask.repeat_interleave(self.n, 0),
                do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=4,
                eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
            )
        texts = self.tokenizer.batch_decode(out[:, self.input_ids.size(1):], skip_special_tokens=True)
        answers = [a for a in self.answers for _ in range(self.n)]
        model.train(was_training)
        return float(np.mean([t.strip() == a for t, a in zip(texts, answers)]))


# ----------------------------------------------------------------------------------------------------------------------
# one run
# ----------------------------------------------------------------------------------------------------------------------
def run_job(job) -> tuple:
    """One (setting, method, seed) run in a worker process."""
    setting, method, seed, args = job
    evaluator = worker_evaluator(args.threads, lambda: Evaluator(args))
    return setting, method, seed, run(method, setting, seed, args, evaluator, lambda m: print(m, flush=True))


def run(method: str, setting: str, seed: int, args, evaluator, log) -> dict:
    from transformers import PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from trl_ext import PGPOConfig, PGPOTrainer, demo

    feedback, lr = setting.split(" @ lr ")
    misleading = args.misleading if feedback == "misleading" else 0.0
    task = demo.get_task(args.task)
    data = demo.with_feedback(task.dataset(args.steps * args.batch // args.num_generations + 64, seed=1),
                              misleading_fraction=misleading, seed=seed, block_size=args.block_size)
    workdir = tempfile.mkdtemp(prefix=f"pgpo-bench-{method}-")
    common = dict(
        output_dir=workdir, max_steps=args.steps, per_device_train_batch_size=args.batch,
        num_generations=args.num_generations, learning_rate=float(lr), lr_scheduler_type="constant",
        max_completion_length=4, temperature=1.0, beta=0.0, seed=seed, logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False, disable_tqdm=True,
        shuffle_dataset=args.shuffle,
    )
    eval_every = max(1, args.steps // args.evals)
    evals = {"step": [0], "success": [evaluator(_load(demo, args), seed=seed)]}
    misleading_share = []  # per step: share of the teacher contexts that showed wrong feedback
    eval_seconds = [0.0]

    class Evaluate(TrainerCallback):
        def on_step_end(self, cb_args, state, control, model=None, **kwargs):
            if state.global_step % eval_every == 0 or state.global_step == args.steps:
                start = time.perf_counter()
                evals["step"].append(state.global_step)
                evals["success"].append(evaluator(model, seed=seed))
                eval_seconds[0] += time.perf_counter() - start

    if method == "grpo":
        trainer = GRPOTrainer(model=_load_path(demo, args), reward_funcs=[demo.task_reward],
                              args=GRPOConfig(**common), train_dataset=data)
    else:
        overrides = dict(args.pgpo_overrides) if method.startswith("pgpo") else {}
        config = PGPOConfig(**common, distillation_topk=args.topk, step_size_modulation=method != "sdpo",
                            information_estimator=method.split("-")[1] if method.startswith("pgpo") else "agreement",
                            **overrides)

        class Recording(PGPOTrainer):
            def _postprocess_rollout(self, inputs, rollout):
                rollout = super()._postprocess_rollout(inputs, rollout)
                contexts = self.last_contexts
                wrong = torch.tensor([not row["feedback_is_correct"] for row in inputs])
                shown_wrong = (contexts.use_feedback & wrong).sum().item()
                misleading_share.append(shown_wrong / max(1, contexts.usable.sum().item()))
                return rollout

        trainer = Recording(model=_load_path(demo, args), reward_funcs=[demo.task_reward], args=config,
                            train_dataset=data)
    trainer.add_callback(Evaluate())
    trainer.remove_callback(PrinterCallback)  # logging_steps=1 would print every step
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start - eval_seconds[0]
    history = trainer.state.log_history

    def series(key):
        return [h[key] for h in history if key in h]

    shutil.rmtree(workdir, ignore_errors=True)
    record = {
        "evals": evals,
        "train_reward": series("reward"),
        "multiplier": series("pgpo/multiplier"),
        "information": [h.get("pgpo/information") for h in history if "pgpo/multiplier" in h],
        "usable_context_fraction": series("pgpo/usable_context_fraction"),
        "misleading_share": misleading_share,
        "seconds_per_step": seconds / args.steps,
    }
    log(f"  {setting:10s} {method:16s} seed {seed}: success {evals['success'][0]:.3f} -> best "
        f"{max(evals['success']):.3f}, final {evals['success'][-1]:.3f}; {record['seconds_per_step'] * 1e3:.0f} ms/step")
    return record


def _load_path(demo, args) -> str:
    return demo.self_teacher_path(args.task)


def _load(demo, args):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(_load_path(demo, args))


# ----------------------------------------------------------------------------------------------------------------------
# summary, targets, plot
# ----------------------------------------------------------------------------------------------------------------------
def summarize(runs: dict, args) -> dict:
    summary = {}
    for setting, by_method in runs.items():
        summary[setting] = {}
        grpo_time = np.mean([r["seconds_per_step"] for r in by_method.get("grpo", [])]) if "grpo" in by_method else None
        for method, records in by_method.items():
            curves = np.array([r["evals"]["success"] for r in records])
            finals, bests = curves[:, -1], curves.max(1)
            entry = {
                "eval_steps": records[0]["evals"]["step"],
                "success_mean": curves.mean(0).tolist(),
                "final": float(finals.mean()), "best": float(bests.mean()),
                "final_per_seed": finals.tolist(), "best_per_seed": bests.tolist(),
                "collapsed_seeds": int(((bests - finals) > args.collapse_drop).sum()),
                "seconds_per_step": float(np.mean([r["seconds_per_step"] for r in records])),
            }
            if grpo_time:
                entry["cost_vs_grpo"] = entry["seconds_per_step"] / grpo_time
            if records[0]["multiplier"]:
                m = np.concatenate([r["multiplier"] for r in records])
                entry["multiplier"] = {"mean": float(m.mean()), "min": float(m.min()), "max": float(m.max()),
                                       "share_at_min": float((m <= m.min() + 1e-9).mean()),
                                       "share_at_max": float((m >= m.max() - 1e-9).mean())}
                shares = np.concatenate([r["misleading_share"][: len(r["multiplier"])] for r in records])
                info = np.concatenate([[np.nan if i is None else i for i in r["information"]] for r in records])
                ok = np.isfinite(info)
                if shares[ok].std() > 0:
                    entry["corr_information_vs_misleading_share"] = float(np.corrcoef(info[ok], shares[ok])[0, 1])
            summary[setting][method] = entry
    return summary


def targets(summary: dict, args) -> dict:
    out = {}
    for method in METHODS[2:]:
        checks = {}
        for setting, by_method in summary.items():
            if method not in by_method or "sdpo" not in by_method:
                continue
            pgpo, sdpo = by_method[method], by_method["sdpo"]
            checks[f"{setting}: final >= SDPO - tie"] = pgpo["final"] >= sdpo["final"] - args.tie
            checks[f"{setting}: best >= SDPO - tie"] = pgpo["best"] >= sdpo["best"] - args.tie
            if sdpo["collapsed_seeds"]:  # "never collapses where SDPO does"
                checks[f"{setting}: no collapse (SDPO collapsed on {sdpo['collapsed_seeds']} seeds)"] = (
                    pgpo["collapsed_seeds"] == 0)
            else:
                checks[f"{setting}: no collapse"] = pgpo["collapsed_seeds"] == 0
            if setting.startswith("misleading"):
                checks[f"{setting}: final > SDPO"] = pgpo["final"] > sdpo["final"]
        if checks:
            out[method] = {"checks": checks, "all_met": all(checks.values())}
    return out


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, summary = report["runs"], report["summary"]
    settings = list(runs)
    fig, axes = plt.subplots(3, len(settings), figsize=(6 * len(settings), 13), squeeze=False)
    for col, setting in enumerate(settings):
        ax = axes[0, col]
        for method, entry in summary[setting].items():
            ax.plot(entry["eval_steps"], entry["success_mean"], marker="o", color=COLORS[method], label=LABELS[method])
        ax.set(title=f"{setting}: evaluation success\n(no feedback in the prompt, T=1)", xlabel="optimizer step",
               ylabel="success rate")
        ax.legend()
        ax = axes[1, col]
        for method, records in runs[setting].items():
            rewards = np.mean([r["train_reward"] for r in records], 0)
            window = max(1, len(rewards) // 25)
            smooth = np.convolve(rewards, np.ones(window) / window, mode="valid")
            ax.plot(np.arange(len(smooth)) + window, smooth, color=COLORS[method], label=LABELS[method])
        ax.set(title=f"{setting}: training reward (moving mean)", xlabel="optimizer step", ylabel="reward")
        ax.legend()
        ax = axes[2, col]
        for method, records in runs[setting].items():
            if records[0]["multiplier"] and method != "sdpo":  # SDPO's m_k is 1 by construction
                m = np.mean([r["multiplier"] for r in records], 0)
                window = 25
                smooth = np.convolve(m, np.ones(window) / window, mode="valid")
                ax.plot(np.arange(len(smooth)) + window, smooth, color=COLORS[method], label=LABELS[method])
        costs = ", ".join(f"{LABELS[m]} {e['cost_vs_grpo']:.2f}x" for m, e in summary[setting].items()
                          if "cost_vs_grpo" in e and m != "grpo")
        ax.set(title=f"{setting}: step multiplier m_k (seed mean, moving mean of 25 steps)\ncost/step vs GRPO: {costs}",
               xlabel="optimizer step", ylabel="m_k")
        ax.title.set_fontsize(8)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.replot:
        report_path = Path(args.replot)
        plot(json.loads(report_path.read_text()), report_path.with_suffix(".png"))
        print(f"wrote {report_path.with_suffix('.png')}")
        return
    quiet()
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from trl_ext import demo

    def log(message):
        print(message, flush=True)

    start = time.perf_counter()
    demo.self_teacher_path(args.task)  # build the cached model once, outside the timings
    evaluator = Evaluator(args)
    jobs = [(setting, method, seed, args) for setting in args.setting_list for method in args.method_list
            for seed in args.seed_list]
    results = {}
    if args.workers > 1:
        for setting, method, seed, record in map_in_processes(run_job, jobs, args.workers):
            results[setting, method, seed] = record
    else:
        for setting, method, seed, _ in jobs:
            results[setting, method, seed] = run(method, setting, seed, args, evaluator, log)
    runs = {setting: {method: [results[setting, method, seed] for seed in args.seed_list]
                      for method in args.method_list} for setting in args.setting_list}
    summary = summarize(runs, args)
    report = {
        "config": {k: v for k, v in vars(args).items() if k != "out_dir"},
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "threads": args.threads},
        "versions": versions(),
        "summary": summary,
        "targets": targets(summary, args),
        "runs": runs,
        "wall_seconds": time.perf_counter() - start,
    }
    write_json(report, out_dir / f"{RESULT_NAME}.json")
    plot(report, out_dir / f"{RESULT_NAME}.png")
    for setting, by_method in summary.items():
        for method, entry in by_method.items():
            log(f"{setting:10s} {LABELS[method]:18s} best {entry['best']:.3f} final {entry['final']:.3f} "
                f"collapsed {entry['collapsed_seeds']}/{len(args.seed_list)} "
                f"cost {entry.get('cost_vs_grpo', float('nan')):.2f}x "
                f"corr(I, misleading) {entry.get('corr_information_vs_misleading_share', float('nan')):+.2f}")
    log(json.dumps(report["targets"], indent=1))
    log(f"wrote {out_dir / (RESULT_NAME + '.json')} and .png in {report['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
