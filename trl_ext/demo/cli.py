"""Argument parsing for the example scripts: TRL-script style, with defaults that fit the machine and the demo.

Defaults are layered under the user's values: our defaults < `--config` YAML < command line. On a machine without
CUDA the default is `use_cpu=True, bf16=False` (TRL configs default to bf16, which a CPU-only run rejects). With no
`--model_name_or_path` the script runs the embedded demo, and demo-sized training settings become the defaults.
"""

from __future__ import annotations

import importlib
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
        return parsed
    return _parser(dataclass_types, demo_settings).parse_args_and_config(args=argv)


@dataclass
class ExampleScriptArguments(ScriptArguments):
    """Script arguments shared by the example scripts (dataset arguments come from TRL's `ScriptArguments`)."""

    reward_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": "Reward functions as dotted import paths (e.g. 'trl.rewards.accuracy_reward'). The demo uses "
            "its task reward."
        },
    )
    demo_task: str = field(
        default="arithmetic",
        metadata={"help": "Task of the embedded demo (used when no --model_name_or_path is given)."},
    )
    demo_train_size: int = field(default=8000, metadata={"help": "Number of demo training prompts."})


def import_callable(path: str):
    """`package.module.name` -> the object (reward functions given on the command line)."""
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def real_model_setup(script_args: ExampleScriptArguments, training_args, model_args: ModelConfig):
    """For a run on real models: pass ModelConfig's loading options to the trainer (as TRL's scripts do) and return
    (model id, train dataset, reward functions or None)."""
    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }
    if script_args.dataset_name is None:
        raise ValueError("Pass --dataset_name (a dataset with a 'prompt' column) with --model_name_or_path.")
    from datasets import load_dataset

    dataset = load_dataset(script_args.dataset_name, name=script_args.dataset_config,
                           split=script_args.dataset_train_split)
    rewards = [import_callable(path) for path in script_args.reward_funcs or []] or None
    return model_args.model_name_or_path, dataset, rewards


def demo_reward_summary(trainer) -> str:
    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    return f"demo task reward: first log {rewards[0]:.3f} -> last log {rewards[-1]:.3f}"
