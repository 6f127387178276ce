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
