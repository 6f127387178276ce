"""ProRLConfig: GRPOConfig with ProRL's defaults, dynamic sampling, reference resets and the EOS penalty.

Sources of the defaults: [P] the ProRL paper (arXiv 2505.24864) or, marked [S], its
settings as reported by several independent summaries; [C] released code (NVIDIA NeMo-RL's ProRLv2 recipe, verl's
DAPO recipe); [I] our choice where the paper is silent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import GRPOConfig

from ..core.field_values import raise_for_bad_field_values
from ..core.ignored_settings import raise_for_ignored_settings
from ..core.reset_triggers import ResetSchedule

DYNAMIC_SAMPLING_MODES = ("refill", "filter", "none")
# Loss types that divide by the generation batch's loss-token count (`num_items_in_batch`, which dynamic sampling
# recounts), so rows masked by dynamic sampling leave the average of the remaining tokens unchanged. "grpo", "sapo",
# "luspo" and "dr_grpo" average over rows or a fixed length, and "bnpo" divides each micro-batch by its own token
# count and then by the accumulation steps: a micro-batch (or process) left with few or no kept tokens would dilute
# the gradient.
TOKEN_NORMALIZED_LOSSES = ("dapo", "cispo", "vespo")


@dataclass
class ProRLConfig(GRPOConfig):
    r"""Configuration for [`ProRLTrainer`]: every [`~trl.GRPOConfig`] field, plus the ones below.

    ProRL (Prolonged RL, arXiv 2505.24864) = GRPO + DAPO's decoupled clip and dynamic sampling + a KL penalty to a
    reference policy that is hard-reset (with the optimizer state) during training. Defaults changed from GRPOConfig:
    `epsilon_high=0.4` [S], `beta=1e-4` [I from C], `temperature=1.2` [S], `num_generations=16` [S],
    `learning_rate=2e-6` and a constant schedule [S], `loss_type="dapo"` (token-level) [S],
    `per_device_train_batch_size=16` [I, so that one group of 16 fits the default batch].
    """

    # ----- GRPOConfig fields with ProRL defaults ----------------------------------------------------------------------
    epsilon_high: float | None = field(
        default=0.4,
        metadata={"help": "Upper clip epsilon (clip-higher; the lower one is `epsilon`=0.2). ProRL: 0.4 [S]."},
    )
    beta: float = field(
        default=1e-4,
        metadata={
            "help": "KL coefficient of the penalty to the reference policy. ProRL uses a KL penalty whose coefficient "
            "we could not find in the paper; 1e-4 is NVIDIA's ProRLv2 recipe (NeMo-RL `reference_policy_kl_penalty`) "
            "[I from C]. It is small on purpose: the KL only keeps the policy near a reference that is itself reset."
        },
    )
    temperature: float = field(
        default=1.2,
        metadata={
            "help": "Rollout sampling temperature. ProRL: 1.2, to delay entropy collapse [S]. On the demo ProRL "
            "benchmark 1.0 instead cut the final pass@1 from 0.80 to 0.44 (8 seeds, six ending near-deterministic "
            "and mostly wrong)."
        },
    )
    num_generations: int | None = field(
        default=16,
        metadata={"help": "Completions sampled per prompt (group size). ProRL: 16 for most runs [S]."},
    )
    per_device_train_batch_size: int = field(
        default=16,
        metadata={
            "help": "Completions per device per micro-batch. 16 (our choice) so that the default configuration holds "
            "whole groups of num_generations=16; TRL's default is 8."
        },
    )
    learning_rate: float = field(
        default=2e-6, metadata={"help": "AdamW learning rate. ProRL: 2e-6, constant [S]."}
    )
    lr_scheduler_type: str = field(
        default="constant", metadata={"help": "Learning-rate schedule. ProRL: constant [S]."}
    )
    loss_type: str = field(
        default="dapo",
        metadata={
            "help": "TRL's loss aggregation. ProRL uses DAPO's token-level loss ('dapo', also TRL's default) [S]. With "
            f"dynamic sampling it must normalize by the token count: one of {list(TOKEN_NORMALIZED_LOSSES)}."
        },
    )

    # ----- dynamic sampling -----------------------------------------------------------------------------------------
    dynamic_sampling: str = field(
        default="refill",
        metadata={
            "help": "What to do with groups whose rewards are all equal (zero advantage, no signal). 'refill' (DAPO, "
            "used by ProRL [P]): drop them and generate completions for fresh prompts until the batch holds as many "
            "informative groups as it should (at most `dynamic_sampling_max_rounds` generation rounds). 'filter': "
            "mask them from the loss and its token normalizer without generating more (cheaper, smaller effective "
            "batch). 'none': plain GRPO batches.",
            "choices": list(DYNAMIC_SAMPLING_MODES),
        },
    )
    dynamic_sampling_max_rounds: int = field(
        default=10,
        metadata={
            "help": "Most generation rounds per batch with dynamic_sampling='refill', the first included (verl's DAPO "
            "recipe: max_num_gen_batches=10 [C]). Slots still without an informative group after the last round are "
            "masked (verl stops with an error instead) and counted in `prorl/groups_masked`."
        },
    )

    # ----- reference reset ------------------------------------------------------------------------------------------
    ref_reset_steps: int | None = field(
        default=None,
        metadata={
            "help": "Reset the reference policy to the current policy (and the optimizer state) every this many "
            "optimizer steps. ProRL resets 'every few hundred steps' between runs, with no fixed schedule [S]; off by "
            "default."
        },
    )
    ref_reset_metric: str | None = field(
        default=None,
        metadata={
            "help": "Reset when this evaluation metric (e.g. 'eval_reward'; 'reward' also finds 'eval_reward') has not "
            "improved for `ref_reset_patience` evaluations, ProRL's 'validation stalls or degrades' trigger [P]. "
            "Needs eval_strategy != 'no' and an eval_dataset; with a dict of them, name one: 'eval_<name>_reward'."
        },
    )
    ref_reset_patience: int = field(
        default=3, metadata={"help": "Evaluations without improvement before a validation-triggered reset [I]."}
    )
    ref_reset_greater_is_better: bool = field(
        default=True, metadata={"help": "Whether a larger `ref_reset_metric` is an improvement."}
    )
    ref_reset_min_delta: float = field(
        default=0.0, metadata={"help": "Smallest change of `ref_reset_metric` that counts as an improvement."}
    )
    ref_reset_kl_share: float | None = field(
        default=None,
        metadata={
            "help": "Reset when the KL term dominates the loss (ProRL's third trigger [P]): when beta*KL / (beta*KL + "
            "mean|advantage|) over the loss tokens exceeds this value in (0, 1) for `ref_reset_kl_patience` "
            "consecutive optimizer steps. The share is our definition [I]; 0.5 = the KL term outweighs the policy term."
        },
    )
    ref_reset_kl_patience: int = field(
        default=5, metadata={"help": "Consecutive optimizer steps above `ref_reset_kl_share` before a reset [I]."}
    )
    ref_reset_optimizer: bool = field(
        default=True,
        metadata={"help": "Also re-initialize the optimizer state (Adam moments) at each reset, as ProRL does [P]."},
    )

    # ----- EOS penalty ----------------------------------------------------------------------------------------------
    eos_penalty: float = field(
        default=0.0,
        metadata={
            "help": "Reward added as -eos_penalty to completions that do not end with an EOS token (cut at "
            "max_completion_length). ProRL added such a penalty in its later runs [S]; its form is ours [I]. 0 = off."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        raise_for_bad_field_values(self)
        if self.dynamic_sampling not in DYNAMIC_SAMPLING_MODES:
            raise ValueError(
                f"Unknown `dynamic_sampling={self.dynamic_sampling!r}`. Choose 'refill' (DAPO: resample until the "
                "batch is full of informative groups), 'filter' (mask uninformative groups) or 'none'."
            )
        if self.dynamic_sampling_max_rounds < 1:  # an integer: raise_for_bad_field_values checked
            raise ValueError(
                f"`dynamic_sampling_max_rounds` must be an integer >= 1 (generation rounds per batch, the first "
                f"included), got {self.dynamic_sampling_max_rounds!r}."
            )
        if self.dynamic_sampling != "none" and self.loss_type not in TOKEN_NORMALIZED_LOSSES:
            divides = ("divides each micro-batch by its own token count" if self.loss_type == "bnpo"
                       else "averages over rows or a fixed length")
            raise ValueError(
                f"`dynamic_sampling={self.dynamic_sampling!r}` masks uninformative groups, and "
                f"`loss_type={self.loss_type!r}` {divides} instead of dividing by the generation batch's kept tokens, "
                f"so masked rows would dilute the gradient. Use a token-normalized loss_type "
                f"({', '.join(TOKEN_NORMALIZED_LOSSES)}; ProRL: 'dapo') or dynamic_sampling='none'."
            )
        cap = self.epsilon_high if self.epsilon_high is not None else self.epsilon  # TRL's fallback
        if self.loss_type == "cispo" and cap <= 1:
            # TRL's CISPO reads epsilon_high as ε_max, a cap on the importance weight itself (clamp(ratio, max=ε)),
            # not as PPO's clip-higher margin 1 + ε: ProRL's 0.4 would cap every weight, on-policy ones included, at
            # 0.4 and silently shrink the whole gradient.
            raise ValueError(
                f"`loss_type='cispo'` with `epsilon_high={self.epsilon_high}` (cap {cap}): for CISPO, TRL caps the "
                "importance weight itself at epsilon_high (clamp(ratio, max=epsilon_high)), so a value <= 1 caps even "
                "on-policy tokens (ratio 1) and scales down every gradient. ProRL's 0.4 is a clip-higher margin for "
                "'dapo'; with 'cispo' set epsilon_high to the weight cap (ScaleRL, TRL's recommendation: 5.0)."
            )
        if self.dynamic_sampling == "refill" and (self.scale_rewards == "batch"
                                                  or self.multi_objective_aggregation == "normalize_then_sum"):
            setting = ("scale_rewards='batch'" if self.scale_rewards == "batch"
                       else "multi_objective_aggregation='normalize_then_sum'")
            raise ValueError(
                f"`dynamic_sampling='refill'` merges groups from several generation rounds, and with {setting} TRL "
                "scales each round's advantages by that round's own batch statistics (uninformative groups "
                "included), so equal rewards would get different advantages in one batch. Use scale_rewards='group' "
                "(ProRL's and DAPO's) with multi_objective_aggregation='sum_then_normalize', or "
                "dynamic_sampling='filter'."
            )
        if self.eos_penalty > 0 and self.multi_objective_aggregation == "normalize_then_sum":
            raise ValueError(
                f"`eos_penalty={self.eos_penalty}` is a reward function's size, but "
                "multi_objective_aggregation='normalize_then_sum' standardizes each reward function within its group, "
                "so any size gives the same advantages. Use 'sum_then_normalize', or weight the penalty with "
                "`reward_weights` instead."
            )
        if self.eos_penalty < 0:
            raise ValueError(
                f"`eos_penalty` must be >= 0 (it is subtracted from the reward), got {self.eos_penalty}. Use 0 to "
                "disable it."
            )
        if self.ref_reset_steps is not None and self.ref_reset_steps < 1:
            raise ValueError(
                f"`ref_reset_steps` must be a positive integer (optimizer steps) or None, got {self.ref_reset_steps!r}."
            )
        if self.ref_reset_patience < 1:
            raise ValueError(f"`ref_reset_patience` must be >= 1 evaluation, got {self.ref_reset_patience}.")
        if self.ref_reset_kl_patience < 1:
            raise ValueError(f"`ref_reset_kl_patience` must be >= 1 step, got {self.ref_reset_kl_patience}.")
        if self.ref_reset_min_delta < 0:
            raise ValueError(f"`ref_reset_min_delta` must be >= 0, got {self.ref_reset_min_delta}.")
        if self.ref_reset_metric is not None and not self.ref_reset_metric.strip():
            raise ValueError(
                f"`ref_reset_metric={self.ref_reset_metric!r}` names no metric. Set it to an evaluation metric such as "
                "'eval_reward', or leave it None for no validation trigger."
            )
        if self.ref_reset_kl_share is not None and not 0 < self.ref_reset_kl_share < 1:
            raise ValueError(
                f"`ref_reset_kl_share` must be in (0, 1), got {self.ref_reset_kl_share}: it is the KL term's share of "
                "the per-token loss magnitude (0.5 = the KL term outweighs the policy term)."
            )
        schedule = self.reset_schedule()
        self._check_no_setting_is_ignored(schedule.enabled)
        if schedule.enabled:
            if self.beta == 0.0:
                raise ValueError(
                    "A reference reset is configured (ref_reset_steps / ref_reset_metric / ref_reset_kl_share), but "
                    "beta=0.0 means there is no reference policy. Set beta > 0 (ProRL: 1e-4) or remove the reset "
                    "options."
                )
            if self.sync_ref_model:
                raise ValueError(
                    "sync_ref_model=True (TRL's soft reference sync) and ProRL's reference reset both move the "
                    "reference; use one. The ProRL reset is `ref_reset_steps=N` (it also resets the optimizer state)."
                )
            if self.ref_reset_metric is not None and self.eval_strategy == "no":
                raise ValueError(
                    f"`ref_reset_metric={self.ref_reset_metric!r}` needs evaluations, but eval_strategy='no'. Set "
                    "eval_strategy='steps' with eval_steps, and pass an eval_dataset to the trainer."
                )

    def _check_no_setting_is_ignored(self, reset_enabled: bool) -> None:
        metric = self.ref_reset_metric is not None
        applies = {
            "dynamic_sampling_max_rounds": (self.dynamic_sampling == "refill", "dynamic_sampling='refill'"),
            "ref_reset_patience": (metric, "ref_reset_metric"),
            "ref_reset_greater_is_better": (metric, "ref_reset_metric"),
            "ref_reset_min_delta": (metric, "ref_reset_metric"),
            "ref_reset_kl_patience": (self.ref_reset_kl_share is not None, "ref_reset_kl_share"),
            "ref_reset_optimizer": (reset_enabled, "a reset trigger (ref_reset_steps, ref_reset_metric or "
                                                   "ref_reset_kl_share)"),
        }
        raise_for_ignored_settings(self, applies)

    def reset_schedule(self) -> ResetSchedule:
        return ResetSchedule(
            every_steps=self.ref_reset_steps,
            metric=self.ref_reset_metric,
            patience=self.ref_reset_patience,
            greater_is_better=self.ref_reset_greater_is_better,
            min_delta=self.ref_reset_min_delta,
            kl_share_threshold=self.ref_reset_kl_share,
            kl_patience=self.ref_reset_kl_patience,
        )
