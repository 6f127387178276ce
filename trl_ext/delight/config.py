"""DelightConfig: GRPOConfig plus Delightful Policy Gradient's weight and the Kondo gate."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import GRPOConfig

from ..core.ignored_settings import raise_for_ignored_settings
from .gated import KondoGateArguments


@dataclass
class DelightConfig(KondoGateArguments, GRPOConfig):
    r"""Configuration for [`DelightTrainer`]: every [`~trl.GRPOConfig`] field, the Kondo gate's `gate_*` fields, and
    the ones below. Defaults follow DeepMind's `egg` (`egg/losses/dg.py`) unless marked as our choice."""

    delight_weighting: bool = field(
        default=True,
        metadata={
            "help": "Weight each token's advantage by w = sigmoid((U * surprisal - delight_price) / delight_eta) "
            "(Delightful PG). False gives plain policy gradient, e.g. to run the Kondo gate alone as egg's KondoLoss."
        },
    )
    delight_eta: float = field(
        default=1.0,
        metadata={"help": "Temperature eta of the delight sigmoid (paper and egg: 1.0, for a raw U). Must be > 0. "
                  "Only with delight_weighting=True, like delight_price and delight_stochastic. With "
                  "multi_objective_aggregation='normalize_then_sum' TRL std-normalizes U whatever scale_rewards "
                  "says, which changes eta's calibration."},
    )
    delight_price: float = field(
        default=0.0, metadata={"help": "Offset lambda inside the delight sigmoid (egg default: 0)."}
    )
    delight_stochastic: bool = field(
        default=False,
        metadata={"help": "Draw w ~ Bernoulli(sigmoid(...)) per token instead of using the probability (egg: False)."},
    )
    scale_rewards: str = field(
        default="none",
        metadata={
            "help": "How TRL scales the group advantage U = r - mean(group). DG uses no std scaling ('none', the "
            "paper's convention; eta is calibrated for it); 'group' and 'batch' are TRL's alternatives. "
            "multi_objective_aggregation='normalize_then_sum' std-normalizes U regardless of this setting.",
            "choices": ["none", "group", "batch"],
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.delight_eta <= 0:
            raise ValueError(
                f"`delight_eta` must be > 0, got {self.delight_eta}. It is the temperature of the delight sigmoid; "
                "the paper uses 1.0."
            )
        weighting = (self.delight_weighting, "delight_weighting=True")
        raise_for_ignored_settings(self, {
            "delight_eta": weighting, "delight_price": weighting, "delight_stochastic": weighting,
        })
        if self.importance_sampling_level != "token":
            # TRL's sequence-level ratio multiplies every token's advantage by the gradient of the whole sequence's
            # mean log-prob, which would smear DG's per-token weights w_t over the sequence.
            raise ValueError(
                f"`importance_sampling_level={self.importance_sampling_level!r}` is not supported by DelightTrainer: "
                "Delightful PG weighs each token's advantage by its own delight, and a sequence-level ratio spreads "
                "those weights over the whole sequence. Use importance_sampling_level='token'."
            )
