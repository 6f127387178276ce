"""QLoRA (4-bit base + LoRA) with every trainer but GNDPO (whose run is in test_gndpo_trainer.py): PGPO's EMA teacher
adapter and ProRL's reference adapter live in the quantized model, the Kondo gate returns graph-connected zero losses
through it, and purification distils full-precision teachers into it. bitsandbytes >= 0.45 runs 4-bit layers on CPU;
it is in the `test` extra.
Each test also runs on a CUDA GPU where there is one (bf16 compute, and ProRL's reset with a paged 8-bit optimizer,
whose GPU buffers the reset must release); the CUDA cases skip on CPU-only machines such as CI."""

import bitsandbytes  # noqa: F401  (in the `test` extra: missing, these tests must fail, not skip)
import pytest
import torch
from peft import LoraConfig

from conftest import cpu_config, four_bit_config, is_quantized
from trl_ext import (DelightConfig, DelightTrainer, PGPOConfig, PGPOTrainer, PurifiedDistillConfig,
                     PurifiedDistillTrainer, demo)
from trl_ext.prorl import ProRLConfig, ProRLTrainer



@pytest.fixture(params=["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def device(request) -> str:
    return request.param


def config(config_cls, output_dir, device: str, **overrides):
    """`cpu_config` on the given device: float32 on CPU, bf16 on a GPU."""
    return cpu_config(config_cls, output_dir, use_cpu=device == "cpu", bf16=device == "cuda", **overrides)


def four_bit(device: str):
    quantization = four_bit_config()
    if device == "cuda":
        quantization.bnb_4bit_compute_dtype = torch.bfloat16
    return quantization


LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def adapter(model, name):
    return {n.replace(f".{name}.", ".X."): p.detach().clone() for n, p in model.named_parameters()
            if f".{name}." in n}


def trains_only_the_adapter(trainer) -> None:
    """Train, then check that every LoRA weight moved and no base weight did."""
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora" in n for n in trainable)
    trainer.train()
    for name, parameter in trainer.model.named_parameters():
        assert torch.equal(parameter, before[name]) != (name in trainable), name


def test_pgpo_ema_teacher_adapter_on_a_4bit_model(tmp_path, device, student_path, arithmetic_dataset):
    args = config(PGPOConfig, tmp_path, device, max_steps=1, distillation_topk=8, seed=0, teacher_update_rate=0.25,
                      per_device_train_batch_size=32)  # 8 groups: some succeed, so the teacher has contexts
    trainer = PGPOTrainer(model=student_path, reward_funcs=[demo.task_reward], args=args,
                          train_dataset=arithmetic_dataset, peft_config=LORA, quantization_config=four_bit(device))
    assert is_quantized(trainer.model) and "teacher" in trainer.model.peft_config
    teacher0, student0 = adapter(trainer.model, "teacher"), adapter(trainer.model, "default")
    assert teacher0.keys() == student0.keys() and all(torch.equal(teacher0[k], student0[k]) for k in teacher0)
    trainer.train()
    teacher1, student1 = adapter(trainer.model, "teacher"), adapter(trainer.model, "default")
    assert any(not torch.equal(student1[k], student0[k]) for k in student0)  # the student learned
    for k in teacher0:  # and the teacher adapter is the EMA of it
        torch.testing.assert_close(teacher1[k], 0.75 * teacher0[k] + 0.25 * student1[k], atol=1e-6, rtol=0)
    assert trainer.state.log_history[0]["pgpo/usable_context_fraction"] > 0


def test_prorl_reference_adapter_reset_on_a_4bit_model(tmp_path, device, student_path, arithmetic_dataset):
    def alternating_reward(completions, **kwargs):  # every group informative
        return [float(i % 2) for i in range(len(completions))]

    args = config(ProRLConfig, tmp_path, device, max_steps=3, beta=0.1, ref_reset_steps=2, dynamic_sampling="none",
                  **({"optim": "paged_adamw_8bit"} if device == "cuda" else {}))
    trainer = ProRLTrainer(model=student_path, reward_funcs=[alternating_reward], args=args,
                           train_dataset=arithmetic_dataset, peft_config=LORA, quantization_config=four_bit(device))
    assert is_quantized(trainer.model) and "ref" in trainer.model.peft_config
    trainer.train()
    assert trainer.reference_reset.history == [{"step": 2, "reason": "schedule", "requested_at": 2}]
    kl = [entry["kl"] for entry in trainer.state.log_history if "kl" in entry]
    assert kl[1] > 0 and kl[2] == pytest.approx(0.0, abs=1e-7)  # the rollout after the reset starts from pi_ref
    reference, policy = adapter(trainer.model, "ref"), adapter(trainer.model, "default")
    assert reference.keys() == policy.keys() and any(not torch.equal(reference[k], policy[k]) for k in reference)


def test_kondo_gate_skipping_micro_batches_on_a_4bit_model(tmp_path, device, student_path, arithmetic_dataset):
    # Price 0 gates out every completion without delight: some micro-batches have nothing left to learn.
    args = config(DelightConfig, tmp_path, device, max_steps=2, gate="threshold", gate_price=0.0,
                      per_device_train_batch_size=4, gradient_accumulation_steps=4)
    trainer = DelightTrainer(model=student_path, reward_funcs=[demo.task_reward], args=args,
                             train_dataset=arithmetic_dataset, peft_config=LORA, quantization_config=four_bit(device))
    assert is_quantized(trainer.model)
    trains_only_the_adapter(trainer)
    assert trainer.gate_counters["micro_batches_skipped"] > 0


def test_purified_distillation_into_a_4bit_student(tmp_path, device, student_path, teacher_path, arithmetic_dataset):
    args = config(PurifiedDistillConfig, tmp_path, device, max_steps=2, purification="similarity_router",
                      router_min_examples=1)
    trainer = PurifiedDistillTrainer(model=student_path, reward_funcs=[demo.task_reward], args=args,
                                     train_dataset=arithmetic_dataset, teacher_models=[teacher_path, student_path],
                                     peft_config=LORA, quantization_config=four_bit(device))
    assert is_quantized(trainer.model) and not any(is_quantized(t) for t in trainer.teacher_models)
    trains_only_the_adapter(trainer)
