"""Glue for the example scripts: run the embedded demo when no model is given, on a CPU when there is no GPU."""

from __future__ import annotations

import sys

import torch


def hardware_argv(argv: list[str] | None = None) -> list[str]:
    """Prepend `--use_cpu true --bf16 false` on a machine without CUDA (TRL configs default to bf16, which a
    CPU-only `TrainingArguments` rejects). The user's own flags come later on the command line and win."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if torch.cuda.is_available():
        return argv
    return ["--use_cpu", "true", "--bf16", "false", *argv]


def apply_demo_defaults(config, overrides: dict[str, object]) -> list[str]:
    """Set demo-sized values on `config` for every field the user left at its default; returns the changed names.

    "Default" is what a fresh config resolves to (e.g. `output_dir` becomes "trainer_output" in `__post_init__`).
    """
    fresh = type(config)(use_cpu=True, bf16=False)
    changed = []
    for name, value in overrides.items():
        if getattr(config, name) == getattr(fresh, name):
            setattr(config, name, value)
            changed.append(name)
    return changed
