# /// script
# dependencies = ["trl-ext", "trl>=1.16,<1.17", "peft"]
# ///
"""Delightful Policy Gradient with the Kondo gate (arXiv 2603.14608, 2603.20526).

With no arguments it runs the embedded offline demo on CPU (under a minute): small-number addition from a weak tiny
student, DG weights, and a Kondo gate that passes about 30% of completions to the backward pass
(`--demo_task reversal` gives the Kondo paper's token-reversal task, which needs a longer run):

    accelerate launch examples/delight.py

Real models (any GRPO dataset and reward functions):

    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml examples/delight.py \
        --model_name_or_path Qwen/Qwen3-0.6B --dataset_name trl-lib/DeepMath-103K \
        --reward_funcs trl.rewards.accuracy_reward --gate pass_rate --gate_pass_rate 0.3 \
        --per_device_train_batch_size 8 --num_generations 8 --gradient_accumulation_steps 4 \
        --learning_rate 1e-6 --output_dir Qwen3-0.6B-Delight --push_to_hub

Every GRPOConfig/DelightConfig/ModelConfig flag works, and `--config recipe.yaml` reads them from YAML.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field

from datasets import load_dataset
from trl import ModelConfig, ScriptArguments, get_peft_config, get_quantization_config

from trl_ext import DelightConfig, DelightTrainer, demo
from trl_ext.demo.cli import parse_example_args

# Demo-sized training settings: the defaults in demo mode (a --config YAML and the command line still win).
DEMO_SETTINGS = {
    "output_dir": "outputs/delight-demo",
    "max_steps": 300,
    "learning_rate": 1e-3,
    "per_device_train_batch_size": 16,
    "gradient_accumulation_steps": 4,
    "num_generations": 8,
    "max_completion_length": 4,
    "logging_steps": 25,
    "gate": "pass_rate",
    "gate_pass_rate": 0.3,
    "save_strategy": "no",
    "report_to": "none",
    "gradient_checkpointing": False,
}


@dataclass
class DelightScriptArguments(ScriptArguments):
    reward_funcs: list[str] | None = field(
        default=None,
        metadata={"help": "Reward functions as dotted import paths (e.g. 'trl.rewards.accuracy_reward'). Required "
                  "with --model_name_or_path; the demo uses its task reward."},
    )
    demo_task: str = field(
        default="arithmetic",
        metadata={"help": "Task of the embedded demo (used when no --model_name_or_path is given).",
                  "choices": sorted(demo.TASKS)},
    )
    demo_train_size: int = field(default=8000, metadata={"help": "Number of demo training prompts."})


def import_callable(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def main(script_args: DelightScriptArguments, training_args: DelightConfig, model_args: ModelConfig) -> None:
    demo_mode = model_args.model_name_or_path is None
    if demo_mode:
        model = demo.student_path(script_args.demo_task)
        train_dataset = demo.get_task(script_args.demo_task).dataset(script_args.demo_train_size, seed=1)
        reward_funcs = [demo.task_reward]
    else:
        model = model_args.model_name_or_path
        training_args.model_init_kwargs = {
            "revision": model_args.model_revision,
            "attn_implementation": model_args.attn_implementation,
            "dtype": model_args.dtype,
            **(training_args.model_init_kwargs or {}),
        }
        if script_args.dataset_name is None or not script_args.reward_funcs:
            raise ValueError("With --model_name_or_path, pass --dataset_name and at least one --reward_funcs.")
        train_dataset = load_dataset(
            script_args.dataset_name, name=script_args.dataset_config, split=script_args.dataset_train_split
        )
        reward_funcs = [import_callable(path) for path in script_args.reward_funcs]

    trainer = DelightTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        peft_config=get_peft_config(model_args),
        quantization_config=get_quantization_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    if demo_mode and trainer.is_world_process_zero():
        rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
        counters = trainer.gate_counters
        print(f"demo task reward: first log {rewards[0]:.3f} -> last log {rewards[-1]:.3f}; gate passed "
              f"{counters['completions_kept']}/{counters['completions']} completions and skipped "
              f"{counters['micro_batches_skipped']}/{counters['micro_batches']} backward passes")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    script_args, training_args, model_args = parse_example_args(
        (DelightScriptArguments, DelightConfig, ModelConfig), DEMO_SETTINGS
    )
    main(script_args, training_args, model_args)
