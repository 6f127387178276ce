"""GNDPOConfig: GRPOConfig plus the teacher and GNDPO's advantage settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trl import GRPOConfig

from ..core.field_values import raise_for_bad_field_values, raise_for_bad_json
from ..core.ignored_settings import raise_for_ignored_settings

ADVANTAGE_NORMALIZATIONS = ("global", "none")


@dataclass
class GNDPOConfig(GRPOConfig):
    r"""Configuration for [`GNDPOTrainer`]: every [`~trl.GRPOConfig`] field, plus the ones below.

    Defaults follow the official GNDPO code (OPPO-Mente-Lab/GNDPO) unless marked as our choice.
    """

    _VALID_DICT_FIELDS = GRPOConfig._VALID_DICT_FIELDS + ["teacher_model_init_kwargs"]

    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Hub id or local path of the frozen teacher. It must share the student's tokenizer. "
            "Alternatively pass `teacher_model` to the trainer; giving both is an error unless they are the same."
        },
    )
    teacher_model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments for loading the teacher with `from_pretrained` (e.g. "
            '\'{"dtype": "bfloat16"}\'); a dict or a JSON string. Only used when the teacher is given by id or path.'
        },
    )
    teacher_temperature: float = field(
        default=1.0,
        metadata={
            "help": "Temperature applied to the teacher's logits when scoring the sampled tokens. The official code "
            "uses none (1.0), with the student sampling at temperature 1.0."
        },
    )
    score_clip: float = field(
        default=5.0,
        metadata={
            "help": "Per-token teacher/student log-ratios are clipped to [-score_clip, +score_clip] before "
            "normalization (official code: 5.0)."
        },
    )
    advantage_normalization: str = field(
        default="global",
        metadata={
            "help": "'global' (GNDPO): whiten the clipped scores with the mean and unbiased std over every valid "
            "completion token of the whole generation batch, all processes and micro-batches. 'none': use the "
            "clipped scores as advantages (plain on-policy distillation, the paper's OPD baseline).",
            "choices": list(ADVANTAGE_NORMALIZATIONS),
        },
    )
    reward_advantage_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of GRPO's reward advantage added to every token's distillation advantage. 0 (the paper's "
            "setting) uses only the teacher; reward functions are then only computed and logged."
        },
    )
    loss_type: str = field(
        default="grpo",
        metadata={
            "help": "TRL's loss aggregation. GNDPO defaults to 'grpo' (per-sequence token mean, then mean over "
            "sequences), the 'seq-mean-token-mean' aggregation of the official code; TRL's own default is 'dapo'."
        },
    )

    def __post_init__(self):
        raise_for_bad_json(self, ("teacher_model_init_kwargs",))
        super().__post_init__()
        raise_for_bad_field_values(self)
        if self.score_clip <= 0:
            raise ValueError(
                f"`score_clip` must be > 0, got {self.score_clip}. It bounds the per-token log-ratio before "
                "normalization; the paper uses 5.0."
            )
        if self.advantage_normalization not in ADVANTAGE_NORMALIZATIONS:
            raise ValueError(
                f"Unknown `advantage_normalization={self.advantage_normalization!r}`. Choose 'global' (GNDPO) or "
                "'none' (plain on-policy distillation)."
            )
        if self.teacher_temperature <= 0:
            raise ValueError(f"`teacher_temperature` must be > 0, got {self.teacher_temperature}.")
        if self.reward_advantage_weight < 0:
            raise ValueError(
                f"`reward_advantage_weight` must be >= 0, got {self.reward_advantage_weight}. Use 0 for pure "
                "distillation or a positive weight to add GRPO's reward advantage."
            )
        # TRL's reward advantage only reaches the loss through `reward_advantage_weight`; without it, the knobs that
        # shape that advantage would do nothing (the rewards themselves are still computed, weighted and logged).
        mixed = (self.reward_advantage_weight > 0, "reward_advantage_weight > 0")
        raise_for_ignored_settings(self, {"scale_rewards": mixed, "multi_objective_aggregation": mixed})
        if self.importance_sampling_level != "token":
            # TRL's sequence-level ratio multiplies every token's advantage by the gradient of the whole sequence's
            # mean log-prob, which would smear GNDPO's per-token advantages over the sequence.
            raise ValueError(
                f"`importance_sampling_level={self.importance_sampling_level!r}` is not supported by GNDPO: its "
                "advantages are per token, and a sequence-level ratio spreads each token's advantage over the whole "
                "sequence. Use importance_sampling_level='token'."
            )
