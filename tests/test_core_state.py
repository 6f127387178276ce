"""Trainer state registered with ExtGRPOTrainer.register_state survives checkpoint and resume."""

import pytest
from transformers import TrainerCallback

from conftest import cpu_config
from trl_ext import GNDPOConfig, GNDPOTrainer


class StepCounter(TrainerCallback):
    """A stand-in for trainer state (a price history, a reset counter): counts optimizer steps."""

    def __init__(self):
        self.steps = 0
        self.history = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1
        self.history.append(state.global_step * 10)

    def state_dict(self):
        return {"steps": self.steps, "history": list(self.history)}

    def load_state_dict(self, state):
        self.steps, self.history = state["steps"], list(state["history"])


def make_trainer(output_dir, student_path, teacher_path, dataset, **overrides):
    counter = StepCounter()
    trainer = GNDPOTrainer(model=student_path, args=cpu_config(GNDPOConfig, output_dir, **overrides),
                           train_dataset=dataset, teacher_model=teacher_path, callbacks=[counter])
    trainer.register_state("counter", counter)
    return trainer, counter


def test_state_is_saved_and_restored(tmp_path, student_path, teacher_path, arithmetic_dataset):
    trainer, counter = make_trainer(tmp_path, student_path, teacher_path, arithmetic_dataset,
                                    save_strategy="steps", save_steps=2, max_steps=2)
    trainer.train()
    assert counter.state_dict() == {"steps": 2, "history": [10, 20]}
    assert (tmp_path / "checkpoint-2" / "trl_ext_state.pt").is_file()

    resumed, restored = make_trainer(tmp_path, student_path, teacher_path, arithmetic_dataset, max_steps=3)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert restored.state_dict() == {"steps": 3, "history": [10, 20, 30]}


def test_resuming_without_state_file_is_an_error(tmp_path, student_path, teacher_path, arithmetic_dataset):
    plain = GNDPOTrainer(model=student_path, args=cpu_config(GNDPOConfig, tmp_path, save_strategy="steps",
                                                             save_steps=1, max_steps=1),
                         train_dataset=arithmetic_dataset, teacher_model=teacher_path)
    plain.train()
    trainer, _ = make_trainer(tmp_path, student_path, teacher_path, arithmetic_dataset, max_steps=2)
    with pytest.raises(FileNotFoundError, match="trl_ext_state.pt"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))


def test_duplicate_state_name_is_an_error(tmp_path, student_path, teacher_path, arithmetic_dataset):
    trainer, counter = make_trainer(tmp_path, student_path, teacher_path, arithmetic_dataset)
    with pytest.raises(ValueError, match="counter"):
        trainer.register_state("counter", counter)


def test_mps_is_refused_with_the_reason():
    import torch

    from trl_ext.core.trainer import check_device

    check_device(torch.device("cpu"))
    with pytest.raises(NotImplementedError, match="float64.*MPS.*use_cpu=True"):
        check_device(torch.device("mps"))
