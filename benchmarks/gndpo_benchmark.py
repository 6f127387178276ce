"""GNDPO benchmark on the embedded demo world: stability, reward and cost against plain OPD and GRPO.

Two parts, one command, 2 CPU cores: about 6 minutes with the defaults on an idle machine, 14 minutes measured with
other jobs keeping the load at ~5.5 (`--quick`: 1-2 minutes, its timing is a smoke test only):

1. Same budget (steps, prompts, samples per prompt, optimizer) for three methods on the arithmetic demo task:
   GRPO (`trl.GRPOTrainer`, task reward), plain on-policy distillation (OPD: `GNDPOConfig(advantage_normalization=
   "none")`) and GNDPO (`advantage_normalization="global"`). Per step we record the task reward of the sampled
   completions and the pre-clip gradient norm (`grad_norm` in `trainer.state.log_history`). Gradient clipping is
   off by default (`--max-grad-norm 1e9`), so the norms are the steps each method actually takes.

   OPD and GNDPO are run with two teachers:
   * `outlier` (the stability test): the demo teacher made extremely over-confident on a few states, the failure
     mode of OPD that GNDPO's paper targets. On every completion position of the questions whose first operand is
     `--outlier-operand` (7: 10% of the questions) its logits are multiplied by `--outlier-scale` (8); elsewhere
     they are divided by `--base-temperature` (default 1: unchanged). Its answers (argmax) are unchanged: it is
     over-confident there, not wrong. The LM head has no bias, so scaling the hidden state that enters it scales the
     logits exactly; two forward hooks on the teacher instance do it (nothing under `trl_ext/` is changed), and the
     instance is passed as `teacher_model`. The raw log-ratios on those states reach -150, but the +-5 score clip
     caps them like any other wrong token: the JSON's `teacher_diagnostics` reports how many sampled tokens each
     teacher puts beyond the clip (the demo teacher alone already puts ~18% there).
   * `clean` (control): the demo teacher as it is.

2. Cost of GNDPOTrainer over GRPOTrainer on the same student, each trainer in a fresh subprocess (so the peak
   memory is its own), repeated with alternating order: median time per optimizer step (`on_step_begin` to
   `on_step_end`: generation, rewards, teacher and student scoring, forward/backward, optimizer; logging
   excluded), peak RSS of the training phase, and, inside the GNDPO run, the time of the teacher's forward pass and
   of the student's extra no-grad forward pass (GNDPO needs pi_old log-probs, which TRL does not compute when
   generation and optimization are aligned). Both run at `learning_rate=0`, so the policy, and with it the
   completion lengths, are the same.

Targets checked (issue text): GNDPO's max gradient norm well below OPD's under outliers (here: at most
`--stability-ratio` = half) with equal or better final reward (within `--reward-tolerance`), and a per-step
overhead over GRPO no larger than the teacher's forward pass.

    HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python benchmarks/gndpo_benchmark.py            # ~6-15 min
    HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python benchmarks/gndpo_benchmark.py --quick    # smoke run

Writes `<out-dir>/gndpo.json` and `<out-dir>/gndpo.png` (default out-dir: benchmarks/results).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Idle OpenMP threads sleep instead of spinning. On a shared 2-core machine, spinning threads of several processes
# (each with 2 threads) starve each other: we measured 0.8 s per GRPO step instead of 0.07 s under a load of ~9.
# Must be set before torch is imported; an explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks._shared import parse_seeds, quiet, versions, write_json  # noqa: E402

NUM_THREADS = 2
RESULT_NAME = "gndpo"

# The training settings shared by every method (CPU-sized; see the module docstring).
COMMON_TRAINING = dict(
    use_cpu=True,
    bf16=False,
    gradient_checkpointing=False,
    report_to="none",
    save_strategy="no",
    per_device_train_batch_size=32,
    num_generations=8,
    max_completion_length=4,
    logging_steps=1,
    disable_tqdm=True,
    dataloader_num_workers=0,
)

METHOD_LABELS = {"grpo": "GRPO", "opd": "OPD", "gndpo": "GNDPO"}
COLORS = {"grpo": "tab:gray", "opd": "tab:red", "gndpo": "tab:blue"}


# ----------------------------------------------------------------------------------------------------------------------
# setup
# ----------------------------------------------------------------------------------------------------------------------
def setup() -> None:
    torch.set_num_threads(NUM_THREADS)
    quiet()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600, help="optimizer steps per training run (default 600)")
    p.add_argument("--seeds", type=str, default="3",
                   help="number of seeds ('3' -> 0,1,2) or a list '0,5,9' (default 3)")
    p.add_argument("--out-dir", type=str, default=str(REPO_ROOT / "benchmarks" / "results"))
    p.add_argument("--quick", action="store_true", help="smoke run (1-2 min): 150 steps, 1 seed, one short timing pair")
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--max-grad-norm", type=float, default=1e9, help="gradient clipping (default: effectively off)")
    p.add_argument("--teachers", type=str, default="outlier,clean", help="teachers for OPD/GNDPO: outlier,clean")
    p.add_argument("--base-temperature", type=float, default=1.0,
                   help="outlier teacher: temperature off the outlier states (default 1: the demo teacher as it is)")
    p.add_argument("--outlier-scale", type=float, default=8.0,
                   help="outlier teacher: logit multiplier on outlier states")
    p.add_argument("--outlier-operand", type=int, default=7,
                   help="outlier states: questions whose first operand is this")
    p.add_argument("--timing-steps", type=int, default=200, help="timed optimizer steps per timing run")
    p.add_argument("--timing-warmup", type=int, default=20, help="untimed steps before them")
    p.add_argument("--timing-repeats", type=int, default=4, help="interleaved GRPO/GNDPO subprocess pairs")
    p.add_argument("--skip-timing", action="store_true", help="part 1 only")
    p.add_argument("--skip-training", action="store_true", help="part 2 only")
    p.add_argument("--reward-tolerance", type=float, default=0.02, help="'equal' final reward: within this")
    p.add_argument("--stability-ratio", type=float, default=0.5, help="'well below': GNDPO max <= ratio * OPD max")
    p.add_argument("--smooth", type=int, default=25, help="moving-average window of the plotted reward curves")
    # internal: one timing run in a fresh process
    p.add_argument("--_child", choices=["grpo", "gndpo"], help=argparse.SUPPRESS)
    p.add_argument("--_child-out", type=str, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.steps = min(args.steps, 150)
        args.seeds = "1"
        args.timing_steps = min(args.timing_steps, 30)
        args.timing_warmup = min(args.timing_warmup, 5)
        args.timing_repeats = 1
        args.smooth = min(args.smooth, 5)
    args.seed_list = parse_seeds(args.seeds)
    args.teacher_list = [t.strip() for t in args.teachers.split(",") if t.strip()]
    if not 0 <= args.outlier_operand <= 9:
        p.error("--outlier-operand must be a digit 0-9 (the demo task's operands)")
    unknown = set(args.teacher_list) - {"outlier", "clean"}
    if unknown:
        p.error(f"unknown teachers {sorted(unknown)}; choose from outlier, clean")
    return args


def demo_world(num_rows: int):
    from trl_ext import demo

    teacher = demo.teacher_path("arithmetic")
    student = demo.student_path("arithmetic")
    dataset = demo.get_task("arithmetic").dataset(num_rows, seed=1)
    return demo, teacher, student, dataset


# ----------------------------------------------------------------------------------------------------------------------
# the outlier teacher
# ----------------------------------------------------------------------------------------------------------------------
class OutlierTeacher:
    """The demo teacher at `base_temperature`, over-confident (logits x `scale`) on a few states.

    Outlier states: every position of the rows whose question starts with `<operand>+` (so every completion token
    of those questions). The LM head has no bias, so scaling the final hidden state scales the logits exactly;
    hooks do it on this instance only. `flagged_rows` records, per teacher forward, how many rows were outliers.
    """

    def __init__(self, path: str, tokenizer, base_temperature: float, scale: float, operand: int):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(path)
        self.base_factor = 1.0 / base_temperature
        self.scale = scale
        self.pattern = [tokenizer.convert_tokens_to_ids(t) for t in ("\n", *str(operand), "+")]
        self.flagged_rows: list[int] = []
        self.total_rows: list[int] = []
        self._factor: torch.Tensor | None = None
        backbone = self.model.base_model
        backbone.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        backbone.norm.register_forward_hook(self._norm_hook)

    def outlier_rows(self, input_ids: torch.Tensor) -> torch.Tensor:
        n = len(self.pattern)
        if input_ids.size(1) < n:
            return torch.zeros(input_ids.size(0), dtype=torch.bool, device=input_ids.device)
        match = torch.ones_like(input_ids[:, : input_ids.size(1) - n + 1], dtype=torch.bool)
        for k, token in enumerate(self.pattern):
            match &= input_ids[:, k : input_ids.size(1) - n + 1 + k] == token
        return match.any(dim=1)

    def _pre_hook(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids")
        if input_ids is None and args:
            input_ids = args[0]
        if input_ids is None:  # embeddings only: no state to flag
            self._factor = None
            return
        rows = self.outlier_rows(input_ids)
        self.flagged_rows.append(int(rows.sum()))
        self.total_rows.append(int(rows.numel()))
        self._factor = torch.where(rows, self.scale, self.base_factor).to(torch.float32)

    def _norm_hook(self, module, inputs, output):
        if self._factor is None:
            return output * self.base_factor
        return output * self._factor.to(output.dtype).view(-1, *([1] * (output.dim() - 1)))


@torch.no_grad()
def answer_probability(model, tok, rows) -> float:
    """Mean probability of the exact answer followed by EOS (teacher forcing, one full forward: no KV cache)."""
    prompts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in rows["prompt"]]
    prompt_ids = tok(prompts, add_special_tokens=False).input_ids
    answer_ids = [tok(a, add_special_tokens=False).input_ids + [tok.eos_token_id] for a in rows["answer"]]
    seqs = [p + a for p, a in zip(prompt_ids, answer_ids)]
    length = max(map(len, seqs))
    input_ids = torch.full((len(seqs), length), tok.pad_token_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    target = torch.zeros(len(seqs), length - 1, dtype=torch.bool)
    for i, (seq, ans) in enumerate(zip(seqs, answer_ids)):
        input_ids[i, length - len(seq) :] = torch.tensor(seq)
        attention[i, length - len(seq) :] = 1
        target[i, length - 1 - len(ans) :] = True
    logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return float((logp * target).sum(1).exp().mean())


@torch.no_grad()
def teacher_diagnostics(demo, teacher_path: str, student_path: str, args, num_prompts: int = 512) -> dict:
    """Raw log-ratio statistics of both teachers on completions sampled from the initial student (no training)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(1234)
    tok = AutoTokenizer.from_pretrained(teacher_path)
    student = AutoModelForCausalLM.from_pretrained(student_path).eval()
    rows = demo.get_task("arithmetic").dataset(num_prompts, seed=99)
    prompts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in rows["prompt"]]
    enc = tok(prompts, return_tensors="pt", padding=True)
    plen = enc.input_ids.size(1)
    out = student.generate(**enc, max_new_tokens=COMMON_TRAINING["max_completion_length"], do_sample=True,
                           temperature=1.0, top_k=0, top_p=1.0)
    completion = out[:, plen:]
    is_eos = completion == tok.eos_token_id
    after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0
    mask = ~after_eos
    attention = torch.cat([enc.attention_mask, mask.long()], dim=1)

    def logps(model):
        logits = model(input_ids=out, attention_mask=attention).logits[:, plen - 1 : -1].float()
        return torch.log_softmax(logits, -1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)

    student_lp = logps(student)
    teachers = {"clean": AutoModelForCausalLM.from_pretrained(teacher_path).eval()}
    outlier = OutlierTeacher(teacher_path, tok, args.base_temperature, args.outlier_scale, args.outlier_operand)
    teachers["outlier"] = outlier.model.eval()
    outlier_rows = outlier.outlier_rows(out)
    result = {
        "num_prompts": num_prompts,
        "num_completion_tokens": int(mask.sum()),
        "student_expected_accuracy": answer_probability(student, tok, rows),
    }
    for name, model in teachers.items():
        ratio = (logps(model) - student_lp)[mask].numpy()
        entry = {
            # P(exact answer + EOS) under the model at temperature 1: its expected sampled task reward
            "expected_accuracy": answer_probability(model, tok, rows),
            "fraction_beyond_clip": float(np.mean(np.abs(ratio) > 5.0)),
            "log_ratio_quantiles": {
                str(q): float(np.quantile(ratio, q)) for q in (0.0, 0.01, 0.05, 0.5, 0.95, 0.99, 1.0)
            },
            "clipped_score_std": float(np.clip(ratio, -5, 5).std(ddof=1)),
        }
        if name == "outlier":
            in_states = outlier_rows.unsqueeze(1).expand_as(mask)[mask].numpy()
            entry["fraction_of_tokens_in_outlier_states"] = float(in_states.mean())
            entry["fraction_beyond_clip_in_outlier_states"] = float(np.mean(np.abs(ratio[in_states]) > 5.0))
            entry["fraction_beyond_clip_elsewhere"] = float(np.mean(np.abs(ratio[~in_states]) > 5.0))
        result[name] = entry
    return result


# ----------------------------------------------------------------------------------------------------------------------
# part 1: training runs
# ----------------------------------------------------------------------------------------------------------------------
def make_step_callback(state: dict):
    from transformers import TrainerCallback

    class StepRecorder(TrainerCallback):
        """Per optimizer step: wall time begin->end, and the largest |advantage| of the rollout (distillation)."""

        def on_step_begin(self, args, st, control, **kwargs):
            state["t0"] = time.perf_counter()
            state["c0"] = time.process_time()

        def on_step_end(self, args, st, control, **kwargs):
            state["step_seconds"].append(time.perf_counter() - state["t0"])
            state.setdefault("step_cpu_seconds", []).append(time.process_time() - state["c0"])
            trainer = state.get("trainer")
            adv = getattr(trainer, "last_advantages", None)
            if adv is not None:
                state["adv_abs_max"].append(float(adv.advantages.abs().max()))
            teacher = state.get("outlier_teacher")
            if teacher is not None:
                state["outlier_rows"].append(teacher.flagged_rows[-1] if teacher.flagged_rows else 0)

    return StepRecorder()


def build_trainer(method: str, seed: int, args, world, teacher_kind: str | None, lr: float, max_steps: int,
                  output_dir: str):
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from trl_ext import GNDPOConfig, GNDPOTrainer

    demo, teacher_path, student_path, dataset = world
    settings = dict(COMMON_TRAINING, output_dir=output_dir, learning_rate=lr, max_steps=max_steps, seed=seed,
                    max_grad_norm=args.max_grad_norm)
    outlier = None
    if method == "grpo":
        trainer = GRPOTrainer(model=student_path, reward_funcs=[demo.task_reward], args=GRPOConfig(**settings),
                              train_dataset=dataset)
    else:
        config = GNDPOConfig(advantage_normalization="none" if method == "opd" else "global", **settings)
        if teacher_kind == "outlier":
            from transformers import AutoTokenizer

            outlier = OutlierTeacher(teacher_path, AutoTokenizer.from_pretrained(teacher_path), args.base_temperature,
                                     args.outlier_scale, args.outlier_operand)
            teacher = outlier.model
        else:
            teacher = teacher_path
        trainer = GNDPOTrainer(model=student_path, reward_funcs=[demo.task_reward], args=config,
                               train_dataset=dataset, teacher_model=teacher)
    trainer.remove_callback(PrinterCallback)
    return trainer, outlier


def series(log_history: list[dict], key: str) -> list[float]:
    return [float(e[key]) for e in log_history if key in e and "train_runtime" not in e]


def run_training(method: str, teacher_kind: str | None, seed: int, args, world) -> dict:
    state = {"step_seconds": [], "adv_abs_max": [], "outlier_rows": []}
    with tempfile.TemporaryDirectory(prefix="gndpo-bench-") as tmp:
        trainer, outlier = build_trainer(method, seed, args, world, teacher_kind, args.learning_rate, args.steps, tmp)
        state["trainer"] = trainer
        state["outlier_teacher"] = outlier
        trainer.add_callback(make_step_callback(state))
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
        history = trainer.state.log_history
    run = {
        "wall_seconds": wall,
        "reward": series(history, "reward"),
        "grad_norm": series(history, "grad_norm"),
        "loss": series(history, "loss"),
        "mean_completion_length": series(history, "completions/mean_length"),
        "step_seconds": state["step_seconds"],
    }
    if method != "grpo":
        run["score_std"] = series(history, "gndpo/score_std")
        run["clipped_fraction"] = series(history, "gndpo/clipped_fraction")
        run["reverse_kl"] = series(history, "gndpo/reverse_kl")
        run["advantage_abs_max"] = state["adv_abs_max"]
    if outlier is not None:
        run["outlier_rows"] = state["outlier_rows"]
    del trainer, state
    gc.collect()
    return run


def final_window(values: list[float]) -> list[float]:
    k = max(1, int(math.ceil(0.1 * len(values))))
    return values[-k:]


def summarize_condition(runs: dict[int, dict]) -> dict:
    finals = {seed: float(np.mean(final_window(r["reward"]))) for seed, r in runs.items()}
    pooled = np.concatenate([np.asarray(r["grad_norm"], dtype=float) for r in runs.values()])
    out = {
        "final_reward_mean": float(np.mean(list(finals.values()))),
        "final_reward_std_over_seeds": float(np.std(list(finals.values()), ddof=1)) if len(finals) > 1 else 0.0,
        "final_reward_per_seed": finals,
        "initial_reward_mean": float(
            np.mean([np.mean(r["reward"][: max(1, len(r["reward"]) // 10)]) for r in runs.values()])
        ),
        "grad_norm_max": float(pooled.max()),
        "grad_norm_p99": float(np.percentile(pooled, 99)),
        "grad_norm_p90": float(np.percentile(pooled, 90)),
        "grad_norm_median": float(np.median(pooled)),
        "grad_norm_max_per_seed": {s: float(np.max(r["grad_norm"])) for s, r in runs.items()},
        "grad_norm_p99_per_seed": {s: float(np.percentile(r["grad_norm"], 99)) for s, r in runs.items()},
        "median_step_seconds": float(np.median(np.concatenate([r["step_seconds"] for r in runs.values()]))),
    }
    if all("clipped_fraction" in r for r in runs.values()):
        out["clipped_fraction_mean"] = float(np.mean(np.concatenate([r["clipped_fraction"] for r in runs.values()])))
        out["score_std_mean"] = float(np.mean(np.concatenate([r["score_std"] for r in runs.values()])))
        out["advantage_abs_max"] = float(np.max(np.concatenate([r["advantage_abs_max"] for r in runs.values()])))
    if all("outlier_rows" in r for r in runs.values()):
        norms = np.concatenate([r["grad_norm"] for r in runs.values()])
        flagged = np.concatenate([np.asarray(r["outlier_rows"][: len(r["grad_norm"])]) > 0 for r in runs.values()])
        if len(flagged) == len(norms):
            out["fraction_of_steps_with_outlier_states"] = float(flagged.mean())
            for name, sel in (("with", flagged), ("without", ~flagged)):
                out[f"grad_norm_median_steps_{name}_outliers"] = float(np.median(norms[sel])) if sel.any() else None
                out[f"grad_norm_max_steps_{name}_outliers"] = float(norms[sel].max()) if sel.any() else None
    return out


def conditions(args) -> list[tuple[str, str, str | None]]:
    """(key, method, teacher) in run order; GRPO needs no teacher."""
    conds = [("grpo", "grpo", None)]
    for teacher in args.teacher_list:
        for method in ("opd", "gndpo"):
            conds.append((f"{method}/{teacher}", method, teacher))
    return conds


# ----------------------------------------------------------------------------------------------------------------------
# part 2: cost, one trainer per fresh process
# ----------------------------------------------------------------------------------------------------------------------
def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def proc_status_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS: current, VmHWM: peak) in MiB; NaN where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def current_rss_mib() -> float:
    return proc_status_mib("VmRSS")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def timing_child(args) -> None:
    """Run one trainer for warmup + timed steps at lr 0 and write its costs as JSON to args._child_out."""
    setup()
    steps = args.timing_warmup + args.timing_steps
    world = demo_world(max(4000, steps * 4))
    gc.collect()
    peak_reset = reset_peak_rss()  # so that the peak below is the trainer's, not the imports'
    rss_before = current_rss_mib()
    peak_before = max_rss_mib()
    state = {"step_seconds": [], "adv_abs_max": [], "outlier_rows": []}
    teacher_calls: list[float] = []
    student_calls: list[float] = []
    advantage_calls: list[float] = []
    with tempfile.TemporaryDirectory(prefix="gndpo-bench-time-") as tmp:
        trainer, _ = build_trainer(args._child, 0, args, world, "clean", 0.0, steps, tmp)
        state["trainer"] = trainer
        trainer.add_callback(make_step_callback(state))
        if args._child == "gndpo":
            original = trainer.score_completions

            def timed_score(model, rollout):
                t0 = time.perf_counter()
                result = original(model, rollout)
                (teacher_calls if model is trainer.teacher_model else student_calls).append(time.perf_counter() - t0)
                return result

            trainer.score_completions = timed_score  # instance attribute: the hooks call self.score_completions

            import trl_ext.gndpo.trainer as gndpo_module

            original_adv = gndpo_module.gndpo_advantages

            def timed_adv(*a, **k):
                t0 = time.perf_counter()
                result = original_adv(*a, **k)
                advantage_calls.append(time.perf_counter() - t0)
                return result

            gndpo_module.gndpo_advantages = timed_adv
        rss_after_init = current_rss_mib()
        trainer.train()
        history = trainer.state.log_history
        n_params = sum(p.numel() for p in trainer.model.parameters())
        n_teacher = sum(p.numel() for p in trainer.teacher_model.parameters()) if args._child == "gndpo" else 0
    skip = args.timing_warmup
    per_step_teacher = teacher_calls[skip:]
    per_step_student = student_calls[skip:]
    result = {
        "method": args._child,
        "timed_steps": args.timing_steps,
        "step_seconds": state["step_seconds"][skip:],
        "median_step_seconds": float(np.median(state["step_seconds"][skip:])),
        "mean_step_seconds": float(np.mean(state["step_seconds"][skip:])),
        "p10_step_seconds": float(np.percentile(state["step_seconds"][skip:], 10)),
        "median_step_cpu_seconds": float(np.median(state["step_cpu_seconds"][skip:])),
        "trl_step_time_median": float(np.median(series(history, "step_time")[skip:])),
        "teacher_forward_calls_per_step": len(teacher_calls) / max(1, steps),
        "teacher_forward_median_seconds": float(np.median(per_step_teacher)) if per_step_teacher else None,
        "student_extra_forward_calls_per_step": len(student_calls) / max(1, steps),
        "student_extra_forward_median_seconds": float(np.median(per_step_student)) if per_step_student else None,
        "advantage_median_seconds": float(np.median(advantage_calls[skip:])) if advantage_calls else None,
        "rss_before_trainer_mib": rss_before,
        "rss_after_trainer_init_mib": rss_after_init,
        "process_peak_rss_mib": max_rss_mib(),  # ru_maxrss: whole process lifetime, imports included
        "peak_rss_before_trainer_mib": peak_before,
        "student_parameters": n_params,
        "teacher_parameters": n_teacher,
        "peak_reset": peak_reset,
    }
    if peak_reset:
        # VmHWM was reset just before the trainer was built: its peak is the training phase's peak
        result["peak_rss_mib"] = proc_status_mib("VmHWM")
        result["peak_rss_increment_mib"] = result["peak_rss_mib"] - rss_before
    else:
        result["peak_rss_mib"] = result["process_peak_rss_mib"]
        result["peak_rss_increment_mib"] = result["peak_rss_mib"] - peak_before
    Path(args._child_out).write_text(json.dumps(result))


def run_timing(args, log) -> dict:
    """Interleaved GRPO/GNDPO timing subprocesses (GRPO first on even repeats, GNDPO first on odd ones)."""
    pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=pythonpath)
    runs: dict[str, list[dict]] = {"grpo": [], "gndpo": []}
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="gndpo-bench-child-") as tmp:
        for repeat in range(args.timing_repeats):
            order = ("grpo", "gndpo") if repeat % 2 == 0 else ("gndpo", "grpo")
            for method in order:
                out = Path(tmp) / f"{method}-{repeat}.json"
                cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", method, "--_child-out", str(out),
                       "--timing-steps", str(args.timing_steps), "--timing-warmup", str(args.timing_warmup),
                       "--max-grad-norm", str(args.max_grad_norm)]
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"timing run {method} failed:\n{proc.stderr[-4000:]}")
                child = json.loads(out.read_text())
                child["process_seconds"] = time.perf_counter() - t0
                runs[method].append(child)
                load.append(os.getloadavg()[0])
                log(f"  timing {method} #{repeat}: median step {1e3 * child['median_step_seconds']:.1f} ms, "
                    f"peak RSS {child['peak_rss_mib']:.0f} MiB ({child['process_seconds']:.0f} s)")
    med = lambda method, key: float(np.median([r[key] for r in runs[method]]))  # noqa: E731
    # Paired statistics: run r of GRPO and run r of GNDPO ran back to back, so a change of the machine's load between
    # repeats cancels in each pair's difference and ratio. These are the headline numbers; the unpaired medians of
    # each method follow as a cross-check.
    pairs = []
    for grpo_run, gndpo_run in zip(runs["grpo"], runs["gndpo"]):
        grpo_step, gndpo_step = grpo_run["median_step_seconds"], gndpo_run["median_step_seconds"]
        teacher = gndpo_run["teacher_forward_median_seconds"]
        student = gndpo_run["student_extra_forward_median_seconds"] or 0.0
        advantage = gndpo_run["advantage_median_seconds"] or 0.0
        pairs.append({
            "grpo_step_seconds": grpo_step,
            "gndpo_step_seconds": gndpo_step,
            "step_time_ratio": gndpo_step / grpo_step,
            "overhead_seconds": gndpo_step - grpo_step,
            "teacher_forward_seconds": teacher,
            "student_extra_forward_seconds": student,
            "advantage_seconds": advantage,
            "unexplained_overhead_seconds": gndpo_step - grpo_step - teacher - student - advantage,
            "overhead_over_teacher_forward": (gndpo_step - grpo_step) / teacher,
        })
    pmed = lambda key: float(np.median([p[key] for p in pairs]))  # noqa: E731
    summary = {
        "grpo_step_seconds": pmed("grpo_step_seconds"),
        "gndpo_step_seconds": pmed("gndpo_step_seconds"),
        "step_time_ratio": pmed("step_time_ratio"),
        "overhead_seconds": pmed("overhead_seconds"),
        "teacher_forward_seconds": pmed("teacher_forward_seconds"),
        "student_extra_forward_seconds": pmed("student_extra_forward_seconds"),
        "advantage_seconds": pmed("advantage_seconds"),
        "unexplained_overhead_seconds": pmed("unexplained_overhead_seconds"),
        "overhead_over_teacher_forward": pmed("overhead_over_teacher_forward"),
        "pairs": pairs,
        # cross-checks: unpaired medians, TRL's own step_time, and statistics less sensitive to other processes on
        # the machine (contention only ever adds time)
        "unpaired_step_time_ratio": med("gndpo", "median_step_seconds") / med("grpo", "median_step_seconds"),
        "trl_step_time_ratio": med("gndpo", "trl_step_time_median") / med("grpo", "trl_step_time_median"),
        "p10_step_time_ratio": med("gndpo", "p10_step_seconds") / med("grpo", "p10_step_seconds"),
        "p10_overhead_seconds": med("gndpo", "p10_step_seconds") - med("grpo", "p10_step_seconds"),
        "cpu_time_per_step_ratio": med("gndpo", "median_step_cpu_seconds") / med("grpo", "median_step_cpu_seconds"),
        "grpo_peak_rss_mib": med("grpo", "peak_rss_mib"),
        "gndpo_peak_rss_mib": med("gndpo", "peak_rss_mib"),
        "peak_rss_ratio": med("gndpo", "peak_rss_mib") / med("grpo", "peak_rss_mib"),
        "grpo_peak_rss_increment_mib": med("grpo", "peak_rss_increment_mib"),
        "gndpo_peak_rss_increment_mib": med("gndpo", "peak_rss_increment_mib"),
        "peak_rss_increment_ratio": (
            med("gndpo", "peak_rss_increment_mib") / max(1e-9, med("grpo", "peak_rss_increment_mib"))
        ),
        "student_parameters": runs["grpo"][0]["student_parameters"],
        "teacher_parameters": runs["gndpo"][0]["teacher_parameters"],
        "load_average_1min_during_timing": load,
        "note": "Step times: median over the timed steps of each run; headline numbers are medians over the "
                "back-to-back GRPO/GNDPO pairs of their ratio and difference. Teacher/student forward and advantage "
                "times are measured inside GNDPO's step; 'unexplained' is the overhead left after them. Peak RSS is "
                "the child process's peak resident memory during training (VmHWM reset just before the trainer is "
                "built, so it includes Python and torch already loaded); the increment is that peak minus the RSS "
                "just before the trainer was built. The demo models have ~0.1M parameters, so memory is dominated "
                "by the runtime.",
    }
    return {"runs": runs, "summary": summary}


# ----------------------------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------------------------
def smooth(values, window: int) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    if window <= 1 or len(values) < window:
        return values
    kernel = np.ones(window) / window
    core = np.convolve(values, kernel, mode="valid")
    return np.concatenate([np.full(window - 1, np.nan), core])


def plot(report: dict, path: Path, window: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    training = report["training"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    if training:
        plot_rewards(axes[0, 0], training, window)
        plot_grad_norm_distribution(axes[0, 1], training)
        plot_grad_norm_steps(axes[1, 0], training)
    else:
        for ax in axes.flat[:3]:
            ax.text(0.5, 0.5, "training skipped", ha="center", va="center", transform=ax.transAxes)
    plot_costs(axes[1, 1], report.get("timing"))
    fig.suptitle(f"GNDPO vs OPD vs GRPO on the demo arithmetic task ({report['config']['steps']} steps, "
                 f"{len(report['config']['seeds'])} seed(s), CPU)", fontsize=12)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def condition_label(cond: dict, sep: str = " ") -> str:
    teacher = cond["teacher"]
    return METHOD_LABELS[cond["method"]] + sep + (f"({teacher} teacher)" if teacher else "(task reward)")


def plot_rewards(ax, training: dict, window: int) -> None:
    """(a) reward curves: smoothed, mean over seeds; band = min..max over seeds for the main conditions."""
    for cond in training.values():
        curves = [r["reward"] for r in cond["runs"].values()]
        n = min(len(c) for c in curves)
        stack = np.stack([smooth(c[:n], window) for c in curves])
        steps = np.arange(1, n + 1)
        main = cond["teacher"] in (None, "outlier")
        ax.plot(steps, np.nanmean(stack, axis=0), "-" if main else ":", color=COLORS[cond["method"]],
                label=condition_label(cond), lw=1.6)
        if len(curves) > 1 and main:
            ax.fill_between(steps, np.nanmin(stack, 0), np.nanmax(stack, 0), color=COLORS[cond["method"]], alpha=0.12)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"task reward (moving avg {window}, mean over seeds)")
    ax.set_title("(a) task reward of sampled completions, same budget")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def plot_grad_norm_distribution(ax, training: dict) -> None:
    """(b) box plots of the per-step pre-clip gradient norm, pooled over seeds; max and p99 annotated."""
    keys = list(training)
    data = [np.concatenate([r["grad_norm"] for r in training[k]["runs"].values()]) for k in keys]
    box = ax.boxplot(data, whis=(1, 99), showfliers=True, patch_artist=True,
                     flierprops=dict(markersize=2, alpha=0.4))
    ax.set_xticks(range(1, len(keys) + 1), [condition_label(training[k], "\n") for k in keys], fontsize=8)
    for patch, k in zip(box["boxes"], keys):
        patch.set_facecolor(COLORS[training[k]["method"]])
        patch.set_alpha(0.35)
    for i, k in enumerate(keys, start=1):
        summary = training[k]["summary"]
        ax.plot(i, summary["grad_norm_max"], "v", color="black", ms=6)
        ax.annotate(f"max {summary['grad_norm_max']:.3g}\np99 {summary['grad_norm_p99']:.3g}",
                    (i, summary["grad_norm_max"]), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylim(top=ax.get_ylim()[1] * 3)
    ax.set_ylabel("pre-clip gradient norm per step (log)")
    ax.set_title("(b) gradient-norm distribution (box: quartiles, whiskers p1-p99, ▼ max)")
    ax.grid(alpha=0.3, axis="y")


def plot_grad_norm_steps(ax, training: dict) -> None:
    """(c) gradient norm along training, for the seed where OPD's largest norm occurred; maxima marked."""
    teacher = "outlier" if "opd/outlier" in training else next(
        (c["teacher"] for c in training.values() if c["teacher"]), None)
    opd = training.get(f"opd/{teacher}")
    if opd:
        seed = max(opd["runs"], key=lambda s: max(opd["runs"][s]["grad_norm"]))
    else:
        seed = next(iter(next(iter(training.values()))["runs"]))
    lines = []
    for method in ("grpo", "opd", "gndpo"):
        key = method if method == "grpo" else f"{method}/{teacher}"
        if key not in training or seed not in training[key]["runs"]:
            continue
        run = training[key]["runs"][seed]
        norms = np.asarray(run["grad_norm"])
        steps = np.arange(1, len(norms) + 1)
        ax.plot(steps, norms, color=COLORS[method], lw=0.6, alpha=0.6, label=f"{condition_label(training[key])}")
        top = int(np.argmax(norms))
        ax.plot(steps[top], norms[top], "v", color=COLORS[method], ms=7, markeredgecolor="black")
        if "outlier_rows" in run and len(run["outlier_rows"]) >= len(norms):
            flagged = np.asarray(run["outlier_rows"][: len(norms)]) > 0
            if flagged.any() and (~flagged).any():
                with_, without = norms[flagged], norms[~flagged]
                lines.append(f"{METHOD_LABELS[method]}: median {np.median(with_):.3g} / {np.median(without):.3g}, "
                             f"max {with_.max():.3g} / {without.max():.3g}")
    if lines:
        ax.text(0.02, 0.03, "steps with / without outlier-state questions\n" + "\n".join(lines),
                transform=ax.transAxes, fontsize=7, va="bottom",
                bbox=dict(facecolor="white", alpha=0.8, edgecolor="none"))
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("pre-clip gradient norm (log)")
    ax.set_title(f"(c) gradient norm per step, seed {seed} (▼ max)")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)


def plot_costs(ax, timing: dict | None) -> None:
    """(d) GNDPOTrainer / GRPOTrainer ratios: time per step, peak RSS, and the target line."""
    if timing:
        s = timing["summary"]
        names = ["time per step", "peak RSS\n(process)", "peak RSS\nincrement"]
        values = [s["step_time_ratio"], s["peak_rss_ratio"], s["peak_rss_increment_ratio"]]
        bars = ax.bar(names, values, color=["tab:blue", "tab:green", "tab:olive"], alpha=0.7)
        ax.axhline(1.0, color="black", lw=0.8)
        budget = (s["grpo_step_seconds"] + s["teacher_forward_seconds"]) / s["grpo_step_seconds"]
        ax.axhline(budget, color="tab:red", ls="--", lw=1,
                   label=f"target for time: GRPO step + teacher forward ({budget:.2f}x)")
        for bar, v in zip(bars, values):
            ax.text(bar.get_x() + bar.get_width() / 2, v, f"{v:.2f}x", ha="center", va="bottom", fontsize=9)
        ms = lambda x: 1e3 * x  # noqa: E731
        ax.text(0.02, 0.97,
                f"GRPO {ms(s['grpo_step_seconds']):.1f} ms/step, GNDPO {ms(s['gndpo_step_seconds']):.1f} ms/step "
                f"(medians over back-to-back pairs)\n"
                f"overhead {ms(s['overhead_seconds']):.1f} ms; inside GNDPO's step: teacher forward "
                f"{ms(s['teacher_forward_seconds']):.1f} ms,\nextra student forward "
                f"{ms(s['student_extra_forward_seconds']):.1f} ms, advantages {ms(s['advantage_seconds']):.2f} ms, "
                f"unexplained {ms(s['unexplained_overhead_seconds']):.1f} ms\n"
                f"peak RSS {s['grpo_peak_rss_mib']:.0f} vs {s['gndpo_peak_rss_mib']:.0f} MiB",
                transform=ax.transAxes, va="top", fontsize=8)
        ax.set_ylim(0, max(values + [budget]) * 1.6)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0.0, 0.78))
    else:
        ax.text(0.5, 0.5, "timing skipped", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("GNDPOTrainer / GRPOTrainer")
    ax.set_title("(d) cost relative to GRPO (same student, lr 0, fresh process each)")
    ax.grid(alpha=0.3, axis="y")


def targets(report: dict, args) -> dict:
    training = report["training"]
    out: dict = {}
    if "opd/outlier" in training and "gndpo/outlier" in training:
        opd, gnd = training["opd/outlier"]["summary"], training["gndpo/outlier"]["summary"]
        ratio = gnd["grad_norm_max"] / opd["grad_norm_max"]
        out["gndpo_max_grad_norm_well_below_opd_under_outliers"] = {
            "met": bool(ratio <= args.stability_ratio),
            "gndpo_grad_norm_max": gnd["grad_norm_max"],
            "opd_grad_norm_max": opd["grad_norm_max"],
            "ratio": ratio,
            "threshold_ratio": args.stability_ratio,
            "gndpo_grad_norm_p99": gnd["grad_norm_p99"],
            "opd_grad_norm_p99": opd["grad_norm_p99"],
            "p99_ratio": gnd["grad_norm_p99"] / opd["grad_norm_p99"],
        }
        diff = gnd["final_reward_mean"] - opd["final_reward_mean"]
        out["gndpo_final_reward_equal_or_better_than_opd_under_outliers"] = {
            "met": bool(diff >= -args.reward_tolerance),
            "gndpo_final_reward": gnd["final_reward_mean"],
            "opd_final_reward": opd["final_reward_mean"],
            "difference": diff,
            "tolerance": args.reward_tolerance,
            "gndpo_final_reward_std_over_seeds": gnd["final_reward_std_over_seeds"],
            "opd_final_reward_std_over_seeds": opd["final_reward_std_over_seeds"],
        }
    timing = report.get("timing")
    if timing:
        s = timing["summary"]
        out["gndpo_step_overhead_over_grpo_at_most_teacher_forward"] = {
            "met": bool(s["overhead_over_teacher_forward"] <= 1.0),
            "overhead_over_teacher_forward": s["overhead_over_teacher_forward"],
            "overhead_seconds": s["overhead_seconds"],
            "teacher_forward_seconds": s["teacher_forward_seconds"],
            "student_extra_forward_seconds": s["student_extra_forward_seconds"],
            "overhead_minus_student_extra_forward_seconds": s["overhead_seconds"] - s["student_extra_forward_seconds"],
            "unexplained_overhead_seconds": s["unexplained_overhead_seconds"],
            "step_time_ratio": s["step_time_ratio"],
        }
    out["all_met"] = bool(out) and all(v["met"] for v in out.values() if isinstance(v, dict))
    return out


# ----------------------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    if args._child:
        timing_child(args)
        return 0
    setup()
    started = time.perf_counter()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f}s] {msg}", flush=True)

    world = demo_world(max(4000, args.steps * 4))
    demo, teacher_path, student_path, _ = world
    log(f"demo teacher {teacher_path}, student {student_path}")

    report: dict = {
        "benchmark": "gndpo",
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "environment": {**versions(), "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                        "platform": platform.platform(), "load_average_1min_at_start": os.getloadavg()[0]},
        "config": {
            "steps": args.steps,
            "seeds": args.seed_list,
            "teachers": args.teacher_list,
            "quick": args.quick,
            "training": dict(COMMON_TRAINING, learning_rate=args.learning_rate, max_grad_norm=args.max_grad_norm),
            "trl_defaults_used": "beta=0 (no reference model), loss_type: GRPO default 'dapo' for GRPOTrainer, "
                                 "GNDPOConfig default 'grpo'; num_iterations=1; temperature=1.0",
            "methods": {
                "grpo": "trl.GRPOTrainer(reward_funcs=[demo.task_reward])",
                "opd": "GNDPOTrainer, GNDPOConfig(advantage_normalization='none'), score_clip=5",
                "gndpo": "GNDPOTrainer, GNDPOConfig(advantage_normalization='global'), score_clip=5",
            },
            "outlier_teacher": {
                "base": "demo.teacher_path('arithmetic')",
                "base_temperature": args.base_temperature,
                "outlier_scale": args.outlier_scale,
                "outlier_states": f"every position of questions '{args.outlier_operand}+b=' (10% of the questions)",
            },
            "final_reward": "mean task reward of the sampled completions over the last 10% of steps, per seed",
            "grad_norm_stats": "pre-clip total gradient norm logged every step, pooled over seeds",
            "timing": {"steps": args.timing_steps, "warmup": args.timing_warmup, "repeats": args.timing_repeats,
                       "learning_rate": 0.0, "teacher": "demo teacher (clean)"},
        },
    }

    log("teacher diagnostics on the initial student's samples")
    report["teacher_diagnostics"] = teacher_diagnostics(demo, teacher_path, student_path, args,
                                                        num_prompts=128 if args.quick else 512)
    for name in ("clean", "outlier"):
        d = report["teacher_diagnostics"][name]
        log(f"  {name}: {100 * d['fraction_beyond_clip']:.1f}% of tokens beyond the +-5 clip, clipped-score std "
            f"{d['clipped_score_std']:.2f}")

    training: dict = {}
    for key, method, teacher in conditions(args):
        training[key] = {"method": method, "teacher": teacher, "runs": {}}
    if args.skip_training:
        training = {}
    for seed in [] if args.skip_training else args.seed_list:
        for key, method, teacher in conditions(args):
            run = run_training(method, teacher, seed, args, world)
            training[key]["runs"][seed] = run
            log(f"{key:14s} seed {seed}: reward {np.mean(run['reward'][:max(1, len(run['reward']) // 10)]):.3f} -> "
                f"{np.mean(final_window(run['reward'])):.3f}, grad norm max {max(run['grad_norm']):.3g}, "
                f"{run['wall_seconds']:.0f} s")
    for cond in training.values():
        cond["summary"] = summarize_condition(cond["runs"])
    report["training"] = training
    write_json(report, out_dir / f"{RESULT_NAME}.json")  # partial results survive a failing timing part

    if not args.skip_timing:
        log("timing: GRPOTrainer vs GNDPOTrainer, one fresh process each")
        report["timing"] = run_timing(args, log)
    report["targets"] = targets(report, args)
    report["runtime_seconds"] = time.perf_counter() - started
    write_json(report, out_dir / f"{RESULT_NAME}.json")
    plot(report, out_dir / f"{RESULT_NAME}.png", args.smooth)

    log("summary")
    for key, cond in training.items():
        s = cond["summary"]
        log(f"  {key:14s} final reward {s['final_reward_mean']:.3f} (+-{s['final_reward_std_over_seeds']:.3f}), "
            f"grad norm max {s['grad_norm_max']:.3g}, p99 {s['grad_norm_p99']:.3g}, median {s['grad_norm_median']:.3g}")
    if "timing" in report:
        s = report["timing"]["summary"]
        log(f"  step time GNDPO/GRPO {s['step_time_ratio']:.2f}x ({1e3 * s['gndpo_step_seconds']:.1f} vs "
            f"{1e3 * s['grpo_step_seconds']:.1f} ms); teacher forward {1e3 * s['teacher_forward_seconds']:.1f} ms, "
            f"extra student forward {1e3 * s['student_extra_forward_seconds']:.1f} ms; peak RSS ratio "
            f"{s['peak_rss_ratio']:.2f}x (increment {s['peak_rss_increment_ratio']:.2f}x)")
    for name, t in report["targets"].items():
        if isinstance(t, dict):
            log(f"  target {name}: {'MET' if t['met'] else 'NOT MET'}")
    log(f"wrote {out_dir / (RESULT_NAME + '.json')} and {out_dir / (RESULT_NAME + '.png')} "
        f"in {report['runtime_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
