# trl-ext is not on PyPI: install it from this repository (`pip install -e .`, see the README) and run this script
# with that environment (`accelerate launch`, `torchrun` or `python`). The header lists the rest of what it needs.
# /// script
# dependencies = ["trl>=1.16,<1.17", "peft"]
# ///
"""GNDPO: on-policy distillation with globally normalized advantages (arXiv 2606.09091).

With no arguments it runs the embedded offline demo (a tiny SFT teacher that solves small-number addition, a
weak student, 1000 steps on CPU in under two minutes):

    accelerate launch examples/gndpo.py

Real models (the teacher must share the student's vocabulary):

    accelerate launch --config_file examples/accelerate_configs/deepspeed_zero3.yaml examples/gndpo.py \
        --model_name_or_path Qwen/Qwen3-0.6B --teacher_model_name_or_path Qwen/Qwen3-4B \
        --dataset_name trl-lib/DeepMath-103K --reward_funcs trl.rewards.accuracy_reward \
        --per_device_train_batch_size 8 --num_generations 8 --max_completion_length 1024 \
        --learning_rate 1e-6 --use_peft --lora_target_modules q_proj v_proj --output_dir Qwen3-0.6B-GNDPO \
        --push_to_hub

Every GRPOConfig/GNDPOConfig/ModelConfig flag works, and `--config recipe.yaml` reads them from YAML.
"""

from __future__ import annotations

import os

from trl import ModelConfig, get_peft_config, get_quantization_config

from trl_ext import GNDPOConfig, GNDPOTrainer, demo
from trl_ext.demo.cli import (
    ExampleScriptArguments,
    demo_reward_summary,
    parse_example_args,
    real_model_setup,
    wants_eval,
)

# Demo-sized training settings: the defaults in demo mode (a --config YAML and the command line still win).
DEMO_SETTINGS = {
    "output_dir": "outputs/gndpo-demo",
    "max_steps": 1000,
    "learning_rate": 1e-3,
    "per_device_train_batch_size": 32,
    "num_generations": 8,
    "max_completion_length": 4,
    "logging_steps": 50,
    "save_strategy": "no",
    "report_to": "none",
    "gradient_checkpointing": False,
}


def main(script_args: ExampleScriptArguments, training_args: GNDPOConfig, model_args: ModelConfig) -> None:
    demo_mode = model_args.model_name_or_path is None
    if demo_mode:
        model = demo.student_path(script_args.demo_task)
        teacher = training_args.teacher_model_name_or_path or demo.teacher_path(script_args.demo_task)
        task = demo.get_task(script_args.demo_task)
        train_dataset = task.dataset(script_args.demo_train_size, seed=1)
        # Held out: prompts drawn with another seed (from the same small question space).
        eval_dataset = task.dataset(script_args.demo_eval_size, seed=2) if wants_eval(training_args) else None
        reward_funcs = [demo.task_reward]  # logged only: GNDPO's advantage uses the teacher
    else:
        if training_args.teacher_model_name_or_path is None:
            raise ValueError("Pass --teacher_model_name_or_path with --model_name_or_path.")
        teacher = training_args.teacher_model_name_or_path
        model, train_dataset, eval_dataset, reward_funcs = real_model_setup(script_args, training_args, model_args)

    trainer = GNDPOTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        teacher_model=teacher,
        peft_config=get_peft_config(model_args),
        quantization_config=get_quantization_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    if demo_mode and trainer.is_world_process_zero():
        print(demo_reward_summary(trainer))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    script_args, training_args, model_args = parse_example_args(
        (ExampleScriptArguments, GNDPOConfig, ModelConfig), DEMO_SETTINGS
    )
    main(script_args, training_args, model_args)
