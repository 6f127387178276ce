"""Bad input fails early: values of the wrong kind in the fields a trl_ext config adds to GRPOConfig.

The configs' range checks compare with `<` and `>`, which NaN passes (every comparison with NaN is False), and an
infinite temperature, price or threshold trains without an error but learns nothing. A fractional step count or a
string for a flag fails later, inside `train()`, far from its cause. So before the range checks, every float field a
config adds must be a finite number, every int field an integer and every flag a bool; the CLI and YAML parsers
already convert, so these checks matter for configs built in Python.
"""

from __future__ import annotations

import json
import math
import typing
from dataclasses import fields

from trl import GRPOConfig

_GRPO_FIELDS = frozenset(f.name for f in fields(GRPOConfig))


def declared_kinds(config_cls: type, name: str) -> tuple[set[str], bool]:
    """The declared types of a field ('float | None' -> {'float'}) and whether None is allowed, read from the class
    annotations: `dataclasses.Field.type` is no record of them, since transformers' argument parser overwrites it
    (it unwraps `int | None` to `int` once any parser has been built for the class)."""
    annotation = next(cls.__dict__["__annotations__"][name] for cls in config_cls.__mro__
                      if name in cls.__dict__.get("__annotations__", {}))
    if isinstance(annotation, str):  # `from __future__ import annotations`
        parts = {part.strip() for part in annotation.split("|")}
    else:
        parts = {getattr(arg, "__name__", str(arg)) for arg in (typing.get_args(annotation) or (annotation,))}
    parts = {"None" if part == "NoneType" else part for part in parts}
    return parts - {"None"}, "None" in parts


def _kind_error(kind: str, value) -> str | None:
    """What is wrong with `value` for a field declared as `kind` ('float', 'int' or 'bool'), or None if it fits."""
    if kind == "bool":
        return None if isinstance(value, bool) else "must be True or False"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "must be a number" if kind == "float" else "must be an integer"
    if kind == "int" and not isinstance(value, int):
        return "must be an integer"
    if kind == "float" and not math.isfinite(value):
        return "must be a finite number"
    return None


def raise_for_bad_field_values(config) -> None:
    """Check every field of `config` that GRPOConfig does not have (its own and its mixins') against its declared
    type; raise naming the field, the value and the default to fall back on."""
    for f in fields(config):
        if f.name in _GRPO_FIELDS:
            continue  # GRPOConfig's fields are TRL's to check
        kinds, optional = declared_kinds(type(config), f.name)
        if len(kinds) != 1 or not kinds <= {"float", "int", "bool"}:
            continue  # strings, choices, dicts and lists have their own checks
        value = getattr(config, f.name)
        if value is None and optional:
            continue
        problem = _kind_error(next(iter(kinds)), value)
        if problem:
            none = " (or None)" if optional else ""
            raise ValueError(
                f"`{f.name}={value!r}` {problem}{none}. Set it to such a value (its default is {f.default!r})."
            )


def raise_for_bad_json(config, names: tuple[str, ...]) -> None:
    """A dict field given as a JSON string (CLI, YAML) must parse; transformers would raise a bare JSONDecodeError
    that names no field. Call before `GRPOConfig.__post_init__`, which parses them."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, str) and value.startswith("{"):
            try:
                json.loads(value)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"`{name}` is not valid JSON ({error}): got {value!r}. Pass a dict, or a JSON object such as "
                    '\'{"dtype": "bfloat16"}\' (keys and strings in double quotes).'
                ) from None
