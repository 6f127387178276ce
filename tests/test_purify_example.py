"""The example script runs as users run it: demo mode, flags and YAML on top (cheap teachers, a few steps)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_purified_distill_example_demo_mode(tmp_path, student_path, teacher_path):
    config = tmp_path / "recipe.yaml"
    config.write_text(
        f"max_steps: 3\nlogging_steps: 1\noutput_dir: {tmp_path / 'out'}\npurification: classifier_router\n"
        f"router_min_examples: 1\nteacher_model_names_or_paths:\n  - {teacher_path}\n  - {student_path}\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "purified_distill.py"), "--config", str(config),
         "--per_device_train_batch_size", "8", "--num_generations", "4", "--demo_train_size", "64"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "demo task reward" in result.stdout and "teacher shares" in result.stdout
    assert (tmp_path / "out" / "model.safetensors").is_file()
