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


def run_example(script: str, *flags: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "examples" / script), *flags], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_gndpo_example_real_run_with_rewards_from_the_working_directory_and_eval(tmp_path, student_path,
                                                                                  teacher_path):
    # A "real" run on local files: a dataset directory with train/test splits, a reward module next to where the
    # script is launched (imported as TRL's grpo.py does), a TRL reward by its registry name, and evaluation on the
    # test split.
    from trl_ext import demo

    data = tmp_path / "data"
    data.mkdir()
    task = demo.get_task("arithmetic")
    task.dataset(16, seed=1).to_json(data / "train.jsonl")
    task.dataset(8, seed=2).to_json(data / "test.jsonl")
    (tmp_path / "my_rewards.py").write_text(
        "from trl_ext import demo\n\n\ndef task_reward(completions, **kwargs):\n"
        "    return demo.task_reward(completions, **kwargs)\n")
    result = run_example(
        "gndpo.py", "--model_name_or_path", student_path, "--teacher_model_name_or_path", teacher_path,
        "--dataset_name", str(data), "--reward_funcs", "my_rewards.task_reward", "think_format_reward",
        "--max_steps", "2", "--logging_steps", "1", "--per_device_train_batch_size", "8", "--num_generations", "4",
        "--max_completion_length", "4", "--eval_strategy", "steps", "--eval_steps", "2",
        "--per_device_eval_batch_size", "8", "--save_strategy", "no", "--report_to", "none",
        "--output_dir", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    for reward in ("task_reward", "think_format_reward"):
        assert f"'eval_rewards/{reward}/mean'" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("script", ["delight.py", "pgpo.py"])
def test_example_demo_mode_evaluates_on_held_out_prompts(tmp_path, script, student_path, self_teacher_path):
    result = run_example(script, "--max_steps", "2", "--logging_steps", "1", "--per_device_train_batch_size", "16",
                         "--eval_strategy", "steps", "--eval_steps", "2", "--demo_eval_size", "8",
                         "--per_device_eval_batch_size", "16", "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "'eval_reward'" in result.stdout


def test_example_demo_mode_refuses_a_dataset_it_would_ignore(tmp_path):
    result = run_example("gndpo.py", "--dataset_name", "trl-lib/DeepMath-103K", "--output_dir", str(tmp_path))
    assert result.returncode != 0 and "only apply to a run on real models" in result.stderr
