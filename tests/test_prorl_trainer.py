"""ProRLTrainer end to end on the demo world: dynamic sampling (refill, cap, filter), EOS penalty, config, card."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from conftest import cpu_config
from trl_ext import demo
from trl_ext.delight import KondoGateArguments, KondoGateMixin
from trl_ext.prorl import ProRLConfig, ProRLTrainer
from trl_ext.prorl.batch_rows import take_rows


def parity_reward(completions, answer, **kwargs):
    """Informative exactly for prompts with an odd answer: even-answer groups all get 0.5, odd ones alternate 0/1.

    The alternation is by position in the process's batch, so a group of 4 consecutive rows (on one process or split
    over two) always sees 0, 1, 0, 1.
    """
    return [0.5 if int(a) % 2 == 0 else float(i % 2) for i, a in enumerate(answer)]


def constant_reward(completions, **kwargs):
    return [1.0] * len(completions)


@pytest.fixture(scope="module")
def mostly_even_dataset():
    """Arithmetic prompts, three quarters with an even answer: most groups are uninformative under parity_reward."""
    rows = demo.get_task("arithmetic").dataset(400, seed=5)
    even = [i for i, a in enumerate(rows["answer"]) if int(a) % 2 == 0][:48]
    odd = [i for i, a in enumerate(rows["answer"]) if int(a) % 2 == 1][:16]
    return rows.select(sorted(even + odd))


def answers_of(trainer, prompt_ids):
    texts = trainer.processing_class.batch_decode(prompt_ids, skip_special_tokens=True)
    return [sum(map(int, re.search(r"(\d+)\+(\d+)=", t).groups())) for t in texts]


def capture_rollouts(trainer):
    """Record every batch `_generate_and_score_completions` hands to TRL (before TRL shuffles it), with the
    trainer's `last_dynamic_sampling` for it: a list of (rollout, DynamicSamplingResult or None)."""
    seen = []
    original = trainer._generate_and_score_completions

    def spy(inputs):
        trainer.last_dynamic_sampling = None
        out = original(inputs)
        seen.append(({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in out.items()},
                     trainer.last_dynamic_sampling))
        return out

    trainer._generate_and_score_completions = spy
    return seen


def capture_completion_tables(trainer):
    """Record the latest generation batch's rows of TRL's completions table after every rollout: a list of
    {"prompt", "advantages", "rewards"} (the first reward function's column)."""
    tables = []
    original = trainer._generate_and_score_completions

    def spy(inputs):
        out = original(inputs)
        rows = trainer.args.generation_batch_size
        logs = trainer._logs
        tables.append({"prompt": list(logs["prompt"])[-rows:], "advantages": list(logs["advantages"])[-rows:],
                       "rewards": list(next(iter(logs["rewards"].values())))[-rows:]})
        return out

    trainer._generate_and_score_completions = spy
    return tables


def make(tmp_path, student_path, dataset, reward=parity_reward, **overrides):
    args = cpu_config(ProRLConfig, tmp_path, **overrides)
    return ProRLTrainer(model=student_path, reward_funcs=[reward], args=args, train_dataset=dataset)


# ----- dynamic sampling -------------------------------------------------------------------------------------------
def test_refill_yields_only_informative_groups_and_a_full_batch(tmp_path, student_path, mostly_even_dataset):
    trainer = make(tmp_path, student_path, mostly_even_dataset, max_steps=3, dynamic_sampling="refill")
    seen = capture_rollouts(trainer)
    tables = capture_completion_tables(trainer)
    trainer.train()
    assert len(seen) == 3
    refills = 0
    for (rollout, result), table in zip(seen, tables):
        refills += result.rounds - 1
        # TRL's completions table shows the rows trained on, not the last refill round's
        table_answers = [sum(map(int, re.search(r"(\d+)\+(\d+)=", str(p)).groups())) for p in table["prompt"]]
        assert table_answers == answers_of(trainer, rollout["prompt_ids"])
        assert table["advantages"] == rollout["advantages"].tolist()
        assert table["rewards"] == [float(i % 2) for i in range(8)]
        rows = rollout["completion_ids"].size(0)
        assert rows == 8 and all(v.size(0) == rows for v in rollout.values() if isinstance(v, torch.Tensor) and v.dim())
        assert result.selection.keep == (True, True)  # the batch was filled
        assert result.groups_surplus == sum(result.informative_per_round) - 2 >= 0  # informative, beyond the 2 slots
        answers = answers_of(trainer, rollout["prompt_ids"])
        assert all(a % 2 == 1 for a in answers), answers  # only informative (odd-answer) groups
        for g in range(0, rows, 4):  # whole groups: one prompt per block of num_generations rows
            assert len(set(answers[g:g + 4])) == 1
            assert torch.equal(rollout["prompt_ids"][g], rollout["prompt_ids"][g + 3])
        assert rollout["completion_mask"].sum(1).min() > 0  # nothing masked
        assert rollout["num_items_in_batch"].item() == rollout["completion_mask"].sum().item()
        assert torch.isfinite(rollout["advantages"]).all() and rollout["advantages"].abs().sum() > 0
    assert refills >= 1  # with 3 of 4 prompts uninformative, the first round never sufficed every time
    logs = trainer.state.log_history
    assert sum(entry["prorl/refill_rounds"] for entry in logs if "prorl/refill_rounds" in entry) == refills
    for key in ("prorl/groups_dropped", "prorl/groups_surplus", "prorl/groups_masked", "prorl/informative_fraction",
                "prorl/entropy", "prorl/kl", "prorl/kl_share", "prorl/refill_seconds"):
        assert key in logs[0], key


def test_refill_with_a_reward_named_with_a_slash_or_nothing(tmp_path, student_path, mostly_even_dataset):
    """TRL names a reward model after the end of its path, which is "" for one built in code or given as "dir/":
    moving refill rows in TRL's completions table must not read reward names as paths."""
    def unnamed(completions, answer, **kwargs):
        return parity_reward(completions, answer)

    def slashed(completions, **kwargs):
        return [0.0] * len(completions)

    unnamed.__name__, slashed.__name__ = "", "a/b"
    args = cpu_config(ProRLConfig, tmp_path, max_steps=3, dynamic_sampling="refill")
    trainer = ProRLTrainer(model=student_path, reward_funcs=[unnamed, slashed], args=args,
                           train_dataset=mostly_even_dataset)
    seen = capture_rollouts(trainer)
    trainer.train()
    assert sum(result.rounds - 1 for _, result in seen) >= 1  # groups moved between rounds
    assert list(trainer._logs["rewards"]) == ["", "a/b"]
    assert list(trainer._logs["rewards"][""]) == [float(i % 2) for i in range(8)]  # the trained rows' rewards


def test_refill_stops_at_the_cap_and_masks_what_is_left(tmp_path, student_path, arithmetic_dataset):
    trainer = make(tmp_path, student_path, arithmetic_dataset, reward=constant_reward, max_steps=1,
                   dynamic_sampling="refill", dynamic_sampling_max_rounds=3)
    seen = capture_rollouts(trainer)
    tables = capture_completion_tables(trainer)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    ((rollout, result),) = seen
    assert result.rounds == 3
    # The batch kept is the first round's (nothing moved): the completions table shows it, not the last round's.
    (table,) = tables
    table_answers = [sum(map(int, re.search(r"(\d+)\+(\d+)=", str(p)).groups())) for p in table["prompt"]]
    assert table_answers == answers_of(trainer, rollout["prompt_ids"])
    assert table["advantages"] == rollout["advantages"].tolist()
    assert rollout["completion_mask"].sum() == 0 and rollout["num_items_in_batch"].item() == 0
    logs = trainer.state.log_history[0]
    assert logs["prorl/refill_rounds"] == 2 and logs["prorl/groups_masked"] == 2 and logs["prorl/groups_dropped"] == 6
    assert logs["prorl/groups_surplus"] == 0
    assert logs["prorl/entropy"] is None  # no loss token: no measurement rather than a misleading 0
    # An all-masked batch is a zero loss that still runs forward/backward: nothing moves, nothing crashes.
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


def test_groups_without_loss_tokens_are_not_informative(tmp_path, student_path, mostly_even_dataset):
    # mask_truncated_completions zeroes a truncated completion's mask; at one token every completion is cut, so the
    # odd-answer groups' differing rewards carry no gradient: refill must not count them (it did, and stopped at
    # once with a batch that trained on nothing), and looks on to its cap.
    odd_answers = mostly_even_dataset.filter(lambda row: int(row["answer"]) % 2 == 1)  # every group's rewards differ
    trainer = make(tmp_path, student_path, odd_answers, max_steps=1, dynamic_sampling="refill",
                   dynamic_sampling_max_rounds=3, mask_truncated_completions=True, max_completion_length=1)
    seen = capture_rollouts(trainer)
    trainer.train()
    ((rollout, result),) = seen
    assert rollout["completion_mask"].sum() == 0  # the precondition: nothing in this batch could train
    assert result.rounds == 3 and result.informative_per_round == (0, 0, 0) and result.selection.kept == 0
    assert trainer.state.log_history[0]["prorl/informative_fraction"] == 0.0


def test_filter_masks_uninformative_groups_and_renormalizes(tmp_path, student_path, mostly_even_dataset):
    trainer = make(tmp_path, student_path, mostly_even_dataset, max_steps=2, dynamic_sampling="filter", beta=0.0)
    seen = capture_rollouts(trainer)
    trainer.train()
    rollout, result = next((r, d) for r, d in seen if 0 < d.selection.kept < 2)  # a batch with both kinds
    assert all(d.rounds == 1 for _, d in seen)  # filter never generates more
    answers = answers_of(trainer, rollout["prompt_ids"])
    kept = rollout["completion_mask"].sum(1) > 0
    assert kept.tolist() == [a % 2 == 1 for a in answers]  # masked exactly the uninformative groups
    assert torch.all(rollout["advantages"][~kept] == 0)
    kept_tokens = rollout["completion_mask"].sum().item()
    assert rollout["num_items_in_batch"].item() == kept_tokens

    # Renormalized: the masked batch gives the loss of its kept rows alone (same token normalizer), and
    # differs from the unmasked batch by exactly kept/all tokens. Advantages of 1 on kept rows make the
    # (on-policy, ratio 1) token-level loss equal to -(kept tokens) / normalizer.
    trainer.model.train()
    masked = dict(rollout, advantages=kept.float())
    only_kept = take_rows(masked, kept.nonzero().squeeze(1))
    only_kept["num_items_in_batch"] = rollout["num_items_in_batch"]
    all_rows_mask = (rollout["completion_ids"] != trainer.processing_class.pad_token_id).long()
    unmasked = dict(masked, completion_mask=all_rows_mask,
                    num_items_in_batch=all_rows_mask.sum())
    loss_masked = trainer._compute_loss(trainer.model, masked).item()
    loss_kept = trainer._compute_loss(trainer.model, only_kept).item()
    loss_unmasked = trainer._compute_loss(trainer.model, unmasked).item()
    assert loss_masked == pytest.approx(-1.0, abs=1e-5)
    assert loss_kept == pytest.approx(loss_masked, abs=1e-5)
    assert loss_unmasked == pytest.approx(-kept_tokens / all_rows_mask.sum().item(), abs=1e-5)


def test_step_entropy_and_kl_weigh_micro_batches_by_their_loss_tokens(tmp_path, student_path, mostly_even_dataset):
    """A micro-batch whose rows are all masked (TRL logs 0 for it) must not pull the step's entropy or KL down."""
    trainer = make(tmp_path, student_path, mostly_even_dataset, max_steps=6, dynamic_sampling="filter", beta=0.1,
                   per_device_train_batch_size=2, gradient_accumulation_steps=4, num_generations=4)
    micro_batches = []
    compute_loss = trainer._compute_loss

    def spy(model, inputs):
        loss = compute_loss(model, inputs)
        metrics = trainer._metrics["train"]
        micro_batches.append((trainer.state.global_step, inputs["completion_mask"].sum().item(),
                              metrics["entropy"][-1], metrics["kl"][-1]))
        return loss

    trainer._compute_loss = spy
    trainer.train()
    assert any(tokens == 0 for _, tokens, _, _ in micro_batches), "no fully masked micro-batch: pick another setup"
    for step, logs in enumerate(log for log in trainer.state.log_history if "prorl/entropy" in log):
        rows = [(tokens, entropy, kl) for s, tokens, entropy, kl in micro_batches if s == step]
        total = sum(tokens for tokens, _, _ in rows)
        if total == 0:  # every group of the step masked: no measurement rather than a misleading 0
            assert logs["prorl/entropy"] is None and logs["prorl/kl"] is None
            continue
        assert logs["prorl/entropy"] == pytest.approx(sum(t * e for t, e, _ in rows) / total, rel=1e-4)
        assert logs["prorl/kl"] == pytest.approx(sum(t * k for t, _, k in rows) / total, rel=1e-4, abs=1e-9)


def test_none_is_plain_grpo_batches(tmp_path, student_path, mostly_even_dataset):
    trainer = make(tmp_path, student_path, mostly_even_dataset, max_steps=1, dynamic_sampling="none")
    seen = capture_rollouts(trainer)
    trainer.train()
    ((rollout, result),) = seen
    assert result is None
    assert rollout["completion_mask"].sum(1).min() > 0
    assert "prorl/refill_rounds" not in trainer.state.log_history[0]
    assert "prorl/entropy" in trainer.state.log_history[0]


# ----- EOS penalty ------------------------------------------------------------------------------------------------
def test_eos_penalty_is_an_extra_reward(tmp_path, student_path, arithmetic_dataset):
    args = cpu_config(ProRLConfig, tmp_path, max_steps=1, dynamic_sampling="none", eos_penalty=0.5,
                      max_completion_length=2, reward_weights=[1.0])
    trainer = ProRLTrainer(model=student_path, reward_funcs=demo.task_reward, args=args,
                           train_dataset=arithmetic_dataset)
    assert args.reward_weights == [1.0]  # the caller's config is not mutated
    assert trainer.args.reward_weights == [1.0, 1.0]
    assert trainer.reward_func_names == ["task_reward", "eos_penalty"]
    trainer.train()
    logs = trainer.state.log_history[0]
    assert logs["completions/clipped_ratio"] > 0  # two tokens are too short for some answers + EOS
    assert logs["rewards/eos_penalty/mean"] == pytest.approx(-0.5 * logs["completions/clipped_ratio"])


def test_eos_penalty_function():
    from trl_ext.prorl import EOSPenalty

    penalty = EOSPenalty(0.25)
    with pytest.raises(RuntimeError, match="eos_token_ids"):
        penalty(completions=["a"], completion_ids=[[1]])
    penalty.eos_token_ids = {3}
    assert penalty(completions=["", "", ""], completion_ids=[[5, 3], [5, 6], []]) == [0.0, -0.25, -0.25]
    with pytest.raises(ValueError, match="> 0"):
        EOSPenalty(0.0)


# ----- configuration ----------------------------------------------------------------------------------------------
def test_defaults_follow_the_paper(tmp_path):
    args = ProRLConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False)
    assert (args.epsilon, args.epsilon_high, args.beta, args.temperature, args.num_generations) == (
        0.2, 0.4, 1e-4, 1.2, 16)
    assert args.loss_type == "dapo" and args.learning_rate == 2e-6 and args.lr_scheduler_type == "constant"
    assert args.dynamic_sampling == "refill" and args.dynamic_sampling_max_rounds == 10
    assert not args.reset_schedule().enabled and args.ref_reset_optimizer and args.eos_penalty == 0.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"dynamic_sampling": "resample"}, "dynamic_sampling='resample'"),
        ({"dynamic_sampling_max_rounds": 0}, "dynamic_sampling_max_rounds"),
        ({"loss_type": "grpo"}, "loss_type='grpo'"),
        ({"loss_type": "bnpo", "dynamic_sampling": "filter"}, "loss_type='bnpo'"),
        ({"scale_rewards": "batch"}, "scale_rewards='batch'"),
        ({"multi_objective_aggregation": "normalize_then_sum"}, "normalize_then_sum"),
        ({"dynamic_sampling": "none", "multi_objective_aggregation": "normalize_then_sum", "eos_penalty": 0.1},
         "eos_penalty=0.1"),
        ({"eos_penalty": -1.0}, "eos_penalty"),
        # CISPO reads epsilon_high as the importance-weight cap: ProRL's clip-higher 0.4 would cap ratio 1 at 0.4.
        ({"loss_type": "cispo"}, "`loss_type='cispo'` with `epsilon_high=0.4`"),
        ({"loss_type": "cispo", "epsilon_high": None}, "(cap 0.2)"),
        ({"ref_reset_steps": 0}, "ref_reset_steps"),
        ({"ref_reset_steps": 10, "beta": 0.0}, "beta=0.0"),
        ({"ref_reset_steps": 10, "sync_ref_model": True}, "sync_ref_model"),
        ({"ref_reset_metric": "eval_reward"}, "eval_strategy='no'"),
        ({"ref_reset_kl_share": 1.0}, "ref_reset_kl_share"),
        ({"ref_reset_kl_share": 0.5, "ref_reset_kl_patience": 0}, "ref_reset_kl_patience"),
        ({"ref_reset_metric": "eval_reward", "eval_strategy": "steps", "ref_reset_patience": 0}, "ref_reset_patience"),
        # Tuning knobs of a feature that is off would be silently ignored.
        ({"dynamic_sampling": "filter", "dynamic_sampling_max_rounds": 3}, "without dynamic_sampling='refill'"),
        ({"ref_reset_steps": 10, "ref_reset_patience": 5},
         "`ref_reset_patience=5` has no effect without ref_reset_metric"),
        ({"ref_reset_greater_is_better": False}, "without ref_reset_metric"),
        ({"ref_reset_min_delta": 0.1}, "without ref_reset_metric"),
        ({"ref_reset_steps": 10, "ref_reset_kl_patience": 2}, "without ref_reset_kl_share"),
        ({"ref_reset_optimizer": False}, "without a reset trigger"),
    ],
)
def test_bad_config_fails_at_construction(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        cpu_config(ProRLConfig, tmp_path, **overrides)


def test_cispo_takes_a_weight_cap(tmp_path):
    assert cpu_config(ProRLConfig, tmp_path, loss_type="cispo", epsilon_high=5.0).epsilon_high == 5.0


def test_grpo_loss_is_fine_without_dynamic_sampling(tmp_path):
    assert cpu_config(ProRLConfig, tmp_path, loss_type="grpo", dynamic_sampling="none").loss_type == "grpo"


def test_trainer_rejects_bad_arguments(tmp_path, student_path, arithmetic_dataset):
    from trl import GRPOConfig

    with pytest.raises(TypeError, match="ProRLConfig"):
        ProRLTrainer(model=student_path, reward_funcs=[demo.task_reward], args=cpu_config(GRPOConfig, tmp_path),
                     train_dataset=arithmetic_dataset)
    streaming = arithmetic_dataset.to_iterable_dataset()
    with pytest.raises(ValueError, match=r"refill.*IterableDataset.*dynamic_sampling='filter'"):
        ProRLTrainer(model=student_path, reward_funcs=[demo.task_reward],
                     args=cpu_config(ProRLConfig, tmp_path), train_dataset=streaming)
    with_images = arithmetic_dataset.add_column("image", [None] * len(arithmetic_dataset))
    with pytest.raises(NotImplementedError, match=r"image column\(s\) \['image'\].*dynamic_sampling='filter'"):
        ProRLTrainer(model=student_path, reward_funcs=[demo.task_reward],
                     args=cpu_config(ProRLConfig, tmp_path), train_dataset=with_images)


def test_trl_parser_reads_cli_and_yaml(tmp_path):
    from trl import ModelConfig, ScriptArguments, TrlParser

    config_file = tmp_path / "recipe.yaml"
    config_file.write_text("dynamic_sampling: filter\nref_reset_steps: 200\neos_penalty: 0.1\nuse_cpu: true\n"
                           "bf16: false\n")
    parser = TrlParser((ScriptArguments, ProRLConfig, ModelConfig))
    _, args, _ = parser.parse_args_and_config(
        args=["--config", str(config_file), "--output_dir", str(tmp_path), "--ref_reset_kl_share", "0.5",
              "--epsilon_high", "0.28"])
    assert (args.dynamic_sampling, args.ref_reset_steps, args.eos_penalty) == ("filter", 200, 0.1)
    assert args.ref_reset_kl_share == 0.5 and args.epsilon_high == 0.28
    assert args.reset_schedule().every_steps == 200


def test_every_new_config_field_has_help():
    from trl import GRPOConfig

    base = {f.name for f in dataclasses.fields(GRPOConfig)}
    new = [f for f in dataclasses.fields(ProRLConfig) if f.name not in base]
    assert {f.name for f in new} >= {"dynamic_sampling", "dynamic_sampling_max_rounds", "ref_reset_steps",
                                     "ref_reset_metric", "ref_reset_kl_share", "ref_reset_optimizer", "eos_penalty"}
    changed = ("epsilon_high", "beta", "temperature", "num_generations", "learning_rate", "lr_scheduler_type",
               "loss_type", "per_device_train_batch_size")
    for f in new + [f for f in dataclasses.fields(ProRLConfig) if f.name in changed]:
        assert f.metadata.get("help"), f.name


def test_trl_internals_prorl_relies_on(tmp_path, student_path, arithmetic_dataset):
    """Contract: the GRPOTrainer attributes ProRL reads (beyond those in trl_ext._compat) still exist."""
    from trl_ext import _compat

    trainer = make(tmp_path, student_path, arithmetic_dataset, reward=demo.task_reward, beta=0.1, ref_reset_steps=5)
    expected = {
        "_metrics": dict,  # TRL's metric store: ProRL reads the `kl` and `entropy` its loss logged
        "_step": int,  # micro-step counter: the reset waits for TRL's next rollout boundary
        "num_iterations": int, "num_generations": int, "beta": float, "multi_objective_aggregation": str,
        "reward_weights": torch.Tensor, "eos_token_ids": list, "ref_model": torch.nn.Module,
    }
    for name, kind in expected.items():
        assert isinstance(getattr(trainer, name, None), kind), f"TRL {_compat.TRL_VERSION}: GRPOTrainer.{name} changed"


# ----- the Kondo gate mixed in --------------------------------------------------------------------------------------
@dataclasses.dataclass
class GatedProRLConfig(KondoGateArguments, ProRLConfig):
    pass


class GatedProRLTrainer(KondoGateMixin, ProRLTrainer):
    pass


def test_kondo_gate_decides_once_on_the_refilled_batch(tmp_path, student_path, mostly_even_dataset):
    # The post-rollout hooks (here the gate) see the final batch, not each refill round: the gate used to get every
    # round's rows and refill then refused to merge the rounds' gate keys. Post-rollout hooks also get the rows'
    # dataset rows and completion ids.
    args = cpu_config(GatedProRLConfig, tmp_path, max_steps=3, dynamic_sampling="refill", gate="threshold",
                      gate_price=-1e9, loss_type="dapo")
    trainer = GatedProRLTrainer(model=student_path, reward_funcs=[parity_reward], args=args,
                                train_dataset=mostly_even_dataset)
    hooked = []
    original = trainer._postprocess_rollout

    def spy(inputs, rollout):
        rollout = original(inputs, rollout)
        hooked.append((inputs, rollout["prompt_ids"].clone(), rollout["completion_ids"].clone(),
                       list(trainer.rollout_completion_ids), trainer.last_dynamic_sampling))
        return rollout

    trainer._postprocess_rollout = spy
    trainer.train()
    assert len(hooked) == 3 and sum(result.rounds - 1 for *_, result in hooked) >= 1  # refill happened
    for inputs, prompt_ids, completion_ids, ids, _ in hooked:
        assert [int(row["answer"]) for row in inputs] == answers_of(trainer, prompt_ids)
        assert all(int(row["answer"]) % 2 == 1 for row in inputs)  # the informative groups that were kept
        mask = completion_ids != trainer.processing_class.pad_token_id
        assert [completion_ids[i][mask[i]].tolist() for i in range(len(ids))] == ids
    # At a price below every delight the gate keeps exactly the batch's completions, once per step.
    assert trainer.gate_counters["completions"] == trainer.gate_counters["completions_kept"] == 3 * 8


def test_kondo_gate_skips_rows_that_dynamic_sampling_masked(tmp_path, student_path, mostly_even_dataset):
    args = cpu_config(GatedProRLConfig, tmp_path, max_steps=2, dynamic_sampling="filter", gate="threshold",
                      gate_price=-1e9, loss_type="dapo")
    trainer = GatedProRLTrainer(model=student_path, reward_funcs=[parity_reward], args=args,
                                train_dataset=mostly_even_dataset)
    seen = capture_rollouts(trainer)
    trainer.train()
    masked = sum(int((rollout["completion_mask"].sum(1) == 0).sum()) for rollout, _ in seen)
    assert masked > 0  # filter-only masks the uninformative groups in place
    # A masked row has no loss tokens: it gets no backward pass, however low the price, and no place in the history
    # or the gate's counts (at this price every other row passes: the pass rate is 1).
    assert trainer.gate_counters["completions_kept"] == trainer.gate_counters["completions"] == 2 * 8 - masked
    rates = [e["delight/pass_rate"] for e in trainer.state.log_history if "delight/pass_rate" in e]
    assert 1.0 in rates and set(rates) <= {1.0, None}  # None: a step whose every group filter masked
    assert all(e["delight/completions_skipped"] == 0 for e in trainer.state.log_history if "delight/pass_rate" in e)
    logs = [e for e in trainer.state.log_history if "delight/nonfinite_delights" in e]
    assert logs and all(e["delight/nonfinite_delights"] == 0 for e in logs)


def test_a_window_the_gate_skips_entirely_still_closes_the_step(tmp_path, student_path, mostly_even_dataset):
    # ProRL logs each step's entropy and KL (and hands the KL share to the reset) at the step's last micro-batch;
    # with nothing passing the gate on one process every micro-batch used to be skipped, and those went unlogged.
    args = cpu_config(GatedProRLConfig, tmp_path, max_steps=2, dynamic_sampling="none", gate="threshold",
                      gate_price=1e9, loss_type="dapo", beta=0.1, gradient_accumulation_steps=2,
                      per_device_train_batch_size=4)
    trainer = GatedProRLTrainer(model=student_path, reward_funcs=[parity_reward], args=args,
                                train_dataset=mostly_even_dataset)
    trainer.train()
    assert trainer.gate_counters["completions_kept"] == 0
    assert trainer.gate_counters["micro_batches_skipped"] == 2  # of 4: one (empty) micro-batch per window ran
    steps = [entry for entry in trainer.state.log_history if "prorl/kl_share" in entry]
    assert len(steps) == 2 and all(entry["prorl/entropy"] is None for entry in steps)  # no kept token: no value
    # TRL's own metrics of the empty micro-batch are no measurement either (they read 0.0).
    assert all(entry["entropy"] is None and entry["kl"] is None and entry["clip_ratio/region_mean"] is None
               for entry in steps)


def test_kl_share_scale_spans_every_rollout_of_the_step(tmp_path, student_path, mostly_even_dataset):
    # With steps_per_generation < gradient_accumulation_steps an optimizer step trains on two rollouts; the KL
    # share's advantage scale is over both (it was the latest rollout's alone).
    def answer_sized_reward(completions, answer, **kwargs):  # |advantage| = answer / 2: differs between prompts
        return [float(i % 2) * int(a) for i, a in enumerate(answer)]

    dataset = mostly_even_dataset.filter(lambda row: int(row["answer"]) > 0)
    trainer = make(tmp_path, student_path, dataset, reward=answer_sized_reward, max_steps=1, dynamic_sampling="none",
                   beta=0.1, scale_rewards="none", gradient_accumulation_steps=2, steps_per_generation=1,
                   per_device_train_batch_size=4)
    seen = capture_rollouts(trainer)
    trainer.train()
    assert len(seen) == 2
    totals = [(r["advantages"].abs().unsqueeze(1) * r["completion_mask"]).sum().item() for r, _ in seen]
    tokens = [r["completion_mask"].sum().item() for r, _ in seen]
    assert totals[0] / tokens[0] != pytest.approx(totals[1] / tokens[1])  # the two rollouts differ
    assert trainer._advantage_scale == pytest.approx(sum(totals) / sum(tokens))
