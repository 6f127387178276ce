"""Frozen teacher models: loading and preparation for every launch mode (vocabulary checks: vocabulary.py).

A teacher is given as a Hub id, a local path, or an instantiated `PreTrainedModel`. It is prepared the way
GRPOTrainer prepares its reference model: sharded with DeepSpeed ZeRO-3 or FSDP when those are on,
otherwise placed on the device without a DDP wrapper. It never trains: gradients off, eval mode, dropout off.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import PreTrainedModel

from .. import _compat


def is_zero3(trainer) -> bool:
    """Whether DeepSpeed ZeRO-3 shards the trainer's models (a copy of one would then hold only empty shards)."""
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return plugin is not None and plugin.zero_stage == 3


def teacher_display_name(teacher: str | PreTrainedModel) -> str:
    if isinstance(teacher, str):
        return teacher
    return _compat.get_config_model_id(teacher.config) or type(teacher).__name__


def given_once(given, configured, given_arg: str, config_field: str):
    """The teacher (or list of teachers) passed to the trainer, else the one named in the config. Both at once is an
    error unless they are the same: one of them would otherwise be silently ignored. A path given as an
    `os.PathLike` is taken as its string, as `from_pretrained` would take it."""
    if isinstance(given, list):
        given = [os.fspath(t) if isinstance(t, os.PathLike) else t for t in given]
    elif isinstance(given, os.PathLike):
        given = os.fspath(given)
    if given is not None and configured and given != configured:
        plural = isinstance(given, list)
        shown = [teacher_display_name(t) for t in given] if plural else teacher_display_name(given)
        raise ValueError(
            f"The {'teachers are' if plural else 'teacher is'} given twice and {'differ' if plural else 'differs'}: "
            f"`{given_arg}` is {shown!r} and `{config_field}` in the config is {configured!r}. Give "
            f"{'them' if plural else 'it'} in one place only."
        )
    return given if given is not None else configured


def load_teacher(
    teacher: str | PreTrainedModel, init_kwargs: dict[str, Any] | None, args, default_dtype=None
) -> PreTrainedModel:
    """Instantiate a teacher from an id/path (with `init_kwargs`) or take the given instance, and freeze it.

    A teacher loaded from a path takes the student's dtype unless `init_kwargs` says otherwise, as GRPOTrainer
    does for its reference model.
    """
    if isinstance(teacher, str):
        kwargs = dict(init_kwargs or {})
        if default_dtype is not None:
            kwargs.setdefault("dtype", default_dtype)
        # Multi-process training needs device_map=None ("auto" would spread one copy over all GPUs).
        if args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED", "FSDP"):
            kwargs["device_map"] = None
        kwargs.setdefault("trust_remote_code", args.trust_remote_code)
        model = _compat.create_model_from_path(teacher, **kwargs)
    elif isinstance(teacher, PreTrainedModel):
        if init_kwargs:
            raise ValueError(
                "`teacher_model_init_kwargs` only applies when the teacher is loaded from an id or a path, but an "
                "instantiated teacher model was passed. Remove `teacher_model_init_kwargs`, or pass the teacher's "
                "path instead of the model."
            )
        model = teacher
    else:
        raise TypeError(
            f"A teacher must be a model id, a local path or a transformers PreTrainedModel, got {type(teacher)!r}."
        )
    model.requires_grad_(False)
    model.eval()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def prepare_teacher(model: PreTrainedModel, trainer, temperature: float) -> torch.nn.Module:
    """Attach TRL's fused log-prob head and place/shard the teacher like GRPOTrainer's reference model."""
    _compat.add_fused_lm_head(model, temperature=temperature, cast_lm_head_to_fp32=trainer.args.cast_lm_head_to_fp32)
    if trainer.is_deepspeed_enabled:
        return _compat.prepare_deepspeed(model, trainer.accelerator)
    if trainer.is_fsdp_enabled:
        return _compat.prepare_fsdp(model, trainer.accelerator)
    return trainer.accelerator.prepare_model(model, evaluation_mode=True)
