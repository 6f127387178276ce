"""The wheel ships every subpackage and the model-card templates."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_every_subpackage_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "trl_ext").rglob("__init__.py")}
    assert on_disk | {"trl_ext.model_cards"} == listed


def test_every_trainer_has_a_card_template():
    from trl_ext import DelightTrainer, GNDPOTrainer, PGPOTrainer, ProRLTrainer, PurifiedDistillTrainer
    from trl_ext.core.model_card import template_path

    for trainer in (GNDPOTrainer, PGPOTrainer, DelightTrainer, ProRLTrainer, PurifiedDistillTrainer):
        assert template_path(trainer._card_template).is_file()


def test_requires_python_is_what_our_dependencies_require():
    # trl 1.16 and transformers 5 need Python >= 3.11: a lower floor here would let pip install a broken set.
    from importlib.metadata import metadata

    from packaging.version import Version

    def floor(spec: str) -> Version:
        return Version(re.search(r">=\s*([\d.]+)", spec).group(1))

    ours = floor(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"])
    for dist in ("trl", "transformers"):
        assert ours >= floor(metadata(dist)["Requires-Python"]), (dist, metadata(dist)["Requires-Python"])
    assert f"Python >= {ours}" in (ROOT / "README.md").read_text()


def test_ci_runs_the_readmes_test_command():
    """.ci/run must install from scratch and run the README's test command, so the two may not drift apart."""
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci_lines[-1] in (ROOT / "README.md").read_text()
