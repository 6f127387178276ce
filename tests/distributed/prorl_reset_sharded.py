"""Run by tests/test_gpu_launch.py under `accelerate launch` with a DeepSpeed or FSDP2 config (GPU, bf16).

ProRL with a reference reset after every optimizer step, full fine-tuning or LoRA (`lora` as second argument). At
each reset it records whether the optimizer state was cleared and how far the gathered reference is from the
gathered policy; the run logs the KL of the step after the reset. Rank 0 writes <out_dir>/result.json.
"""

import json
import os
import sys

import torch
from peft import LoraConfig

from conftest import end_distributed_run  # tests/ is on PYTHONPATH (see tests/test_gpu_launch.py)
from trl_ext import demo
from trl_ext.core.full_state import full_tensors
from trl_ext.core.reference_reset import adapter_pairs, innermost_optimizer
from trl_ext.prorl import ProRLConfig, ProRLTrainer

out_dir, variant = sys.argv[1], sys.argv[2]


def alternating_reward(completions, **kwargs):  # every group informative
    return [float(i % 2) for i in range(len(completions))]


gpu = torch.cuda.is_available()  # (it also runs on CPU, for debugging it without a GPU)
args = ProRLConfig(output_dir=os.path.join(out_dir, "run"), bf16=gpu, use_cpu=not gpu, gradient_checkpointing=False,
                   report_to="none", save_strategy="no", max_steps=3, per_device_train_batch_size=16,
                   num_generations=4, max_completion_length=4, learning_rate=1e-2, logging_steps=1,
                   disable_tqdm=True, seed=0, beta=0.1, ref_reset_steps=1, steps_per_generation=1,
                   dynamic_sampling="none")
peft_config = (LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
               if variant == "lora" else None)
trainer = ProRLTrainer(model=demo.student_path("arithmetic"), reward_funcs=[alternating_reward], args=args,
                       train_dataset=demo.get_task("arithmetic").dataset(64, seed=3), peft_config=peft_config)
callback = trainer.reference_reset
policy_model = trainer.accelerator.unwrap_model(trainer.model)
resets = []


def reference_and_policy_parameters():
    """(reference, policy) parameter lists in matching order: the `ref` adapter and its `default` twins under LoRA
    (the reset's own pairing), else the reference model's parameters and the policy's of the same names."""
    if trainer.ref_model is None:
        policy, reference = zip(*adapter_pairs(policy_model))
        return list(reference), list(policy)
    reference = callback._reference_parameters()
    return list(reference.values()), [policy_model.get_parameter(name) for name in reference]


original_reset = callback.reset


def recording_reset(step, reason="manual", requested_at=None):
    original_reset(step, reason, requested_at)
    reference, policy = reference_and_policy_parameters()
    zero3 = callback.zero3
    ref_full = full_tensors(lambda: reference, reference, zero3, keep=True)
    policy_full = full_tensors(lambda: policy, policy, zero3, keep=True)
    resets.append({
        "step": step,
        "optimizer_state_entries": len(innermost_optimizer(trainer.optimizer).state),
        # in the reference's precision (a bf16 reference of an fp32-sharded FSDP2 policy holds its rounded values)
        "max_abs_difference": max(float((r.float() - p.to(r.dtype).float()).abs().max())
                                  for r, p in zip(ref_full, policy_full)),
        "parameters": len(ref_full),
    })


callback.reset = recording_reset
trainer.train()
if trainer.accelerator.is_main_process:
    kl = [entry["kl"] for entry in trainer.state.log_history if "kl" in entry]
    with open(os.path.join(out_dir, "result.json"), "w") as f:
        json.dump({"resets": resets, "kl": kl, "history": callback.history}, f)
end_distributed_run()
