"""PurifiedDistillTrainer: on-policy distillation from K teachers with knowledge purification (arXiv 2602.01064).

Per generation batch (once, on every process, before TRL shuffles rows):

    student samples (TRL) -> every teacher scores the sampled tokens (K forward passes)
      -> gathered over processes: router features and per-teacher signal of every prompt (purify/signal.py)
      -> the purifier decides weights over the teachers per prompt (purify/methods/), then learns online
      -> per row: purified teacher log-probs (purify/target.py) -> GNDPO advantages (trl_ext.gndpo)
      -> super()._compute_loss, unchanged

Decisions are made on gathered data by identical code on every process, and the main process's result is broadcast
anyway, so every process trains on the same choice. Router state is registered with the checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel

from ..core import (
    ExtGRPOTrainer,
    check_teacher_vocabulary,
    distillation_reward_funcs,
    environments_give_reward,
    load_teacher,
    prepare_teacher,
)
from ..core.teachers import given_once, teacher_display_name
from ..gndpo.advantages import GNDPOAdvantages, gndpo_advantages
from .config import NEEDS_REWARD, PurifiedDistillConfig
from .features import hashed_ngram_features, hidden_state_features
from .methods import Decision, build_purifier
from .methods.base import single_threaded
from .methods.rl_selection import student_improvement
from .pending import PendingDecisions
from .signal import (
    choice_accuracy,
    combined_rewards,
    conflict_and_consensus,
    decisive_prompts,
    mean_conflict,
    ranking_agreement,
    sequence_logps,
)
from .target import purified_logps

logger = logging.getLogger(__name__)


@dataclass
class PromptBatch:
    """The gathered view of one generation batch that the purifier works on (identical on every process)."""

    features: torch.Tensor  # (Q, D) router features, one row per prompt
    signal: torch.Tensor  # (Q, K) per-teacher signal, NaN where undefined
    teacher_seq_logps: torch.Tensor  # (K, N) teachers' log-likelihood of every completion
    consensus: torch.Tensor  # (Q, K) reward-free agreement of each teacher with the others (signal.teacher_consensus)
    conflict: torch.Tensor  # (K, K) rate at which two teachers order completions oppositely (signal.teacher_conflict)
    rewards: torch.Tensor  # (N,) weighted rewards of every completion
    group_size: int


@dataclass
class Purification:
    """What the latest rollout's purification did (for inspection, tests and benchmarks)."""

    batch: PromptBatch
    decision: Decision
    weights: torch.Tensor  # (Q, K) after the broadcast
    advantages: GNDPOAdvantages


class PurifiedDistillTrainer(ExtGRPOTrainer):
    """Drop-in replacement for `trl.GRPOTrainer` that distils K frozen teachers into the policy, purified per prompt.

    Args:
        model, reward_funcs, args, ...: exactly as in `trl.GRPOTrainer`. Reward functions are required by every
            purification (they define which teacher is right on a prompt) and optional only for "none".
        teacher_models: a list of teachers, each an id, a path or a `PreTrainedModel`; defaults to
            `args.teacher_model_names_or_paths`. Their order is the order of the `purify/*/teacher_<k>` metrics.
    """

    _tag_names = ["trl", "trl_ext", "knowledge-purification", "multi-teacher-distillation", "distillation"]
    _name = "PurifiedDistill"
    _paper = {
        "title": "Exploring Knowledge Purification in Multi-Teacher Knowledge Distillation for LLMs",
        "id": "2602.01064",
        "citation": (
            "@inproceedings{jin2026purification,\n"
            "    title     = {{Exploring Knowledge Purification in Multi-Teacher Knowledge Distillation for LLMs}},\n"
            "    author    = {Ruihan Jin and Pengpeng Shao and Zhengqi Wen and Jinyang Wu and Mingkuan Feng and "
            "Shuo Yang and Chu Yuan Zhang and Jianhua Tao},\n"
            "    booktitle = {International Conference on Learning Representations},\n"
            "    year      = {2026}\n"
            "}"
        ),
    }
    _metric_prefix = "purify"
    _card_template = "purified_distill.md"

    def __init__(
        self,
        model: str | PreTrainedModel,
        reward_funcs: Any | list[Any] | None = None,
        args: PurifiedDistillConfig | None = None,
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
        teacher_models: list[str | PreTrainedModel] | None = None,
    ):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = PurifiedDistillConfig(f"{name.split('/')[-1]}-PurifiedDistill")
        if not isinstance(args, PurifiedDistillConfig):
            raise TypeError(
                f"PurifiedDistillTrainer needs a PurifiedDistillConfig, got {type(args).__name__}. Build the config "
                "with trl_ext.purify.PurifiedDistillConfig(...); it accepts every GRPOConfig field."
            )
        teachers = self._teacher_list(teacher_models, args)
        # Checked from the configs and tokenizers, before any weights are loaded.
        named = {f"teacher {index} ({teacher_display_name(teacher)!r})": teacher
                 for index, teacher in enumerate(teachers)}
        check_teacher_vocabulary(model, named, trust_remote_code=args.trust_remote_code,
                                 student_tokenizer=processing_class)
        has_reward = reward_funcs is not None or environments_give_reward(environment_factory)
        if args.purification in NEEDS_REWARD and not has_reward:
            raise ValueError(
                f"purification={args.purification!r} tells which teacher is right on a prompt from the verifiable "
                "reward of the student's completions, but no `reward_funcs` were given (and no environment defines "
                "`get_reward`). Pass reward functions, or use purification='none' (the plain average of the "
                "teachers), which needs none."
            )
        if len(teachers) == 1 and args.purification != "none":
            logger.warning(
                "PurifiedDistillTrainer got a single teacher: purification=%r has nothing to choose between and "
                "reduces to GNDPO with that teacher.", args.purification,
            )
        reward_funcs = distillation_reward_funcs(reward_funcs, environment_factory, args.reward_advantage_weight)

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
        self.teacher_names = [teacher_display_name(t) for t in teachers]
        self.teacher_models = [
            prepare_teacher(load_teacher(t, args.teacher_model_init_kwargs, args, default_dtype=self.model.dtype),
                            self, temperature=args.teacher_temperature)
            for t in teachers
        ]
        self.purifier = build_purifier(args.purification, len(teachers), self._feature_dim(), args.router_settings())
        self.register_state("purifier", self.purifier)
        self.pending = PendingDecisions()
        if self.purifier.learns_from_improvement:
            self.register_state("rl_pending", self.pending)
        self.last_purification: Purification | None = None

    @staticmethod
    def _teacher_list(teacher_models, args) -> list:
        if isinstance(teacher_models, str | PreTrainedModel):
            raise TypeError(
                "`teacher_models` must be a list of teachers (ids, paths or models), got a single "
                f"{type(teacher_models).__name__}. Wrap it in a list: teacher_models=[teacher]."
            )
        teachers = given_once(list(teacher_models) if teacher_models is not None else None,
                              list(args.teacher_model_names_or_paths or []), "teacher_models",
                              "teacher_model_names_or_paths")
        if not teachers:
            raise ValueError(
                "PurifiedDistillTrainer needs at least one teacher, got an empty teacher list: pass "
                "`teacher_models=[...]` (ids, paths or models) or set `teacher_model_names_or_paths` in "
                "PurifiedDistillConfig."
            )
        return teachers

    @property
    def num_teachers(self) -> int:
        return len(self.teacher_models)

    def _feature_dim(self) -> int:
        if self.args.router_features == "ngram":
            return self.args.router_feature_dim
        config = self.accelerator.unwrap_model(self.teacher_models[0]).config
        return int(config.get_text_config().hidden_size)

    # ----- the post-rollout hook ------------------------------------------------------------------------------
    def card_settings(self) -> dict[str, object]:
        return {"teacher_model_names_or_paths": self.teacher_names}  # also when passed as `teacher_models=`

    def _postprocess_rollout(self, inputs: list[dict[str, Any]], rollout: dict[str, Any]) -> dict[str, Any]:
        training = self._mode == "train"
        group_size = self.num_generations if training else self.num_generations_eval
        mask = self.loss_mask(rollout).float()
        student_logps = self.student_logps(rollout).float()
        teacher_logps = torch.stack([self.score_completions(t, rollout).float() for t in self.teacher_models])

        if training and self.purifier.learns_from_improvement:
            self._learn_from_improvement()  # the previous rollout's choices, now that the student trained on them

        local_features = self._prompt_features(rollout).to(mask.device)
        with single_threaded():  # microsecond-sized CPU math: see methods/base.py
            batch = self._gather_prompts(local_features, teacher_logps, mask, group_size)
            # Decide first, learn second: a prompt is never routed with its own label.
            decision = self.purifier.decide(batch.features, batch.signal, explore=training, consensus=batch.consensus)
            weights = self._broadcast(decision.weights)
            self._log_purification(batch, decision, weights)
        if training and self.purifier.learns_from_signal:
            for name, value in self.purifier.learn(batch.features, batch.signal).items():
                self.log_metric(name, value)
            self._sync_purifier()

        local_rows = self._local_rows(mask.size(0))
        row_weights = weights.repeat_interleave(group_size, dim=0)[local_rows].to(teacher_logps.device)
        target = purified_logps(teacher_logps, row_weights)
        result = gndpo_advantages(target, student_logps, mask, score_clip=self.args.score_clip,
                                  normalization=self.args.advantage_normalization, reduce_sum=self.reduce_sum)
        advantages = result.advantages
        if self.args.reward_advantage_weight:
            advantages = advantages + self.args.reward_advantage_weight * rollout["advantages"].unsqueeze(1) * mask
        rollout["advantages"] = advantages  # (B, T): TRL's loss takes per-token advantages as they are
        self.log_metric("score_mean", result.score_moments.mean)
        self.log_metric("score_std", result.score_moments.std)
        self.log_metric("clipped_fraction", result.clipped_fraction)
        self.log_metric("reverse_kl", result.reverse_kl)

        if training and self.purifier.learns_from_improvement:
            self._store_pending(rollout, mask, student_logps, batch, weights)
        self.last_purification = Purification(batch, decision, weights, result)
        return rollout

    # ----- gathering and broadcasting -------------------------------------------------------------------------
    def _local_rows(self, num_local: int) -> slice:
        """This process's rows in the gathered batch (TRL gives each process a contiguous slice)."""
        start = self.accelerator.process_index * num_local
        return slice(start, start + num_local)

    def _gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather(tensor.contiguous()).cpu()

    def _broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """The main process's copy of `tensor` on every process (a no-op with one process)."""
        if self.accelerator.num_processes == 1:
            return tensor
        from accelerate.utils import broadcast

        return broadcast(tensor.contiguous().to(self.accelerator.device), from_process=0).cpu()

    def _sync_purifier(self) -> None:
        for tensor in self.purifier.sync_tensors():
            tensor.copy_(self._broadcast(tensor))

    def _prompt_features(self, rollout: dict[str, Any]) -> torch.Tensor:
        if self.args.router_features == "teacher_hidden":
            return hidden_state_features(self.teacher_models[0], rollout["prompt_ids"], rollout["prompt_mask"])
        with single_threaded():
            return hashed_ngram_features(rollout["prompt_ids"], rollout["prompt_mask"], self.args.router_feature_dim,
                                         self.args.router_ngram_order)

    def _gather_prompts(self, local_features, teacher_logps, mask, group_size) -> PromptBatch:
        # A completion without loss tokens (cut at max_completion_length under mask_truncated_completions) was scored
        # with its tokens masked out: its log-likelihood (0) and reward take part in no comparison.
        ignored = self._gather((mask.sum(dim=1) == 0).int()).bool()
        seq_logps = self._gather(sequence_logps(teacher_logps, mask).t()).t()  # (K, N)
        seq_logps = seq_logps.masked_fill(ignored, float("nan"))
        # TRL's rewards of the whole batch (already gathered), combined as TRL combines them.
        rewards = combined_rewards(self.rollout_rewards.float().cpu(), self.reward_weights.float().cpu(), group_size,
                                   self.multi_objective_aggregation).masked_fill(ignored, float("nan"))
        features = self._gather(local_features)[::group_size]  # one row per prompt
        signal = ranking_agreement(seq_logps, rewards, group_size)
        conflict, consensus = conflict_and_consensus(seq_logps, group_size)  # one count of orders serves both
        return PromptBatch(features=features, signal=signal, teacher_seq_logps=seq_logps, consensus=consensus,
                           conflict=conflict, rewards=rewards, group_size=group_size)

    # ----- RL teacher selection: measure the student's improvement one rollout later ---------------------------
    def _store_pending(self, rollout, mask, student_logps, batch: PromptBatch, weights: torch.Tensor) -> None:
        pad = self.accelerator.pad_across_processes
        pad_id = self.processing_class.pad_token_id if hasattr(self.processing_class, "pad_token_id") else 0
        pad_id = pad_id if pad_id is not None else 0
        widths = torch.tensor([[rollout["prompt_ids"].size(1), rollout["completion_ids"].size(1)]],
                              device=mask.device)
        self.pending.store({
            "prompt_ids": self._gather(pad(rollout["prompt_ids"], dim=1, pad_index=pad_id, pad_first=True)),
            "prompt_mask": self._gather(pad(rollout["prompt_mask"], dim=1, pad_index=0, pad_first=True)),
            "completion_ids": self._gather(pad(rollout["completion_ids"], dim=1, pad_index=pad_id)),
            "completion_mask": self._gather(pad(rollout["completion_mask"], dim=1, pad_index=0)),
            "loss_mask": self._gather(pad(mask, dim=1, pad_index=0)),
            "widths": self._gather(widths),
            "old_seq_logps": self._gather(sequence_logps(student_logps, mask)),
            "rewards": batch.rewards,
            "features": batch.features,
            "signal": batch.signal,
            "consensus": batch.consensus,
            "actions": weights.argmax(dim=1),
            "group_size": torch.tensor(batch.group_size),
        })

    def _learn_from_improvement(self) -> None:
        if not self.pending:
            return
        if self.pending.world_size != self.accelerator.num_processes:
            logger.warning("Dropping the RL selector's pending decisions: they were made with %d processes, this run "
                           "has %d.", self.pending.world_size, self.accelerator.num_processes)
            self.pending.clear()
            return
        device = self.accelerator.device
        local = {k: v.to(device) for k, v in self.pending.local_rows(self.accelerator.process_index).items()}
        new_logps = self.score_completions(self.model, local).float()
        new_seq = self._gather(sequence_logps(new_logps, local["loss_mask"].float()))
        pending = self.pending.batch
        improvement = student_improvement(new_seq - pending["old_seq_logps"], pending["rewards"],
                                          int(pending["group_size"]))
        metrics = self.purifier.learn_from_improvement(pending["features"], pending["signal"], pending["actions"],
                                                       improvement, consensus=pending["consensus"])
        self._sync_purifier()
        self.pending.clear()
        for name, value in metrics.items():
            self.log_metric(name, value)

    # ----- metrics --------------------------------------------------------------------------------------------
    def _log_purification(self, batch: PromptBatch, decision: Decision, weights: torch.Tensor) -> None:
        for k in range(self.num_teachers):
            self.log_metric(f"choice/teacher_{k}", weights[:, k].mean())
            column = batch.signal[:, k]
            column = column[~torch.isnan(column)]
            self.log_metric(f"signal/teacher_{k}", column.mean() if column.numel() else float("nan"))
        self.log_metric("router_accuracy", choice_accuracy(weights, batch.signal))
        self.log_metric("decisive_fraction", decisive_prompts(batch.signal).float().mean())
        self.log_metric("fallback_fraction", decision.fallback.float().mean())
        if self.num_teachers > 1:
            self.log_metric("disagreement", mean_conflict(batch.conflict))
        if getattr(self.purifier, "last_entropy", None) is not None:
            self.log_metric("rl_policy_entropy", self.purifier.last_entropy)
