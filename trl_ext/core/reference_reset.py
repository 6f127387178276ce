"""Hard reference-policy reset (ProRL): pi_ref <- pi_theta and a fresh optimizer state, as a reusable callback.

TRL's `sync_ref_model` (TR-DPO) mixes the policy into the reference on a fixed schedule, but it keeps the optimizer's
moments and it refuses PEFT models. ProRL (arXiv 2505.24864) instead *restarts* from the current policy: the
reference becomes the current weights and the optimizer state is re-initialised, when a trigger fires
(`core.reset_triggers`). This callback does that for any trl_ext trainer with `beta > 0`:

    reset = ReferenceResetCallback(ResetSchedule(every_steps=200))
    reset.attach(trainer)          # adds the callback, registers its state for checkpoints, checks the setup
    trainer.train()

* Full fine-tuning: every parameter of `trainer.ref_model` is overwritten with the policy's.
* LoRA / PEFT: the reference is a frozen adapter named "ref" (TRL creates it when a `PeftModel` is passed with
  `beta > 0`; `attach` adds it when TRL's reference is "adapters disabled", i.e. the base model, which a reset cannot
  move). A reset copies every `.default.` adapter parameter into its `.ref.` twin, the same mapping TRL uses.
* The optimizer's state (Adam moments and step counts) is cleared, so it re-initialises lazily on the next step,
  exactly as a freshly built optimizer would. The learning-rate schedule is left alone.

A requested reset waits for the next rollout boundary: the generation batch in flight was scored against the old
reference (`ref_per_token_logps`), and resetting in the middle of it would mix two references in one rollout.
The reset count, its history, the triggers' state and, after the first reset, the reference weights themselves are
saved with every checkpoint and restored on resume (a resumed run otherwise reloads the *initial* reference).

Sharded models (DeepSpeed ZeRO-3, FSDP2) are copied and checkpointed shard-aware (`core.full_state`): a reset and a
checkpoint are then collective, which they are anyway, since every process runs them at the same step. FSDP1's flat
parameters are refused.
"""

from __future__ import annotations

import torch
from accelerate.utils import is_peft_model
from transformers import TrainerCallback

from .. import _compat
from .full_state import copy_full_tensors, full_tensors, load_full_tensors
from .reset_triggers import ResetSchedule, ResetTriggers
from .teachers import is_zero3

POLICY_ADAPTER = "default"
REFERENCE_ADAPTER = _compat.REFERENCE_ADAPTER  # TRL's name: with a passed PeftModel, TRL has already added it


# ----- the two operations of a reset ---------------------------------------------------------------------------------
def copy_parameters(source: torch.nn.Module, target: torch.nn.Module, zero3: bool = False) -> int:
    """Overwrite every parameter of `target` with the same-named parameter of `source`; returns how many.
    Collective under ZeRO-3 (`zero3=True`) and FSDP2."""
    src = dict(source.named_parameters())
    dst = dict(target.named_parameters())
    if src.keys() != dst.keys():
        missing, extra = sorted(src.keys() - dst.keys())[:5], sorted(dst.keys() - src.keys())[:5]
        raise RuntimeError(
            f"The reference model's parameters do not match the policy's (only in policy: {missing}, only in "
            f"reference: {extra}); a reference reset needs the same architecture."
        )
    copy_full_tensors([(src[name], param) for name, param in dst.items()], zero3)
    return len(dst)


def adapter_pairs(model: torch.nn.Module, source: str = POLICY_ADAPTER, target: str = REFERENCE_ADAPTER):
    """(source parameter, target parameter) for every parameter of adapter `source` (PEFT's naming, as TRL uses it)."""
    pairs = []
    for name, param in model.named_parameters():
        if f".{source}." in name:
            pairs.append((param, model.get_parameter(name.replace(f".{source}.", f".{target}."))))
    if not pairs:
        raise RuntimeError(f"The PEFT model has no parameters of an adapter named {source!r} to copy.")
    return pairs


def copy_adapter(model: torch.nn.Module, source: str = POLICY_ADAPTER, target: str = REFERENCE_ADAPTER,
                 zero3: bool = False) -> int:
    pairs = adapter_pairs(model, source, target)
    copy_full_tensors(pairs, zero3)
    return len(pairs)


def add_reference_adapter(model) -> None:
    """Give a PeftModel a frozen "ref" adapter equal to its "default" adapter (what TRL does for a passed PeftModel)."""
    model.add_adapter(REFERENCE_ADAPTER, model.peft_config[POLICY_ADAPTER])
    copy_adapter(model)
    for _, ref in adapter_pairs(model):
        ref.requires_grad_(False)
    # The reference never trains: its copy of lora_dropout would only add noise to the reference log-probs (and
    # TRL's disable_dropout ran before this adapter existed).
    for name, module in model.named_modules():
        if name.endswith(f"lora_dropout.{REFERENCE_ADAPTER}") and isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def innermost_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer that holds the state, under accelerate's wrappers and DeepSpeed's ZeRO optimizers (which
    are no torch optimizers themselves: they keep the one they step, over their fp32 partitions, in `.optimizer`)."""
    chain = [optimizer]
    while getattr(chain[-1], "optimizer", None) is not None and len(chain) < 8:
        chain.append(chain[-1].optimizer)
    torch_optimizers = [o for o in chain if isinstance(o, torch.optim.Optimizer)]
    if not torch_optimizers:
        raise TypeError(
            f"Cannot reset the state of optimizer {type(optimizer).__name__}: it is not a torch.optim.Optimizer. Use a "
            "torch optimizer or set `ref_reset_optimizer=False`."
        )
    return torch_optimizers[-1]


def reset_optimizer_state(optimizer) -> None:
    """Forget every parameter's state (Adam: step, exp_avg, exp_avg_sq); torch optimizers re-initialise it lazily."""
    inner = innermost_optimizer(optimizer)
    release_paged_buffers(inner)
    inner.state.clear()


def release_paged_buffers(optimizer: torch.optim.Optimizer) -> None:
    """bitsandbytes' paged optimizers (optim="paged_adamw_*") also list every paged state buffer in a process-wide
    page manager (`page_mng.paged_tensors`); drop this optimizer's buffers from it too, or every reset would leak a
    copy of the optimizer state."""
    manager = getattr(optimizer, "page_mng", None)
    if not getattr(optimizer, "is_paged", False) or manager is None:
        return
    state_buffers = {id(t) for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)}
    manager.paged_tensors[:] = [t for t in manager.paged_tensors if id(t) not in state_buffers]


# ----- the callback --------------------------------------------------------------------------------------------------
class ReferenceResetCallback(TrainerCallback):
    """Resets the reference policy (and the optimizer state) of a trl_ext trainer when a trigger fires.

    Args:
        schedule: which triggers request a reset (`ResetSchedule`).
        reset_optimizer: clear the optimizer state at each reset (ProRL: yes).
        state_name: name of this callback's state in checkpoints.
    """

    def __init__(self, schedule: ResetSchedule, reset_optimizer: bool = True, state_name: str = "reference_reset"):
        if not schedule.enabled:
            raise ValueError(
                "ReferenceResetCallback needs at least one trigger: every_steps, a validation metric, or a KL-share "
                "threshold."
            )
        self.schedule = schedule
        self.reset_optimizer = reset_optimizer
        self.state_name = state_name
        self.triggers = ResetTriggers(schedule)
        self.history: list[dict] = []  # one entry per reset: step, reason, step the reset was requested at
        self.pending: dict | None = None  # a requested reset waiting for the next rollout boundary
        self.trainer = None
        self._kl_share: float | None = None
        self._training = False
        self._tracked_eval: tuple[str, str] | None = None  # (dataset, metric) with several evaluation datasets

    @property
    def count(self) -> int:
        return len(self.history)

    # ----- setup ---------------------------------------------------------------------------------------------------
    def attach(self, trainer) -> "ReferenceResetCallback":
        """Check that `trainer` can be reset, prepare its reference, add this callback and register its state."""
        if not hasattr(trainer, "register_state"):
            raise TypeError(
                f"ReferenceResetCallback needs a trl_ext trainer (an ExtGRPOTrainer), got {type(trainer).__name__}: "
                "its state must be saved with checkpoints."
            )
        args = trainer.args
        if trainer.beta == 0.0:
            raise ValueError(
                "A reference reset needs a reference policy, but beta=0.0 (no KL term, no reference model). Set "
                "beta > 0 (ProRL: 1e-4) or disable the reset triggers."
            )
        if args.sync_ref_model:
            raise ValueError(
                "sync_ref_model=True already moves the reference (TRL's soft sync, without optimizer reset); use it or "
                "the reference reset, not both."
            )
        if getattr(trainer, "is_fsdp_enabled", False) and trainer.accelerator.state.fsdp_plugin.fsdp_version == 1:
            raise NotImplementedError(
                "The reference reset copies and checkpoints sharded weights under FSDP2 and DeepSpeed ZeRO-3, but not "
                "under FSDP1 (flat parameters). Set fsdp_version: 2 in the accelerate config (as "
                "examples/accelerate_configs/fsdp2.yaml)."
            )
        if self.schedule.metric is not None and args.eval_strategy == "no":
            raise ValueError(
                f"The reset trigger on validation metric {self.schedule.metric!r} needs evaluations, but "
                "eval_strategy='no'. Set eval_strategy='steps' (with eval_steps) and pass an eval_dataset."
            )
        if self.schedule.metric is not None and isinstance(trainer.eval_dataset, dict):
            metric = self.schedule.metric
            metric = metric if metric.startswith("eval_") else f"eval_{metric}"
            self._tracked_eval = tracked_eval_dataset(metric, list(trainer.eval_dataset))
        if self.schedule.kl_share_threshold is not None and not getattr(trainer, "reports_kl_share", False):
            raise ValueError(
                f"The KL-share reset trigger needs a trainer that reports the KL share of its loss, and "
                f"{type(trainer).__name__} does not (ProRLTrainer does; others can call `observe_kl_share`)."
            )
        model = trainer.accelerator.unwrap_model(trainer.model)
        if trainer.ref_model is None:
            if not is_peft_model(model):
                raise ValueError("beta > 0 without a reference model or a PEFT model: nothing to reset.")
            if model.active_adapter != POLICY_ADAPTER:
                raise ValueError(
                    f"The reference reset copies the trained adapter {POLICY_ADAPTER!r} into {REFERENCE_ADAPTER!r} (as "
                    f"TRL does), but the active adapter is {model.active_adapter!r}."
                )
            if REFERENCE_ADAPTER not in model.peft_config:
                # TRL's reference is then the base model (adapters disabled), which no reset can move: give it a
                # frozen copy of the (freshly initialised, hence identity) adapter instead. TRL uses it by name.
                add_reference_adapter(model)
        self.trainer = trainer
        self.zero3 = is_zero3(trainer)
        trainer.add_callback(self)
        trainer.register_state(self.state_name, self)
        return self

    # ----- signals from the trainer ---------------------------------------------------------------------------------
    def observe_kl_share(self, share: float) -> None:
        """The KL share of the optimizer step that is ending (identical on every process)."""
        self._kl_share = share

    # ----- callback events ------------------------------------------------------------------------------------------
    def on_init_end(self, args, state, control, **kwargs):
        if self.trainer is None:
            raise RuntimeError(
                "ReferenceResetCallback was passed in `callbacks=`; attach it instead, after building the trainer: "
                "`ReferenceResetCallback(schedule).attach(trainer)`. attach() checks the trainer, prepares its "
                "reference and registers the callback's state for checkpoints."
            )

    def on_train_begin(self, args, state, control, **kwargs):
        self._training = True
        if self.reset_optimizer:
            innermost_optimizer(self.trainer.optimizer)  # fail now, not at the first reset
        # Resumed from a checkpoint saved inside a rollout with a reset pending: TRL does not checkpoint its buffered
        # rollout and generates a fresh one at once, so this is the rollout boundary the reset was waiting for.
        self._maybe_reset(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self._training = False

    def on_step_end(self, args, state, control, **kwargs):
        reason = self.triggers.after_step(state.global_step, self._kl_share)
        self._kl_share = None
        self._request(reason, state.global_step)
        self._maybe_reset(state.global_step)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not self._training or self.schedule.metric is None:
            return
        metrics = metrics or {}
        if self._tracked_eval is not None:
            # transformers evaluates each named dataset on its own and calls on_evaluate for each; TRL's own metrics
            # (reward, ...) are `eval_<metric>` in every one of them, its own ones `eval_<dataset>_<metric>`.
            dataset, metric = self._tracked_eval
            if f"eval_{dataset}_runtime" not in metrics:
                return  # another dataset's evaluation
            value = metrics.get(f"eval_{dataset}_{metric}", metrics.get(f"eval_{metric}"))
            metrics = {self.schedule.metric: value} if value is not None else metrics
        self._request(self.triggers.after_validation(metrics), state.global_step)
        self._maybe_reset(state.global_step)

    def _request(self, reason: str | None, step: int) -> None:
        if reason is not None and self.pending is None:
            self.pending = {"reason": reason, "requested_at": step}

    def _maybe_reset(self, step: int) -> None:
        if self.pending is not None and _at_rollout_boundary(self.trainer):
            self.reset(step, self.pending["reason"], self.pending["requested_at"])

    # ----- the reset ------------------------------------------------------------------------------------------------
    def reset(self, step: int, reason: str = "manual", requested_at: int | None = None) -> None:
        """pi_ref <- pi_theta and (optionally) a fresh optimizer state. Call it on every process at the same step."""
        trainer = self.trainer
        model = trainer.accelerator.unwrap_model(trainer.model)
        if trainer.ref_model is not None:
            copy_parameters(model, trainer.accelerator.unwrap_model(trainer.ref_model), self.zero3)
        else:
            copy_adapter(model, zero3=self.zero3)
        if self.reset_optimizer and trainer.optimizer is not None:
            reset_optimizer_state(trainer.optimizer)
        requested_at = step if requested_at is None else requested_at
        self.history.append({"step": step, "reason": reason, "requested_at": requested_at})
        self.pending = None
        self.triggers.reset_done()

    # ----- checkpoint state ----------------------------------------------------------------------------------------
    def _reference_parameters(self) -> dict[str, torch.Tensor]:
        trainer = self.trainer
        model = trainer.accelerator.unwrap_model(trainer.model)
        if trainer.ref_model is not None:
            return dict(trainer.accelerator.unwrap_model(trainer.ref_model).named_parameters())
        prefix = f".{REFERENCE_ADAPTER}."
        return {name: p for name, p in model.named_parameters() if prefix in name}

    def state_dict(self) -> dict:
        """Called on every process (gathering sharded weights is collective); only the saving process keeps them."""
        # Before the first reset the reference is the initial model, which the trainer rebuilds on resume; afterwards
        # it is a past policy that exists nowhere else, so it is saved.
        reference = None
        if self.history:
            params = self._reference_parameters()
            values = full_tensors(lambda: list(params.values()), list(params.values()), self.zero3,
                                  keep=self.trainer.args.should_save)
            reference = None if values is None else dict(zip(params, values))
        return {
            "history": [dict(h) for h in self.history],
            "pending": None if self.pending is None else dict(self.pending),
            "triggers": self.triggers.state_dict(),
            "reference": reference,
        }

    def load_state_dict(self, state: dict) -> None:
        self.history = [dict(h) for h in state["history"]]
        self.pending = None if state["pending"] is None else dict(state["pending"])
        self.triggers.load_state_dict(state["triggers"])
        if state["reference"] is not None:
            params = self._reference_parameters()
            if params.keys() != state["reference"].keys():
                raise KeyError("The checkpointed reference does not match this trainer's reference parameters.")
            load_full_tensors(lambda: list(params.values()), list(params.values()), self.zero3,
                              [state["reference"][name] for name in params])

    def summary(self) -> dict:
        """Count and steps of the resets so far (for logs and model cards)."""
        return {"count": self.count, "steps": [h["step"] for h in self.history],
                "reasons": [h["reason"] for h in self.history]}


def tracked_eval_dataset(metric: str, datasets: list[str]) -> tuple[str, str]:
    """(dataset, metric) that `eval_<dataset>_<metric>` names among several evaluation datasets (the longest
    matching dataset name wins)."""
    matches = sorted((d for d in datasets if metric.startswith(f"eval_{d}_")), key=len, reverse=True)
    if not matches:
        raise ValueError(
            f"The reset trigger's validation metric {metric!r} names none of the evaluation datasets "
            f"{sorted(datasets)}: transformers evaluates each one on its own, so the trigger must track one. Set e.g. "
            f"ref_reset_metric='eval_{datasets[0]}_reward' (TRL's reward on dataset {datasets[0]!r})."
        )
    return matches[0], metric[len(f"eval_{matches[0]}_"):]


def _at_rollout_boundary(trainer) -> bool:
    """True when the next training micro-step generates a new rollout."""
    return _compat.will_generate(trainer)


__all__ = [
    "ReferenceResetCallback",
    "ResetSchedule",
    "add_reference_adapter",
    "copy_adapter",
    "copy_parameters",
    "innermost_optimizer",
    "reset_optimizer_state",
]
