"""The weights the self-teacher reads its privileged prompt with.

- "ema" (SDPO's default): an exponential moving average of the student, theta_T <- (1 - r) theta_T + r theta after
  every optimizer step, starting from the initial student. With LoRA it is a second adapter, "teacher", on the same
  base model (no second copy of the base weights); otherwise a frozen copy of the model, prepared like GRPO's
  reference model.
- "initial": the same, never updated (the frozen initial policy).
- "live": the current policy itself, under no_grad.

The EMA and initial teachers are trainer state: saved with each checkpoint, restored on resume.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from .. import _compat
from ..core import load_teacher, prepare_teacher
from ..core.full_state import full_tensors, load_full_tensors
from ..core.teachers import is_zero3

TEACHER_KINDS = ("ema", "initial", "live")
TEACHER_ADAPTER = "teacher"


class SelfTeacher:
    def __init__(self, trainer, kind: str, update_rate: float):
        if kind not in TEACHER_KINDS:
            raise ValueError(f"Unknown teacher_model_kind {kind!r}; choose one of {TEACHER_KINDS}.")
        self.kind = kind
        self.update_rate = update_rate if kind == "ema" else 0.0
        self.accelerator = trainer.accelerator
        self.zero3 = is_zero3(trainer)
        self.saves = trainer.args.should_save  # the process that writes checkpoints keeps the gathered weights
        self.copy: torch.nn.Module | None = None  # the frozen full copy (non-PEFT ema/initial)
        self.adapter_pairs: list[tuple[torch.nn.Parameter, torch.nn.Parameter]] = []  # (teacher, student) LoRA
        self.updates = 0
        if kind == "live":
            return
        if trainer.is_fsdp_enabled and trainer.accelerator.state.fsdp_plugin.fsdp_version == 1:
            raise NotImplementedError(
                f"teacher_model_kind={kind!r} keeps a teacher whose weights are checkpointed, which trl_ext supports "
                "under FSDP2 but not FSDP1 (flat parameters). Set fsdp_version: 2 in the accelerate config (as "
                "examples/accelerate_configs/fsdp2.yaml), or use teacher_model_kind='live'."
            )
        model = trainer.model
        if _compat.is_peft_model(model):
            self._add_teacher_adapter(model)
            trainer.register_internal_adapter(TEACHER_ADAPTER)  # its weights are in this object's state
        else:
            self.copy = prepare_teacher(self._initial_copy(trainer, model), trainer, temperature=trainer.temperature)

    @staticmethod
    def _initial_copy(trainer, model) -> torch.nn.Module:
        """A frozen copy of the student as it is now (which may differ from its saved weights)."""
        if is_zero3(trainer):
            # The student is sharded: load it from its path, as TRL loads its reference model. In-memory changes to
            # the student are not in that copy.
            return load_teacher(_compat.get_config_model_id(model.config), trainer.args.model_init_kwargs,
                                trainer.args, default_dtype=model.dtype)
        # A fresh model with the student's weights, not a deep copy: TRL patches the student's `forward` (its fused
        # LM head) with a closure over the student's original forward, which a deep copy would share.
        with torch.random.fork_rng(devices=[]):  # its random initialisation must not move the training RNG
            fresh = type(model)._from_config(model.config, dtype=model.dtype)
        fresh.load_state_dict(model.state_dict())
        return load_teacher(fresh, None, trainer.args)

    def _add_teacher_adapter(self, model) -> None:
        config = model.peft_config[model.active_adapter]
        model.add_adapter(TEACHER_ADAPTER, config)
        student_adapter = f".{model.active_adapter}."
        for name, param in model.named_parameters():
            if student_adapter in name:
                teacher = model.get_parameter(name.replace(student_adapter, f".{TEACHER_ADAPTER}."))
                teacher.data.copy_(param.data)
                teacher.requires_grad_(False)
                self.adapter_pairs.append((teacher, param))
        if not self.adapter_pairs:
            raise ValueError(f"Found no parameters of the active adapter {model.active_adapter!r} to copy.")

    @contextlib.contextmanager
    def scoring(self, model):
        """Yield the module that scores teacher prompts; `model` is the (wrapped) policy being trained."""
        with torch.no_grad():
            if self.copy is not None:  # frozen and in eval mode since load_teacher
                yield self.copy
                return
            # The policy scores in eval mode: a teacher's targets must not carry the student's dropout (or LoRA
            # dropout, which the teacher adapter inherits).
            training = model.training
            model.eval()
            try:
                if self.adapter_pairs:
                    with _compat.use_adapter(self.accelerator.unwrap_model(model), TEACHER_ADAPTER):
                        yield model
                else:
                    yield model
            finally:
                model.train(training)

    @torch.no_grad()
    def update(self, model) -> None:
        """One EMA step towards the student (after each optimizer step; no-op for 'initial' and 'live')."""
        if self.update_rate == 0.0:
            return
        if self.copy is not None:
            _compat.ema_update_model(self.accelerator.unwrap_model(model), self.accelerator.unwrap_model(self.copy),
                                     self.update_rate)
        for teacher, student in self.adapter_pairs:
            teacher.data.mul_(1.0 - self.update_rate).add_(student.data, alpha=self.update_rate)
        self.updates += 1

    # ----- checkpoint state ----------------------------------------------------------------------------------
    def _teacher_tensors(self) -> list[torch.Tensor]:
        if self.copy is not None:
            return list(self.accelerator.unwrap_model(self.copy).state_dict().values())
        return [teacher for teacher, _ in self.adapter_pairs]

    def _teacher_parameters(self) -> list[torch.nn.Parameter]:
        if self.copy is not None:
            return list(self.accelerator.unwrap_model(self.copy).parameters())
        return [teacher for teacher, _ in self.adapter_pairs]

    def state_dict(self) -> dict[str, Any]:
        """Called on every process: under ZeRO-3 / FSDP2 the teacher's shards are gathered (full_state.py)."""
        weights = full_tensors(self._teacher_tensors, self._teacher_parameters(), self.zero3, keep=self.saves)
        return {"kind": self.kind, "updates": self.updates, "weights": weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["kind"] != self.kind:
            raise ValueError(f"The checkpoint's self-teacher is {state['kind']!r}, this trainer's is {self.kind!r}.")
        load_full_tensors(self._teacher_tensors, self._teacher_parameters(), self.zero3, state["weights"])
        self.updates = state["updates"]
