"""Bad input fails early: a tuning knob moved off its default while the feature it tunes is off would do nothing."""

from __future__ import annotations

from dataclasses import fields


def raise_for_ignored_settings(config, applies: dict[str, tuple[bool, str]]) -> None:
    """`applies` maps a field name to (whether it has an effect in `config`, the setting it needs). A field that
    has no effect and differs from its default raises, naming the field, its value, what it needs and the fix."""
    defaults = {f.name: f.default for f in fields(config)}
    for name, (used, needs) in applies.items():
        value = getattr(config, name)
        if not used and value != defaults[name]:
            raise ValueError(
                f"`{name}={value!r}` has no effect without {needs}. Set {needs} too, or leave `{name}` at its "
                f"default ({defaults[name]!r})."
            )
