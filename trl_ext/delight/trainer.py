"""DelightTrainer: Delightful Policy Gradient (arXiv 2603.14608) with the optional Kondo gate (arXiv 2603.20526)."""

from __future__ import annotations

from typing import Any

import torch

from ..core import ExtGRPOTrainer, masked_moments
from ..core.trainer import resolve_config
from .config import DelightConfig
from .delight import delight_weights, masked, surprisal, token_delight
from .gated import KondoGateMixin, refuse_image_datasets


class RolloutCounter:
    """How many rollouts (training and evaluation) the trainer has weighted; identical on every rank."""

    def __init__(self):
        self.count = 0

    def state_dict(self) -> dict:
        return {"count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.count = state["count"]


class DelightTrainer(KondoGateMixin, ExtGRPOTrainer):
    """Drop-in replacement for `trl.GRPOTrainer` that weights every token's advantage by its delight.

    The group advantage U comes from TRL (`scale_rewards="none"` by default: U = r - mean of the group). With the
    policy's surprisal l_t = -log pi(y_t) of its own sample, the per-token advantage fed to TRL's loss is
    sigmoid((U * l_t - lambda) / eta) * U. On-policy (one update per rollout, `num_iterations=1` and
    `steps_per_generation == gradient_accumulation_steps`) TRL's ratio is exactly 1, so the loss is DG's
    -(1/N) sum_t w_t U log pi(y_t) with N every valid token (`loss_type="dapo"`).
    """

    _tag_names = ["trl", "trl_ext", "delight", "kondo-gate"]
    _name = "Delightful Policy Gradient"
    _paper = {
        "title": "Delightful Policy Gradient",
        "id": "2603.14608",
        "citation": (
            "@article{osband2026delightful,\n"
            "    title   = {{Delightful Policy Gradient}},\n"
            "    author  = {Ian Osband},\n"
            "    journal = {arXiv preprint arXiv:2603.14608},\n"
            "    year    = {2026}\n"
            "}\n"
            "@article{osband2026kondo,\n"
            "    title   = {{Does This Gradient Spark Joy?}},\n"
            "    author  = {Ian Osband},\n"
            "    journal = {arXiv preprint arXiv:2603.20526},\n"
            "    year    = {2026}\n"
            "}"
        ),
    }
    _metric_prefix = "delight"
    _card_template = "delight.md"

    def __init__(self, model, reward_funcs=None, args: DelightConfig | None = None, *more, **kwargs):
        args = resolve_config(model, args, DelightConfig, "Delight")
        refuse_image_datasets(args, more[0] if more else kwargs.get("train_dataset"))
        super().__init__(model, reward_funcs, args, *more, **kwargs)
        self.delight_rollouts = RolloutCounter()
        if args.delight_weighting and args.delight_stochastic:
            # It seeds the Bernoulli draws: resuming must continue the stream, not restart it.
            self.register_state("delight_rollouts", self.delight_rollouts)

    def _weight_generator(self) -> torch.Generator:
        """A fresh generator per rollout, seeded by (seed, rollout index, rank): every rollout draws new uniforms,
        also when several share an optimizer step (steps_per_generation < gradient_accumulation_steps) or during
        evaluation, and each rank draws its own for its own rows. The index is the same on every rank and saved."""
        rollout = self.delight_rollouts.count
        self.delight_rollouts.count += 1
        seed = (self.args.seed * 1_000_003 + rollout) * 1009 + self.accelerator.process_index
        return torch.Generator().manual_seed(seed)

    def _gate_advantages(self, rollout: dict[str, Any]) -> torch.Tensor:
        # The gate prices raw delight U * l (egg's Kondo priority), not the DG-weighted advantage.
        return rollout["delight_group_advantages"]

    def _postprocess_rollout(self, inputs, rollout):
        group_advantages = rollout["advantages"]  # (B,) from TRL
        rollout["delight_group_advantages"] = group_advantages
        if self.args.delight_weighting:
            mask = self.loss_mask(rollout)
            chi = token_delight(group_advantages, surprisal(self.student_logps(rollout)).float())
            generator = self._weight_generator() if self.args.delight_stochastic else None
            weights = delight_weights(chi, self.args.delight_eta, self.args.delight_price,
                                      self.args.delight_stochastic, generator)
            rollout["advantages"] = masked(weights * group_advantages.unsqueeze(1), mask)
            self.log_metric("weight_mean", masked_moments(weights, mask, self.reduce_sum, unbiased=False).mean)
            self.log_metric("token_delight_mean", masked_moments(chi, mask, self.reduce_sum, unbiased=False).mean)
        return super()._postprocess_rollout(inputs, rollout)
