"""PurifiedDistillTrainer end to end on the demo world: every purification, the advantage glue, checkpoint/resume of
the routers, evaluation, LoRA, bad input, config parsing and the model card.

The teachers here are cheap and differ in strength: the arithmetic teacher, the weak student itself and an
untrained model (the full multi-teacher world of `trl_ext.demo.teachers` is exercised by the benchmark).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from conftest import ToolOnlyEnvironment, cpu_config
from trl_ext import demo
from trl_ext.gndpo import gndpo_advantages
from trl_ext.purify import PURIFICATIONS, PurifiedDistillConfig, PurifiedDistillTrainer
from trl_ext.purify.target import purified_logps

NEEDS_REWARD = ("aggregation", "plackett_luce", "classifier_router", "similarity_router", "rl_selection")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The demo models are tiny: one thread is as fast, and much faster on a loaded machine (no spinning pool)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teachers(teacher_path, student_path):
    return [teacher_path, student_path, demo.pretrained_model(demo.untrained(seed=3))]


def make_trainer(output_dir, student_path, teachers, dataset, purification="similarity_router", **overrides):
    if purification in ("plackett_luce", "classifier_router", "similarity_router"):  # the routers with a memory
        overrides.setdefault("router_min_examples", 1)
    args = cpu_config(PurifiedDistillConfig, output_dir, purification=purification, **overrides)
    return PurifiedDistillTrainer(model=student_path, reward_funcs=[demo.task_reward], args=args,
                                  train_dataset=dataset, teacher_models=teachers)


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_state(a, b, path="state"):
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for key in a:
            assert_same_state(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=path)
    else:
        assert a == b, path


@pytest.mark.parametrize("purification", PURIFICATIONS)
def test_every_purification_trains_and_logs(tmp_path, student_path, teachers, arithmetic_dataset, purification):
    trainer = make_trainer(tmp_path, student_path, teachers, arithmetic_dataset, purification)
    before = trainable(trainer.model)
    trainer.train()
    now = dict(trainer.model.named_parameters())
    assert all(not torch.equal(p, now[n].detach()) for n, p in before.items())
    first = trainer.state.log_history[0]
    for key in ("purify/choice/teacher_0", "purify/choice/teacher_2", "purify/signal/teacher_1",
                "purify/router_accuracy", "purify/disagreement", "purify/decisive_fraction",
                "purify/fallback_fraction", "purify/score_std", "purify/reverse_kl", "rewards/task_reward/mean"):
        assert key in first, key
    assert sum(first[f"purify/choice/teacher_{k}"] for k in range(3)) == pytest.approx(1.0)
    if purification in ("plackett_luce", "classifier_router", "similarity_router"):
        # Decide before learning: on the very first rollout a router knows nothing and averages all teachers.
        assert first["purify/fallback_fraction"] == 1.0
    if purification == "rl_selection":
        assert "purify/rl_policy_entropy" in first
        assert "purify/rl_improvement" in trainer.state.log_history[1]  # measured one rollout later
    for teacher in trainer.teacher_models:
        assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())


def test_advantages_are_gndpo_advantages_of_the_purified_teacher(tmp_path, student_path, teachers,
                                                                 arithmetic_dataset):
    trainer = make_trainer(tmp_path, student_path, teachers, arithmetic_dataset, "classifier_router", max_steps=3,
                           learning_rate=1e-4)  # a gentle step keeps mixed-reward (decisive) groups coming
    scored = []
    original = trainer.score_completions

    def record(model, rollout):
        out = original(model, rollout)
        scored.append((model, out.clone()))
        return out

    trainer.score_completions = record
    seen = {}
    hook = trainer._postprocess_rollout

    def spy(inputs, rollout):
        scored.clear()
        out = hook(inputs, rollout)
        seen.update(out)
        return out

    trainer._postprocess_rollout = spy
    trainer.train()
    result = trainer.last_purification
    student = [lp for m, lp in scored if m is trainer.model][0]
    teacher_logps = torch.stack([[lp for m, lp in scored if m is t][0] for t in trainer.teacher_models])
    rows = result.weights.repeat_interleave(trainer.num_generations, dim=0)
    assert rows.shape == (8, 3)
    torch.testing.assert_close(rows.sum(dim=1), torch.ones(8))
    mask = seen["completion_mask"].float()
    expected = gndpo_advantages(purified_logps(teacher_logps, rows), student, mask)
    torch.testing.assert_close(seen["advantages"], expected.advantages)
    assert torch.all(seen["advantages"][mask == 0] == 0)
    # By the third rollout the router has learned and picks teachers (one-hot, or split only between tied ones).
    assert not result.decision.fallback.any()


@pytest.mark.parametrize("purification", ["classifier_router", "rl_selection"])
def test_checkpoint_restores_router_state(tmp_path, student_path, teachers, arithmetic_dataset, purification):
    trainer = make_trainer(tmp_path, student_path, teachers, arithmetic_dataset, purification,
                           save_strategy="steps", save_steps=2, max_steps=2, per_device_train_batch_size=16)
    trainer.train()
    saved = copy.deepcopy(trainer.purifier.state_dict())
    saved_pending = copy.deepcopy(trainer.pending.state_dict())
    checkpoint = tmp_path / "checkpoint-2"
    assert (checkpoint / "trl_ext_state.pt").is_file()
    card = (tmp_path / "README.md").read_text()  # GRPOTrainer writes the card at every checkpoint
    assert "trained with **PurifiedDistill**" in card and "2602.01064" in card
    assert f"| `purification` | `{purification}` |" in card
    assert f"| `teacher_model_names_or_paths` | `{trainer.teacher_names}` |" in card  # passed as teacher_models=

    resumed = make_trainer(tmp_path, student_path, teachers, arithmetic_dataset, purification, max_steps=3,
                           per_device_train_batch_size=16)
    loaded = {}

    def capture(name, component):
        load = component.load_state_dict

        def load_and_record(state):
            load(state)
            loaded[name] = copy.deepcopy(component.state_dict())

        component.load_state_dict = load_and_record

    capture("purifier", resumed.purifier)
    capture("pending", resumed.pending)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert_same_state(loaded["purifier"], saved)
    if purification == "rl_selection":
        assert saved_pending["batch"] is not None  # a decision whose outcome was not measured yet ...
        assert_same_state(loaded["pending"], saved_pending)  # ... survives the restart
        assert "purify/rl_improvement" in resumed.state.log_history[-2]  # and is learned from after it
    else:
        assert saved["memory"]["seen"] >= 1, "precondition: the router learned something before the checkpoint"
        # A router restored with what it learned decides at once instead of averaging.
        assert resumed.state.log_history[-2]["purify/fallback_fraction"] == 0.0
    assert resumed.state.global_step == 3


def test_evaluation_routes_without_learning(tmp_path, student_path, teachers, arithmetic_dataset):
    trainer = make_trainer(tmp_path, student_path, teachers, arithmetic_dataset, "similarity_router", max_steps=2,
                           per_device_eval_batch_size=8)
    trainer.train()
    before = copy.deepcopy(trainer.purifier.state_dict())
    metrics = trainer.evaluate(eval_dataset=arithmetic_dataset.select(range(4)))
    assert "eval_purify/choice/teacher_0" in metrics and "eval_reward" in metrics
    assert_same_state(trainer.purifier.state_dict(), before)


def test_lora_with_teacher_hidden_state_features(tmp_path, student_path, teachers, arithmetic_dataset):
    from peft import LoraConfig

    args = cpu_config(PurifiedDistillConfig, tmp_path, purification="classifier_router", router_min_examples=1,
                      router_features="teacher_hidden")
    trainer = PurifiedDistillTrainer(
        model=student_path, reward_funcs=[demo.task_reward], args=args, train_dataset=arithmetic_dataset,
        teacher_models=teachers,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    before = trainable(trainer.model)
    assert before and all("lora" in n for n in before)
    trainer.train()
    now = dict(trainer.model.named_parameters())
    assert all(not torch.equal(p, now[n].detach()) for n, p in before.items())
    hidden_size = trainer.teacher_models[0].config.hidden_size
    assert trainer.last_purification.batch.features.shape[1] == hidden_size


def test_completions_the_loss_ignores_are_left_out_of_the_signal(tmp_path, student_path, teachers):
    """Under mask_truncated_completions a completion cut at max_completion_length has no loss token, and its teacher
    scores attended to none of its tokens: it must not enter the signal, the conflict or the RL selector's reward."""
    rows = demo.get_task("arithmetic").dataset(400, seed=3)
    rows = rows.select([i for i, a in enumerate(rows["answer"]) if len(a) == 2][:32])  # two digits: cut at length 2
    trainer = make_trainer(tmp_path, student_path, teachers, rows, purification="rl_selection", max_steps=1,
                           max_completion_length=2, per_device_train_batch_size=16, mask_truncated_completions=True)
    trainer.train()
    batch = trainer.last_purification.batch
    ignored = torch.isnan(batch.teacher_seq_logps).all(dim=0)
    assert 0 < ignored.sum() < ignored.numel()  # some completions were cut, some ended in time
    assert torch.isnan(batch.rewards[ignored]).all() and not torch.isnan(batch.rewards[~ignored]).any()
    assert not torch.isnan(batch.teacher_seq_logps[:, ~ignored]).any()
    # What ended in time is a one-digit answer, always wrong: no prompt has a reward gap left, so none has a signal
    # (with the cut completions in, every teacher "ranked" them first and the signal was 1/2 or 3/4 everywhere).
    assert torch.isnan(batch.signal).all()


def test_averaging_needs_no_reward_functions(tmp_path, student_path, teachers, arithmetic_dataset):
    args = cpu_config(PurifiedDistillConfig, tmp_path, purification="none", max_steps=1)
    trainer = PurifiedDistillTrainer(model=student_path, args=args, train_dataset=arithmetic_dataset,
                                     teacher_models=teachers)
    trainer.train()
    assert trainer.state.log_history[0]["purify/choice/teacher_1"] == pytest.approx(1 / 3)


def test_rl_selector_rescores_tool_calling_rollouts_as_they_were_scored(tmp_path, student_path, teachers,
                                                                         arithmetic_dataset, monkeypatch):
    """The re-scoring forward attends to tool outputs as the first scoring did; only the loss mask drops them. With
    learning_rate=0 the student does not change, so its measured change of log-likelihood must be zero."""
    import trl_ext.purify.trainer as purify_trainer

    trainer = make_trainer(tmp_path, student_path, teachers, arithmetic_dataset, "rl_selection", max_steps=2,
                           learning_rate=0.0)
    hook = trainer._postprocess_rollout

    def with_tool_output(inputs, rollout):
        tool_mask = torch.ones_like(rollout["completion_mask"])
        tool_mask[:, 1:3] = 0  # pretend tokens 1-2 of every completion came from a tool
        rollout["tool_mask"] = tool_mask
        return hook(inputs, rollout)

    deltas = []
    measure = purify_trainer.student_improvement

    def spy(delta, rewards, group_size):
        deltas.append(delta)
        return measure(delta, rewards, group_size)

    trainer._postprocess_rollout = with_tool_output
    monkeypatch.setattr(purify_trainer, "student_improvement", spy)
    trainer.train()
    assert deltas, "the RL selector never measured an improvement"
    torch.testing.assert_close(deltas[0], torch.zeros_like(deltas[0]), atol=1e-4, rtol=0)


# ----- bad input -------------------------------------------------------------------------------------------------
def test_reward_advantage_weight_needs_a_reward(tmp_path, student_path, teachers, arithmetic_dataset):
    args = cpu_config(PurifiedDistillConfig, tmp_path, purification="none", reward_advantage_weight=0.5)
    with pytest.raises(ValueError, match="reward_advantage_weight=0.5"):
        PurifiedDistillTrainer(model=student_path, args=args, train_dataset=arithmetic_dataset,
                               teacher_models=teachers)


def test_empty_teacher_list(tmp_path, student_path, arithmetic_dataset):
    args = cpu_config(PurifiedDistillConfig, tmp_path)
    with pytest.raises(ValueError, match="at least one teacher"):
        PurifiedDistillTrainer(model=student_path, reward_funcs=[demo.task_reward], args=args,
                               train_dataset=arithmetic_dataset, teacher_models=[])
    with pytest.raises(ValueError, match="at least one teacher"):
        PurifiedDistillTrainer(model=student_path, reward_funcs=[demo.task_reward], args=args,
                               train_dataset=arithmetic_dataset)


def test_single_teacher_instead_of_a_list(tmp_path, student_path, teacher_path, arithmetic_dataset):
    with pytest.raises(TypeError, match=r"teacher_models=\[teacher\]"):
        PurifiedDistillTrainer(model=student_path, reward_funcs=[demo.task_reward],
                               args=cpu_config(PurifiedDistillConfig, tmp_path), train_dataset=arithmetic_dataset,
                               teacher_models=teacher_path)


def test_teachers_given_twice_must_be_the_same(tmp_path, student_path, teacher_path, arithmetic_dataset):
    args = cpu_config(PurifiedDistillConfig, tmp_path, teacher_model_names_or_paths=[teacher_path, teacher_path])
    with pytest.raises(ValueError, match="teachers are given twice and differ"):
        PurifiedDistillTrainer(model=student_path, reward_funcs=[demo.task_reward], args=args,
                               train_dataset=arithmetic_dataset, teacher_models=[teacher_path, student_path])


def test_vocabulary_mismatch_names_the_teacher(tmp_path, student_path, teacher_path, other_vocab_path,
                                               arithmetic_dataset):
    student_vocab = len(demo.build_tokenizer())
    with pytest.raises(ValueError, match=rf"teacher 1 .* vocabulary of 100 tokens but the student has {student_vocab}"):
        PurifiedDistillTrainer(model=student_path, reward_funcs=[demo.task_reward],
                               args=cpu_config(PurifiedDistillConfig, tmp_path), train_dataset=arithmetic_dataset,
                               teacher_models=[teacher_path, other_vocab_path])


@pytest.mark.parametrize("purification", NEEDS_REWARD)
def test_purifications_need_a_reward(tmp_path, student_path, teacher_path, arithmetic_dataset,
                                              purification):
    with pytest.raises(ValueError, match="no `reward_funcs`"):
        PurifiedDistillTrainer(model=student_path, args=cpu_config(PurifiedDistillConfig, tmp_path,
                                                                   purification=purification),
                               train_dataset=arithmetic_dataset, teacher_models=[teacher_path, teacher_path])


def test_an_environment_without_get_reward_is_no_reward(tmp_path, student_path, teacher_path, arithmetic_dataset):
    # It used to count as a reward source: the trainer then ran on the zero placeholder reward, and every signal was
    # undefined, so the purification asked for silently did nothing.
    with pytest.raises(ValueError, match="no environment defines `get_reward`"):
        PurifiedDistillTrainer(model=student_path, args=cpu_config(PurifiedDistillConfig, tmp_path,
                                                                   purification="aggregation"),
                               train_dataset=arithmetic_dataset, teacher_models=[teacher_path, teacher_path],
                               environment_factory=ToolOnlyEnvironment)


def test_grpo_config_is_rejected(tmp_path, student_path, teacher_path, arithmetic_dataset):
    from trl import GRPOConfig

    with pytest.raises(TypeError, match="PurifiedDistillConfig"):
        PurifiedDistillTrainer(model=student_path, args=cpu_config(GRPOConfig, tmp_path),
                               train_dataset=arithmetic_dataset, teacher_models=[teacher_path])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"purification": "vote"}, "purification='vote'"),
        ({"router_features": "bert"}, "router_features='bert'"),
        ({"advantage_normalization": "group"}, "advantage_normalization='group'"),
        ({"teacher_model_names_or_paths": "org/teacher"}, "must be a list"),
        ({"score_clip": 0.0}, "score_clip"),
        ({"router_memory_size": 0}, "router_memory_size"),
        ({"similarity_neighbors": 0}, "similarity_neighbors"),
        ({"router_ngram_order": 6}, "router_ngram_order"),
        ({"router_min_examples": 0}, "router_min_examples"),
        # With the method that uses each field, so that the range check (not the "has no effect" one) must fire.
        ({"purification": "plackett_luce", "plackett_luce_gamma": 1.0}, "`plackett_luce_gamma` must be > 1, got 1.0"),
        ({"purification": "plackett_luce", "plackett_luce_gamma": 0.0}, "`plackett_luce_gamma` must be > 0, got 0.0"),
        ({"purification": "none", "router_features": "teacher_hidden"}, "reads no prompt features"),
        ({"purification": "rl_selection", "rl_learning_rate": 0.0}, "`rl_learning_rate` must be > 0, got 0.0"),
        ({"purification": "rl_selection", "rl_evidence_prior": float("nan")},
         "`rl_evidence_prior=nan` must be a finite number"),
        ({"purification": "rl_selection", "rl_signal_in_state": False}, "rl_evidence_prior=30.0"),
        ({"importance_sampling_level": "sequence"}, "importance_sampling_level='sequence'"),
        # Another method's knobs would be silently ignored.
        ({"classifier_steps": 8}, "`classifier_steps=8` has no effect without purification='classifier_router'"),
        ({"purification": "classifier_router", "similarity_neighbors": 4}, "`similarity_neighbors=4` has no effect"),
        ({"plackett_luce_gamma": 10.0}, "`plackett_luce_gamma=10.0` has no effect"),
        ({"aggregation_temperature": 0.5}, "`aggregation_temperature=0.5` has no effect"),
        ({"rl_exploration": 0.2}, "`rl_exploration=0.2` has no effect"),
        ({"purification": "rl_selection", "router_min_examples": 1}, "`router_min_examples=1` has no effect"),
        ({"purification": "aggregation", "router_ngram_order": 2}, "`router_ngram_order=2` has no effect"),
        ({"router_features": "teacher_hidden", "router_feature_dim": 64}, "`router_feature_dim=64` has no effect"),
        ({"scale_rewards": "batch"}, "without reward_advantage_weight > 0"),
    ],
)
def test_bad_config_fails_at_construction(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        cpu_config(PurifiedDistillConfig, tmp_path, **overrides)


def test_trl_parser_reads_cli_and_yaml(tmp_path):
    from trl import ModelConfig, ScriptArguments, TrlParser

    config_file = tmp_path / "recipe.yaml"
    config_file.write_text(
        "purification: rl_selection\nteacher_model_names_or_paths:\n  - org/a\n  - org/b\n"
        "teacher_model_init_kwargs:\n  dtype: bfloat16\nuse_cpu: true\nbf16: false\n"
    )
    parser = TrlParser((ScriptArguments, PurifiedDistillConfig, ModelConfig))
    _, args, _ = parser.parse_args_and_config(
        args=["--config", str(config_file), "--output_dir", str(tmp_path), "--rl_exploration", "0.25",
              "--rl_signal_in_state", "false", "--rl_evidence_prior", "0"]
    )
    assert args.purification == "rl_selection"
    assert args.teacher_model_names_or_paths == ["org/a", "org/b"]
    assert args.teacher_model_init_kwargs == {"dtype": "bfloat16"}
    assert args.rl_exploration == 0.25 and args.rl_signal_in_state is False and args.rl_evidence_prior == 0
    assert args.router_settings().rl_exploration == 0.25


def test_every_new_config_field_has_help():
    from trl import GRPOConfig

    base = {f.name for f in dataclasses.fields(GRPOConfig)}
    new = [f for f in dataclasses.fields(PurifiedDistillConfig) if f.name not in base or f.name == "loss_type"]
    assert len(new) >= 20
    for f in new:
        assert f.metadata.get("help"), f.name
