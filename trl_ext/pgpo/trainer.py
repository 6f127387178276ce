"""PGPOTrainer: self-distillation policy optimization (SDPO, arXiv 2601.20802) with PGPO's information-modulated
step size (arXiv 2606.03620).

    rollout (TRL)  -> _postprocess_rollout: each completion's privileged context (a successful sibling and/or the
                      environment's feedback) rendered into a teacher prompt
    micro-batch    -> _compute_loss: student and self-teacher score the same completion tokens; top-k (+ tail)
                      divergence, token mean over the generation batch; information statistics accumulated
    last micro-batch of a step -> I_k over the whole step (all micro-batches, all processes), m_k, lr *= m_k
    after the optimizer step   -> lr restored, EMA teacher updated
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import PreTrainedModel, TrainerCallback

from .. import _compat
from ..core import ExtGRPOTrainer
from ..core.trainer import image_columns, resolve_config
from .config import PGPOConfig
from .context import Templates, assign_contexts, demonstration_text, strip_thinking, teacher_prompt
from .divergences import clipped_importance_weights, generalized_jsd, shared_support, support_from_top_k
from .information import (
    agreement_joint,
    correction_information,
    mutual_information,
    top1_agreement,
    verified_information,
    verified_joint,
)
from .sparse_log_probs import gathered_log_probs, log_normalizer
from .step_size import StepSizeController
from .teacher import SelfTeacher

# Per-row rollout keys written by the post-rollout hook (they survive TRL's shuffle and micro-batch split).
TEACHER_PROMPT_IDS = "pgpo_teacher_prompt_ids"
TEACHER_PROMPT_MASK = "pgpo_teacher_prompt_mask"
HAS_CONTEXT = "pgpo_has_context"
SUCCEEDED = "pgpo_succeeded"  # (B,) the verifier's verdict, for the "verified" estimator
NUM_DISTILLATION_TOKENS = "pgpo_num_distillation_tokens"  # 0-dim: over the whole generation batch, all processes
ROW = "pgpo_row"  # (B,) each row's global index in its generation batch, to find it in the completions table
# The completions table's column for each completion's mean teacher - student log-prob of its sampled tokens.
TEACHER_ADVANTAGE_COLUMN = "self_teacher_advantage"
# Layout of the per-step statistics vector, summed over micro-batches and processes with one all-reduce.
TOKENS, CORRECTION, AGREEMENT, DIVERGENCE = range(4)
VERIFIED = slice(4, 8)  # the 2 x 2 verified joint
JOINT = 8  # then the agreement joint, when that estimator is used


class _StepCallback(TrainerCallback):
    """Restores the scheduled learning rate right after the optimizer step and moves the EMA teacher."""

    def __init__(self, trainer: PGPOTrainer):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._restore_learning_rates()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.trainer.self_teacher.update(model)


class PGPOTrainer(ExtGRPOTrainer):
    """Drop-in replacement for `trl.GRPOTrainer` that distils the policy's own feedback-informed predictions.

    The teacher is the policy (EMA, initial or live weights) reading a privileged prompt: a successful sibling
    rollout of the same prompt and/or the environment feedback in the dataset's `feedback_column`. The student's
    completion is scored under both prompts and the per-token divergence on the student's top-k tokens is the loss.
    Completions with no successful sibling and no feedback get no loss. PGPO multiplies each optimizer step's
    learning rate by m_k from an estimate I_k of the information between student and teacher on that step;
    `step_size_modulation=False` is SDPO.

    Args: exactly those of `trl.GRPOTrainer`.
    """

    _tag_names = ["trl", "trl_ext", "pgpo", "sdpo", "self-distillation"]
    _name = "PGPO"
    _paper = {
        "title": "Physics-Guided Policy Optimization with Self-Distillation",
        "id": "2606.03620",
        "citation": (
            "@article{wang2026pgpo,\n"
            "    title   = {{Physics-Guided Policy Optimization with Self-Distillation}},\n"
            "    author  = {Ke Wang and Yuning Wu and Haoran Liu and Chaoqun Jia and Devin Chen and Kai Wei},\n"
            "    journal = {arXiv preprint arXiv:2606.03620},\n"
            "    year    = {2026}\n"
            "}"
        ),
    }
    _metric_prefix = "pgpo"
    _card_template = "pgpo.md"
    loss_closes_each_step = True  # the step's learning rate is set at its last micro-batch (DeepSpeed steps there)

    def __init__(
        self,
        model: str | PreTrainedModel,
        reward_funcs: Any | list[Any],
        args: PGPOConfig | None = None,
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
        args = resolve_config(model, args, PGPOConfig, "PGPO")
        _check_feedback_column(train_dataset, args)
        images = image_columns(train_dataset)
        if images:
            raise NotImplementedError(
                f"The training dataset has image column(s) {images}, but PGPO's self-teacher rewrites each prompt as "
                "text with its privileged context, which would drop the images: vision-language prompts are not "
                "supported yet. Use a text-only dataset."
            )
        if environment_factory is not None:
            # TRL appends each environment's reset() observation to the student's prompt at generation time; the
            # self-teacher's prompt is rebuilt from the dataset row and would not show it.
            raise NotImplementedError(
                "PGPOTrainer does not support `environment_factory` yet: TRL adds each environment's reset() "
                "observation to the student's prompt, and the self-teacher's privileged prompt, rebuilt from the "
                "dataset's `prompt`, would not contain it. Use `tools=` with prompts that hold the whole task, or "
                "GRPOTrainer / another trl_ext trainer for environments."
            )
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
        self.templates = Templates(args.reprompt_template, args.solution_template, args.feedback_template)
        self.self_teacher = SelfTeacher(self, args.teacher_model_kind, args.teacher_update_rate)
        if args.teacher_model_kind != "live":
            self.register_state("self_teacher", self.self_teacher)
        self.step_size = StepSizeController(args.multiplier_min, args.multiplier_max, args.information_ema,
                                            power=args.multiplier_power, reference=args.information_reference,
                                            enabled=args.step_size_modulation, ratchet=args.multiplier_ratchet)
        self.register_state("step_size", self.step_size)
        self._step_statistics: torch.Tensor | None = None
        self._scheduled_learning_rates: list[float] | None = None
        self._modulated_learning_rates: list[float] | None = None
        self.last_contexts = None  # the latest generation batch's ContextAssignment (all processes), for inspection
        self._parsed_completions: list = []  # this process's completions of the latest rollout, as TRL parsed them
        self.last_step_size: dict[str, float | None] | None = None  # the latest step's I_k and m_k
        self._eval_rollouts_logged = 0  # evaluation rollouts added to the completions table
        self._table_rollout: tuple[int, int] | None = None  # (eval rollouts logged by then, rows) of the train one
        self.add_callback(_StepCallback(self))

    # ----- the self-teacher's prompts (once per generation batch) ---------------------------------------------
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        # TRL's parsed completions: a tool-calling sibling's turns, shown to the teacher turn by turn.
        self._parsed_completions = completions
        return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)

    def _postprocess_rollout(self, inputs: list[dict[str, Any]], rollout: dict[str, Any]) -> dict[str, Any]:
        args = self.args
        num_generations = self.num_generations if self._mode == "train" else self.num_generations_eval
        rewards = (self.rollout_rewards * self.reward_weights.to(self.rollout_rewards.device)).nansum(dim=1)
        # The text the reward judged: a completion cut at max_completion_length can be a success, and under
        # mask_truncated_completions its completion mask is all zero.
        decoded = self.processing_class.batch_decode(self.rollout_completion_ids, skip_special_tokens=True)
        special = tuple(self.processing_class.all_special_tokens)
        completions = [demonstration_text(parsed, text, special)
                       for parsed, text in zip(self._parsed_completions, decoded, strict=True)]
        feedback = [row.get(args.feedback_column) for row in inputs]
        all_completions, all_feedback = _compat.gather_object(completions), _compat.gather_object(feedback)
        assignment = assign_contexts(
            rewards.cpu(),
            torch.tensor([isinstance(f, str) and f.strip() != "" for f in all_feedback]),
            num_generations,
            args.success_reward_threshold,
            exclude_self=args.dont_reprompt_on_self_success,
            include_feedback=args.include_environment_feedback,
            feedback_only_without_solution=args.environment_feedback_only_without_solution,
        )

        self.last_contexts = assignment
        start = self.accelerator.process_index * len(inputs)
        prompts = []
        for local, row in enumerate(inputs):
            i = start + local
            demo = assignment.demonstration[i].item()
            solution = all_completions[demo] if demo >= 0 else None
            if solution is not None and args.remove_thinking_from_demonstration:
                solution = strip_thinking(solution)
            shown_feedback = all_feedback[i] if assignment.use_feedback[i] else None
            prompts.append(teacher_prompt(row["prompt"], solution, shown_feedback, self.templates))
        ids = [torch.tensor(p[-args.max_reprompt_length:]) for p in _compat.tokenize_prompts(self, prompts)]
        device = rollout["prompt_ids"].device
        rollout[TEACHER_PROMPT_IDS] = _left_pad(ids, self.processing_class.pad_token_id).to(device)
        rollout[TEACHER_PROMPT_MASK] = _left_pad([torch.ones_like(x) for x in ids], 0).to(device)
        has_context = assignment.usable[start:start + len(inputs)].to(device)
        rollout[HAS_CONTEXT] = has_context.float()
        rollout[SUCCEEDED] = assignment.has_success[start:start + len(inputs)].to(device).float()
        tokens = self._distillation_tokens_per_row(rollout).sum().double()
        rollout[NUM_DISTILLATION_TOKENS] = self.reduce_sum(tokens.reshape(1)).reshape(())
        self._add_teacher_advantage_column(rollout, start, len(all_completions))

        # Shares of the completions the loss trains on (one with no loss token, e.g. masked as truncated, gets no
        # self-distillation whatever its context).
        trained = self.accelerator.gather((self.loss_mask(rollout).sum(-1) > 0).long()).bool().cpu()
        for name, rows in (("usable_context_fraction", assignment.usable),
                           ("solution_fraction", assignment.demonstration >= 0),
                           ("feedback_fraction", assignment.use_feedback)):
            self.log_metric(name, rows[trained].float().mean() if trained.any() else math.nan)
        return rollout

    def _distillation_tokens_per_row(self, rollout: dict[str, Any]) -> torch.Tensor:
        """(B,) loss tokens of each completion that has a teacher context: what the self-distillation loss averages."""
        return (self.loss_mask(rollout) * rollout[HAS_CONTEXT].unsqueeze(1)).sum(-1)

    def _loss_normalizers(self, rollout: dict[str, Any]) -> dict[str, torch.Tensor]:
        counts = super()._loss_normalizers(rollout)
        counts[NUM_DISTILLATION_TOKENS] = self._distillation_tokens_per_row(rollout)
        return counts

    # ----- the completions table: the self-teacher's advantage of each completion ---------------------------------
    def _add_teacher_advantage_column(self, rollout: dict[str, Any], start: int, rows: int) -> None:
        """With `log_completions`, every rollout gets an empty column in TRL's completions table (every column needs
        an entry per row); a training rollout's is filled by the loss, once the self-teacher has scored the rows."""
        if not self.args.log_completions:
            return
        _compat.add_completion_log_column(self, TEACHER_ADVANTAGE_COLUMN, rows)
        if self._mode == "eval":
            self._eval_rollouts_logged += 1
            return
        rollout[ROW] = torch.arange(start, start + rollout["completion_ids"].size(0),
                                    device=rollout["completion_ids"].device)
        self._table_rollout = (self._eval_rollouts_logged, rows)

    def _log_teacher_advantages(self, inputs: dict[str, Any], correction: torch.Tensor,
                                token_mask: torch.Tensor) -> None:
        """Each completion's mean over its distillation tokens of log pi_teacher - log pi_student of the sampled
        token (SDPO's per-token advantage in its policy-gradient reading; 0 without a usable context), written into
        the completions table. Only rows with loss tokens write their cell: a row without any (masked as truncated,
        or a padding row of the Kondo gate, which copies another row) leaves it empty. Collective: every process
        computes every micro-batch's loss."""
        advantage = correction / token_mask.sum(1).clamp(min=1.0)
        written = (self.loss_mask(inputs).sum(1) > 0).long()
        rows, values, written = self.accelerator.gather((inputs[ROW], advantage.float(), written))
        chosen = written.bool()
        evals_then, batch_rows = self._table_rollout
        if evals_then == self._eval_rollouts_logged:  # an evaluation since would have pushed the rows out
            _compat.set_completion_log_values(self, TEACHER_ADVANTAGE_COLUMN, rows[chosen].tolist(),
                                              values[chosen].tolist(), batch_rows)

    # ----- the loss (once per micro-batch) ----------------------------------------------------------------------
    def _compute_loss(self, model, inputs):
        distillation = self._self_distillation_loss(model, inputs)
        weight = self.args.distillation_weight
        if weight == 1.0:
            return distillation
        return (1.0 - weight) * super()._compute_loss(model, inputs) + weight * distillation

    def _self_distillation_loss(self, model, inputs: dict[str, Any]) -> torch.Tensor:
        args = self.args
        # MoE models: the router's load-balancing loss, which TRL adds to its own loss (`router_aux_loss_coef`).
        router_aux = _compat.router_aux_loss_enabled(self)
        student, aux_loss = self._completion_logits(model, inputs["prompt_ids"], inputs["prompt_mask"], inputs,
                                                    router_aux_loss=router_aux)
        with self.self_teacher.scoring(model) as teacher_model:
            teacher, _ = self._completion_logits(
                teacher_model, inputs[TEACHER_PROMPT_IDS], inputs[TEACHER_PROMPT_MASK], inputs
            )
        vocab_size = student.size(-1)
        support, sampled_logps, teacher_sampled = self._distillation_log_probs(student, teacher, inputs)
        del student, teacher  # the (B, T, V) logits: only the student's stay, in the autograd graph
        divergence = generalized_jsd(support.student, support.teacher, args.distillation_alpha)  # (B, T)

        token_mask = self.loss_mask(inputs) * inputs[HAS_CONTEXT].unsqueeze(1)
        weights = token_mask.to(divergence.dtype)
        importance = clipped_importance_weights(sampled_logps, inputs.get("old_per_token_logps"),
                                                args.distillation_is_clip)
        if importance is not None:
            weights = weights * importance
        if inputs.get("importance_sampling_ratio") is not None:  # TRL's vLLM sampler/trainer mismatch correction
            weights = weights * inputs["importance_sampling_ratio"]

        # Token mean over the generation batch, scaled like TRL's "dapo" loss for accumulation and processes, so
        # the micro-batch losses of one optimizer step add up to the global mean.
        normalizer = inputs[NUM_DISTILLATION_TOKENS].clamp(min=1.0) / self.accelerator.num_processes
        if self._mode == "train":
            normalizer = normalizer * self.current_gradient_accumulation_steps / args.steps_per_generation
        loss = (divergence * weights).sum() / normalizer.to(divergence.dtype)
        if router_aux:  # scaled for gradient accumulation like the rest of the loss, as TRL does
            accumulation = self.current_gradient_accumulation_steps if self._mode == "train" else 1.0
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
            if args.distillation_weight == 1.0:  # else TRL's own loss logs it
                self._metrics[self._mode]["aux_loss"].append(
                    self.accelerator.gather_for_metrics(aux_loss.detach()).mean().item())

        if self._mode == "train":
            correction = ((teacher_sampled - sampled_logps.detach()) * token_mask).sum(1)
            # Rows without distillation tokens measured nothing: a truncated completion under
            # mask_truncated_completions, or a padding row the Kondo gate adds (a copy of a real row, mask zeroed).
            measured = token_mask.sum(1) > 0
            if self.args.log_completions:
                self._log_teacher_advantages(inputs, correction, token_mask)
            self._accumulate_step_statistics(support, divergence.detach(), token_mask, vocab_size=vocab_size,
                                             verified=verified_joint(correction, inputs[SUCCEEDED], measured))
            if _compat.is_last_micro_batch(self):
                self._modulate_step_size()
        return loss

    def _completion_logits(self, model, prompt_ids, prompt_mask, inputs,
                           router_aux_loss: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T, V) logits of `model` at each completion position, after `prompt_ids` (in the model's dtype), and
        with `router_aux_loss` the MoE router's load-balancing loss of that forward (else None)."""
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        length = completion_ids.size(1)
        extra = {key: inputs[key] for key in _compat.MULTIMODAL_KEYS if inputs.get(key) is not None}
        if router_aux_loss:
            extra["output_router_logits"] = True
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=length + 1,
                        use_cache=False, **extra)
        # Position t predicts completion token t.
        return outputs.logits[:, :-1, :], (outputs.aux_loss if router_aux_loss else None)

    def _distillation_log_probs(self, student: torch.Tensor, teacher: torch.Tensor, inputs) -> tuple:
        """Both models' logits -> (the shared support, the student's and the teacher's log-probs of the sampled
        tokens), at TRL's temperature."""
        args, temperature = self.args, self.temperature
        sampled = inputs["completion_ids"].unsqueeze(-1)
        if args.distillation_topk is not None and args.distillation_topk < student.size(-1):
            # Top-k: only k + 1 entries per position are read, so only the normalizers are computed over the
            # vocabulary (sparse_log_probs.py), never a (B, T, V) float32 log-softmax.
            student_norm, teacher_norm = log_normalizer(student, temperature), log_normalizer(teacher, temperature)
            token_ids = student.detach().topk(args.distillation_topk, dim=-1).indices
            support = support_from_top_k(gathered_log_probs(student, token_ids, student_norm, temperature),
                                         gathered_log_probs(teacher, token_ids, teacher_norm, temperature),
                                         token_ids, args.distillation_add_tail)
            return (support, gathered_log_probs(student, sampled, student_norm, temperature).squeeze(-1),
                    gathered_log_probs(teacher, sampled, teacher_norm, temperature).squeeze(-1))
        # The full vocabulary is the support.
        student = (student.float() / temperature).log_softmax(-1)
        teacher = teacher.float()  # the teacher has no gradient: normalized in place, one float32 copy
        teacher.div_(temperature)
        teacher.sub_(teacher.logsumexp(-1, keepdim=True))
        support = shared_support(student, teacher, None, args.distillation_add_tail)
        return support, student.gather(-1, sampled).squeeze(-1), teacher.gather(-1, sampled).squeeze(-1)

    # ----- PGPO: information -> step size (once per optimizer step) -------------------------------------------
    def _accumulate_step_statistics(self, support, divergence: torch.Tensor, token_mask: torch.Tensor,
                                    vocab_size: int, verified: torch.Tensor) -> None:
        mask = token_mask.double()
        stats = [mask.sum(), (correction_information(support).double() * mask).sum(),
                 (top1_agreement(support).double() * mask).sum(), (divergence.double() * mask).sum()]
        joint = torch.zeros(0, dtype=torch.float64, device=mask.device)
        if self.args.information_estimator == "agreement":
            # One bucket per token when the vocabulary is smaller than `agreement_buckets`: exact, and cheaper.
            buckets = min(self.args.agreement_buckets, vocab_size)
            joint = agreement_joint(support, token_mask, buckets).flatten()
        vector = torch.cat([torch.stack(stats), verified.to(mask.device).flatten(), joint])
        self._step_statistics = vector if self._step_statistics is None else self._step_statistics + vector

    def _modulate_step_size(self) -> None:
        """Form I_k from the whole step's statistics (one all-reduce), then scale this step's learning rate."""
        total = self.reduce_sum(self._step_statistics)
        self._step_statistics = None
        tokens = total[TOKENS].item()
        information = None
        if tokens > 0:
            verified = verified_information(total[VERIFIED].view(2, 2))
            verified = None if verified is None else verified.item()
            if self.args.information_estimator == "agreement":
                side = math.isqrt(total.numel() - JOINT)
                information = mutual_information(total[JOINT:].view(side, side)).item()
            elif self.args.information_estimator == "verified":
                information = verified
            else:
                information = total[CORRECTION].item() / tokens
        multiplier = self.step_size.multiplier(information)
        self._scheduled_learning_rates = [group["lr"] for group in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["lr"] = group["lr"] * multiplier
        self._modulated_learning_rates = [group["lr"] for group in self.optimizer.param_groups]

        self.last_step_size = {"information": information, "multiplier": multiplier}  # for inspection
        self.log_metric("multiplier", multiplier)
        self.log_metric("distillation_tokens", tokens)
        if information is not None:
            self.log_metric("information", information)
            if self.step_size.running_mean is not None:
                self.log_metric("information_mean", self.step_size.running_mean)
            self.log_metric("correction_kl", total[CORRECTION].item() / tokens)
            if verified is not None:
                self.log_metric("verified_information", verified)
            self.log_metric("teacher_agreement", total[AGREEMENT].item() / tokens)
            self.log_metric("divergence", total[DIVERGENCE].item() / tokens)

    def _restore_learning_rates(self) -> None:
        if self._scheduled_learning_rates is None:
            return
        for group, lr, modulated in zip(self.optimizer.param_groups, self._scheduled_learning_rates,
                                        self._modulated_learning_rates):
            # A scheduler that stepped in between (DeepSpeed's own steps inside backward) has already set the next
            # step's rate: keep it rather than rewind the schedule.
            if group["lr"] == modulated:
                group["lr"] = lr
        self._scheduled_learning_rates = self._modulated_learning_rates = None


def _check_feedback_column(dataset, args: PGPOConfig) -> None:
    """A renamed feedback column must exist; feedback that would be ignored is said so (before any weights load)."""
    columns = getattr(dataset, "column_names", None)
    if columns is None:  # e.g. an IterableDataset without known features: nothing to check ahead of time
        return
    present = args.feedback_column in columns
    if not present and args.feedback_column != PGPOConfig.feedback_column:
        raise ValueError(
            f"`feedback_column={args.feedback_column!r}` is not a column of the training dataset (columns: "
            f"{columns}). Name the column that holds the environment's feedback, or leave the default to train "
            "without feedback (successful siblings only)."
        )
    if present and not args.include_environment_feedback:
        warnings.warn(
            f"The training dataset has a {args.feedback_column!r} column but include_environment_feedback=False: the "
            "self-teacher will not see it.",
            UserWarning,
            stacklevel=3,
        )


def _left_pad(rows: list[torch.Tensor], value: int) -> torch.Tensor:
    return pad_sequence(rows, batch_first=True, padding_value=value, padding_side="left")
