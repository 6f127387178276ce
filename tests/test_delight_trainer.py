"""DelightTrainer and the Kondo gate end to end: DG's loss, compute really skipped, composition, resume, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import GatedGNDPOConfig, GatedGNDPOTrainer, cpu_config, postprocessed_rollouts, steps_run_by
from trl_ext import DelightConfig, DelightTrainer, GNDPOConfig, GNDPOTrainer, demo
from trl_ext.delight import KondoGateMixin, delight_weights


def make_trainer(tmp_path, student_path, dataset, **overrides):
    return DelightTrainer(model=student_path, reward_funcs=[demo.task_reward],
                          args=cpu_config(DelightConfig, tmp_path, **overrides), train_dataset=dataset)


def first_buffer(trainer):
    """Generate once and return the micro-batches TRL (and the gate) prepared for this generation batch."""
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps  # set by train()
    batch = next(iter(trainer.get_train_dataloader()))
    chunks = [trainer._prepare_inputs(batch)]
    for _ in range(trainer.args.steps_per_generation - 1):
        trainer._step += 1
        chunks.append(trainer._prepare_inputs(batch))
    return chunks


def trl_gradients(trainer, chunks):
    trainer.model.zero_grad()
    for chunk in chunks:
        trainer.compute_loss(trainer.model, chunk).backward()
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def manual_dg_gradients(model, rows, advantages, weight_fn, normalizer):
    """egg's DG loss written out: -(1/N) sum_t w_t * U * log pi(y_t), w from the detached surprisal."""
    model.zero_grad()
    input_ids = torch.cat([rows["prompt_ids"], rows["completion_ids"]], 1)
    attention = torch.cat([rows["prompt_mask"], rows["completion_mask"]], 1)
    logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1]
    length = rows["completion_ids"].shape[1]
    logps = F.log_softmax(logits[:, -length:].float(), -1).gather(-1, rows["completion_ids"].unsqueeze(-1))[..., 0]
    mask = rows["completion_mask"].float()
    chi = advantages.unsqueeze(1) * (-logps.detach())
    loss = -(weight_fn(chi) * advantages.unsqueeze(1) * logps * mask).sum() / normalizer
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_dg_trains_and_logs(tmp_path, student_path, arithmetic_dataset):
    trainer = make_trainer(tmp_path, student_path, arithmetic_dataset)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert any(not torch.equal(p, dict(trainer.model.named_parameters())[n]) for n, p in before.items())
    logs = trainer.state.log_history[0]
    assert "delight/weight_mean" in logs and "delight/token_delight_mean" in logs
    assert trainer.args.scale_rewards == "none" and trainer.args.loss_type == "dapo"


def test_trl_loss_with_delight_advantages_is_dg(tmp_path, student_path, arithmetic_dataset):
    """On-policy, TRL's loss on the (B, T) advantage w_t * U has exactly the gradient of egg's DG loss."""
    trainer = make_trainer(tmp_path, student_path, arithmetic_dataset, max_steps=1)
    (chunk,) = first_buffer(trainer)
    ours = trl_gradients(trainer, [chunk])
    reference = manual_dg_gradients(trainer.model, chunk, chunk["delight_group_advantages"],
                                    lambda chi: delight_weights(chi, 1.0, 0.0), chunk["num_items_in_batch"])
    assert ours.keys() == reference.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-4, atol=1e-6, msg=name)


def test_gate_skips_compute_and_keeps_the_gradient(tmp_path, student_path, arithmetic_dataset):
    """With the gate, only survivors are forwarded with gradients, and the gradient equals DG's with the gated
    completions' terms removed (normalized by all valid tokens, as in the paper)."""
    trainer = make_trainer(tmp_path, student_path, arithmetic_dataset, max_steps=1, gate="threshold",
                           gate_price=0.0, per_device_train_batch_size=4, gradient_accumulation_steps=4)
    rollouts = postprocessed_rollouts(trainer)
    chunks = first_buffer(trainer)
    captured = rollouts[-1]
    keep = captured["kondo_keep"]
    assert 0 < keep.sum() < keep.numel()  # the gate passed some completions and skipped others

    rows_with_grad = []
    hook = trainer.model.register_forward_hook(
        lambda module, args, kwargs, out: rows_with_grad.append(kwargs["input_ids"].shape[0])
        if torch.is_grad_enabled() else None, with_kwargs=True)
    ours = trl_gradients(trainer, chunks)
    hook.remove()
    assert sum(rows_with_grad) == int(keep.sum())  # gated completions get no forward-with-grad at all
    skipped = sum("kondo_skip" in chunk for chunk in chunks)
    assert skipped == 4 - -(-int(keep.sum()) // 4)  # survivors packed into as few micro-batches as possible
    assert len(rows_with_grad) == 4 - skipped

    U = captured["delight_group_advantages"] * keep  # gated completions contribute nothing
    rows = {k: captured[k] for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")}
    reference = manual_dg_gradients(trainer.model, rows, U, lambda chi: delight_weights(chi, 1.0, 0.0),
                                    captured["num_items_in_batch"])
    for name in reference:
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("rule", ["price", "pass_rate"])
def test_gate_rules_train_and_log(tmp_path, student_path, arithmetic_dataset, rule):
    rule_settings = {"gate_pass_rate": 0.5} if rule == "pass_rate" else {}
    trainer = make_trainer(tmp_path, student_path, arithmetic_dataset, max_steps=3, gate=rule, **rule_settings,
                           gradient_accumulation_steps=2, per_device_train_batch_size=8)
    trainer.train()
    logs = trainer.state.log_history[0]
    for key in ("delight/pass_rate", "delight/completions_skipped", "delight/backward_passes_skipped",
                "delight/price", "delight/sequence_delight_mean"):
        assert key in logs, key
    counters = trainer.gate_counters
    assert counters["completions"] == 3 * 16 and 0 < counters["completions_kept"] < counters["completions"]


def test_stochastic_weights_and_plain_pg_with_gate(tmp_path, student_path, arithmetic_dataset, monkeypatch):
    from trl_ext.delight import trainer as delight_trainer

    drawn = []

    def recording(*args, **kwargs):
        weights = delight_weights(*args, **kwargs)
        drawn.append(weights.detach().clone())
        return weights

    monkeypatch.setattr(delight_trainer, "delight_weights", recording)
    make_trainer(tmp_path / "s", student_path, arithmetic_dataset, delight_stochastic=True).train()
    values = torch.cat([w.flatten() for w in drawn])
    assert drawn and set(values.unique().tolist()) == {0.0, 1.0}  # Bernoulli draws, both outcomes seen
    monkeypatch.undo()
    trainer = make_trainer(tmp_path / "pg", student_path, arithmetic_dataset, delight_weighting=False,
                           gate="threshold")
    trainer.train()
    assert "delight/weight_mean" not in trainer.state.log_history[0]
    assert "delight/pass_rate" in trainer.state.log_history[0]


def recorded_weight_seeds(monkeypatch) -> list[int]:
    """The seeds of the generators DG's stochastic weights draw from, one per rollout, as they are used."""
    import trl_ext.delight.trainer as delight_trainer

    seeds, original = [], delight_trainer.delight_weights

    def spy(chi, eta, price, stochastic, generator):
        seeds.append(generator.initial_seed())
        return original(chi, eta, price, stochastic, generator)

    monkeypatch.setattr(delight_trainer, "delight_weights", spy)
    return seeds


def test_stochastic_weights_draw_new_uniforms_for_every_rollout(tmp_path, student_path, arithmetic_dataset,
                                                                monkeypatch):
    """Two rollouts per optimizer step (steps_per_generation < gradient_accumulation_steps) must not share draws."""
    seeds = recorded_weight_seeds(monkeypatch)
    trainer = make_trainer(tmp_path, student_path, arithmetic_dataset, delight_stochastic=True, max_steps=2,
                           per_device_train_batch_size=4, gradient_accumulation_steps=2, steps_per_generation=1)
    trainer.train()
    assert len(seeds) == 4 and len(set(seeds)) == 4
    assert trainer.delight_rollouts.count == 4


def test_stochastic_weights_continue_their_stream_after_resume(tmp_path, student_path, arithmetic_dataset,
                                                               monkeypatch):
    seeds = recorded_weight_seeds(monkeypatch)
    make_trainer(tmp_path / "straight", student_path, arithmetic_dataset, delight_stochastic=True, max_steps=3).train()
    straight = list(seeds)
    make_trainer(tmp_path / "run", student_path, arithmetic_dataset, delight_stochastic=True, max_steps=2,
                 save_strategy="steps", save_steps=2).train()
    seeds.clear()
    resumed = make_trainer(tmp_path / "run", student_path, arithmetic_dataset, delight_stochastic=True, max_steps=3)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert resumed.delight_rollouts.count == 3
    assert seeds == straight[2:]  # the third rollout draws what it would have drawn without the restart


def test_checkpoint_resume_keeps_the_price_history(tmp_path, student_path, arithmetic_dataset):
    trainer = make_trainer(tmp_path, student_path, arithmetic_dataset, gate="pass_rate", gate_pass_rate=0.5,
                           save_strategy="steps", save_steps=2, max_steps=2)
    trainer.train()
    saved = trainer.kondo_gate.state_dict()
    assert len(saved["history"]) == 16 and saved["decisions_made"] == 2
    saved_counters = dict(trainer.gate_counters)
    assert saved_counters["completions"] == 16 and saved_counters["micro_batches"] == 2
    resumed_run = make_trainer(tmp_path, student_path, arithmetic_dataset, gate="pass_rate", gate_pass_rate=0.5,
                               max_steps=3)
    resumed_run.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed_run.kondo_gate.decisions_made == 3 and len(resumed_run.kondo_gate.history) == 24
    assert list(resumed_run.kondo_gate.history)[:16] == saved["history"]  # the restored history, then one batch
    # The counters go on from the saved totals: one more generation batch of 8 completions in 1 micro-batch.
    counters = resumed_run.gate_counters
    assert counters["completions"] == 24 and counters["micro_batches"] == 3
    assert saved_counters["completions_kept"] <= counters["completions_kept"] <= saved_counters["completions_kept"] + 8


def test_resume_without_the_gate_from_a_plain_grpo_checkpoint(tmp_path, student_path, arithmetic_dataset):
    """A checkpoint without trl_ext state (written by GRPOTrainer) resumes, unless a gate needs its state."""
    from trl import GRPOConfig, GRPOTrainer

    GRPOTrainer(model=student_path, reward_funcs=[demo.task_reward], train_dataset=arithmetic_dataset,
                args=cpu_config(GRPOConfig, tmp_path, save_strategy="steps", save_steps=2)).train()
    checkpoint = str(tmp_path / "checkpoint-2")
    resumed = make_trainer(tmp_path, student_path, arithmetic_dataset, max_steps=3)
    steps = steps_run_by(resumed)
    resumed.train(resume_from_checkpoint=checkpoint)
    assert steps == [3] and resumed.state.global_step == 3  # resumed after step 2: one step run
    gated = make_trainer(tmp_path, student_path, arithmetic_dataset, max_steps=3, gate="threshold")
    with pytest.raises(FileNotFoundError, match="kondo_gate"):
        gated.train(resume_from_checkpoint=checkpoint)


def test_gate_composes_with_gndpo(tmp_path, student_path, teacher_path, arithmetic_dataset):
    args = cpu_config(GatedGNDPOConfig, tmp_path, loss_type="dapo", gate="threshold", max_steps=2)
    trainer = GatedGNDPOTrainer(model=student_path, args=args, train_dataset=arithmetic_dataset,
                                teacher_model=teacher_path)
    trainer.train()
    logs = trainer.state.log_history[0]
    assert "gndpo/reverse_kl" in logs and "delight/pass_rate" in logs
    assert 0 < trainer.gate_counters["completions_kept"] < trainer.gate_counters["completions"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"gate": "auction"}, "gate='auction'"),
        ({"gate": "price", "gate_eta": 0.0}, "gate_eta"),
        ({"gate": "pass_rate", "gate_pass_rate": 0.0}, "gate_pass_rate"),
        ({"gate": "pass_rate", "gate_pass_rate": 1.5}, "gate_pass_rate"),
        # With the rule that uses each field, so that the range check (not the "has no effect" one) must fire.
        ({"gate": "pass_rate", "gate_history_size": 0}, "`gate_history_size` must be >= 1, got 0"),
        ({"gate": "threshold", "loss_type": "grpo"}, "loss_type='grpo'"),
        ({"gate": "threshold", "gate_normalizer": "tokens"}, "Unknown `gate_normalizer='tokens'`"),
        ({"delight_eta": 0.0}, "delight_eta"),
        ({"delight_eta": -1.0}, "delight_eta"),
        ({"importance_sampling_level": "sequence"}, "importance_sampling_level='sequence'"),
    ],
)
def test_bad_config_fails_at_construction(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        cpu_config(DelightConfig, tmp_path, **overrides)


def test_sampler_surprisal_without_a_sampler_fails_before_loading_weights(tmp_path, arithmetic_dataset):
    missing = str(tmp_path / "no-model")  # nothing is loaded before the check
    args = cpu_config(DelightConfig, tmp_path, gate="threshold", gate_surprisal="sampler")
    with pytest.raises(ValueError, match="use_vllm=False and no rollout_func was given"):
        DelightTrainer(missing, [demo.task_reward], args, arithmetic_dataset)  # positional, as GRPOTrainer's
    gated = cpu_config(GatedGNDPOConfig, tmp_path, gate="threshold", gate_surprisal="sampler", loss_type="dapo")
    with pytest.raises(ValueError, match="use_vllm=False and no rollout_func was given"):
        GatedGNDPOTrainer(model=missing, args=gated, train_dataset=arithmetic_dataset, teacher_model=missing)


def test_sampler_surprisal_sees_a_rollout_func_passed_through_a_subclass_kwargs(tmp_path, student_path,
                                                                                 teacher_path, arithmetic_dataset):
    class KeywordGNDPO(GNDPOTrainer):  # a user's subclass that forwards what it does not name
        def __init__(self, model, args=None, **kwargs):
            super().__init__(model, args=args, **kwargs)

    class GatedKeywordGNDPO(KondoGateMixin, KeywordGNDPO):
        pass

    args = cpu_config(GatedGNDPOConfig, tmp_path, gate="threshold", gate_surprisal="sampler", loss_type="dapo")
    trainer = GatedKeywordGNDPO(student_path, args=args, train_dataset=arithmetic_dataset, teacher_model=teacher_path,
                                rollout_func=lambda prompts, trainer: None)
    assert trainer.rollout_func is not None


def test_sampler_surprisal_from_a_rollout_func(tmp_path, student_path, arithmetic_dataset):
    # A rollout_func that returns its sampler's log-probs gives the gate its surprisal without vLLM.
    sampled = []

    def rollout_func(prompts, trainer):
        tokenizer = trainer.processing_class
        prompt_ids = [list(tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True)["input_ids"])
                      for p in prompts]
        eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
        completion_ids = [tokenizer(str(i % 20), add_special_tokens=False)["input_ids"] + [eos]
                          for i in range(len(prompts))]
        logprobs = [[-0.1 * (i % 7 + 1)] * len(ids) for i, ids in enumerate(completion_ids)]
        sampled.extend(logprobs)
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": logprobs}

    args = cpu_config(DelightConfig, tmp_path, gate="threshold", gate_surprisal="sampler", max_steps=1)
    trainer = DelightTrainer(model=student_path, reward_funcs=[demo.task_reward], args=args,
                             train_dataset=arithmetic_dataset, rollout_func=rollout_func)
    rollouts = postprocessed_rollouts(trainer)
    trainer.train()
    (rollout,) = rollouts
    mask = rollout["completion_mask"].bool()
    assert torch.equal(rollout["sampling_per_token_logps"][mask], torch.tensor([x for row in sampled for x in row]))
    assert trainer.gate_counters["completions"] == len(sampled) == 8


def test_sampler_surprisal_without_sampler_log_probs_names_the_fix():
    # TRL keeps `sampling_per_token_logps` only when the backend returned log-probs (a rollout_func may not).
    from types import SimpleNamespace

    trainer = SimpleNamespace(args=SimpleNamespace(gate_surprisal="sampler"))
    with pytest.raises(ValueError, match="this rollout has none.*Use gate_surprisal='policy'"):
        KondoGateMixin._gate_surprisals(trainer, {"completion_ids": torch.ones(2, 3)})
    logps = torch.tensor([[-0.5, -2.0]])
    assert torch.equal(KondoGateMixin._gate_surprisals(trainer, {"sampling_per_token_logps": logps}), -logps)


@pytest.mark.parametrize(
    "windows",
    [
        {"steps_per_generation": 3, "gradient_accumulation_steps": 2},
        {"steps_per_generation": 2, "gradient_accumulation_steps": 3},
        {"generation_batch_size": 24, "gradient_accumulation_steps": 2},  # TRL resolves steps_per_generation=3
    ],
)
def test_gate_refuses_rollouts_that_straddle_accumulation_windows(tmp_path, windows):
    """A window-ending micro-step that the gate skipped would never all-reduce, and DDP replicas would drift."""
    with pytest.raises(ValueError, match=r"steps_per_generation=[23] and gradient_accumulation_steps=[23]"):
        cpu_config(DelightConfig, tmp_path, gate="pass_rate", **windows)
    cpu_config(DelightConfig, tmp_path, gate="none", **windows)  # nothing is packed without the gate


@pytest.mark.parametrize(("steps_per_generation", "accumulation"), [(4, 2), (2, 4), (1, 3)])
def test_gate_accepts_rollouts_that_tile_accumulation_windows(tmp_path, steps_per_generation, accumulation):
    config = cpu_config(DelightConfig, tmp_path, gate="pass_rate", steps_per_generation=steps_per_generation,
                        gradient_accumulation_steps=accumulation)
    assert config.steps_per_generation == steps_per_generation


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"gate_pass_rate": 0.3}, r"`gate_pass_rate=0.3` has no effect without gate='pass_rate'"),
        ({"gate_history_size": 64}, r"`gate_history_size=64` has no effect without gate='pass_rate'"),
        ({"gate_price": 1.0}, r"`gate_price=1.0` has no effect without gate='price' or gate='threshold'"),
        ({"gate_eta": 0.5}, r"`gate_eta=0.5` has no effect without gate='price'"),
        ({"gate_normalizer": "survivors"}, r"`gate_normalizer='survivors'` has no effect without a gate"),
        ({"gate": "threshold", "gate_pass_rate": 0.3}, r"`gate_pass_rate=0.3` has no effect"),
        ({"gate": "threshold", "gate_eta": 0.1}, r"`gate_eta=0.1` has no effect"),
        ({"gate": "pass_rate", "gate_price": 2.0}, r"`gate_price=2.0` has no effect"),
        ({"gate": "price", "gate_history_size": 64}, r"`gate_history_size=64` has no effect"),
        ({"delight_weighting": False, "delight_eta": 5.0}, r"`delight_eta=5.0` has no effect without "
                                                           r"delight_weighting=True"),
        ({"delight_weighting": False, "delight_price": 1.0}, r"`delight_price=1.0` has no effect"),
        ({"delight_weighting": False, "delight_stochastic": True}, r"`delight_stochastic=True` has no effect"),
    ],
)
def test_settings_that_would_be_ignored_fail_at_construction(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        cpu_config(DelightConfig, tmp_path, **overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        {"gate": "price", "gate_price": 1.0, "gate_eta": 0.5, "gate_normalizer": "survivors"},
        {"gate": "threshold", "gate_price": 1.0, "gate_surprisal": "policy"},
        {"gate": "pass_rate", "gate_pass_rate": 0.3, "gate_history_size": 64},
        {"delight_eta": 2.0, "delight_price": 0.5, "delight_stochastic": True},
        {"delight_weighting": False, "gate": "threshold"},
    ],
)
def test_settings_that_act_are_accepted(tmp_path, overrides):
    cpu_config(DelightConfig, tmp_path, **overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"entropy_coef": 0.1}, "entropy_coef=0.1"),
        ({"use_adaptive_entropy": True}, "use_adaptive_entropy=True"),
        ({"top_entropy_quantile": 0.2}, "top_entropy_quantile=0.2"),
    ],
)
def test_gate_refuses_trl_entropy_terms(tmp_path, overrides, message):
    """The gate would rescale TRL's entropy bonus (a per-micro-batch mean, so skipped micro-steps drop out) and take
    the entropy quantile over survivors only."""
    with pytest.raises(ValueError, match=message):
        cpu_config(DelightConfig, tmp_path, gate="threshold", **overrides)
    cpu_config(DelightConfig, tmp_path, **overrides)  # without the gate TRL's terms are unchanged


def test_gate_refuses_image_datasets_at_construction(tmp_path, student_path, teacher_path, arithmetic_dataset,
                                                     monkeypatch):
    from trl import GRPOTrainer

    images = arithmetic_dataset.add_column("image", [None] * len(arithmetic_dataset))
    started, original = [], GRPOTrainer.__init__
    monkeypatch.setattr(GRPOTrainer, "__init__", lambda self, *a, **k: started.append(1) or original(self, *a, **k))
    with pytest.raises(NotImplementedError, match=r"image column\(s\) \['image'\].*gate='threshold'"):
        make_trainer(tmp_path, student_path, images, gate="threshold")
    assert not started  # DelightTrainer refuses before GRPOTrainer loads any weights
    gated_gndpo = cpu_config(GatedGNDPOConfig, tmp_path, gate="threshold", loss_type="dapo")
    with pytest.raises(NotImplementedError, match=r"image column\(s\) \['image'\]"):  # any trainer with the mixin
        GatedGNDPOTrainer(model=student_path, args=gated_gndpo, train_dataset=images, teacher_model=teacher_path)
    make_trainer(tmp_path, student_path, images)  # without the gate nothing is re-packed


def test_mixin_without_gate_fields_is_rejected(tmp_path, student_path, teacher_path, arithmetic_dataset):
    class Broken(KondoGateMixin, GNDPOTrainer):
        pass

    with pytest.raises(TypeError, match="KondoGateArguments"):
        Broken(model=student_path, args=cpu_config(GNDPOConfig, tmp_path), train_dataset=arithmetic_dataset,
               teacher_model=teacher_path)


def test_model_card(tmp_path, student_path, arithmetic_dataset):
    trainer = make_trainer(tmp_path, student_path, arithmetic_dataset, gate="pass_rate", gate_pass_rate=0.5)
    trainer.train()
    trainer.create_model_card(model_name="tiny-delight")
    card = (tmp_path / "README.md").read_text()
    assert "trained with **Delightful Policy Gradient**" in card
    assert "2603.14608" in card and "2603.20526" in card
    assert "| `gate` | `pass_rate` |" in card and "| `delight_eta` | `1.0` |" in card
    assert "delight/pass_rate" in card
    assert "kondo-gate" in card.split("---")[1]
