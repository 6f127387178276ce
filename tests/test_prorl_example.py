"""examples/prorl.py runs as users run it: demo mode with no model arguments, flags and YAML on top."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_prorl_example_demo_mode(tmp_path, student_path):
    config = tmp_path / "recipe.yaml"
    config.write_text(f"max_steps: 4\nlogging_steps: 2\noutput_dir: {tmp_path / 'out'}\nref_reset_steps: 2\n"
                      "dynamic_sampling: filter\nsave_strategy: steps\nsave_steps: 4\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "prorl.py"), "--config", str(config),
         "--per_device_train_batch_size", "16", "--num_generations", "8"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    # The demo reuses each rollout for 4 optimizer steps: the reset requested at step 2 waits for the rollout
    # boundary after step 4 (the one requested at step 4 coincides with it).
    assert "reference resets 1 at steps [4]" in result.stdout
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert "ProRL" in (tmp_path / "out" / "README.md").read_text()
