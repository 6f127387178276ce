"""PGPOTrainer end to end: SDPO's loss by hand, the teacher's contexts, the step-size multiplier on the learning rate,
EMA teachers (full copy and LoRA adapter), checkpoints, errors."""

import dataclasses
import re

import pandas as pd
import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, TrainerCallback
from trl import GRPOConfig

from conftest import cpu_config, postprocessed_rollouts
from trl_ext import PGPOConfig, PGPOTrainer, demo
from trl_ext.delight import KondoGateArguments, KondoGateMixin
from trl_ext.pgpo.divergences import clipped_importance_weights
from trl_ext.pgpo.trainer import (
    HAS_CONTEXT,
    NUM_DISTILLATION_TOKENS,
    ROW,
    TEACHER_ADVANTAGE_COLUMN,
    TEACHER_PROMPT_IDS,
    TEACHER_PROMPT_MASK,
)

LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


class RecordingPGPOTrainer(PGPOTrainer):
    """Keeps each rollout, each micro-batch the loss saw, and the learning rate each step ran with."""

    def __init__(self, *args, **kwargs):
        self.rollouts, self.micro_batches, self.step_lrs = [], [], []
        super().__init__(*args, **kwargs)

    def _postprocess_rollout(self, inputs, rollout):
        rollout = super()._postprocess_rollout(inputs, rollout)
        self.rollouts.append(({k: v.clone() if torch.is_tensor(v) else v for k, v in rollout.items()},
                              self.rollout_rewards.clone(), [dict(row) for row in inputs]))
        return rollout

    def _compute_loss(self, model, inputs):
        self.micro_batches.append({k: v.clone() if torch.is_tensor(v) else v for k, v in inputs.items()})
        loss = super()._compute_loss(model, inputs)
        if self.model.training and self._scheduled_learning_rates is not None:
            self.step_lrs.append((self._scheduled_learning_rates[0], self.optimizer.param_groups[0]["lr"]))
        return loss


def make(tmp_path, model, dataset, cls=RecordingPGPOTrainer, peft_config=None, eval_dataset=None, **overrides):
    settings = dict(distillation_topk=8, seed=0)
    settings.update(overrides)
    return cls(model=model, reward_funcs=[demo.task_reward], args=cpu_config(PGPOConfig, tmp_path, **settings),
               train_dataset=dataset, eval_dataset=eval_dataset, peft_config=peft_config)


@pytest.fixture
def verified_counts(monkeypatch) -> list[float]:
    """The number of completions each micro-batch's 'verified' table counts, in call order."""
    from trl_ext.pgpo import information
    from trl_ext.pgpo import trainer as pgpo_trainer

    counts: list[float] = []

    def recording(*args):
        joint = information.verified_joint(*args)
        counts.append(joint.sum().item())
        return joint

    monkeypatch.setattr(pgpo_trainer, "verified_joint", recording)
    return counts


def parameters(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ----- SDPO exactly ----------------------------------------------------------------------------------------------
def sdpo_loss_by_hand(model, batch, topk, alpha, teacher_model=None):
    """The official SDPO loss written out: top-k (+ tail) generalized JSD, token mean over tokens with a context.
    The teacher reads its privileged prompt with `teacher_model` (default: the student's own weights)."""
    def log_probs(net, prompt_ids, prompt_mask):
        ids = torch.cat([prompt_ids, batch["completion_ids"]], 1)
        mask = torch.cat([prompt_mask, batch["completion_mask"]], 1)
        logits = net(input_ids=ids, attention_mask=mask).logits
        t = batch["completion_ids"].size(1)
        return logits[:, -t - 1:-1].float().log_softmax(-1)

    student = log_probs(model, batch["prompt_ids"], batch["prompt_mask"])
    with torch.no_grad():
        teacher = log_probs(teacher_model or model, batch[TEACHER_PROMPT_IDS], batch[TEACHER_PROMPT_MASK])
    idx = student.topk(topk, -1).indices
    in_top_k = torch.zeros_like(student, dtype=torch.bool).scatter_(-1, idx, True)

    def with_tail(log_probs):  # the k entries, then the log of the mass outside them (summed directly: stable)
        tail = log_probs.masked_fill(in_top_k, float("-inf")).logsumexp(-1, keepdim=True)
        return torch.cat([log_probs.gather(-1, idx), tail], -1)

    p, q = with_tail(student), with_tail(teacher)
    m = torch.log((1 - alpha) * p.exp() + alpha * q.exp())
    divergence = (1 - alpha) * (p.exp() * (p - m)).sum(-1) + alpha * (q.exp() * (q - m)).sum(-1)
    mask = batch["completion_mask"] * batch[HAS_CONTEXT].unsqueeze(1)
    return (divergence * mask).sum() / mask.sum()


def teacher_advantages_by_hand(model, batch):
    """Each completion's mean over its distillation tokens of log pi_teacher - log pi_student of the sampled token."""
    def sampled_log_probs(prompt_ids, prompt_mask):
        ids = torch.cat([prompt_ids, batch["completion_ids"]], 1)
        mask = torch.cat([prompt_mask, batch["completion_mask"]], 1)
        t = batch["completion_ids"].size(1)
        log_probs = model(input_ids=ids, attention_mask=mask).logits[:, -t - 1:-1].float().log_softmax(-1)
        return log_probs.gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)

    with torch.no_grad():
        ratio = sampled_log_probs(batch[TEACHER_PROMPT_IDS], batch[TEACHER_PROMPT_MASK]) - sampled_log_probs(
            batch["prompt_ids"], batch["prompt_mask"])
    mask = batch["completion_mask"] * batch[HAS_CONTEXT].unsqueeze(1)
    return (ratio * mask).sum(1) / mask.sum(1).clamp(min=1)


def test_one_step_is_the_sdpo_update_by_hand(tmp_path, student_path, arithmetic_dataset):
    trainer = make(tmp_path, student_path, arithmetic_dataset, max_steps=1, optim="sgd", learning_rate=0.5,
                   max_grad_norm=0.0, lr_scheduler_type="constant", step_size_modulation=False,
                   distillation_topk=5, distillation_alpha=0.3, log_completions=True)
    trainer.train()
    batch = trainer.micro_batches[0]
    assert batch[HAS_CONTEXT].sum() > 0 and batch[HAS_CONTEXT].sum() < len(batch[HAS_CONTEXT])
    model = AutoModelForCausalLM.from_pretrained(student_path)  # the initial weights: student and teacher at step 1
    # The completions table's column of the self-teacher's advantage, in TRL's row order (0 without a context).
    table = pd.read_parquet(tmp_path / "completions" / "completions_00001.parquet")
    logged = torch.tensor(table[TEACHER_ADVANTAGE_COLUMN].to_numpy(dtype=float))[batch[ROW]]
    torch.testing.assert_close(logged, teacher_advantages_by_hand(model, batch).double(), atol=1e-5, rtol=1e-5)
    assert (logged[batch[HAS_CONTEXT] == 0] == 0).all()
    sdpo_loss_by_hand(model, batch, topk=5, alpha=0.3).backward()
    trained = dict(trainer.model.named_parameters())
    for name, param in model.named_parameters():
        expected = param.detach() - 0.5 * param.grad
        assert torch.allclose(trained[name].detach(), expected, atol=1e-6), name


def test_two_steps_are_the_sdpo_updates_by_hand_with_the_ema_teacher(tmp_path, student_path, arithmetic_dataset):
    """An independent SDPO over two steps: SGD on the hand-written loss, the teacher an EMA (rate 1/4) of the
    student."""
    trainer = make(tmp_path, student_path, arithmetic_dataset, max_steps=2, optim="sgd", learning_rate=0.5,
                   max_grad_norm=0.0, lr_scheduler_type="constant", step_size_modulation=False, distillation_topk=5,
                   distillation_alpha=0.3, teacher_update_rate=0.25, per_device_train_batch_size=32)
    trainer.train()
    first, second = trainer.micro_batches
    assert first[HAS_CONTEXT].sum() > 0 and second[HAS_CONTEXT].sum() > 0
    student = AutoModelForCausalLM.from_pretrained(student_path)
    teacher = AutoModelForCausalLM.from_pretrained(student_path)
    for batch in (first, second):
        student.zero_grad()
        sdpo_loss_by_hand(student, batch, topk=5, alpha=0.3, teacher_model=teacher).backward()
        with torch.no_grad():
            for param, teacher_param in zip(student.parameters(), teacher.parameters()):
                param -= 0.5 * param.grad
                teacher_param.mul_(0.75).add_(param, alpha=0.25)
    trained = dict(trainer.model.named_parameters())
    ema = dict(trainer.self_teacher.copy.named_parameters())
    for (name, param), teacher_param in zip(student.named_parameters(), teacher.parameters()):
        assert torch.allclose(trained[name].detach(), param.detach(), atol=1e-5), name
        assert torch.allclose(ema[name].detach(), teacher_param, atol=1e-5), name


def test_multiplier_off_is_sdpo_exactly(tmp_path, student_path, arithmetic_dataset):
    """Same data and seed: SDPO (modulation off) and PGPO whose multiplier is pinned to 1 end at identical weights;
    PGPO with its real multiplier does not."""
    runs = {}
    for name, overrides in {
        "sdpo": dict(step_size_modulation=False),
        "pinned": dict(multiplier_min=1.0, multiplier_max=1.0),
        "pgpo": dict(multiplier_min=0.2, multiplier_max=5.0, information_estimator="agreement"),
    }.items():
        trainer = make(tmp_path / name, student_path, arithmetic_dataset, max_steps=3, learning_rate=1e-3,
                       per_device_train_batch_size=16, **overrides)
        trainer.train()
        runs[name] = (parameters(trainer.model), trainer)
    sdpo, pinned, pgpo = (runs[k][0] for k in ("sdpo", "pinned", "pgpo"))
    assert all(torch.equal(sdpo[n], pinned[n]) for n in sdpo)
    assert any(not torch.equal(sdpo[n], pgpo[n]) for n in sdpo)
    multipliers = [h["pgpo/multiplier"] for h in runs["pgpo"][1].state.log_history if "pgpo/multiplier" in h]
    assert multipliers[0] == 1.0 and any(m != 1.0 for m in multipliers[1:])
    logged = [h for h in runs["sdpo"][1].state.log_history if "pgpo/information" in h]
    assert logged and all(h["pgpo/multiplier"] == 1.0 for h in logged)  # SDPO still logs I_k


def test_multiplier_scales_the_learning_rate_of_its_step_only(tmp_path, student_path, arithmetic_dataset):
    deltas = {}
    for m in (1.0, 1.7):
        trainer = make(tmp_path / str(m), student_path, arithmetic_dataset, max_steps=2, optim="sgd",
                       learning_rate=0.2, max_grad_norm=0.0, lr_scheduler_type="linear", gradient_accumulation_steps=2)
        trainer.step_size.multiplier = lambda information, m=m: m  # pin m_k
        before = parameters(AutoModelForCausalLM.from_pretrained(student_path))
        after = []

        class AfterStep(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kwargs):
                after.append(parameters(model))

        trainer.add_callback(AfterStep())
        trainer.train()
        deltas[m] = {n: after[0][n] - before[n] for n in before}
        # Each step ran at m * the scheduled rate, and the schedule's own rate was restored after it.
        assert [actual / scheduled for scheduled, actual in trainer.step_lrs] == pytest.approx([m, m])
        assert [s for s, _ in trainer.step_lrs] == pytest.approx([0.2, 0.1])  # linear decay, unaffected by m
        assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(trainer.lr_scheduler.get_last_lr()[0])
    for name in deltas[1.0]:  # plain SGD: the first step's update is exactly m times larger
        assert torch.allclose(deltas[1.7][name], 1.7 * deltas[1.0][name], atol=1e-6), name


def test_the_scheduled_rate_is_restored_for_a_scheduler_that_builds_on_it(tmp_path, student_path, arithmetic_dataset):
    """MultiplicativeLR makes each rate from the optimizer's current one: if m_k stayed in the optimizer after its step,
    the schedule would compound it (0.2, 0.17, ...) instead of running 0.2, 0.1, 0.05."""
    model = AutoModelForCausalLM.from_pretrained(student_path)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    scheduler = torch.optim.lr_scheduler.MultiplicativeLR(optimizer, lambda epoch: 0.5)
    trainer = RecordingPGPOTrainer(
        model=model, reward_funcs=[demo.task_reward], train_dataset=arithmetic_dataset,
        optimizers=(optimizer, scheduler),
        args=cpu_config(PGPOConfig, tmp_path, distillation_topk=8, seed=0, max_steps=3, max_grad_norm=0.0),
    )
    trainer.step_size.multiplier = lambda information: 1.7  # pin m_k
    trainer.train()
    assert [scheduled for scheduled, _ in trainer.step_lrs] == pytest.approx([0.2, 0.1, 0.05])
    assert [actual for _, actual in trainer.step_lrs] == pytest.approx([0.34, 0.17, 0.085])


# ----- contexts ------------------------------------------------------------------------------------------------
def test_teacher_prompts_show_a_successful_sibling_or_the_feedback(tmp_path, student_path, arithmetic_dataset):
    feedback = [f"expected {a}" if i % 2 else "" for i, a in enumerate(arithmetic_dataset["answer"])]
    dataset = arithmetic_dataset.add_column("feedback", feedback)
    trainer = make(tmp_path, student_path, dataset, max_steps=2)
    trainer.train()
    tokenizer = trainer.processing_class
    seen = {"solution": 0, "feedback": 0, "none": 0}
    for rollout, rewards, rows in trainer.rollouts:
        texts = tokenizer.batch_decode(rollout[TEACHER_PROMPT_IDS], skip_special_tokens=False)
        completions = tokenizer.batch_decode(rollout["completion_ids"], skip_special_tokens=True)
        for i, (text, row) in enumerate(zip(texts, rows)):
            group = slice(i - i % 4, i - i % 4 + 4)
            siblings = [j for j in range(group.start, group.stop) if j != i and rewards[j, 0] >= 0.5]
            question = row["prompt"][-1]["content"]
            if siblings:
                shown = completions[siblings[0]].strip()
                assert f"{question}\nCorrect solution:\n\n{shown}\n\n" in text and "feedback" not in text
                assert shown == row["answer"] and rollout[HAS_CONTEXT][i] == 1
                seen["solution"] += 1
            elif row["feedback"]:
                assert f"unsuccessful earlier attempt:\n\nexpected {row['answer']}\n\n" in text
                assert rollout[HAS_CONTEXT][i] == 1
                seen["feedback"] += 1
            else:
                assert rollout[HAS_CONTEXT][i] == 0 and "Correct" not in text
                seen["none"] += 1
            assert text.replace("<|pad|>", "").endswith("Correctly solve the original question.<|im_end|>\n"
                                                        "<|im_start|>assistant\n") or rollout[HAS_CONTEXT][i] == 0
    assert all(seen.values()), seen
    fractions = [h["pgpo/usable_context_fraction"] for h in trainer.state.log_history if "pgpo/usable_context_fraction" in h]
    assert 0 < fractions[0] < 1


def test_a_truncated_success_is_shown_as_written_under_mask_truncated_completions(tmp_path, self_teacher_path,
                                                                                 verified_counts):
    """With max_completion_length=2 every right two-digit answer is cut before its end token: TRL hides the row from
    the loss, but the reward judged its text, and that text is what the siblings' teacher must see."""
    rows = demo.get_task("arithmetic").dataset(400, seed=3)
    rows = rows.select([i for i, a in enumerate(rows["answer"]) if len(a) == 2][:32])
    trainer = make(tmp_path, self_teacher_path, rows, max_steps=1, max_completion_length=2,
                   per_device_train_batch_size=32, mask_truncated_completions=True)
    trainer.train()
    ((rollout, rewards, dataset_rows),) = trainer.rollouts
    tokenizer = trainer.processing_class
    shown = 0
    for i, source in enumerate(trainer.last_contexts.demonstration.tolist()):
        if source < 0:
            continue
        assert rollout["completion_mask"][source].sum() == 0  # truncated, so hidden from the loss
        text = tokenizer.decode(rollout[TEACHER_PROMPT_IDS][i], skip_special_tokens=True)
        assert f"Correct solution:\n\n{dataset_rows[source]['answer']}\n\n" in text
        shown += 1
    assert shown > 0
    # The context shares are over the completions the loss trains on (the truncated ones get no loss).
    trained = rollout["completion_mask"].sum(1) > 0
    usable = trainer.last_contexts.usable
    assert 0 < trained.sum() < trained.numel() and usable[trained].float().mean() != usable.float().mean()
    logged = trainer.state.log_history[0]["pgpo/usable_context_fraction"]
    assert logged == pytest.approx(usable[trained].float().mean().item())
    # The 'verified' estimator counts only completions with distillation tokens (a truncated one measured nothing).
    has_context = rollout[HAS_CONTEXT].bool()
    assert sum(verified_counts) == (has_context & trained).sum().item() < has_context.sum().item()


def test_completions_without_context_get_no_loss(tmp_path, student_path, arithmetic_dataset):
    impossible = arithmetic_dataset.map(lambda row: {"answer": "never"})  # no success, no feedback anywhere
    trainer = make(tmp_path, student_path, impossible, max_steps=1)
    before = parameters(trainer.model)
    trainer.train()
    assert trainer.micro_batches[0][HAS_CONTEXT].sum() == 0
    assert all(torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    assert trainer.state.log_history[0]["pgpo/multiplier"] == 1.0 and "pgpo/information" not in \
        trainer.state.log_history[0]


def test_moe_router_load_balancing_loss_is_kept(tmp_path, student_path, arithmetic_dataset):
    """GRPOTrainer adds an MoE model's router loss (router_aux_loss_coef * aux_loss); the distillation loss that
    replaces GRPO's must keep it. With no context anywhere, it is the only loss: the routers must still learn."""
    from transformers import AutoTokenizer, Qwen3MoeConfig, Qwen3MoeForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(student_path)
    config = Qwen3MoeConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, moe_intermediate_size=16,
                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                            num_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.5,
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    Qwen3MoeForCausalLM(config).save_pretrained(tmp_path / "moe")
    tokenizer.save_pretrained(tmp_path / "moe")
    impossible = arithmetic_dataset.map(lambda row: {"answer": "never"})  # no success, no feedback anywhere
    trainer = make(tmp_path / "run", str(tmp_path / "moe"), impossible, max_steps=1, optim="sgd", learning_rate=0.5)
    assert trainer.aux_loss_enabled
    before = parameters(trainer.model)
    trainer.train()
    assert trainer.micro_batches[0][HAS_CONTEXT].sum() == 0
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p)]
    assert any(".mlp.gate." in n for n in changed), changed  # the routers moved (and what feeds them)
    assert not any(".experts." in n for n in changed)  # no distillation loss: the experts' weights have no gradient
    assert trainer.state.log_history[0]["aux_loss"] > 0


# ----- the self-teacher -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_lora", [False, True])
def test_ema_teacher_follows_the_student(tmp_path, student_path, arithmetic_dataset, use_lora):
    trainer = make(tmp_path, student_path, arithmetic_dataset, max_steps=1, peft_config=LORA if use_lora else None,
                   teacher_update_rate=0.25, per_device_train_batch_size=32)  # 8 groups: some succeed
    teacher = trainer.self_teacher
    if use_lora:
        assert "teacher" in trainer.model.peft_config and not any(t.requires_grad for t, _ in teacher.adapter_pairs)
        initial = [t.detach().clone() for t, _ in teacher.adapter_pairs]
        assert all(torch.equal(t, s) for t, s in teacher.adapter_pairs)  # starts as the student's adapter
    else:
        initial = [p.detach().clone() for p in teacher.copy.parameters()]
    trainer.train()
    pairs = teacher.adapter_pairs or list(zip(teacher.copy.parameters(), trainer.model.parameters()))
    moved = False
    for (t, s), t0 in zip(pairs, initial):
        assert torch.allclose(t, 0.75 * t0 + 0.25 * s.detach(), atol=1e-6)
        moved |= not torch.equal(t, t0)
    assert moved and teacher.updates == 1


def test_initial_and_live_teachers(tmp_path, student_path, arithmetic_dataset):
    frozen = make(tmp_path / "initial", student_path, arithmetic_dataset, max_steps=2, peft_config=LORA,
                  teacher_model_kind="initial")
    initial = [t.detach().clone() for t, _ in frozen.self_teacher.adapter_pairs]
    student_before = [s.detach().clone() for _, s in frozen.self_teacher.adapter_pairs]
    frozen.train()
    # The student's adapter moved (else the frozen teacher's staying put would prove nothing); the teacher's did not.
    assert any(not torch.equal(s, s0) for (_, s), s0 in zip(frozen.self_teacher.adapter_pairs, student_before,
                                                             strict=True))
    assert all(torch.equal(t, t0) for (t, _), t0 in zip(frozen.self_teacher.adapter_pairs, initial, strict=True))
    live = make(tmp_path / "live", student_path, arithmetic_dataset, max_steps=2, teacher_model_kind="live")
    live.train()
    assert live.self_teacher.copy is None and "self_teacher" not in live._stateful_components
    with live.self_teacher.scoring(live.model) as scorer:  # the policy's current weights, without gradients
        assert scorer is live.model and not torch.is_grad_enabled()


@pytest.mark.parametrize("kind", ["ema", "live"])
def test_the_policy_scores_as_teacher_without_dropout(tmp_path, student_path, arithmetic_dataset, kind):
    """The LoRA teacher adapter inherits lora_dropout, and the live teacher is the training policy: their targets
    must not be noisy, and the policy must go back to train mode."""
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = make(tmp_path, student_path, arithmetic_dataset, peft_config=lora, teacher_model_kind=kind)
    with torch.no_grad():  # non-zero LoRA branches, so that dropout on them would change the logits
        for name, param in trainer.model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.5)
    trainer.model.train()
    ids = torch.randint(5, 40, (2, 12))

    def teacher_logits():
        with trainer.self_teacher.scoring(trainer.model) as scorer:
            return scorer(input_ids=ids, attention_mask=torch.ones_like(ids)).logits

    torch.testing.assert_close(teacher_logits(), teacher_logits(), rtol=0, atol=0)
    assert trainer.model.training


def test_a_full_copy_teacher_starts_from_the_student_in_memory(tmp_path, student_path, arithmetic_dataset):
    """A model changed in memory (e.g. fine-tuned earlier in the same script, never saved) is where the teacher
    starts, not the weights saved at its path; the 'initial' teacher then stays there."""
    model = AutoModelForCausalLM.from_pretrained(student_path)
    with torch.no_grad():
        model.model.layers[-1].mlp.down_proj.weight.add_(1e-3)
    start = parameters(model)
    trainer = make(tmp_path, model, arithmetic_dataset, max_steps=2, teacher_model_kind="initial",
                   per_device_train_batch_size=32)  # 8 groups: some succeed, so the student learns
    teacher = dict(trainer.self_teacher.copy.named_parameters())
    assert teacher.keys() == start.keys() and not any(t.requires_grad for t in teacher.values())
    assert all(torch.equal(teacher[n], start[n]) for n in start)
    trainer.train()
    assert all(torch.equal(teacher[n], start[n]) for n in start)
    assert any(not torch.equal(p.detach(), start[n]) for n, p in trainer.model.named_parameters())


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora-adapter-teacher", "full-copy-teacher"])
def test_checkpoint_resume_restores_teacher_and_step_size(tmp_path, student_path, arithmetic_dataset, use_lora):
    lora = LORA if use_lora else None
    full = make(tmp_path / "full", student_path, arithmetic_dataset, cls=PGPOTrainer, max_steps=3,
                save_strategy="steps", save_steps=2, peft_config=lora, information_estimator="agreement")
    full.train()
    state = torch.load(tmp_path / "full" / "checkpoint-2" / "trl_ext_state.pt", weights_only=False)
    assert set(state) == {"self_teacher", "step_size"} and state["self_teacher"]["updates"] == 2
    # The teacher adapter is trainer state: the checkpoint's model holds the trained adapter only.
    assert not (tmp_path / "full" / "checkpoint-2" / "teacher").exists()
    assert state["step_size"]["steps"] >= 1 and state["step_size"]["running_mean"] is not None

    resumed = make(tmp_path / "resumed", student_path, arithmetic_dataset, cls=PGPOTrainer, max_steps=3,
                   peft_config=lora, information_estimator="agreement")
    restored = {}
    original_load = resumed._load_optimizer_and_scheduler

    def load_and_record(checkpoint):
        original_load(checkpoint)
        restored["teacher"] = [t.detach().clone() for t in resumed.self_teacher._teacher_tensors()]
        restored["step_size"] = resumed.step_size.state_dict()

    resumed._load_optimizer_and_scheduler = load_and_record
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert restored["step_size"] == state["step_size"]
    assert len(restored["teacher"]) == len(state["self_teacher"]["weights"])
    assert all(torch.equal(t, s) for t, s in zip(restored["teacher"], state["self_teacher"]["weights"]))
    initial = [t.detach() for t in make(tmp_path / "fresh", student_path, arithmetic_dataset, cls=PGPOTrainer,
                                        max_steps=3, peft_config=lora).self_teacher._teacher_tensors()]
    assert any(not torch.equal(t, t0) for t, t0 in zip(restored["teacher"], initial))  # an EMA that had moved
    assert resumed.self_teacher.updates == 3 and resumed.step_size.steps >= state["step_size"]["steps"]


# ----- everything else a GRPOTrainer user expects --------------------------------------------------------------
def test_saved_lora_model_holds_only_the_trained_adapter(tmp_path, student_path, arithmetic_dataset):
    from peft import PeftModel

    trainer = make(tmp_path, student_path, arithmetic_dataset, cls=PGPOTrainer, max_steps=1, peft_config=LORA)
    trainer.train()
    assert set(trainer.model.peft_config) == {"default", "teacher"}
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "final" / "teacher").exists()
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(student_path), tmp_path / "final")
    trained = {n: p for n, p in trainer.model.named_parameters() if ".default." in n}
    assert trained and all(torch.equal(p.detach(), loaded.get_parameter(n)) for n, p in trained.items())
    assert set(trainer.model.peft_config) == {"default", "teacher"}  # the save left the live model as it was
    assert "save_pretrained" not in vars(trainer.model)


def test_hybrid_loss_and_evaluation(tmp_path, student_path, arithmetic_dataset):
    trainer = make(tmp_path, student_path, arithmetic_dataset, cls=PGPOTrainer, max_steps=4, distillation_weight=0.5,
                   eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=8, log_completions=True,
                   eval_dataset=arithmetic_dataset.select(range(8)))
    trainer.train()
    logs = {k for h in trainer.state.log_history for k in h}
    assert {"pgpo/divergence", "entropy", "eval_loss"} <= logs  # TRL's policy-loss metrics are there too
    # The completions table keeps one self-teacher advantage per row through evaluations: the evaluations' rows
    # (steps 2 and 4) have none, since no loss scores them; step 3's training rows are filled after the first one.
    tables = {step: pd.read_parquet(tmp_path / "completions" / f"completions_{step:05d}.parquet") for step in (2, 3)}
    assert len(tables[2]) == len(tables[3]) == 8  # isna().all() would hold for an empty table
    assert tables[2][TEACHER_ADVANTAGE_COLUMN].isna().all()
    assert tables[3][TEACHER_ADVANTAGE_COLUMN].notna().all()


def test_off_policy_steps_use_clipped_importance_weights(tmp_path, student_path, arithmetic_dataset, monkeypatch):
    import trl_ext.pgpo.trainer as pgpo_trainer

    seen = []

    def recording(student_logps, old_logps, clip):
        weights = clipped_importance_weights(student_logps, old_logps, clip)
        seen.append((clip, weights))
        return weights

    monkeypatch.setattr(pgpo_trainer, "clipped_importance_weights", recording)
    trainer = make(tmp_path, student_path, arithmetic_dataset, max_steps=2, num_iterations=2, learning_rate=1e-2,
                   distillation_is_clip=1.01, per_device_train_batch_size=32)
    trainer.train()
    assert all(batch.get("old_per_token_logps") is not None for batch in trainer.micro_batches)
    assert seen and all(clip == 1.01 and weights is not None for clip, weights in seen)
    assert all((weights <= 1.01).all() for _, weights in seen)
    # The rollout's second pass runs after an update: its weights are off 1, and the clip binds on some tokens.
    assert any(((weights - 1).abs() > 1e-6).any() for _, weights in seen)
    assert any((weights == 1.01).any() for _, weights in seen)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(distillation_alpha=1.5), "distillation_alpha"),
        (dict(distillation_topk=0), "distillation_topk"),
        (dict(teacher_model_kind="frozen"), "teacher_model_kind"),
        (dict(information_estimator="entropy"), "information_estimator"),
        (dict(multiplier_min=1.5), "multiplier_min"),
        (dict(distillation_weight=0.0), "distillation_weight"),
        (dict(beta=0.04), "beta=0.04"),
        (dict(solution_template="no field"), "successful_previous_attempt"),
        # Knobs of a feature that is off would be silently ignored.
        (dict(teacher_model_kind="initial", teacher_update_rate=0.1), "without teacher_model_kind='ema'"),
        (dict(step_size_modulation=False, multiplier_min=0.1), "multiplier_min=0.1.*step_size_modulation=True"),
        (dict(step_size_modulation=False, multiplier_ratchet=False), "multiplier_ratchet"),
        (dict(agreement_buckets=8), "without information_estimator='agreement'"),
        (dict(distillation_topk=None, distillation_add_tail=False), "distillation_add_tail"),
    ],
)
def test_bad_config_fails_at_construction(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        cpu_config(PGPOConfig, tmp_path, **overrides)


def test_grpo_config_is_rejected(tmp_path, student_path, arithmetic_dataset):
    with pytest.raises(TypeError, match="PGPOConfig"):
        PGPOTrainer(model=student_path, reward_funcs=[demo.task_reward], args=cpu_config(GRPOConfig, tmp_path),
                    train_dataset=arithmetic_dataset)


def test_image_prompts_are_refused(tmp_path, student_path, arithmetic_dataset):
    with_images = arithmetic_dataset.add_column("images", [[]] * len(arithmetic_dataset))
    with pytest.raises(NotImplementedError, match=r"image column\(s\) \['images'\].*text-only"):
        PGPOTrainer(model=student_path, reward_funcs=[demo.task_reward], args=cpu_config(PGPOConfig, tmp_path),
                    train_dataset=with_images)


def test_environments_are_refused(tmp_path, student_path, arithmetic_dataset):
    class Environment:
        def reset(self, **kwargs):
            return "an observation the self-teacher would not see"

    with pytest.raises(NotImplementedError, match="environment_factory.*reset\\(\\) observation"):
        PGPOTrainer(model=student_path, reward_funcs=[demo.task_reward], args=cpu_config(PGPOConfig, tmp_path),
                    train_dataset=arithmetic_dataset, environment_factory=Environment)


def test_every_new_config_field_has_help():
    import dataclasses

    base = {f.name for f in dataclasses.fields(GRPOConfig)}
    new = [f for f in dataclasses.fields(PGPOConfig) if f.name not in base]
    assert len(new) >= 20
    for f in new:
        assert f.metadata.get("help"), f.name


def test_trl_parser_reads_cli_and_yaml(tmp_path):
    from trl import ModelConfig, ScriptArguments, TrlParser

    config_file = tmp_path / "recipe.yaml"
    config_file.write_text("distillation_alpha: 1.0\ninformation_estimator: correction\ndistillation_topk: 20\n"
                           "use_cpu: true\nbf16: false\n")
    parser = TrlParser((ScriptArguments, PGPOConfig, ModelConfig))
    _, args, _ = parser.parse_args_and_config(
        args=["--config", str(config_file), "--output_dir", str(tmp_path), "--multiplier_max", "3.0",
              "--multiplier_ratchet", "false"])
    assert (args.distillation_alpha, args.information_estimator, args.distillation_topk) == (1.0, "correction", 20)
    assert args.multiplier_max == 3.0 and args.multiplier_ratchet is False


def test_model_card(tmp_path, student_path, arithmetic_dataset):
    trainer = make(tmp_path, student_path, arithmetic_dataset, cls=PGPOTrainer, max_steps=1, peft_config=LORA)
    trainer.train()
    trainer.create_model_card(model_name="tiny-pgpo", dataset_name="demo/arithmetic")
    card = (tmp_path / "README.md").read_text()
    assert "trained with **PGPO**" in card and "2606.03620" in card and "@article{wang2026pgpo" in card
    assert "@article{hubotter2026sdpo" in card and "arXiv:2601.20802" in card  # SDPO, the method PGPO builds on
    assert "| `information_estimator` | `verified` |" in card and "| `distillation_alpha` | `0.5` |" in card
    assert "pgpo/multiplier" in card and "(a PEFT adapter)" in card
    assert "pgpo" in card.split("---")[1]  # tag in the front matter


def test_feedback_column_is_checked_before_loading(tmp_path, arithmetic_dataset):
    with pytest.raises(ValueError, match="feedback_column='errors'"):
        PGPOTrainer(model="does/not-load", reward_funcs=[demo.task_reward],
                    args=cpu_config(PGPOConfig, tmp_path, feedback_column="errors"), train_dataset=arithmetic_dataset)
    with_feedback = demo.with_feedback(arithmetic_dataset)
    with pytest.warns(UserWarning, match="will not see it"), pytest.raises(OSError):
        PGPOTrainer(model=str(tmp_path / "missing-model"), reward_funcs=[demo.task_reward],
                    args=cpu_config(PGPOConfig, tmp_path, include_environment_feedback=False),
                    train_dataset=with_feedback)


def test_policy_loss_settings_without_policy_loss_fail(tmp_path):
    with pytest.raises(ValueError, match="`loss_type='grpo'`, `epsilon=0.3`: these settings only shape GRPO's"):
        cpu_config(PGPOConfig, tmp_path, loss_type="grpo", epsilon=0.3)
    # TRL's entropy bonus and reward aggregation live in the same policy loss / advantages.
    with pytest.raises(ValueError, match="`multi_objective_aggregation='normalize_then_sum'`, `entropy_coef=0.01`, "
                                         "`use_adaptive_entropy=True`: these"):
        cpu_config(PGPOConfig, tmp_path, entropy_coef=0.01, use_adaptive_entropy=True,
                   multi_objective_aggregation="normalize_then_sum")
    cpu_config(PGPOConfig, tmp_path, loss_type="grpo", distillation_weight=0.5)  # used by the mixed loss


def test_model_card_settings_table_survives_multiline_templates(tmp_path, student_path, arithmetic_dataset):
    # PGPO's templates are multi-line; a raw newline or pipe in a cell used to break the settings table.
    trainer = make(tmp_path, student_path, arithmetic_dataset, cls=PGPOTrainer,
                   feedback_template="\nFeedback | from `tests`:\n\n{feedback_raw}\n\n")
    trainer.create_model_card(model_name="tiny-pgpo")
    card = (tmp_path / "README.md").read_text()
    table = card.split("## Training settings")[1].strip().split("\n\n")[0].splitlines()
    assert table[:2] == ["| setting | value |", "|---|---|"] and len(table) > 20
    for row in table[2:]:
        cells = re.split(r"(?<!\\)\|", row)  # GFM splits cells on unescaped pipes
        assert len(cells) == 4 and cells[0] == cells[-1] == "", row
    reprompt = "`{prompt}{solution}{feedback}\\n\\nCorrectly solve the original question.`"
    assert f"| `reprompt_template` | {reprompt} |" in table
    assert "| `feedback_template` | `` \\nFeedback \\| from `tests`:\\n\\n{feedback_raw}\\n\\n `` |" in table


# ----- the Kondo gate mixed in --------------------------------------------------------------------------------------
@dataclasses.dataclass
class GatedPGPOConfig(KondoGateArguments, PGPOConfig):
    pass


class GatedPGPOTrainer(KondoGateMixin, PGPOTrainer):
    pass


def gated(tmp_path, model, dataset, **overrides):
    args = cpu_config(GatedPGPOConfig, tmp_path, distillation_topk=8, **overrides)
    return GatedPGPOTrainer(model=model, reward_funcs=[demo.task_reward], args=args, train_dataset=dataset)


@pytest.mark.parametrize("normalizer", ["all_tokens", "survivors"])
def test_the_gate_normalizes_the_self_distillation_by_the_tokens_it_keeps(tmp_path, self_teacher_path,
                                                                          arithmetic_dataset, normalizer):
    # PGPO's loss divides by its own count (distillation tokens), not by TRL's num_items_in_batch: the 'survivors'
    # normalizer has to recount it too (it used to change only TRL's, so PGPO's loss ignored the setting).
    trainer = gated(tmp_path, self_teacher_path, demo.with_feedback(arithmetic_dataset), max_steps=1,
                    gate="pass_rate", gate_pass_rate=0.5, gate_normalizer=normalizer)
    rollouts = postprocessed_rollouts(trainer)
    trainer.train()
    (rollout,) = rollouts
    keep, mask = rollout["kondo_keep"], rollout["completion_mask"]
    with_context = mask * rollout[HAS_CONTEXT].unsqueeze(1)
    counted = keep.unsqueeze(1) if normalizer == "survivors" else torch.ones_like(mask)
    assert 0 < keep.sum() < keep.numel() and (with_context * ~keep.unsqueeze(1)).sum() > 0  # both counts differ
    assert rollout[NUM_DISTILLATION_TOKENS].item() == (with_context * counted).sum().item()
    assert rollout["num_items_in_batch"].item() == (mask * counted).sum().item()


def test_a_window_the_gate_skips_entirely_still_sets_the_step_size(tmp_path, self_teacher_path, arithmetic_dataset,
                                                                   verified_counts):
    # PGPO sets each step's learning rate at the step's last micro-batch; with nothing passing the gate on one
    # process, every micro-batch used to be skipped, so steps ran at the unmodulated rate and the step statistics
    # carried over into the next step.
    trainer = gated(tmp_path, self_teacher_path, demo.with_feedback(arithmetic_dataset), max_steps=2,
                    gate="threshold", gate_price=1e9, gradient_accumulation_steps=2, per_device_train_batch_size=4)
    trainer.train()
    # The micro-batch that runs is padding (copies of real rows with their masks zeroed): the "verified" estimator
    # must not count those copies as completions (it did, as completions the teacher lowers).
    assert verified_counts == [0.0, 0.0]
    assert trainer.gate_counters["completions_kept"] == 0
    assert trainer.gate_counters["micro_batches_skipped"] == 2  # of 4: one (empty) micro-batch per window ran
    steps = [entry for entry in trainer.state.log_history if "pgpo/multiplier" in entry]
    assert len(steps) == 2 and all(entry["pgpo/distillation_tokens"] == 0 for entry in steps)


def test_the_gates_padding_rows_leave_the_completions_table_alone(tmp_path, self_teacher_path, arithmetic_dataset):
    # Nothing passes: the one micro-batch that runs holds a padding copy of a real row, which must not write that
    # row's self_teacher_advantage cell (without feedback, rows without a context would get a 0 they never earned).
    trainer = gated(tmp_path, self_teacher_path, arithmetic_dataset, max_steps=1, gate="threshold", gate_price=1e9,
                    gradient_accumulation_steps=2, per_device_train_batch_size=4, log_completions=True)
    trainer.train()
    cells = list(trainer._logs["extra"][TEACHER_ADVANTAGE_COLUMN])
    assert len(cells) == 8 and all(cell is None for cell in cells)
