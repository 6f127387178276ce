"""Building a demo model inside a distributed launch: one build, in a process of its own, and no hang."""

import pytest

from conftest import torchrun
from trl_ext import demo


@pytest.mark.slow
def test_two_ranks_build_a_cold_demo_recipe_once(tmp_path):
    # The task exists only in the launched script's registry: before the second fix the build process did not know
    # it. Before the first fix rank 0 SFT-trained inside the process group while rank 1 waited on the cache's file
    # lock: a hang.
    torchrun("demo_build_two_ranks.py", str(tmp_path), timeout=180)
    demo.register_task(demo.Arithmetic(name="arithmetic-registered-at-run-time", max_operand=3))
    recipe = demo.Pretraining(tasks=("arithmetic-registered-at-run-time",), steps=2, batch_size=4, num_examples=16,
                              seed=5)
    paths = {(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)}
    assert paths == {str(tmp_path / recipe.key())}
    assert (tmp_path / recipe.key() / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".building-*"))  # the staging directory was renamed or removed
