# trl-ext is not on PyPI: install it from this repository (`pip install -e .`, see the README) and run this script
# with that environment (`accelerate launch`, `torchrun` or `python`). The header lists the rest of what it needs.
# /// script
# dependencies = ["trl>=1.16,<1.17", "peft"]
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

import os

from trl import ModelConfig, get_peft_config, get_quantization_config

from trl_ext import DelightConfig, DelightTrainer, demo
from trl_ext.demo.cli import (
    ExampleScriptArguments,
    demo_reward_summary,
    parse_example_args,
    real_model_setup,
    wants_eval,
)

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


def main(script_args: ExampleScriptArguments, training_args: DelightConfig, model_args: ModelConfig) -> None:
    demo_mode = model_args.model_name_or_path is None
    if demo_mode:
        model = demo.student_path(script_args.demo_task)
        task = demo.get_task(script_args.demo_task)
        train_dataset = task.dataset(script_args.demo_train_size, seed=1)
        # Held out: prompts drawn with another seed (from the same small question space).
        eval_dataset = task.dataset(script_args.demo_eval_size, seed=2) if wants_eval(training_args) else None
        reward_funcs = [demo.task_reward]
    else:
        model, train_dataset, eval_dataset, reward_funcs = real_model_setup(script_args, training_args, model_args)
        if reward_funcs is None:
            raise ValueError("DelightTrainer learns from rewards: pass --reward_funcs or --reward_model_name_or_path.")

    trainer = DelightTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=get_peft_config(model_args),
        quantization_config=get_quantization_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    if demo_mode and trainer.is_world_process_zero():
        counters = trainer.gate_counters
        print(f"{demo_reward_summary(trainer)}; gate passed {counters['completions_kept']}/{counters['completions']} "
              f"completions and skipped {counters['micro_batches_skipped']}/{counters['micro_batches']} backward passes")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    script_args, training_args, model_args = parse_example_args(
        (ExampleScriptArguments, DelightConfig, ModelConfig), DEMO_SETTINGS
    )
    main(script_args, training_args, model_args)
