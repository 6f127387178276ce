"""The example script runs as users run it: demo mode with no model arguments, flags and YAML on top."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_gndpo_example_demo_mode(tmp_path, student_path, teacher_path):
    config = tmp_path / "recipe.yaml"
    config.write_text(f"max_steps: 4\nlogging_steps: 2\noutput_dir: {tmp_path / 'out'}\nscore_clip: 4.0\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "gndpo.py"), "--config", str(config), "--per_device_train_batch_size",
         "8"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "demo task reward" in result.stdout
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.slow
def test_delight_example_demo_mode(tmp_path, student_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "delight.py"), "--max_steps", "3", "--logging_steps", "1",
         "--output_dir", str(tmp_path / "out")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "gate passed" in result.stdout and "skipped" in result.stdout
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.slow
def test_pgpo_example_demo_mode(tmp_path, self_teacher_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "pgpo.py"), "--max_steps", "3", "--logging_steps", "1",
         "--demo_misleading_feedback", "0.5", "--output_dir", str(tmp_path / "out")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "demo task reward" in result.stdout and "step multiplier m_k" in result.stdout
    assert (tmp_path / "out" / "model.safetensors").is_file()
