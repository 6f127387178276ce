"""The shared base of every trl_ext trainer: GRPOTrainer plus three hooks.

    _generate_rollout(inputs)                    TRL rollout (generation, rewards, group advantages); ProRL
                                                 overrides it to assemble its batch from refill rounds
      -> _postprocess_rollout(inputs, rollout)   once per generation batch, every process, whole groups
      -> TRL shuffle + micro-batching
      -> _prepare_loss_inputs(inputs)            once per micro-batch
      -> super()._compute_loss                   TRL's loss, every loss_type, metrics
      -> optimizer step                          callbacks (step-size multipliers, EMA teachers, resets)

Nothing of TRL's logic is copied: each override calls `super()` and post-processes.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Protocol

import torch
from trl import GRPOTrainer

from .. import _compat
from .model_card import render_model_card
from .saved_adapters import saving_adapters_except
from .stats import accelerator_reduce_sum


def zero_reward(completions, **kwargs) -> list[float]:
    """Placeholder reward for distillation without reward functions: GRPOTrainer needs one reward source.

    A constant reward gives every group a zero reward advantage, so it never moves the policy.
    """
    return [0.0] * len(completions)


def environments_own_reward(environment_factory) -> bool | None:
    """Whether the environments define `get_reward`, which TRL then adds as a reward source; None when a factory is
    not a class (only calling it would tell, and TRL's contract is to construct environments once)."""
    factories = environment_factory.values() if isinstance(environment_factory, dict) else [environment_factory]
    if not all(isinstance(factory, type) for factory in factories):
        return None
    # TRL's own test: a function named get_reward on the environment's class.
    return any(inspect.isfunction(getattr(factory, "get_reward", None)) for factory in factories)


def environments_give_reward(environment_factory) -> bool:
    """Whether TRL takes a reward from the environments: their `get_reward` (a factory function counts, since only
    calling it would tell and TRL checks it)."""
    return environment_factory is not None and environments_own_reward(environment_factory) is not False


def distillation_reward_funcs(reward_funcs, environment_factory, reward_advantage_weight: float):
    """The reward source of a distillation trainer: the user's, or `zero_reward` when it has none (GRPOTrainer
    needs one). Mixing the reward advantage in (`reward_advantage_weight`) needs a real reward."""
    if reward_funcs is not None:
        return reward_funcs
    if environments_give_reward(environment_factory):
        return None  # the environments' get_reward is the reward
    if reward_advantage_weight:
        raise ValueError(
            f"`reward_advantage_weight={reward_advantage_weight}` adds GRPO's reward advantage to the distillation "
            "advantage, but no `reward_funcs` were given, so it would add nothing. Pass reward functions, or set "
            "reward_advantage_weight=0."
        )
    return [zero_reward]


def check_device(device: torch.device) -> None:
    """Refuse, before training, a device the batch statistics cannot run on."""
    if device.type == "mps":
        raise NotImplementedError(
            "trl_ext trainers accumulate batch statistics (advantage moments, gate prices, information estimates) in "
            "float64, which PyTorch's MPS backend does not support, so training on Apple-silicon GPUs would fail at "
            "the first rollout. Train on CPU (use_cpu=True) or a CUDA GPU."
        )


def image_columns(dataset) -> list[str]:
    """The image columns TRL's vision-language path reads ("image", "images") that `dataset` has."""
    return sorted({"image", "images"} & set(getattr(dataset, "column_names", None) or []))


def resolve_config(model, args, config_cls: type, trainer_name: str):
    """The trainer's config: `args` checked to be a `config_cls`, or a default one named after the model, as
    GRPOTrainer does (`<model>-<method>`)."""
    if args is None:
        name = model if isinstance(model, str) else model.config._name_or_path
        return config_cls(f"{name.split('/')[-1]}-{trainer_name}")
    if not isinstance(args, config_cls):
        raise TypeError(
            f"{trainer_name}Trainer needs a {config_cls.__name__}, got {type(args).__name__}. Build it with "
            f"trl_ext.{config_cls.__name__}(...); it accepts every GRPOConfig field."
        )
    return args


class StatefulComponent(Protocol):
    """Anything whose state must survive checkpoint/resume (gate price history, EMA teacher, router, counters)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


TRAINER_STATE_FILE = "trl_ext_state.pt"
STUDENT_LOGPS_KEY = "ext_student_logps"  # rollout key caching the policy's no-grad log-probs of its samples


class ExtGRPOTrainer(GRPOTrainer):
    """GRPOTrainer with trl_ext's hooks, global statistics, metric helpers and model-card rendering.

    Subclasses set `_name`, `_paper`, `_tag_names`, `_metric_prefix` and `_card_template`, and override the hooks.
    """

    _metric_prefix = "ext"
    _card_template: str | None = None  # file name in model_cards/
    # True when the loss finishes per-optimizer-step work at the step's last micro-batch (PGPO sets the step's
    # learning rate there, ProRL logs its step signals): a component that skips micro-batches (the Kondo gate) must
    # still run that one.
    loss_closes_each_step = False

    def __init__(self, *args, **kwargs):
        self._rollout_rewards: torch.Tensor | None = None
        self._rollout_completion_ids: list[list[int]] | None = None
        self._stateful_components: dict[str, StatefulComponent] = {}
        # Adapters that are trainer state, not the model being trained; TRL's reference adapter is one of them.
        self._internal_adapters: set[str] = {_compat.REFERENCE_ADAPTER}
        super().__init__(*args, **kwargs)
        check_device(self.accelerator.device)
        _compat.keep_internal_adapters_out_of_vllm(self, self._internal_adapters)
        # One all-reduce turns per-process moments into statistics of the whole generation batch.
        self.reduce_sum = accelerator_reduce_sum(self.accelerator)

    # ----- hooks ---------------------------------------------------------------------------------------------
    def _postprocess_rollout(self, inputs: list[dict[str, Any]], rollout: dict[str, Any]) -> dict[str, Any]:
        """Change the rollout before it is shuffled and split into micro-batches (default: unchanged).

        `inputs` are this process's dataset rows, `rollout` the dict TRL's loss will receive, and
        `self.rollout_rewards` the (N, num_reward_funcs) rewards of the whole generation batch (all processes).
        Anything derived from groups or from batch statistics must be written back as per-row tensors.
        """
        return rollout

    def _prepare_loss_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Change one micro-batch just before TRL's loss (default: unchanged)."""
        return inputs

    def _loss_normalizers(self, rollout: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The generation batch's global token counts that the loss divides by (rollout keys), each with the (B,)
        tokens every row of this process adds to it. A component that takes rows out of the loss (the Kondo gate's
        'survivors' normalizer) recounts every one of them. Default: TRL's `num_items_in_batch`."""
        return {"num_items_in_batch": self.loss_mask(rollout).sum(-1)}

    # ----- TRL overrides (all call super) --------------------------------------------------------------------
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._rollout_rewards = rewards
        self._rollout_completion_ids = [list(ids) for ids in completion_ids_list]
        return rewards

    def _generate_rollout(self, inputs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """TRL's generation and scoring of one generation batch, before the post-rollout hook: returns this
        process's dataset rows of the batch and the rollout. A trainer that draws the batch in several rounds
        (ProRL's refill) overrides it, so that the hook sees the final batch and the rows it was drawn from."""
        return inputs, super()._generate_and_score_completions(inputs)

    def _generate_and_score_completions(self, inputs):
        inputs, rollout = self._generate_rollout(inputs)
        rollout = self._postprocess_rollout(inputs, rollout)
        advantages = rollout["advantages"]
        if self.args.log_completions and advantages.dim() == 2:
            # Per-token advantages (distillation): the completions table shows each completion's token mean of the
            # advantages the loss uses, not TRL's reward advantage. The gather is collective; log_completions is the
            # same on every process.
            mask = self.loss_mask(rollout).to(advantages.dtype)
            tokens = mask.sum(dim=1)
            per_completion = (advantages * mask).sum(dim=1) / tokens.clamp(min=1.0)
            per_completion = per_completion.masked_fill(tokens == 0, float("nan"))  # no token: nothing to average
            _compat.replace_logged_advantages(self, self.accelerator.gather(per_completion).tolist())
        return rollout

    def _compute_loss(self, model, inputs):
        return super()._compute_loss(model, self._prepare_loss_inputs(inputs))

    # ----- helpers for subclasses ----------------------------------------------------------------------------
    @property
    def rollout_rewards(self) -> torch.Tensor | None:
        """Rewards of the current generation batch, (N_global, num_reward_funcs), gathered over processes."""
        return self._rollout_rewards

    @property
    def rollout_completion_ids(self) -> list[list[int]] | None:
        """This process's completions of the current generation batch as the reward functions saw them: every
        generated token, also where the completion mask hides a row (`mask_truncated_completions`); row for row
        those of the batch the post-rollout hook sees."""
        return self._rollout_completion_ids

    @property
    def _mode(self) -> str:
        return "train" if self.model.training else "eval"

    def log_metric(self, name: str, value: float | torch.Tensor) -> None:
        """Record `<prefix>/<name>` through TRL's metric machinery (averaged per logging step, every backend).

        Call it with values that are already global (identical on every process), as TRL does.
        """
        if isinstance(value, torch.Tensor):
            value = value.item()
        self._metrics[self._mode][f"{self._metric_prefix}/{name}"].append(float(value))

    def loss_mask(self, rollout: dict[str, Any]) -> torch.Tensor:
        return _compat.completion_loss_mask(rollout)

    @torch.no_grad()
    def score_completions(self, model, rollout: dict[str, Any]) -> torch.Tensor:
        """(B, T) log-probs of the sampled completion tokens under `model` (no gradient)."""
        # The same chunking TRL uses for its own scoring passes.
        if self._mode == "train":
            batch_size = self.args.per_device_train_batch_size
        else:
            batch_size = self.args.per_device_eval_batch_size
        return _compat.per_token_logps(self, model, rollout, batch_size=batch_size)

    @torch.no_grad()
    def student_logps(self, rollout: dict[str, Any]) -> torch.Tensor:
        """The policy's log-probs of its own samples before the update (pi_theta_old).

        Reuses TRL's `old_per_token_logps` when it computed them; otherwise runs one no-grad forward pass, whose
        result is kept in the rollout so that every later user (a method, then a gate) shares it.
        """
        for key in ("old_per_token_logps", STUDENT_LOGPS_KEY):
            if rollout.get(key) is not None:
                return rollout[key]
        rollout[STUDENT_LOGPS_KEY] = self.score_completions(self.model, rollout)
        return rollout[STUDENT_LOGPS_KEY]

    # ----- trainer state in checkpoints ---------------------------------------------------------------------
    def register_state(self, name: str, component: StatefulComponent) -> None:
        """Save `component.state_dict()` in every checkpoint and restore it on resume (under `name`)."""
        if name in self._stateful_components:
            raise ValueError(f"A trainer state component named {name!r} is already registered.")
        self._stateful_components[name] = component

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if not self._stateful_components:
            return
        # Every process builds the state (a component whose weights are sharded gathers them: a collective); it is
        # identical on every process by design (rank-symmetric), so the main process writes it.
        state = {name: c.state_dict() for name, c in self._stateful_components.items()}
        if self.args.should_save:
            checkpoint_dir = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            torch.save(state, os.path.join(checkpoint_dir, TRAINER_STATE_FILE))

    def register_internal_adapter(self, name: str) -> None:
        """Mark the LoRA adapter `name` as trainer state: saved models (checkpoints, save_model, push_to_hub) and vLLM
        weight syncs leave it out, so whoever registers it must save its weights with `register_state`."""
        self._internal_adapters.add(name)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        with saving_adapters_except(self.accelerator.unwrap_model(self.model), self._internal_adapters):
            super()._save(output_dir, state_dict)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or not self._stateful_components:
            return
        path = os.path.join(checkpoint, TRAINER_STATE_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"Resuming from {checkpoint!r}, but it has no {TRAINER_STATE_FILE} with this trainer's state "
                f"({sorted(self._stateful_components)}). Resume from a checkpoint written by the same trainer."
            )
        state = torch.load(path, map_location="cpu", weights_only=False)
        for name, component in self._stateful_components.items():
            if name not in state:
                raise KeyError(f"{path} has no state for {name!r}; it holds {sorted(state)}.")
            component.load_state_dict(state[name])

    # ----- model card ----------------------------------------------------------------------------------------
    def card_settings(self) -> dict[str, object]:
        """Settings the card shows in place of (or besides) the config's, e.g. a teacher passed to the trainer
        rather than named in the config."""
        return {}

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        if self._card_template is None:
            return super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if not self.is_world_process_zero():
            return None
        card = render_model_card(self, model_name=model_name, dataset_name=dataset_name, tags=tags)
        card.save(f"{self.args.output_dir}/README.md")
        return card
