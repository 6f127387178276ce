"""Argument parsing for the example scripts: TRL-script style, with defaults that fit the machine and the demo.

Defaults are layered under the user's values: our defaults < `--config` YAML < command line. On a machine without
CUDA the default is `use_cpu=True, bf16=False` (TRL configs default to bf16, which a CPU-only run rejects). With no
`--model_name_or_path` the script runs the embedded demo, and demo-sized training settings become the defaults.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from dataclasses import dataclass, field

import torch
from trl import ModelConfig, ScriptArguments, TrlParser


def _parser(dataclass_types, defaults: dict) -> TrlParser:
    parser = TrlParser(dataclass_types)
    if not torch.cuda.is_available():
        defaults = {"use_cpu": True, "bf16": False, **defaults}
    parser.set_defaults(**defaults)
    return parser


def parse_example_args(dataclass_types, demo_settings: dict, argv: list[str] | None = None) -> tuple:
    """Parse (script, config, ModelConfig) arguments; in demo mode with `demo_settings` as defaults.

    The config's derived fields (e.g. `steps_per_generation` from `gradient_accumulation_steps`) are computed by its
    `__post_init__` from the final values, so demo defaults behave exactly like user-given ones.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parsed = _parser(dataclass_types, {}).parse_args_and_config(args=argv)
    model_args = next(a for a in parsed if isinstance(a, ModelConfig))
    if model_args.model_name_or_path is not None:
        refuse_demo_arguments(parsed)
        return parsed
    parsed = _parser(dataclass_types, demo_settings).parse_args_and_config(args=argv)
    refuse_real_run_arguments(parsed)
    return parsed


def non_default_fields(args, names) -> list[str]:
    """`--name value` for each of `names` that `args` has and holds away from its dataclass default."""
    defaults = {f.name: f.default for f in dataclasses.fields(args) if f.default is not dataclasses.MISSING}
    return [f"--{name} {getattr(args, name)!r}" for name in names
            if name in defaults and getattr(args, name) != defaults[name]]


def refuse_demo_arguments(parsed) -> None:
    """With --model_name_or_path, raise on a demo-only argument (`--demo_*`) rather than silently ignore it."""
    given = []
    for args in parsed:
        given += non_default_fields(args, [f.name for f in dataclasses.fields(args) if f.name.startswith("demo_")])
    if given:
        raise ValueError(f"{', '.join(given)} only apply to the embedded demo, which runs when no "
                         f"--model_name_or_path is given. Drop them for a run on real models.")


# Arguments only a run on real models reads: the demo brings its own dataset, rewards and model files.
REAL_RUN_ONLY = {
    ScriptArguments: ("dataset_name", "dataset_config", "dataset_train_split", "dataset_test_split",
                      "dataset_streaming", "reward_funcs", "reward_model_name_or_path"),
    ModelConfig: ("model_revision", "dtype", "attn_implementation"),
}


def refuse_real_run_arguments(parsed) -> None:
    """In demo mode, raise on any real-run argument set away from its default rather than silently ignore it."""
    given = [flag for args in parsed for base, names in REAL_RUN_ONLY.items() if isinstance(args, base)
             for flag in non_default_fields(args, names)]
    if given:
        raise ValueError(
            f"{', '.join(given)} only apply to a run on real models, but no --model_name_or_path was given, so the "
            f"script runs the embedded demo (its own task data, reward and tiny models) and would ignore them. Pass "
            f"--model_name_or_path (and the script's teacher arguments) for a real run, or drop them for the demo."
        )


REWARD_FUNCS_HELP = (
    "Reward functions: `accuracy_reward`, `reasoning_accuracy_reward`, `think_format_reward`, "
    "`get_soft_overlong_punishment` (max_completion_len=1280, soft_punish_cache=256), as in TRL's grpo.py, or any "
    "dotted import path (e.g. 'my_lib.rewards.custom_reward'; the working directory is importable). Real runs only: "
    "the demo uses its task reward."
)


@dataclass
class RewardScriptArguments(ScriptArguments):
    """TRL's dataset arguments plus the reward arguments of TRL's `grpo.py`."""

    reward_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Reward model id or local path (a sequence-classification model), as in TRL's grpo.py. "
                  "Real runs only."},
    )
    reward_funcs: list[str] | None = field(default=None, metadata={"help": REWARD_FUNCS_HELP})


@dataclass
class ExampleScriptArguments(RewardScriptArguments):
    """Script arguments shared by the example scripts (dataset arguments come from TRL's `ScriptArguments`)."""

    demo_task: str = field(
        default="arithmetic",
        metadata={"help": "Task of the embedded demo (used when no --model_name_or_path is given)."},
    )
    demo_train_size: int = field(default=8000, metadata={"help": "Number of demo training prompts."})
    demo_eval_size: int = field(
        default=64,
        metadata={"help": "Number of demo prompts (drawn with their own seed) evaluated when --eval_strategy is not "
                  "'no'."},
    )


def reward_funcs_registry() -> dict:
    """TRL's named reward functions, with the settings its `trl/scripts/grpo.py` gives them."""
    from trl.rewards import (
        accuracy_reward,
        get_soft_overlong_punishment,
        reasoning_accuracy_reward,
        think_format_reward,
    )

    return {
        "accuracy_reward": accuracy_reward,
        "reasoning_accuracy_reward": reasoning_accuracy_reward,
        "think_format_reward": think_format_reward,
        "get_soft_overlong_punishment": get_soft_overlong_punishment(max_completion_len=1280, soft_punish_cache=256),
    }


def load_reward_func(name: str):
    """A `--reward_funcs` entry -> the function: a name from TRL's registry or a dotted import path.

    Like TRL's grpo.py, dotted paths are imported with the working directory on `sys.path`, so a `my_rewards.py`
    next to where the script is launched works as `my_rewards.my_reward`.
    """
    registry = reward_funcs_registry()
    if name in registry:
        return registry[name]
    if "." not in name:
        raise ValueError(f"--reward_funcs {name!r} is neither one of TRL's reward functions {sorted(registry)} nor a "
                         f"dotted import path such as 'my_rewards.my_reward'.")
    module_path, _, attribute = name.rpartition(".")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return getattr(importlib.import_module(module_path), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"--reward_funcs {name!r} could not be imported ({error}). Give a function as "
                         f"'module.function', with the module importable from {os.getcwd()} or installed, or one "
                         f"of {sorted(registry)}.") from error


def load_rewards(script_args: RewardScriptArguments) -> list | None:
    """The reward model (if any) and reward functions, in TRL's grpo.py order; None when none were given."""
    rewards = [script_args.reward_model_name_or_path] if script_args.reward_model_name_or_path else []
    rewards += [load_reward_func(name) for name in script_args.reward_funcs or []]
    return rewards or None


def wants_eval(training_args) -> bool:
    """Whether the run evaluates (then it needs an eval dataset, as in TRL's grpo.py)."""
    return training_args.eval_strategy != "no"


def load_split(script_args: ScriptArguments, split: str):
    from datasets import load_dataset

    return load_dataset(script_args.dataset_name, name=script_args.dataset_config, split=split,
                        streaming=script_args.dataset_streaming)


def real_model_setup(script_args: RewardScriptArguments, training_args, model_args: ModelConfig):
    """For a run on real models: pass ModelConfig's loading options to the trainer (as TRL's scripts do) and return
    (model id, train dataset, eval dataset or None, rewards or None). The eval dataset is `--dataset_test_split`,
    loaded when `eval_strategy` is not "no" (as in TRL's grpo.py)."""
    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }
    if script_args.dataset_name is None:
        raise ValueError("Pass --dataset_name (a dataset with a 'prompt' column) with --model_name_or_path.")
    train_dataset = load_split(script_args, script_args.dataset_train_split)
    eval_dataset = load_split(script_args, script_args.dataset_test_split) if wants_eval(training_args) else None
    return model_args.model_name_or_path, train_dataset, eval_dataset, load_rewards(script_args)


def demo_reward_summary(trainer) -> str:
    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    return f"demo task reward: first log {rewards[0]:.3f} -> last log {rewards[-1]:.3f}"
