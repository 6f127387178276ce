# trl-ext is not on PyPI: install it from this repository (`pip install -e .`, see the README) and run this script
# with that environment (`accelerate launch`, `torchrun` or `python`). The header lists the rest of what it needs.
# /// script
# dependencies = ["trl>=1.16,<1.17", "peft"]
# ///
"""PGPO: self-distillation policy optimization (SDPO) with an information-modulated step size (arXiv 2606.03620).

With no arguments it runs the embedded offline demo: a tiny model that can use a worked solution or the environment's
feedback in its prompt, trained on small-number addition where every prompt carries feedback ("expected 7"); it
learns to answer without them. 300 steps, about 30 s on 2 CPU cores; the training reward goes from about 0.24 to
0.33, while SDPO (`--step_size_modulation false`) first rises, then collapses as its self-teacher forgets how to read
its context (about 0.16 at the end):

    accelerate launch examples/pgpo.py
    accelerate launch examples/pgpo.py --demo_misleading_feedback 0.5    # half of the feedback names a wrong answer
    accelerate launch examples/pgpo.py --step_size_modulation false      # SDPO

Real models (the dataset needs a `prompt` column, and optionally a `feedback` column with the environment's text
feedback on each prompt; the reward decides which siblings are successful demonstrations):

    accelerate launch --config_file examples/accelerate_configs/deepspeed_zero2.yaml examples/pgpo.py \
        --model_name_or_path Qwen/Qwen3-8B --dataset_name <your dataset> --reward_funcs trl.rewards.accuracy_reward \
        --per_device_train_batch_size 8 --num_generations 8 --max_completion_length 4096 --learning_rate 1e-5 \
        --use_peft --lora_target_modules q_proj v_proj --output_dir Qwen3-8B-PGPO --push_to_hub

Every GRPOConfig/PGPOConfig/ModelConfig flag works, and `--config recipe.yaml` reads them from YAML.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from trl import ModelConfig, get_peft_config, get_quantization_config

from trl_ext import PGPOConfig, PGPOTrainer, demo
from trl_ext.demo.cli import (
    ExampleScriptArguments,
    demo_reward_summary,
    parse_example_args,
    real_model_setup,
    wants_eval,
)

# Demo-sized training settings: the defaults in demo mode (a --config YAML and the command line still win).
DEMO_SETTINGS = {
    "output_dir": "outputs/pgpo-demo",
    "max_steps": 300,
    "learning_rate": 3e-4,
    "lr_scheduler_type": "constant",
    "per_device_train_batch_size": 32,
    "num_generations": 4,
    "max_completion_length": 4,
    "distillation_topk": 20,  # the demo vocabulary has 88 tokens
    "logging_steps": 50,
    "save_strategy": "no",
    "report_to": "none",
    "gradient_checkpointing": False,
}


@dataclass
class PGPOScriptArguments(ExampleScriptArguments):
    demo_misleading_feedback: float = field(
        default=0.0, metadata={"help": "Demo only: share of training prompts whose feedback names a wrong answer."}
    )


def main(script_args: PGPOScriptArguments, training_args: PGPOConfig, model_args: ModelConfig) -> None:
    demo_mode = model_args.model_name_or_path is None
    if demo_mode:
        model = demo.self_teacher_path(script_args.demo_task)
        task = demo.get_task(script_args.demo_task)
        train_dataset = demo.with_feedback(task.dataset(script_args.demo_train_size, seed=1),
                                           misleading_fraction=script_args.demo_misleading_feedback)
        # Held out: prompts drawn with another seed, with correct feedback (the self-teacher reads it in eval too).
        eval_dataset = (demo.with_feedback(task.dataset(script_args.demo_eval_size, seed=2))
                        if wants_eval(training_args) else None)
        reward_funcs = [demo.task_reward]
    else:
        model, train_dataset, eval_dataset, reward_funcs = real_model_setup(script_args, training_args, model_args)
        if reward_funcs is None:
            raise ValueError("PGPO needs --reward_funcs or --reward_model_name_or_path: rewards decide which siblings "
                             "are successful demonstrations.")

    trainer = PGPOTrainer(
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
        print(demo_reward_summary(trainer))
        multipliers = [h["pgpo/multiplier"] for h in trainer.state.log_history if "pgpo/multiplier" in h]
        print(f"step multiplier m_k: logged means from {min(multipliers):.2f} to {max(multipliers):.2f}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    script_args, training_args, model_args = parse_example_args(
        (PGPOScriptArguments, PGPOConfig, ModelConfig), DEMO_SETTINGS
    )
    main(script_args, training_args, model_args)
