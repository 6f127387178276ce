"""Reference reset in a real trainer: full fine-tuning and LoRA, the three triggers, checkpoint and resume."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from transformers import TrainerCallback

from conftest import cpu_config
from trl_ext import demo
from trl_ext.core.reference_reset import ReferenceResetCallback
from trl_ext.core.reset_triggers import ResetSchedule
from trl_ext.prorl import ProRLConfig, ProRLTrainer

def alternating_reward(completions, **kwargs):
    """Every group informative (0, 1, 0, 1, ...), whatever the policy does: every step moves the policy."""
    return [float(i % 2) for i in range(len(completions))]


LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def train_logs(trainer):
    return [entry for entry in trainer.state.log_history if "kl" in entry]


def adam_steps(trainer):
    state = trainer.optimizer.state
    return {int(s["step"]) for s in state.values()}


class SnapshotReference(TrainerCallback):
    """Copies the reference weights at the end of every step (after the reset callback ran)."""

    def __init__(self, trainer):
        self.trainer, self.snapshots = trainer, {}

    def reference(self):
        t = self.trainer
        if t.ref_model is not None:
            return {n: p.detach().clone() for n, p in t.ref_model.named_parameters()}
        return {n.replace(".ref.", ".default."): p.detach().clone()
                for n, p in t.model.named_parameters() if ".ref." in n}

    def policy(self):
        names = self.reference().keys()
        return {n: p.detach().clone() for n, p in self.trainer.model.named_parameters() if n in names}

    def on_step_end(self, args, state, control, **kwargs):
        self.snapshots[state.global_step] = (self.reference(), self.policy())


def equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_full_finetune_reset_on_schedule(tmp_path, student_path, arithmetic_dataset):
    args = cpu_config(ProRLConfig, tmp_path, max_steps=3, beta=0.1, ref_reset_steps=2, dynamic_sampling="none")
    trainer = ProRLTrainer(model=student_path, reward_funcs=[alternating_reward], args=args,
                           train_dataset=arithmetic_dataset)
    snapshot = SnapshotReference(trainer)
    trainer.add_callback(snapshot)
    trainer.train()
    assert trainer.reference_reset.history == [{"step": 2, "reason": "schedule", "requested_at": 2}]
    ref1, policy1 = snapshot.snapshots[1]
    ref2, policy2 = snapshot.snapshots[2]
    ref3, policy3 = snapshot.snapshots[3]
    assert not equal(ref1, policy1) and equal(ref2, policy2)  # pi_ref <- pi_theta at step 2 ...
    assert equal(ref3, ref2) and not equal(ref3, policy3)     # ... and frozen afterwards
    kl = [entry["kl"] for entry in train_logs(trainer)]
    assert kl[1] > 1e-4 and kl[2] == pytest.approx(0.0, abs=1e-7)  # the rollout after the reset: KL = 0
    assert [entry["prorl/resets"] for entry in train_logs(trainer)] == [0, 0, 1]
    assert adam_steps(trainer) == {1}  # fresh optimizer at step 2, one step since (3 without the reset)


def test_lora_reset_uses_a_reference_adapter(tmp_path, student_path, arithmetic_dataset):
    args = cpu_config(ProRLConfig, tmp_path, max_steps=3, beta=0.1, ref_reset_steps=2, dynamic_sampling="none")
    trainer = ProRLTrainer(model=student_path, reward_funcs=[alternating_reward], args=args,
                           train_dataset=arithmetic_dataset, peft_config=LORA)
    # TRL's reference for a new adapter is the base model (adapters disabled), which a reset cannot move: the
    # trainer adds a frozen "ref" adapter, a copy of the fresh (identity) default adapter.
    assert "ref" in trainer.model.peft_config
    refs = [p for n, p in trainer.model.named_parameters() if ".ref." in n]
    assert refs and not any(p.requires_grad for p in refs)
    base = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora" not in n}
    snapshot = SnapshotReference(trainer)
    trainer.add_callback(snapshot)
    trainer.train()
    ref1, policy1 = snapshot.snapshots[1]
    ref2, policy2 = snapshot.snapshots[2]
    assert not equal(ref1, policy1) and equal(ref2, policy2)
    assert not any(p.requires_grad for n, p in trainer.model.named_parameters() if ".ref." in n)
    assert all(torch.equal(p, base[n]) for n, p in trainer.model.named_parameters() if n in base)
    kl = [entry["kl"] for entry in train_logs(trainer)]
    assert kl[1] > 0 and kl[2] == pytest.approx(0.0, abs=1e-7)
    assert adam_steps(trainer) == {1}


def test_the_added_reference_adapter_has_no_dropout(tmp_path, student_path, arithmetic_dataset):
    """TRL's disable_dropout runs before the trainer adds the "ref" adapter; the reference must still be exact."""
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    args = cpu_config(ProRLConfig, tmp_path, max_steps=3, beta=0.1, ref_reset_steps=2, dynamic_sampling="none",
                      disable_dropout=True)
    trainer = ProRLTrainer(model=student_path, reward_funcs=[alternating_reward], args=args,
                           train_dataset=arithmetic_dataset, peft_config=lora)
    dropouts = {n: m.p for n, m in trainer.model.named_modules() if n.endswith("lora_dropout.ref")}
    assert dropouts and set(dropouts.values()) == {0.0}
    trainer.train()
    kl = [entry["kl"] for entry in train_logs(trainer)]
    assert kl[2] == pytest.approx(0.0, abs=1e-7)  # the rollout after the reset: reference == policy, exactly


def test_reset_releases_paged_optimizer_buffers():
    """bitsandbytes' paged optimizers list their state buffers in a process-wide page manager as well."""
    from types import SimpleNamespace

    from trl_ext.core.reference_reset import reset_optimizer_state

    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([param], lr=0.1)
    state_buffer, other_optimizers_buffer = torch.zeros(3), torch.zeros(3)
    optimizer.state[param] = {"state1": state_buffer, "step": 4}
    optimizer.is_paged = True
    optimizer.page_mng = SimpleNamespace(paged_tensors=[other_optimizers_buffer, state_buffer])
    reset_optimizer_state(optimizer)
    assert not optimizer.state
    assert len(optimizer.page_mng.paged_tensors) == 1 and optimizer.page_mng.paged_tensors[0] is other_optimizers_buffer


def test_reset_reaches_the_torch_optimizer_inside_a_deepspeed_style_wrapper():
    """accelerate wraps DeepSpeed's ZeRO optimizer, which is no torch optimizer but steps one (`.optimizer`) over its
    fp32 partitions: that innermost optimizer's state is the one to clear."""
    from trl_ext.core.reference_reset import innermost_optimizer, reset_optimizer_state

    class AcceleratedStyleOptimizer(torch.optim.Optimizer):  # like accelerate's wrapper: a torch optimizer on top
        def __init__(self, optimizer):
            self.optimizer = optimizer

    class ZeroStyleOptimizer:  # like deepspeed's DeepSpeedZeroOptimizer: a plain object holding a torch optimizer
        def __init__(self, optimizer):
            self.optimizer = optimizer

    param = torch.nn.Parameter(torch.zeros(3))
    torch_optimizer = torch.optim.Adam([param], lr=0.1)
    param.grad = torch.ones(3)
    torch_optimizer.step()
    wrapped = AcceleratedStyleOptimizer(ZeroStyleOptimizer(torch_optimizer))
    assert innermost_optimizer(wrapped) is torch_optimizer
    reset_optimizer_state(wrapped)
    assert not torch_optimizer.state


def test_lora_with_a_peft_model_reuses_trls_reference_adapter(tmp_path, student_path, arithmetic_dataset):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(student_path), LORA)
    args = cpu_config(ProRLConfig, tmp_path, max_steps=2, beta=0.1, ref_reset_steps=1, dynamic_sampling="none")
    trainer = ProRLTrainer(model=model, reward_funcs=[alternating_reward], args=args,
                           train_dataset=arithmetic_dataset, processing_class=demo.build_tokenizer())
    assert sorted(trainer.model.peft_config) == ["default", "ref"]  # created by TRL, reused by the reset
    trainer.train()
    assert trainer.reference_reset.count == 2
    assert [entry["kl"] for entry in train_logs(trainer)] == pytest.approx([0.0, 0.0], abs=1e-7)


def test_kl_share_trigger(tmp_path, student_path, arithmetic_dataset):
    # beta=1 makes the KL term comparable to the policy term after one large step.
    args = cpu_config(ProRLConfig, tmp_path, max_steps=3, beta=1.0, ref_reset_kl_share=1e-3, ref_reset_kl_patience=1,
                      dynamic_sampling="none")
    trainer = ProRLTrainer(model=student_path, reward_funcs=[alternating_reward], args=args,
                           train_dataset=arithmetic_dataset)
    trainer.train()
    logs = train_logs(trainer)
    assert logs[0]["prorl/kl_share"] == 0.0  # step 1: the reference is the policy itself
    assert logs[1]["prorl/kl_share"] > 1e-3
    assert trainer.reference_reset.history[0] == {"step": 2, "reason": "kl_share", "requested_at": 2}
    assert logs[2]["kl"] == pytest.approx(0.0, abs=1e-7)


def test_validation_trigger(tmp_path, student_path, arithmetic_dataset):
    # min_delta=10 on a reward in [0, 1]: the second evaluation can never improve, so patience 1 fires there.
    args = cpu_config(ProRLConfig, tmp_path, max_steps=2, beta=0.1, dynamic_sampling="none",
                      eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=8,
                      ref_reset_metric="reward", ref_reset_patience=1, ref_reset_min_delta=10.0)
    trainer = ProRLTrainer(model=student_path, reward_funcs=[alternating_reward], args=args,
                           train_dataset=arithmetic_dataset, eval_dataset=arithmetic_dataset.select(range(8)))
    trainer.train()
    assert trainer.reference_reset.history == [{"step": 2, "reason": "validation", "requested_at": 2}]
    assert trainer.reference_reset.triggers.best is not None


def test_validation_trigger_with_several_evaluation_datasets(tmp_path, student_path, arithmetic_dataset):
    """transformers evaluates each named dataset on its own (eval_<name>_... metrics, one on_evaluate each): the
    trigger tracks the named one and skips the others instead of failing on their metrics."""
    eval_sets = {"held": arithmetic_dataset.select(range(8)), "other": arithmetic_dataset.select(range(8, 16))}

    def make(metric):
        args = cpu_config(ProRLConfig, tmp_path, max_steps=2, beta=0.1, dynamic_sampling="none",
                          eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=8,
                          ref_reset_metric=metric, ref_reset_patience=1, ref_reset_min_delta=10.0)
        return ProRLTrainer(model=student_path, reward_funcs=[alternating_reward], args=args,
                            train_dataset=arithmetic_dataset, eval_dataset=eval_sets)

    trainer = make("eval_held_reward")
    trainer.train()
    assert trainer.reference_reset.history == [{"step": 2, "reason": "validation", "requested_at": 2}]
    with pytest.raises(ValueError, match=r"names none of the evaluation datasets \['held', 'other'\]"):
        make("reward")


def test_reset_waits_for_the_rollout_boundary(tmp_path, student_path, arithmetic_dataset):
    # One rollout feeds two optimizer steps (steps_per_generation=2, GA=1): a reset requested after step 1 would
    # mix two references in that rollout, so it happens after step 2.
    args = cpu_config(ProRLConfig, tmp_path, max_steps=4, beta=0.1, ref_reset_steps=1, dynamic_sampling="none",
                      per_device_train_batch_size=4, steps_per_generation=2)
    trainer = ProRLTrainer(model=student_path, reward_funcs=[alternating_reward], args=args,
                           train_dataset=arithmetic_dataset)
    trainer.train()
    assert [(h["step"], h["requested_at"]) for h in trainer.reference_reset.history] == [(2, 1), (4, 3)]


def test_resume_after_a_reset_restores_reference_and_history(tmp_path, student_path, arithmetic_dataset):
    def make(**overrides):
        args = cpu_config(ProRLConfig, tmp_path, beta=0.1, ref_reset_steps=2, dynamic_sampling="none", **overrides)
        return ProRLTrainer(model=student_path, reward_funcs=[alternating_reward], args=args,
                            train_dataset=arithmetic_dataset)

    first = make(max_steps=2, save_strategy="steps", save_steps=2)
    first.train()
    checkpoint = tmp_path / "checkpoint-2"
    assert (checkpoint / "trl_ext_state.pt").is_file()
    assert "ProRL" in (tmp_path / "README.md").read_text()  # the card is written with every checkpoint

    resumed = make(max_steps=3)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.reference_reset.history == first.reference_reset.history == [
        {"step": 2, "reason": "schedule", "requested_at": 2}]
    # The restored reference is the policy of step 2 (not the initial model the trainer rebuilt): the first
    # rollout after resuming has zero KL, and the reference equals the checkpointed weights.
    assert train_logs(resumed)[-1]["kl"] == pytest.approx(0.0, abs=1e-7)
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(checkpoint)
    for (name, p), q in zip(resumed.ref_model.named_parameters(), saved.parameters()):
        assert torch.equal(p.detach(), q), name


def test_a_reset_pending_at_a_mid_rollout_checkpoint_happens_when_the_resumed_run_starts(tmp_path, student_path,
                                                                                          arithmetic_dataset):
    # Two optimizer steps per rollout: the reset requested at step 3 waits for the boundary after step 4. A run
    # resumed from checkpoint-3 starts with a fresh rollout (TRL does not checkpoint its buffer), which is that
    # boundary; the pending reset used to wait for the next one instead, which the resumed run's steps shifted.
    def make(**overrides):
        args = cpu_config(ProRLConfig, tmp_path, beta=0.1, ref_reset_steps=3, dynamic_sampling="none",
                          steps_per_generation=2, **overrides)
        return ProRLTrainer(model=student_path, reward_funcs=[alternating_reward], args=args,
                            train_dataset=arithmetic_dataset)

    first = make(max_steps=3, save_strategy="steps", save_steps=3)
    first.train()
    assert first.reference_reset.history == [] and first.reference_reset.pending["requested_at"] == 3
    resumed = make(max_steps=4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert resumed.reference_reset.history == [{"step": 3, "reason": "schedule", "requested_at": 3}]
    assert resumed.reference_reset.pending is None
    assert train_logs(resumed)[-1]["kl"] == pytest.approx(0.0, abs=1e-7)  # step 4's rollout: reference = policy


def test_resume_after_a_reset_with_lora_restores_the_reference_adapter(tmp_path, student_path, arithmetic_dataset):
    def make(**overrides):
        args = cpu_config(ProRLConfig, tmp_path, beta=0.1, ref_reset_steps=2, dynamic_sampling="none", **overrides)
        return ProRLTrainer(model=student_path, reward_funcs=[alternating_reward], args=args,
                            train_dataset=arithmetic_dataset, peft_config=LORA)

    first = make(max_steps=2, save_strategy="steps", save_steps=2)
    first.train()
    # The reference adapter is trainer state (in trl_ext_state.pt): the checkpoint's model is the policy adapter.
    assert (tmp_path / "checkpoint-2" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "checkpoint-2" / "ref").exists()
    reference = {n: p.detach().clone() for n, p in first.model.named_parameters() if ".ref." in n}
    policy = {n.replace(".default.", ".ref."): p.detach().clone() for n, p in first.model.named_parameters()
              if ".default." in n}
    assert reference and equal(reference, policy)  # the reset at step 2 made the reference the step-2 policy

    resumed = make(max_steps=3)
    initial_reference = {n: p.detach().clone() for n, p in resumed.model.named_parameters() if ".ref." in n}
    assert not equal(initial_reference, reference)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed.reference_reset.history == first.reference_reset.history
    assert train_logs(resumed)[-1]["kl"] == pytest.approx(0.0, abs=1e-7)
    assert equal({n: p.detach() for n, p in resumed.model.named_parameters() if ".ref." in n}, reference)


def test_another_trl_ext_trainer_can_use_the_callback(tmp_path, student_path, arithmetic_dataset):
    """The reset is a callback for any trl_ext trainer with a KL term, not a ProRL feature: here DelightTrainer."""
    from trl_ext import DelightConfig, DelightTrainer

    trainer = DelightTrainer(model=student_path, reward_funcs=[alternating_reward],
                             args=cpu_config(DelightConfig, tmp_path, max_steps=3, beta=0.1),
                             train_dataset=arithmetic_dataset)
    callback = ReferenceResetCallback(ResetSchedule(every_steps=2)).attach(trainer)
    snapshot = SnapshotReference(trainer)
    trainer.add_callback(snapshot)
    trainer.train()
    assert callback.history == [{"step": 2, "reason": "schedule", "requested_at": 2}]
    ref1, policy1 = snapshot.snapshots[1]
    ref2, policy2 = snapshot.snapshots[2]
    assert not equal(ref1, policy1) and equal(ref2, policy2)
    assert adam_steps(trainer) == {1}
    kl = [entry["kl"] for entry in train_logs(trainer)]
    assert kl[1] > 1e-4 and kl[2] == pytest.approx(0.0, abs=1e-7)


def test_callback_checks_its_trainer(tmp_path, student_path, arithmetic_dataset):
    from trl import GRPOConfig, GRPOTrainer

    plain = GRPOTrainer(model=student_path, reward_funcs=[demo.task_reward],
                        args=cpu_config(GRPOConfig, tmp_path, beta=0.1), train_dataset=arithmetic_dataset)
    with pytest.raises(TypeError, match="trl_ext trainer"):
        ReferenceResetCallback(ResetSchedule(every_steps=5)).attach(plain)
    no_kl = ProRLTrainer(model=student_path, reward_funcs=[demo.task_reward],
                         args=cpu_config(ProRLConfig, tmp_path, beta=0.0, dynamic_sampling="none"),
                         train_dataset=arithmetic_dataset)
    with pytest.raises(ValueError, match="beta > 0"):
        ReferenceResetCallback(ResetSchedule(every_steps=5)).attach(no_kl)
    with pytest.raises(RuntimeError, match=r"attach\(trainer\)"):
        ProRLTrainer(model=student_path, reward_funcs=[demo.task_reward],
                     args=cpu_config(ProRLConfig, tmp_path, beta=0.1, dynamic_sampling="none"),
                     train_dataset=arithmetic_dataset, callbacks=[ReferenceResetCallback(ResetSchedule(every_steps=5))])
