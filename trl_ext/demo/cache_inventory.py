"""Which entries of the demo model cache the current code would build, and which are leftovers.

The cache key hashes the recipe with the code and library versions that build it (`pretrained.build_fingerprint`),
so an edit to that code leaves the models built before it in the cache under keys nothing asks for any more. A
report that lists the models a run could have used should list only the current ones. The key cannot be decoded, but
every entry stores its recipe (`trl_ext_recipe.json`): an entry is current when that recipe, keyed by this code,
names the entry's own directory.

This module is deliberately not in `pretrained.BUILD_MODULES`: it reads the cache and never changes what a recipe
builds, so editing it must not rebuild every demo model.
"""

from __future__ import annotations

import json
from pathlib import Path

from .models import TinyArchitecture
from .pretrained import Pretraining, cache_root

RECIPE_FILE = "trl_ext_recipe.json"


def stored_recipe(entry: Path) -> Pretraining | None:
    """The recipe an entry was built from, or None when it cannot be read back with this code (no recipe file, or
    fields this version of `Pretraining` does not have)."""
    path = entry / RECIPE_FILE
    if not path.is_file():
        return None
    try:
        fields = json.loads(path.read_text())
        architecture = TinyArchitecture(**fields.pop("architecture"))
        return Pretraining(**{**fields, "tasks": tuple(fields["tasks"]), "architecture": architecture})
    except (TypeError, KeyError, ValueError):
        return None


def is_current(entry: Path) -> bool:
    """True when the current code keys the entry's own recipe to the entry's directory name.

    A recipe on a task variant that this process has not registered (`demo.register_task`) cannot be keyed and counts
    as not current here; the process that registered it (e.g. a benchmark run with `--length`) sees it as current.
    """
    recipe = stored_recipe(entry)
    if recipe is None:
        return False
    try:
        return recipe.key() == entry.name
    except ValueError:  # an unregistered task variant
        return False


def built_models(root: str | Path | None = None) -> list[Path]:
    """Every built model in the cache (`root`, default `cache_root()`), current or not, sorted by name; staging
    directories of builds in progress (`.building-*`) are left out."""
    root = Path(root) if root is not None else cache_root()
    entries = (weights.parent for weights in root.glob("*/model.safetensors"))
    return sorted(entry for entry in entries if not entry.name.startswith("."))


def current_models(root: str | Path | None = None) -> list[Path]:
    """The built models in the cache that the current code would build under the same key, sorted by name."""
    return [entry for entry in built_models(root) if is_current(entry)]
