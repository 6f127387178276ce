"""ProRLTrainer: prolonged RL (arXiv 2505.24864) = GRPO + clip-higher + dynamic sampling + KL with reference resets.

What TRL already does and we only configure (ProRLConfig): decoupled clip (`epsilon`/`epsilon_high`), the token-level
loss (`loss_type="dapo"`), the KL penalty to a reference (`beta`), the rollout temperature.
What this trainer adds around TRL's own rollout and loss (all through `super()`):
* dynamic sampling (`dynamic_sampling.py`): after TRL scores a generation batch, uninformative groups (all rewards
  equal) are dropped; "refill" generates more rounds through TRL's own `_generate_and_score_completions` for
  fresh prompts and moves informative groups into the empty slots; "filter" only masks. Both happen in
  `_generate_rollout`, before the post-rollout hook, so a mixed-in hook (the Kondo gate) sees the final batch;
* the reference reset (`trl_ext.core.reference_reset`), fed with the KL share of the loss measured here;
* the EOS penalty (`eos_penalty.py`), an extra reward function.

Merging refill rounds re-pads prompts on the left to a common width, while TRL scored each round's reference (and,
when it computes them, old) log-probs at that round's own width. Models with rotary position embeddings (Llama,
Qwen, Mistral, ...) attend by relative position, so the shift changes those log-probs only by float rounding; with
absolute position embeddings prefer dynamic_sampling="filter", which never moves rows.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel

from .. import _compat
from ..core import ExtGRPOTrainer
from ..core.reference_reset import ReferenceResetCallback
from ..core.reset_triggers import kl_share
from ..core.trainer import image_columns, resolve_config
from .batch_rows import check_mergeable, concat_rows, gather_rows, mask_rows, take_rows, take_table_rows
from .config import ProRLConfig
from .dynamic_sampling import (
    GroupSelection,
    groups_that_train,
    informative_groups,
    informative_needed,
    kept_rows,
    local_rows,
    refill_prompt_indices,
    select_groups,
    selected_rows,
)
from .eos_penalty import EOSPenalty, with_eos_penalty


@dataclass(frozen=True)
class DynamicSamplingResult:
    """What dynamic sampling did to one generation batch (identical on every process)."""

    rounds: int  # generation rounds, the first included
    informative_per_round: tuple[int, ...]  # informative groups generated in each round
    selection: GroupSelection  # which group fills each slot, and which slots are masked
    seconds_refilling: float  # wall time of the extra rounds and the merge (the slowest process's)

    @property
    def groups_dropped(self) -> int:
        """Uninformative groups generated (all rounds): dropped from the batch, or masked in it."""
        slots = len(self.selection.keep)
        return self.rounds * slots - sum(self.informative_per_round)

    @property
    def groups_surplus(self) -> int:
        """Informative groups generated beyond the free slots of the last round: generated, then not used."""
        return sum(self.informative_per_round) - self.selection.kept


class ProRLTrainer(ExtGRPOTrainer):
    """Drop-in replacement for `trl.GRPOTrainer` with the ProRL recipe.

    Args:
        model, reward_funcs, args, ...: exactly as in `trl.GRPOTrainer` (`args` is a `ProRLConfig`).

    Attributes:
        reference_reset: the `ReferenceResetCallback` when a reset trigger is configured, else None.
        last_dynamic_sampling: a `DynamicSamplingResult` for the latest training generation batch.
    """

    _tag_names = ["trl", "trl_ext", "prorl", "grpo", "dapo"]
    _name = "ProRL"
    _paper = {
        "title": "ProRL: Prolonged Reinforcement Learning Expands Reasoning Boundaries in Large Language Models",
        "id": "2505.24864",
        "citation": (
            "@article{liu2025prorl,\n"
            "    title   = {{ProRL: Prolonged Reinforcement Learning Expands Reasoning Boundaries in Large Language "
            "Models}},\n"
            "    author  = {Mingjie Liu and Shizhe Diao and Ximing Lu and Jian Hu and Xin Dong and Yejin Choi and "
            "Jan Kautz and Yi Dong},\n"
            "    journal = {arXiv preprint arXiv:2505.24864},\n"
            "    year    = {2025}\n"
            "}"
        ),
    }
    _metric_prefix = "prorl"
    _card_template = "prorl.md"
    reports_kl_share = True  # feeds ReferenceResetCallback.observe_kl_share every optimizer step
    loss_closes_each_step = True  # the step's KL, entropy and KL share are logged at its last micro-batch

    def __init__(
        self,
        model: str | PreTrainedModel,
        reward_funcs: Any | list[Any] | None = None,
        args: ProRLConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        reward_processing_classes=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        tools: list[Callable] | None = None,
        rollout_func: Callable | None = None,
        environment_factory: Callable | None = None,
    ):
        args = resolve_config(model, args, ProRLConfig, "ProRL")
        if args.dynamic_sampling == "refill":
            check_refill_dataset(train_dataset)
        self._eos_penalty = None
        if args.eos_penalty > 0:
            self._eos_penalty = EOSPenalty(args.eos_penalty)
            reward_funcs, args = with_eos_penalty(reward_funcs, args, self._eos_penalty)
            if reward_processing_classes is not None:
                classes = reward_processing_classes
                classes = list(classes) if isinstance(classes, list | tuple) else [classes]
                reward_processing_classes = [*classes, None]

        super().__init__(
            model=model,
            reward_funcs=reward_funcs,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            reward_processing_classes=reward_processing_classes,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
            tools=tools,
            rollout_func=rollout_func,
            environment_factory=environment_factory,
        )
        if self._eos_penalty is not None:
            self._eos_penalty.eos_token_ids = set(self.eos_token_ids)
        self.reference_reset: ReferenceResetCallback | None = None
        schedule = args.reset_schedule()
        if schedule.enabled:
            self.reference_reset = ReferenceResetCallback(
                schedule, reset_optimizer=args.ref_reset_optimizer, state_name="prorl_reference_reset"
            ).attach(self)
        self.last_dynamic_sampling: DynamicSamplingResult | None = None
        self._advantage_scale = math.nan  # mean |advantage| over the loss tokens of the optimizer step's rollouts
        self._step_advantages: list[torch.Tensor] = []  # (sum |advantage|, loss tokens) of each rollout of the step
        self._step_kl: list[tuple[float, float]] = []  # (TRL's micro-batch value, its loss tokens)
        self._step_entropy: list[tuple[float, float]] = []
        self._refill_draws = (-1, 0)  # (global step, rounds drawn at that step): keys the refill prompts

    # ----- rollout: dynamic sampling ---------------------------------------------------------------------------------
    def _generate_rollout(self, inputs):
        # Dynamic sampling happens here, before the post-rollout hook: a hook (e.g. the Kondo gate mixed in) sees the
        # final batch once, with the dataset rows and completion ids its rows come from.
        if self._mode != "train" or self.args.dynamic_sampling == "none":
            inputs, rollout = super()._generate_rollout(inputs)
            if self._mode == "train":
                self._note_rollout(rollout)
            return inputs, rollout

        first = self._generate_round(inputs)
        if self.args.dynamic_sampling == "refill":
            check_mergeable(first.rollout)  # at the first step, not at the first refill that moves a group
        rounds = [first]
        informative = [self._informative(first)]
        tables = [_compat.completion_log_tail(self, first.rewards.size(0))]  # each round's rows of TRL's table
        started = time.perf_counter()
        if self.args.dynamic_sampling == "refill":
            # Every process holds the same gathered rewards, hence the same count: all run the same rounds.
            while informative_needed(informative) > 0 and len(rounds) < self.args.dynamic_sampling_max_rounds:
                rounds.append(self._generate_round(self._refill_inputs(len(inputs))))
                informative.append(self._informative(rounds[-1]))
                tables.append(_compat.completion_log_tail(self, rounds[-1].rewards.size(0)))
        selection = select_groups(informative)
        inputs, rollout = self._assemble(rounds, tables, selection, len(inputs))
        result = DynamicSamplingResult(
            rounds=len(rounds),
            informative_per_round=tuple(int(f.sum()) for f in informative),
            selection=selection,
            seconds_refilling=self._slowest_process(time.perf_counter() - started),
        )
        self.last_dynamic_sampling = result
        self._note_rollout(rollout)
        slots = len(selection.keep)
        self.log_metric("refill_rounds", result.rounds - 1)
        self.log_metric("groups_dropped", result.groups_dropped)
        self.log_metric("groups_surplus", result.groups_surplus)
        self.log_metric("groups_masked", selection.masked)
        self.log_metric("informative_fraction", result.informative_per_round[0] / slots)
        self.log_metric("refill_seconds", result.seconds_refilling)
        return inputs, rollout

    def _generate_round(self, inputs: list[dict[str, Any]]) -> Round:
        """One generation round through TRL, with the rewards and completion ids it left on the trainer."""
        inputs, rollout = super()._generate_rollout(inputs)
        return Round(inputs, rollout, self.rollout_rewards, self.rollout_completion_ids)

    def _slowest_process(self, seconds: float) -> float:
        """The longest of the processes' wall times (every process waits for it), so the logged value is the same on
        every process. Collective: every process calls it once per rollout."""
        if self.accelerator.num_processes == 1:
            return seconds
        return self.accelerator.gather(torch.tensor([seconds], device=self.accelerator.device)).max().item()

    def _informative(self, generated: Round) -> torch.Tensor:
        """The round's groups whose rewards differ and that have a row to train on. Collective (one gather)."""
        by_reward = informative_groups(
            generated.rewards, self.reward_weights, self.num_generations, self.multi_objective_aggregation
        ).cpu()
        advantages = generated.rollout["advantages"]
        moves = advantages != 0 if advantages.dim() == 1 else (advantages != 0).any(dim=-1)
        row_trains = (self.loss_mask(generated.rollout).sum(dim=-1) > 0) & moves
        all_rows = self.accelerator.gather(row_trains.long()).bool().cpu()
        return by_reward & groups_that_train(all_rows, self.num_generations)

    def _refill_inputs(self, rows_per_process: int) -> list[dict[str, Any]]:
        """Fresh dataset rows for one more generation round, laid out like TRL's sampler (prompt repeated G times)."""
        step, drawn = self._refill_draws
        drawn = drawn + 1 if step == self.state.global_step else 0
        self._refill_draws = (self.state.global_step, drawn)
        num_prompts = rows_per_process * self.accelerator.num_processes // self.num_generations
        prompts = refill_prompt_indices(
            len(self.train_dataset), num_prompts, self.args.seed, self.state.global_step, drawn
        )
        rows = [index for index in prompts for _ in range(self.num_generations)]
        return [self.train_dataset[i] for i in local_rows(rows, self.accelerator.process_index, rows_per_process)]

    def _assemble(self, rounds: list[Round], tables, selection: GroupSelection,
                  rows_per_process: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The batch TRL expects (same local size): the selected groups, uninformative slots masked, with this
        process's dataset rows of it. The rewards, completion ids and TRL's completions table get the same rows, so
        that hooks and `log_completions` see what is trained on."""
        process = slice(self.accelerator.process_index * rows_per_process,
                        (self.accelerator.process_index + 1) * rows_per_process)
        keep = kept_rows(selection, self.num_generations)
        if selection.is_identity:  # no group moved: mask in place, no communication
            inputs, rollout = rounds[0].inputs, rounds[0].rollout
            self._rollout_rewards, self._rollout_completion_ids = rounds[0].rewards, rounds[0].completion_ids
            if len(rounds) > 1:  # refill rounds that found nothing logged their rows last: log the first round's
                first_rows = torch.arange(rounds[0].rewards.size(0))
                _compat.replace_completion_log_tail(self, take_table_rows(tables, first_rows))
        else:
            pad_id = self.model.generation_config.pad_token_id  # TRL mirrors the tokenizer's pad id here
            everything = concat_rows([gather_rows(r.rollout, self.accelerator, pad_id) for r in rounds], pad_id)
            rows = selected_rows(selection, self.num_generations, [r.rewards.size(0) for r in rounds])
            rollout = take_rows(everything, rows[process])
            self._rollout_rewards = torch.cat([r.rewards for r in rounds]).index_select(
                0, rows.to(rounds[0].rewards.device))
            # Rows are numbered round by round, process by process, as the gathered objects are ordered.
            local = rows[process].tolist()
            local_pairs = [list(zip(r.inputs, r.completion_ids, strict=True)) for r in rounds]
            everyone = [pair for pairs in local_pairs for pair in _compat.gather_object(pairs)]
            inputs = [everyone[i][0] for i in local]
            self._rollout_completion_ids = [everyone[i][1] for i in local]
            _compat.replace_completion_log_tail(self, take_table_rows(tables, rows))
        num_items = rounds[0].rollout["num_items_in_batch"]
        rollout = mask_rows(rollout, keep[process])
        # TRL's token-normalized losses divide by the generation batch's loss-token count: count the kept tokens.
        count = self.reduce_sum(self.loss_mask(rollout).sum().to(torch.float64))
        rollout["num_items_in_batch"] = count.round().to(dtype=num_items.dtype, device=num_items.device)
        return inputs, rollout

    def _note_rollout(self, rollout: dict[str, Any]) -> None:
        """Remember what the KL share needs at the step's end: the rollout's |advantage| total and loss-token count
        (all processes). With steps_per_generation < gradient_accumulation_steps a step spans several rollouts."""
        mask = self.loss_mask(rollout).to(torch.float64)
        advantages = rollout["advantages"].to(torch.float64)
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1).expand_as(mask)
        self._step_advantages.append(self.reduce_sum(torch.stack([(advantages.abs() * mask).sum(), mask.sum()])))

    # ----- loss: per-step KL / entropy signals -----------------------------------------------------------------------
    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        if self._mode == "train":
            # Every process computes every micro-batch's loss, so this all-reduce is rank-symmetric.
            tokens = self.reduce_sum(self.loss_mask(inputs).sum().to(torch.float64)).item()
            self._record_step_signals(tokens)
        return loss

    def _record_step_signals(self, tokens: float) -> None:
        """Average TRL's per-micro-batch `kl` and `entropy` (already global) over the optimizer step, weighted by
        each micro-batch's loss tokens (all processes); at its last micro-batch log them under prorl/, with the KL
        share, and hand the share to the reset trigger."""
        # TRL reports 0 for a micro-batch without loss tokens (everything masked): that is no measurement, not 0,
        # and the token weight leaves it out.
        self._step_entropy.append((_compat.logged_values(self, "entropy")[-1], tokens))
        if self.beta != 0.0:
            self._step_kl.append((_compat.logged_values(self, "kl")[-1], tokens))
        if not self.accelerator.sync_gradients:
            return
        if self._step_advantages:  # a step inside a longer rollout keeps that rollout's scale
            total, tokens = torch.stack(self._step_advantages).sum(0).tolist()
            self._advantage_scale = total / tokens if tokens > 0 else math.nan
            self._step_advantages = []
        self.log_metric("entropy", token_weighted_mean(self._step_entropy))
        if self._step_kl:
            kl = token_weighted_mean(self._step_kl)
            share = kl_share(self.beta, kl, self._advantage_scale)
            self.log_metric("kl", kl)
            self.log_metric("kl_share", share)
            if self.reference_reset is not None:
                self.reference_reset.observe_kl_share(share)
        if self.reference_reset is not None:
            self.log_metric("resets", self.reference_reset.count)
        self._step_kl, self._step_entropy = [], []


@dataclass
class Round:
    """One generation round of dynamic sampling: this process's dataset rows, its rollout, the gathered rewards
    and this process's completion ids."""

    inputs: list[dict[str, Any]]
    rollout: dict[str, Any]
    rewards: torch.Tensor
    completion_ids: list[list[int]]


def token_weighted_mean(values: list[tuple[float, float]]) -> float:
    """Mean of per-micro-batch (value, loss tokens) pairs, weighted by tokens; NaN when no micro-batch had any."""
    values = [(value, tokens) for value, tokens in values if tokens > 0]  # no token: no measurement (maybe NaN)
    total = sum(tokens for _, tokens in values)
    return sum(value * tokens for value, tokens in values) / total if total > 0 else math.nan


def check_refill_dataset(train_dataset) -> None:
    """Refill draws extra prompts by index, so it needs a map-style dataset."""
    from datasets import IterableDataset

    if train_dataset is None or isinstance(train_dataset, IterableDataset) or not (
        hasattr(train_dataset, "__len__") and hasattr(train_dataset, "__getitem__")
    ):
        kind = "no train_dataset" if train_dataset is None else f"a {type(train_dataset).__name__}"
        raise ValueError(
            f"dynamic_sampling='refill' draws extra prompts from the training dataset by index, but it got {kind}. "
            "Pass a map-style dataset (datasets.Dataset), or use dynamic_sampling='filter' (masks uninformative "
            "groups without generating more)."
        )
    images = image_columns(train_dataset)
    if images:
        raise NotImplementedError(
            f"dynamic_sampling='refill' merges rollout rows from several generation rounds, which is supported for "
            f"text only, but the training dataset has image column(s) {images}. Use dynamic_sampling='filter', "
            "which masks uninformative groups in place."
        )
