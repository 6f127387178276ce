# trl-ext is not on PyPI: install it from this repository (`pip install -e .`, see the README) and run this script
# with that environment (`accelerate launch`, `torchrun` or `python`). The header lists the rest of what it needs.
# /// script
# dependencies = ["trl>=1.16,<1.17", "peft"]
# ///
"""Multi-teacher on-policy distillation with knowledge purification (after arXiv 2602.01064).

With no arguments it runs the embedded offline demo: three tiny teachers with different strengths (an addition
expert, a reversal expert, and a generalist that is confidently wrong on additions whose first operand is >= 5) are
distilled into one weak student on a mix of both tasks; the similarity router learns online which teacher to trust
on which prompt (a few minutes on CPU; the teachers are SFT-trained once and cached):

    accelerate launch examples/purified_distill.py
    accelerate launch examples/purified_distill.py --purification none          # the naive averaging baseline

Real models (every teacher must share the student's vocabulary, so take them from the student's family: Qwen3's
tokenizer adds tokens that Qwen2.5's lacks, and a mismatch is refused at construction):

    accelerate launch --config_file examples/accelerate_configs/deepspeed_zero3.yaml examples/purified_distill.py \
        --model_name_or_path Qwen/Qwen3-0.6B \
        --teacher_model_names_or_paths Qwen/Qwen3-1.7B Qwen/Qwen3-4B Qwen/Qwen3-8B \
        --purification similarity_router --dataset_name trl-lib/DeepMath-103K \
        --reward_funcs trl.rewards.accuracy_reward --per_device_train_batch_size 8 --num_generations 8 \
        --max_completion_length 1024 --learning_rate 1e-6 --use_peft --lora_target_modules q_proj v_proj \
        --output_dir Qwen3-0.6B-PurifiedDistill --push_to_hub

Every GRPOConfig/PurifiedDistillConfig/ModelConfig flag works, and `--config recipe.yaml` reads them from YAML.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from trl import ModelConfig, get_peft_config, get_quantization_config

from trl_ext import demo
from trl_ext.demo import teachers as demo_teachers
from trl_ext.demo.cli import REWARD_FUNCS_HELP, RewardScriptArguments, parse_example_args, real_model_setup, wants_eval
from trl_ext.purify import PurifiedDistillConfig, PurifiedDistillTrainer

# Demo-sized training settings: the defaults in demo mode (a --config YAML and the command line still win).
DEMO_SETTINGS = {
    "output_dir": "outputs/purified-distill-demo",
    "max_steps": 400,
    "learning_rate": 1e-3,
    "per_device_train_batch_size": 32,
    "num_generations": 8,
    "max_completion_length": 6,
    "logging_steps": 50,
    "save_strategy": "no",
    "report_to": "none",
    "gradient_checkpointing": False,
}


@dataclass
class PurifiedDistillScriptArguments(RewardScriptArguments):
    reward_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": REWARD_FUNCS_HELP + " Every purification but 'none' needs a reward (it says which teacher is "
            "right on a prompt)."
        },
    )
    demo_train_size: int = field(default=8000, metadata={"help": "Number of demo training prompts (in-domain)."})
    demo_eval_size: int = field(
        default=64,
        metadata={"help": "Number of in-domain demo prompts (drawn with their own seed) evaluated when "
                  "--eval_strategy is not 'no'."},
    )


def main(script_args: PurifiedDistillScriptArguments, training_args: PurifiedDistillConfig,
         model_args: ModelConfig) -> None:
    demo_mode = model_args.model_name_or_path is None
    if demo_mode:
        model = demo_teachers.student_path()
        teachers = training_args.teacher_model_names_or_paths or demo_teachers.teacher_paths()
        train_dataset = demo_teachers.in_domain_dataset(script_args.demo_train_size, seed=1)
        # Held out: in-domain prompts drawn with another seed (from the same small question space).
        eval_dataset = (demo_teachers.in_domain_dataset(script_args.demo_eval_size, seed=2)
                        if wants_eval(training_args) else None)
        reward_funcs = [demo.task_reward]
    else:
        teachers = training_args.teacher_model_names_or_paths
        if not teachers:
            raise ValueError("Pass --teacher_model_names_or_paths (one or more teachers) with --model_name_or_path.")
        model, train_dataset, eval_dataset, reward_funcs = real_model_setup(script_args, training_args, model_args)

    trainer = PurifiedDistillTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        teacher_models=teachers,
        peft_config=get_peft_config(model_args),
        quantization_config=get_quantization_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    if demo_mode and trainer.is_world_process_zero():
        logs = [entry for entry in trainer.state.log_history if "reward" in entry]
        first, last = logs[0], logs[-1]
        print(f"demo task reward: first log {first['reward']:.3f} -> last log {last['reward']:.3f}")
        names = trainer.teacher_names if training_args.teacher_model_names_or_paths else demo_teachers.TEACHER_ROLES
        shares = ", ".join(f"{name} {last.get(f'purify/choice/teacher_{k}', float('nan')):.2f}"
                           for k, name in enumerate(names))
        print(f"last log: teacher shares {shares}; router accuracy {last.get('purify/router_accuracy')}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    script_args, training_args, model_args = parse_example_args(
        (PurifiedDistillScriptArguments, PurifiedDistillConfig, ModelConfig), DEMO_SETTINGS
    )
    main(script_args, training_args, model_args)
