"""PGPOConfig: GRPOConfig plus SDPO's self-distillation settings and PGPO's step-size multiplier."""

from __future__ import annotations

import string
from dataclasses import dataclass, field

from trl import GRPOConfig

from ..core.field_values import raise_for_bad_field_values
from ..core.ignored_settings import raise_for_ignored_settings
from .context import FEEDBACK_TEMPLATE, REPROMPT_TEMPLATE, SOLUTION_TEMPLATE
from .information import ESTIMATORS
from .step_size import REFERENCES
from .teacher import TEACHER_KINDS


# GRPOConfig fields that only shape TRL's policy loss (its advantages, clipping and entropy bonus), which
# `distillation_weight=1.0` does not compute.
POLICY_LOSS_FIELDS = ("loss_type", "epsilon", "epsilon_high", "delta", "top_entropy_quantile",
                      "importance_sampling_level", "off_policy_mask_threshold", "scale_rewards",
                      "multi_objective_aggregation", "entropy_coef", "use_adaptive_entropy")


@dataclass
class PGPOConfig(GRPOConfig):
    r"""Configuration for [`PGPOTrainer`]: every [`~trl.GRPOConfig`] field, plus the ones below.

    Self-distillation defaults follow the official SDPO code's science runs (lasgroup/SDPO, the YAML values that
    actually run: alpha 0.5, top-k 100 with a tail bucket, EMA teacher at rate 0.05, importance weights clipped at 2).
    PGPO's multiplier has no public code; its form and defaults are ours (see `trl_ext/pgpo/step_size.py`).
    """

    # ----- the self-teacher's context (SDPO) -----
    success_reward_threshold: float = field(
        default=0.5,
        metadata={"help": "A rollout is a success (a demonstration for its siblings) when its reward, summed over "
                  "reward functions with `reward_weights`, is >= this (official YAML: 0.5; binary rewards: any value "
                  "in (0, 1])."},
    )
    dont_reprompt_on_self_success: bool = field(
        default=True,
        metadata={"help": "Show a completion another successful sibling, never itself (official default)."},
    )
    remove_thinking_from_demonstration: bool = field(
        default=True,
        metadata={"help": "Strip <think>...</think> blocks from the demonstration shown to the teacher."},
    )
    include_environment_feedback: bool = field(
        default=True,
        metadata={"help": "Show the environment feedback (the `feedback_column` of the dataset) to the teacher."},
    )
    environment_feedback_only_without_solution: bool = field(
        default=True,
        metadata={"help": "Show feedback only to completions whose group has no successful sibling (official "
                  "default): a demonstration then takes precedence."},
    )
    feedback_column: str = field(
        default="feedback",
        metadata={"help": "Dataset column with the environment's text feedback for each prompt (e.g. a failing "
                  "test's message). Rows without it, or with an empty string, have no feedback."},
    )
    max_reprompt_length: int = field(
        default=10240,
        metadata={"help": "Teacher prompts longer than this many tokens keep their last tokens, the end that joins "
                  "the completion (official: 10240, keeping the first tokens by default)."},
    )
    reprompt_template: str = field(
        default=REPROMPT_TEMPLATE,
        metadata={"help": "The teacher's user turn; fields {prompt}, {solution}, {feedback} (official template)."},
    )
    solution_template: str = field(
        default=SOLUTION_TEMPLATE,
        metadata={"help": "Block showing a successful sibling; field {successful_previous_attempt}."},
    )
    feedback_template: str = field(
        default=FEEDBACK_TEMPLATE,
        metadata={"help": "Block showing the environment feedback; field {feedback_raw}."},
    )

    # ----- the self-distillation loss (SDPO) -----
    distillation_alpha: float = field(
        default=0.5,
        metadata={"help": "Divergence between student p and teacher q per token: 0 forward KL(q||p), 1 reverse "
                  "KL(p||q), in between the generalized Jensen-Shannon divergence (official science runs: 0.5)."},
    )
    distillation_topk: int | None = field(
        default=100,
        metadata={"help": "Compare the distributions on the student's top-k tokens (official: 100); None uses the "
                  "full vocabulary."},
    )
    distillation_add_tail: bool = field(
        default=True,
        metadata={"help": "Add a bucket with the mass outside the top-k (official); False renormalizes the top-k."},
    )
    distillation_is_clip: float | None = field(
        default=2.0,
        metadata={"help": "Clip of the per-token importance weight pi_theta/pi_old (official: 2.0). It only "
                  "matters off-policy (num_iterations > 1 or several optimizer steps per generation)."},
    )
    distillation_weight: float = field(
        default=1.0,
        metadata={"help": "Loss = (1 - w) * GRPO's policy loss + w * self-distillation. 1 (SDPO, the official "
                  "code) replaces the policy loss; values in (0, 1) mix in TRL's GRPO loss (a second forward)."},
    )
    teacher_model_kind: str = field(
        default="ema",
        metadata={"help": "Self-teacher weights: 'ema' (official default), 'initial' (the frozen initial policy) or "
                  "'live' (the current policy). With LoRA the EMA/initial teacher is a second adapter.",
                  "choices": list(TEACHER_KINDS)},
    )
    teacher_update_rate: float = field(
        default=0.05,
        metadata={"help": "EMA rate r per optimizer step: theta_T <- (1 - r) theta_T + r theta (official: 0.05, "
                  "applied once per rollout batch, i.e. per optimizer step with TRL's defaults)."},
    )

    # ----- PGPO's step-size multiplier -----
    step_size_modulation: bool = field(
        default=True,
        metadata={"help": "PGPO: multiply each optimizer step's learning rate by m_k = clip((I_k / reference) ** "
                  "multiplier_power, multiplier_min, multiplier_max), the reference set by information_reference. "
                  "False gives SDPO exactly (I_k is still logged)."},
    )
    information_estimator: str = field(
        default="verified",
        metadata={"help": "Estimate of I_k between the student's predictions and the feedback-conditioned teacher: "
                  "'verified' (how much the direction of the teacher's corrections tells about the verifier's "
                  "verdict, I(S; C) / H(S), and 0 when they point away from success; our default, chosen with "
                  "benchmarks/pgpo_benchmark.py), 'agreement' (mutual information of their next-token joint across "
                  "positions) or 'correction' (mean KL(teacher || student)).",
                  "choices": list(ESTIMATORS)},
    )
    multiplier_min: float = field(
        default=0.02,
        metadata={"help": "Lower bound m_min of the multiplier (ours). Low enough that the step keeps shrinking once "
                  "the teacher's information has drained to a tenth of its peak: at 0.1 the steps that remained still "
                  "collapsed the student at the benchmark's larger learning rate."},
    )
    multiplier_max: float = field(default=2.0, metadata={"help": "Upper bound m_max of the multiplier (ours)."})
    multiplier_power: float = field(
        default=2.0,
        metadata={"help": "Sensitivity gamma: m_k = clip((I_k / reference) ** gamma, min, max) (ours)."},
    )
    information_reference: str = field(
        default="peak",
        metadata={"help": "What I_k is compared with: 'running' (its running mean) or 'peak' (the highest value the "
                  "running mean has reached, so steps shrink while the teacher's information drains away) (ours).",
                  "choices": list(REFERENCES)},
    )
    multiplier_ratchet: bool = field(
        default=True,
        metadata={"help": "Never let m_k exceed the multiplier of the lowest running mean of I since its peak: "
                  "information that drained away is not trusted when it comes back, e.g. when a collapsing student "
                  "fails so often that any teacher's corrections predict the verdict again (ours). Steps shrink "
                  "faster with it: on the benchmark it prevented every collapse but learned more slowly at the "
                  "smaller learning rate."},
    )
    information_ema: float = field(
        default=0.9,
        metadata={"help": "beta of the running mean of I: mean <- beta * mean + (1 - beta) * I_k (ours)."},
    )
    agreement_buckets: int = field(
        default=1024,
        metadata={"help": "'agreement' hashes token ids into this many buckets (id mod buckets): a lower bound on "
                  "the MI of the ids, exact when >= the vocabulary size (then one bucket per token is used). Its cost is "
                  "one (N x B)^T (N x B) product per micro-batch and one all-reduce of B^2 numbers per step."},
    )

    def __post_init__(self):
        super().__post_init__()
        raise_for_bad_field_values(self)
        checks = [
            (0.0 <= self.distillation_alpha <= 1.0, "distillation_alpha", self.distillation_alpha,
             "use 0 (forward KL), 1 (reverse KL) or a value in between (JSD)"),
            (self.distillation_topk is None or self.distillation_topk >= 1, "distillation_topk",
             self.distillation_topk, "use a positive k, or None for the full vocabulary"),
            (self.distillation_is_clip is None or self.distillation_is_clip > 0, "distillation_is_clip",
             self.distillation_is_clip, "use a positive clip, or None for no clipping"),
            (0.0 < self.distillation_weight <= 1.0, "distillation_weight", self.distillation_weight,
             "use a weight in (0, 1]; for plain GRPO use GRPOTrainer"),
            (self.teacher_model_kind in TEACHER_KINDS, "teacher_model_kind", self.teacher_model_kind,
             f"choose one of {TEACHER_KINDS}"),
            (0.0 < self.teacher_update_rate <= 1.0, "teacher_update_rate", self.teacher_update_rate,
             "use a rate in (0, 1]; for a frozen teacher set teacher_model_kind='initial'"),
            (self.information_estimator in ESTIMATORS, "information_estimator", self.information_estimator,
             f"choose one of {ESTIMATORS}"),
            (0.0 < self.multiplier_min <= 1.0 <= self.multiplier_max, "multiplier_min/multiplier_max",
             (self.multiplier_min, self.multiplier_max), "use 0 < multiplier_min <= 1 <= multiplier_max"),
            (0.0 <= self.information_ema < 1.0, "information_ema", self.information_ema, "use a value in [0, 1)"),
            (self.multiplier_power > 0, "multiplier_power", self.multiplier_power, "use a positive exponent"),
            (self.information_reference in REFERENCES, "information_reference", self.information_reference,
             f"choose one of {REFERENCES}"),
            (self.agreement_buckets >= 2, "agreement_buckets", self.agreement_buckets, "use at least 2 buckets"),
            (self.max_reprompt_length >= 1, "max_reprompt_length", self.max_reprompt_length, "use a positive length"),
        ]
        for ok, name, value, fix in checks:
            if not ok:
                raise ValueError(f"Invalid `{name}={value!r}`: {fix}.")
        modulated = (self.step_size_modulation, "step_size_modulation=True")
        feedback = (self.include_environment_feedback, "include_environment_feedback=True")
        raise_for_ignored_settings(self, {
            "teacher_update_rate": (self.teacher_model_kind == "ema", "teacher_model_kind='ema'"),
            "multiplier_min": modulated, "multiplier_max": modulated, "multiplier_power": modulated,
            "multiplier_ratchet": modulated, "information_reference": modulated,
            "agreement_buckets": (self.information_estimator == "agreement", "information_estimator='agreement'"),
            "distillation_add_tail": (self.distillation_topk is not None, "distillation_topk (a top-k support)"),
            "environment_feedback_only_without_solution": feedback,
            "feedback_template": feedback,
            "feedback_column": feedback,
        })
        for name, template, placeholders in (
            ("reprompt_template", self.reprompt_template, ("prompt", "solution", "feedback")),
            ("solution_template", self.solution_template, ("successful_previous_attempt",)),
            ("feedback_template", self.feedback_template, ("feedback_raw",)),
        ):
            check_template(name, template, placeholders)
        if self.distillation_weight == 1.0:
            changed = [name for name in POLICY_LOSS_FIELDS
                       if getattr(self, name) != GRPOConfig.__dataclass_fields__[name].default]
            if changed:
                raise ValueError(
                    f"{', '.join(f'`{n}={getattr(self, n)!r}`' for n in changed)}: these settings only shape GRPO's "
                    "policy loss, which PGPO does not compute with distillation_weight=1.0 (the self-distillation "
                    "loss replaces it), so they would have no effect. Leave them at GRPOConfig's defaults, or set "
                    "distillation_weight < 1 to mix in GRPO's loss."
                )
        if self.distillation_weight == 1.0 and self.beta != 0.0:
            # With distillation only, TRL's policy loss (and with it the KL penalty) is not computed.
            raise ValueError(
                f"`beta={self.beta}` has no effect with `distillation_weight=1.0`: the self-distillation loss replaces "
                "GRPO's policy loss and its KL term. Set beta=0.0, or distillation_weight < 1 to mix in GRPO's loss."
            )


def check_template(name: str, template: str, placeholders: tuple[str, ...]) -> None:
    """A reprompt template must name each of its placeholders and no other: `str.format` would otherwise fail at the
    first teacher context, inside training (a KeyError for an unknown name, a ValueError for a lone brace)."""
    try:
        used = {field_name for _, field_name, _, _ in string.Formatter().parse(template) if field_name is not None}
    except ValueError as error:
        raise ValueError(
            f"`{name}` is not a valid format string ({error}): got {template!r}. Write a literal brace as '{{{{' or "
            "'}}}}'."
        ) from None
    expected = ", ".join("{" + p + "}" for p in placeholders)
    missing = [p for p in placeholders if p not in used]
    if missing:
        raise ValueError(f"`{name}` must contain {', '.join('{' + p + '}' for p in missing)}, got {template!r}.")
    unknown = sorted(used - set(placeholders))
    if unknown:
        raise ValueError(
            f"`{name}` uses the placeholder(s) {', '.join('{' + u + '}' for u in unknown)}, which PGPO does not fill: "
            f"got {template!r}. Use only {expected}, and write a literal brace as '{{{{' or '}}}}'."
        )
