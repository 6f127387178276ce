"""GPU-only paths. CI has no GPU: these skip cleanly there and run wherever CUDA is available."""

import pytest
import torch

from conftest import cpu_config
from trl_ext import GNDPOConfig, GNDPOTrainer, PGPOConfig, PGPOTrainer, demo

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_bf16_training_on_gpu(tmp_path, student_path, teacher_path, arithmetic_dataset):
    args = cpu_config(GNDPOConfig, tmp_path, use_cpu=False, bf16=True,
                      teacher_model_init_kwargs={"dtype": "bfloat16"})
    trainer = GNDPOTrainer(model=student_path, reward_funcs=[demo.task_reward], args=args,
                           train_dataset=arithmetic_dataset, teacher_model=teacher_path)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert next(trainer.teacher_model.parameters()).device.type == "cuda"
    assert next(trainer.teacher_model.parameters()).dtype == torch.bfloat16
    assert any(not torch.equal(p, dict(trainer.model.named_parameters())[n]) for n, p in before.items())
    assert torch.isfinite(torch.tensor(trainer.state.log_history[0]["gndpo/score_std"]))


@pytest.mark.parametrize("teacher_model_kind", ["ema", "live"])
def test_pgpo_bf16_on_gpu(tmp_path, self_teacher_path, arithmetic_dataset, teacher_model_kind):
    args = cpu_config(PGPOConfig, tmp_path, use_cpu=False, bf16=True, distillation_topk=20,
                      teacher_model_kind=teacher_model_kind, per_device_train_batch_size=32)
    trainer = PGPOTrainer(model=self_teacher_path, reward_funcs=[demo.task_reward], args=args,
                          train_dataset=demo.with_feedback(arithmetic_dataset))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    if teacher_model_kind == "ema":
        assert next(trainer.self_teacher.copy.parameters()).device.type == "cuda"
    assert any(not torch.equal(p, dict(trainer.model.named_parameters())[n]) for n, p in before.items())
    logged = [h for h in trainer.state.log_history if "pgpo/divergence" in h]
    assert logged and all(torch.isfinite(torch.tensor(h["pgpo/divergence"])) for h in logged)


def test_gated_delight_purify_and_prorl_refill_bf16_on_gpu(tmp_path, student_path, teacher_path,
                                                           arithmetic_dataset):
    """The rest of the trainers on one GPU in bf16: the Kondo gate's skipped micro-batches, two frozen teachers
    placed on the GPU, and ProRL's refill rounds."""
    from trl_ext import DelightConfig, DelightTrainer, PurifiedDistillConfig, PurifiedDistillTrainer
    from trl_ext.prorl import ProRLConfig, ProRLTrainer

    def gpu(config_cls, name, **overrides):
        return cpu_config(config_cls, tmp_path / name, use_cpu=False, bf16=True, **overrides)

    runs = {
        "delight/": DelightTrainer(
            model=student_path, reward_funcs=[demo.task_reward], train_dataset=arithmetic_dataset,
            args=gpu(DelightConfig, "delight", gate="threshold", gate_price=0.0, per_device_train_batch_size=4,
                     gradient_accumulation_steps=4)),
        "purify/": PurifiedDistillTrainer(
            model=student_path, reward_funcs=[demo.task_reward], train_dataset=arithmetic_dataset,
            teacher_models=[teacher_path, student_path],
            args=gpu(PurifiedDistillConfig, "purify", purification="classifier_router", router_min_examples=1)),
        "prorl/": ProRLTrainer(
            model=student_path, reward_funcs=[demo.task_reward], train_dataset=arithmetic_dataset,
            args=gpu(ProRLConfig, "prorl", dynamic_sampling="refill", num_generations=4, beta=0.1,
                     ref_reset_steps=1)),
    }
    for prefix, trainer in runs.items():
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.train()
        assert next(trainer.model.parameters()).device.type == "cuda", prefix
        assert any(not torch.equal(p, dict(trainer.model.named_parameters())[n]) for n, p in before.items()), prefix
        metrics = {k: v for h in trainer.state.log_history for k, v in h.items() if k.startswith(prefix)}
        # None: TRL's "undefined in this logging window" (e.g. router accuracy with no decisive prompt).
        defined = [v for v in metrics.values() if v is not None]
        assert defined and all(torch.isfinite(torch.tensor(float(v))) for v in defined), (prefix, metrics)
    assert all(next(t.parameters()).device.type == "cuda" for t in runs["purify/"].teacher_models)
    assert runs["delight/"].gate_counters["micro_batches_skipped"] > 0
    assert runs["prorl/"].reference_reset.history[0]["step"] == 1
