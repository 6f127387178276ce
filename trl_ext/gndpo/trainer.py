"""GNDPOTrainer: on-policy distillation with globally normalized per-token advantages (arXiv 2606.09091)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transformers import PreTrainedModel

from ..core import (
    ExtGRPOTrainer,
    check_teacher_vocabulary,
    distillation_reward_funcs,
    load_teacher,
    prepare_teacher,
)
from ..core.trainer import resolve_config
from ..core.teachers import given_once, teacher_display_name
from .advantages import GNDPOAdvantages, gndpo_advantages
from .config import GNDPOConfig


class GNDPOTrainer(ExtGRPOTrainer):
    """Drop-in replacement for `trl.GRPOTrainer` that distils a frozen teacher into the policy.

    The student samples completions as in GRPO; the teacher scores the sampled tokens; the clipped per-token
    log-ratio teacher/student, whitened over the whole generation batch, is the advantage that TRL's policy loss
    uses. Reward functions are optional: they are computed and logged, and only enter the advantage with
    `reward_advantage_weight > 0`.

    Args:
        model, reward_funcs, args, ...: exactly as in `trl.GRPOTrainer` (`reward_funcs` may be omitted).
        teacher_model: the teacher as an id, a path or a `PreTrainedModel`; defaults to
            `args.teacher_model_name_or_path`.
    """

    _tag_names = ["trl", "trl_ext", "gndpo", "distillation"]
    _name = "GNDPO"
    _paper = {
        "title": "Stabilizing On-Policy Distillation for MLLM Reasoning with Global Normalization",
        "id": "2606.09091",
        "citation": (
            "@article{hao2026gndpo,\n"
            "    title   = {{Stabilizing On-Policy Distillation for MLLM Reasoning with Global Normalization}},\n"
            "    author  = {Dongze Hao and Zhiwei Jin and Chen Chen and Haonan Lu},\n"
            "    journal = {arXiv preprint arXiv:2606.09091},\n"
            "    year    = {2026}\n"
            "}"
        ),
    }
    _metric_prefix = "gndpo"
    _card_template = "gndpo.md"

    def __init__(
        self,
        model: str | PreTrainedModel,
        reward_funcs: Any | list[Any] | None = None,
        args: GNDPOConfig | None = None,
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
        teacher_model: str | PreTrainedModel | None = None,
    ):
        args = resolve_config(model, args, GNDPOConfig, "GNDPO")
        teacher = given_once(teacher_model, args.teacher_model_name_or_path, "teacher_model",
                             "teacher_model_name_or_path")
        if teacher is None:
            raise ValueError(
                "GNDPOTrainer needs a teacher: pass `teacher_model=` (an id, a path or a model) or set "
                "`teacher_model_name_or_path` in GNDPOConfig."
            )
        # Checked from the configs and tokenizers, before any weights are loaded.
        check_teacher_vocabulary(model, {f"teacher {teacher_display_name(teacher)!r}": teacher},
                                 trust_remote_code=args.trust_remote_code, student_tokenizer=processing_class)
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
        self.teacher_name = teacher_display_name(teacher)
        teacher = load_teacher(teacher, args.teacher_model_init_kwargs, args, default_dtype=self.model.dtype)
        self.teacher_model = prepare_teacher(teacher, self, temperature=args.teacher_temperature)
        self.last_advantages: GNDPOAdvantages | None = None  # the latest rollout's statistics, for inspection

    def card_settings(self) -> dict[str, object]:
        return {"teacher_model_name_or_path": self.teacher_name}  # also when passed as `teacher_model=`

    def _postprocess_rollout(self, inputs: list[dict[str, Any]], rollout: dict[str, Any]) -> dict[str, Any]:
        mask = self.loss_mask(rollout).float()
        teacher_logps = self.score_completions(self.teacher_model, rollout).float()
        student_logps = self.student_logps(rollout).float()
        result = gndpo_advantages(
            teacher_logps,
            student_logps,
            mask,
            score_clip=self.args.score_clip,
            normalization=self.args.advantage_normalization,
            reduce_sum=self.reduce_sum,
        )
        advantages = result.advantages
        if self.args.reward_advantage_weight:
            advantages = advantages + self.args.reward_advantage_weight * rollout["advantages"].unsqueeze(1) * mask
        rollout["advantages"] = advantages  # (B, T): TRL's loss takes per-token advantages as they are
        self.last_advantages = result

        self.log_metric("score_mean", result.score_moments.mean)
        self.log_metric("score_std", result.score_moments.std)
        self.log_metric("clipped_fraction", result.clipped_fraction)
        self.log_metric("reverse_kl", result.reverse_kl)
        return rollout
