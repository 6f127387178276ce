"""GNDPOTrainer end to end on the demo world: training, drop-in arguments, LoRA/QLoRA, GA, errors, cards, Hub."""

from __future__ import annotations

from unittest.mock import MagicMock, patch

import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM

from conftest import (
    ToolOnlyEnvironment,
    cpu_config,
    four_bit_config,
    is_quantized,
    postprocessed_rollouts,
    steps_run_by,
)
from trl_ext import GNDPOConfig, GNDPOTrainer, demo


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def changed_parameters(before, model):
    now = dict(model.named_parameters())
    return [n for n, p in before.items() if not torch.equal(p, now[n].detach())]


def test_full_finetune_trains_and_logs(tmp_path, student_path, teacher_path, arithmetic_dataset):
    trainer = GNDPOTrainer(
        model=student_path,
        reward_funcs=[demo.task_reward],
        args=cpu_config(GNDPOConfig, tmp_path),
        train_dataset=arithmetic_dataset,
        teacher_model=teacher_path,
    )
    before = snapshot(trainer.model)
    trainer.train()
    assert len(changed_parameters(before, trainer.model)) == len(before)
    logs = trainer.state.log_history[0]
    for key in ("gndpo/score_mean", "gndpo/score_std", "gndpo/clipped_fraction", "gndpo/reverse_kl",
                "rewards/task_reward/mean"):
        assert key in logs, key
    # The teacher is frozen, in eval mode, and never changes.
    teacher = trainer.teacher_model
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    reference = AutoModelForCausalLM.from_pretrained(teacher_path)
    for (name, p), q in zip(teacher.named_parameters(), reference.parameters()):
        assert torch.equal(p.detach().cpu(), q), name


def train_capturing_rollout(trainer, before=None) -> dict:
    """Train, and return the last rollout as GNDPO's post-rollout hook produced it (`before` may edit TRL's rollout
    first, e.g. to add a tool mask)."""
    seen = {}
    original = trainer._postprocess_rollout

    def spy(inputs, rollout):
        if before is not None:
            before(rollout)
        seen.update(original(inputs, rollout))
        return seen

    trainer._postprocess_rollout = spy
    trainer.train()
    return seen


def test_advantages_are_per_token_normalized_and_zero_on_padding(tmp_path, student_path, teacher_path,
                                                                 arithmetic_dataset):
    trainer = GNDPOTrainer(model=student_path, args=cpu_config(GNDPOConfig, tmp_path, max_steps=1),
                           train_dataset=arithmetic_dataset, teacher_model=teacher_path)
    seen = train_capturing_rollout(trainer)
    advantages, mask = seen["advantages"], seen["completion_mask"].float()
    assert advantages.shape == mask.shape  # (B, T)
    assert torch.all(advantages[mask == 0] == 0)
    valid = advantages[mask == 1]
    assert valid.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert valid.std().item() == pytest.approx(1.0, abs=1e-3)  # unbiased std of whitened scores


def test_without_reward_functions(tmp_path, student_path, teacher_path, arithmetic_dataset):
    trainer = GNDPOTrainer(model=student_path, args=cpu_config(GNDPOConfig, tmp_path),
                           train_dataset=arithmetic_dataset, teacher_model=teacher_path)
    before = snapshot(trainer.model)
    trainer.train()
    assert changed_parameters(before, trainer.model)
    assert "gndpo/reverse_kl" in trainer.state.log_history[0]


class RewardingEnvironment(ToolOnlyEnvironment):
    def get_reward(self) -> float:
        return 1.0


def test_tool_output_tokens_get_no_advantage_and_stay_out_of_the_statistics(tmp_path, student_path, teacher_path,
                                                                           arithmetic_dataset):
    trainer = GNDPOTrainer(model=student_path, args=cpu_config(GNDPOConfig, tmp_path, max_steps=1),
                           train_dataset=arithmetic_dataset, teacher_model=teacher_path)

    def add_tool_output(rollout):
        rollout["tool_mask"] = torch.ones_like(rollout["completion_mask"])
        rollout["tool_mask"][:, 1:3] = 0  # pretend tokens 1-2 of every completion came from a tool

    seen = train_capturing_rollout(trainer, before=add_tool_output)
    advantages = seen["advantages"]
    trained = seen["completion_mask"].bool() & seen["tool_mask"].bool()
    assert torch.all(advantages[~trained] == 0)
    valid = advantages[trained]
    assert valid.mean().item() == pytest.approx(0.0, abs=1e-5)  # whitened over the trained tokens only
    assert valid.std().item() == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("reuses", [True, False], ids=["trl-computed-old-logps", "own-forward"])
def test_student_old_logps_come_from_trl_when_it_computed_them(tmp_path, student_path, teacher_path,
                                                               arithmetic_dataset, reuses):
    """num_iterations=2 makes TRL compute pi_old; GNDPO must score with those, not a second forward of its own."""
    from trl_ext.core.trainer import STUDENT_LOGPS_KEY

    trainer = GNDPOTrainer(model=student_path, train_dataset=arithmetic_dataset, teacher_model=teacher_path,
                           args=cpu_config(GNDPOConfig, tmp_path, max_steps=1, num_iterations=2 if reuses else 1))
    seen = train_capturing_rollout(trainer)
    assert (seen.get("old_per_token_logps") is not None) == reuses
    assert (STUDENT_LOGPS_KEY in seen) != reuses


def test_completions_table_shows_the_advantages_the_loss_uses(tmp_path, student_path, teacher_path,
                                                             arithmetic_dataset):
    # With the reward advantage mixed in, the loss's advantages differ from the distillation ones alone.
    args = cpu_config(GNDPOConfig, tmp_path, max_steps=1, log_completions=True, reward_advantage_weight=2.0)
    trainer = GNDPOTrainer(model=student_path, reward_funcs=[demo.task_reward], train_dataset=arithmetic_dataset,
                           args=args, teacher_model=teacher_path)
    rollouts = postprocessed_rollouts(trainer)
    trainer.train()
    (rollout,) = rollouts
    mask = rollout["completion_mask"].float()
    expected = (rollout["advantages"] * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    distillation_only = (trainer.last_advantages.advantages * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    assert not torch.allclose(expected, distillation_only)  # the reward term moved them
    logged = torch.tensor(list(trainer._logs["advantages"]))
    torch.testing.assert_close(logged, expected)


def test_completions_table_leaves_rows_without_loss_tokens_undefined(tmp_path, student_path, teacher_path,
                                                                     arithmetic_dataset):
    # At one token every completion is cut and masked as truncated: a mean over no tokens is no value (it read 0.0).
    args = cpu_config(GNDPOConfig, tmp_path, max_steps=1, log_completions=True, max_completion_length=1,
                      mask_truncated_completions=True)
    trainer = GNDPOTrainer(model=student_path, train_dataset=arithmetic_dataset, args=args, teacher_model=teacher_path)
    rollouts = postprocessed_rollouts(trainer)
    trainer.train()
    (rollout,) = rollouts
    masked = (rollout["completion_mask"].sum(dim=1) == 0).tolist()
    logged = torch.tensor(list(trainer._logs["advantages"]))
    assert any(masked) and logged.isnan().tolist() == masked


def test_reward_source_with_environments():
    from trl_ext.core.trainer import distillation_reward_funcs, environments_own_reward, zero_reward

    assert environments_own_reward(ToolOnlyEnvironment) is False
    assert environments_own_reward({"a": ToolOnlyEnvironment, "b": RewardingEnvironment}) is True
    assert environments_own_reward(lambda: RewardingEnvironment()) is None  # only calling it would tell
    assert distillation_reward_funcs(None, ToolOnlyEnvironment, 0.0) == [zero_reward]
    assert distillation_reward_funcs(None, RewardingEnvironment, 0.5) is None  # TRL adds the environment's reward
    with pytest.raises(ValueError, match="reward_advantage_weight=0.5"):
        distillation_reward_funcs(None, ToolOnlyEnvironment, 0.5)


def test_a_teacher_given_twice_must_be_the_same(tmp_path, student_path, teacher_path, arithmetic_dataset):
    args = cpu_config(GNDPOConfig, tmp_path, teacher_model_name_or_path=teacher_path)
    with pytest.raises(ValueError, match="teacher is given twice and differs: `teacher_model` is "):
        GNDPOTrainer(model=student_path, args=args, train_dataset=arithmetic_dataset, teacher_model=student_path)


def test_a_teacher_path_object_is_a_path(tmp_path, student_path, teacher_path, arithmetic_dataset):
    from pathlib import Path

    trainer = GNDPOTrainer(model=student_path, args=cpu_config(GNDPOConfig, tmp_path), train_dataset=arithmetic_dataset,
                           teacher_model=Path(teacher_path))
    assert trainer.teacher_name == teacher_path


def test_teacher_from_config_and_instance(tmp_path, student_path, teacher_path, arithmetic_dataset):
    args = cpu_config(GNDPOConfig, tmp_path, teacher_model_name_or_path=teacher_path,
                      teacher_model_init_kwargs='{"dtype": "float32"}')
    assert args.teacher_model_init_kwargs == {"dtype": "float32"}  # JSON strings parse like TRL's dict fields
    from_config = GNDPOTrainer(model=student_path, args=args, train_dataset=arithmetic_dataset)
    from_config.train()
    instance = AutoModelForCausalLM.from_pretrained(teacher_path)
    assert from_config.teacher_name == teacher_path and not from_config.teacher_model.training
    loaded = dict(from_config.teacher_model.named_parameters())
    for name, param in instance.named_parameters():  # the teacher at that path, in float32, untouched by training
        assert loaded[name].dtype == torch.float32 and torch.equal(loaded[name].detach(), param.detach()), name
    trainer = GNDPOTrainer(model=student_path, args=cpu_config(GNDPOConfig, tmp_path / "i"),
                           train_dataset=arithmetic_dataset, teacher_model=instance)
    trainer.train()
    assert not trainer.teacher_model.training


def test_lora(tmp_path, student_path, teacher_path, arithmetic_dataset):
    trainer = GNDPOTrainer(
        model=student_path, reward_funcs=[demo.task_reward], args=cpu_config(GNDPOConfig, tmp_path),
        train_dataset=arithmetic_dataset, teacher_model=teacher_path,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    base_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora" not in n}
    before = snapshot(trainer.model)
    assert before and all("lora" in n for n in before)
    trainer.train()
    assert len(changed_parameters(before, trainer.model)) == len(before)
    assert not changed_parameters(base_before, trainer.model)


def test_qlora_4bit(tmp_path, student_path, teacher_path, arithmetic_dataset):
    import bitsandbytes  # noqa: F401  (in the `test` extra: missing, the test must fail, not skip)
    trainer = GNDPOTrainer(
        model=student_path, args=cpu_config(GNDPOConfig, tmp_path), train_dataset=arithmetic_dataset,
        teacher_model=teacher_path,
        quantization_config=four_bit_config(),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    assert is_quantized(trainer.model)
    before = snapshot(trainer.model)
    trainer.train()
    assert len(changed_parameters(before, trainer.model)) == len(before)


def test_gradient_accumulation_gives_the_same_advantages(tmp_path, student_path, teacher_path,
                                                         arithmetic_dataset):
    """The statistics are taken once over the generation batch, whatever its micro-batch split."""

    def first_rollout(**overrides):
        args = cpu_config(GNDPOConfig, tmp_path / str(overrides), max_steps=1, **overrides)
        trainer = GNDPOTrainer(model=student_path, args=args, train_dataset=arithmetic_dataset,
                               teacher_model=teacher_path)
        trainer.train()
        return trainer.last_advantages

    one = first_rollout(per_device_train_batch_size=8, gradient_accumulation_steps=1)
    two = first_rollout(per_device_train_batch_size=4, gradient_accumulation_steps=2)
    assert one.advantages.shape == two.advantages.shape and one.advantages.shape[0] == 8
    torch.testing.assert_close(one.advantages, two.advantages, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(one.score_moments.mean, two.score_moments.mean)


def test_reward_advantage_weight_mixes_grpo_advantage(tmp_path, student_path, teacher_path, arithmetic_dataset):
    args = cpu_config(GNDPOConfig, tmp_path, max_steps=1, reward_advantage_weight=2.0)
    trainer = GNDPOTrainer(model=student_path, reward_funcs=[demo.task_reward], args=args,
                           train_dataset=arithmetic_dataset, teacher_model=teacher_path)
    captured = {}
    original = trainer._postprocess_rollout

    def spy(inputs, rollout):
        captured["reward_advantages"] = rollout["advantages"].clone()
        out = original(inputs, rollout)
        captured["advantages"] = out["advantages"]
        return out

    trainer._postprocess_rollout = spy
    trainer.train()
    mask = trainer.last_advantages.advantages.ne(0).float()  # valid tokens (whitened scores are never exactly 0)
    assert captured["reward_advantages"].abs().sum() > 0  # else the mix would be checked against nothing
    expected = trainer.last_advantages.advantages + 2.0 * captured["reward_advantages"].unsqueeze(1) * mask
    torch.testing.assert_close(captured["advantages"], expected)


# ----- bad input -------------------------------------------------------------------------------------------------
def test_missing_teacher(tmp_path, student_path, arithmetic_dataset):
    with pytest.raises(ValueError, match="needs a teacher"):
        GNDPOTrainer(model=student_path, args=cpu_config(GNDPOConfig, tmp_path), train_dataset=arithmetic_dataset)


def test_vocabulary_mismatch_names_both_sizes(tmp_path, student_path, other_vocab_path, arithmetic_dataset):
    student_vocab = len(demo.build_tokenizer())
    with pytest.raises(ValueError, match=rf"vocabulary of 100 tokens but the student has {student_vocab}"):
        GNDPOTrainer(model=student_path, args=cpu_config(GNDPOConfig, tmp_path), train_dataset=arithmetic_dataset,
                     teacher_model=other_vocab_path)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"score_clip": 0.0}, "score_clip"),
        ({"score_clip": -1.0}, "score_clip"),
        ({"advantage_normalization": "group"}, "advantage_normalization='group'"),
        ({"teacher_temperature": 0.0}, "teacher_temperature"),
        ({"reward_advantage_weight": -1.0}, "reward_advantage_weight"),
        ({"importance_sampling_level": "sequence"}, "importance_sampling_level='sequence'"),
        ({"scale_rewards": "batch"}, "`scale_rewards='batch'` has no effect without reward_advantage_weight > 0"),
        ({"multi_objective_aggregation": "normalize_then_sum"}, "multi_objective_aggregation='normalize_then_sum'"),
    ],
)
def test_bad_config_fails_at_construction(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        cpu_config(GNDPOConfig, tmp_path, **overrides)


def test_reward_advantage_weight_needs_a_reward(tmp_path, student_path, teacher_path, arithmetic_dataset):
    args = cpu_config(GNDPOConfig, tmp_path, reward_advantage_weight=0.5)
    with pytest.raises(ValueError, match="reward_advantage_weight=0.5"):
        GNDPOTrainer(model=student_path, args=args, train_dataset=arithmetic_dataset, teacher_model=teacher_path)


def test_init_kwargs_with_an_instance_teacher_is_an_error(tmp_path, student_path, teacher_path,
                                                          arithmetic_dataset):
    args = cpu_config(GNDPOConfig, tmp_path, teacher_model_init_kwargs={"dtype": "bfloat16"})
    with pytest.raises(ValueError, match="teacher_model_init_kwargs"):
        GNDPOTrainer(model=student_path, args=args, train_dataset=arithmetic_dataset,
                     teacher_model=AutoModelForCausalLM.from_pretrained(teacher_path))


def test_grpo_config_is_rejected(tmp_path, student_path, teacher_path, arithmetic_dataset):
    from trl import GRPOConfig

    with pytest.raises(TypeError, match="GNDPOConfig"):
        GNDPOTrainer(model=student_path, args=cpu_config(GRPOConfig, tmp_path), train_dataset=arithmetic_dataset,
                     teacher_model=teacher_path)


# ----- model card and Hub ----------------------------------------------------------------------------------------
def test_model_card_and_push_to_hub(tmp_path, student_path, teacher_path, arithmetic_dataset):
    args = cpu_config(GNDPOConfig, tmp_path / "out", hub_model_id="someone/tiny-gndpo")
    trainer = GNDPOTrainer(
        model=student_path, reward_funcs=[demo.task_reward], args=args, train_dataset=arithmetic_dataset,
        teacher_model=teacher_path,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    trainer.train()
    uploaded = {}

    def upload_folder(repo_id, folder_path, **kwargs):
        import os

        uploaded["repo_id"] = repo_id
        uploaded["files"] = sorted(os.listdir(folder_path))
        with open(os.path.join(folder_path, "README.md")) as f:
            uploaded["card"] = f.read()
        return MagicMock()

    api = MagicMock()
    api.create_repo.return_value = MagicMock(repo_id="someone/tiny-gndpo")
    api.upload_folder.side_effect = upload_folder
    with patch("transformers.trainer.hf_api", return_value=api):
        trainer.push_to_hub(dataset_name="demo/arithmetic")

    assert uploaded["repo_id"] == "someone/tiny-gndpo"
    assert "adapter_model.safetensors" in uploaded["files"]  # LoRA: the adapter is uploaded
    card = uploaded["card"]
    assert "trained with **GNDPO**" in card
    assert "2606.09091" in card and "@article{hao2026gndpo" in card
    assert "gndpo" in card.split("---")[1]  # tag in the front matter
    assert "| `score_clip` | `5.0` |" in card
    assert "| `advantage_normalization` | `global` |" in card
    assert f"| `teacher_model_name_or_path` | `{teacher_path}` |" in card  # passed as teacher_model=, not in args
    assert "gndpo/reverse_kl" in card
    assert "(a PEFT adapter)" in card


def test_trl_parser_reads_cli_and_yaml(tmp_path):
    from trl import ModelConfig, ScriptArguments, TrlParser

    config_file = tmp_path / "recipe.yaml"
    config_file.write_text(
        "score_clip: 3.0\nadvantage_normalization: none\nteacher_model_init_kwargs:\n  dtype: bfloat16\n"
        "use_cpu: true\nbf16: false\n"
    )
    parser = TrlParser((ScriptArguments, GNDPOConfig, ModelConfig))
    _, args, _ = parser.parse_args_and_config(
        args=["--config", str(config_file), "--output_dir", str(tmp_path), "--reward_advantage_weight", "0.5"]
    )
    assert args.score_clip == 3.0
    assert args.advantage_normalization == "none"
    assert args.teacher_model_init_kwargs == {"dtype": "bfloat16"}
    assert args.reward_advantage_weight == 0.5


def test_every_new_config_field_has_help():
    import dataclasses

    from trl import GRPOConfig

    base = {f.name for f in dataclasses.fields(GRPOConfig)}
    new = [f for f in dataclasses.fields(GNDPOConfig) if f.name not in base or f.name == "loss_type"]
    assert {f.name for f in new} >= {"teacher_model_name_or_path", "teacher_model_init_kwargs", "score_clip",
                                     "advantage_normalization", "reward_advantage_weight"}
    for f in new:
        assert f.metadata.get("help"), f.name


def test_checkpoint_writes_card_and_resumes(tmp_path, student_path, teacher_path, arithmetic_dataset):
    args = cpu_config(GNDPOConfig, tmp_path, save_strategy="steps", save_steps=1, max_steps=2)
    trainer = GNDPOTrainer(model=student_path, args=args, train_dataset=arithmetic_dataset,
                           teacher_model=teacher_path)
    trainer.train()
    checkpoint = tmp_path / "checkpoint-2"
    assert (checkpoint / "model.safetensors").is_file()
    assert "GNDPO" in (tmp_path / "README.md").read_text()  # GRPOTrainer writes the card at every checkpoint

    resumed_args = cpu_config(GNDPOConfig, tmp_path, save_strategy="no", max_steps=3)
    resumed = GNDPOTrainer(model=student_path, args=resumed_args, train_dataset=arithmetic_dataset,
                           teacher_model=teacher_path)
    steps = steps_run_by(resumed)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert steps == [3] and resumed.state.global_step == 3  # resumed after step 2: one step run
    assert "gndpo/reverse_kl" in resumed.state.log_history[-2]


def test_evaluation_scores_with_the_teacher(tmp_path, student_path, teacher_path, arithmetic_dataset):
    args = cpu_config(GNDPOConfig, tmp_path, eval_strategy="steps", eval_steps=1, max_steps=1,
                      per_device_eval_batch_size=8)
    trainer = GNDPOTrainer(model=student_path, reward_funcs=[demo.task_reward], args=args,
                           train_dataset=arithmetic_dataset, eval_dataset=arithmetic_dataset.select(range(8)),
                           teacher_model=teacher_path)
    trainer.train()
    eval_logs = [entry for entry in trainer.state.log_history if "eval_gndpo/reverse_kl" in entry]
    assert eval_logs and "eval_reward" in eval_logs[0]
