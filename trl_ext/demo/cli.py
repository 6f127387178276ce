"""Argument parsing for the example scripts: TRL-script style, with defaults that fit the machine and the demo.

Defaults are layered under the user's values: our defaults < `--config` YAML < command line. On a machine without
CUDA the default is `use_cpu=True, bf16=False` (TRL configs default to bf16, which a CPU-only run rejects). With no
`--model_name_or_path` the script runs the embedded demo, and demo-sized training settings become the defaults.
"""

from __future__ import annotations

import sys

import torch
from trl import ModelConfig, TrlParser


def _parser(dataclass_types, defaults: dict) -> TrlParser:
    parser = TrlParser(dataclass_types)
    if not torch.cuda.is_available():
        defaults = {"use_cpu": True, "bf16": False, **defaults}
    parser.set_defaults(**defaults)
    return parser


def parse_example_args(dataclass_types, demo_settings: dict, argv: list[str] | None = None) -> tuple:
    """Parse (script, config, ModelConfig) arguments; in demo mode with `demo_settings` as defaults.

    The config's derived fields (e.g. `steps_per_generation` from `gradient_accumulation_steps`) are computed by its
    `__post_init__` from the final values, so demo defaults behave exactly like user-given ones.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parsed = _parser(dataclass_types, {}).parse_args_and_config(args=argv)
    model_args = next(a for a in parsed if isinstance(a, ModelConfig))
    if model_args.model_name_or_path is not None:
        return parsed
    return _parser(dataclass_types, demo_settings).parse_args_and_config(args=argv)
