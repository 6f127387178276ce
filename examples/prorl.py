# trl-ext is not on PyPI: install it from this repository (`pip install -e .`, see the README) and run this script
# with that environment (`accelerate launch`, `torchrun` or `python`). The header lists the rest of what it needs.
# /// script
# dependencies = ["trl>=1.16,<1.17", "peft"]
# ///
"""ProRL: prolonged RL with clip-higher, dynamic sampling and a KL-regularized, periodically reset reference.

Paper: arXiv 2505.24864.

With no arguments it runs the embedded offline demo: RL with the ProRL recipe on the demo's small-number addition
task from a weak tiny student, 300 steps with a reference + optimizer reset every 100 (under a minute on CPU with
OMP_NUM_THREADS=1; more threads than free cores slow this tiny model down several-fold). It prints the task reward
rising (about 0.2 -> 0.35) and the reset steps:

    OMP_NUM_THREADS=1 accelerate launch examples/prorl.py

Real models (the paper's recipe: 16 samples per prompt at temperature 1.2, clip 0.2/0.4, KL 1e-4, lr 2e-6, constant):

    accelerate launch --config_file examples/accelerate_configs/deepspeed_zero2.yaml examples/prorl.py \
        --model_name_or_path deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B --dataset_name trl-lib/DeepMath-103K \
        --reward_funcs trl.rewards.accuracy_reward --per_device_train_batch_size 16 --steps_per_generation 4 \
        --max_completion_length 8192 --ref_reset_steps 300 --eos_penalty 0.1 --output_dir ProRL-1.5B --push_to_hub

Validation-triggered resets: `--eval_strategy steps --eval_steps 50 --ref_reset_metric eval_reward` (the demo
evaluates on prompts drawn with a seed of their own; real runs use `--dataset_test_split`). LoRA: `--use_peft
--lora_target_modules q_proj v_proj` (the reference is then a frozen copy of the adapter). Every
GRPOConfig/ProRLConfig/ModelConfig flag works, and `--config recipe.yaml` reads them from YAML.
"""

from __future__ import annotations

import os

from trl import ModelConfig, get_peft_config, get_quantization_config

from trl_ext import demo
from trl_ext.demo.cli import (
    ExampleScriptArguments,
    demo_reward_summary,
    parse_example_args,
    real_model_setup,
    wants_eval,
)
from trl_ext.prorl import ProRLConfig, ProRLTrainer

# Demo-sized training settings: the defaults in demo mode (a --config YAML and the command line still win).
DEMO_SETTINGS = {
    "output_dir": "outputs/prorl-demo",
    "max_steps": 300,
    "learning_rate": 3e-4,
    "per_device_train_batch_size": 64,  # 4 prompts x 16 samples
    "steps_per_generation": 4,  # ProRL: 4 optimizer steps per rollout (batch 256 / mini-batch 64)
    "max_completion_length": 4,
    "ref_reset_steps": 100,
    "logging_steps": 50,
    "save_strategy": "no",
    "report_to": "none",
    "gradient_checkpointing": False,
}


def main(script_args: ExampleScriptArguments, training_args: ProRLConfig, model_args: ModelConfig) -> None:
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
            raise ValueError("ProRL is RL on a reward: pass --reward_funcs (or --reward_model_name_or_path) with "
                             "--model_name_or_path.")

    trainer = ProRLTrainer(
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
        resets = trainer.reference_reset.summary() if trainer.reference_reset else {"count": 0, "steps": []}
        print(f"{demo_reward_summary(trainer)}; reference resets {resets['count']} at steps {resets['steps']}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    script_args, training_args, model_args = parse_example_args(
        (ExampleScriptArguments, ProRLConfig, ModelConfig), DEMO_SETTINGS
    )
    main(script_args, training_args, model_args)
