"""Every trainer's example under the accelerate back-ends the README documents, on the GPUs of this machine:
DeepSpeed ZeRO-2, ZeRO-3 and FSDP2 with the configs in examples/accelerate_configs (bf16, as they say), one process
per GPU. Each run trains, checkpoints and saves; the trainer state in its checkpoints (PGPO's EMA teacher, the Kondo
gate's price history, routers, reset counters) must hold full tensors, not ZeRO-3's empty shards. A second run stops
at step 1 and resumes from that checkpoint (scattering the state back into the sharded modules); its state at step 2
must match the uninterrupted run's, within GPU nondeterminism (bit-exact resumes are tested on CPU). CI has no GPU:
these skip there (and the DeepSpeed ones wherever DeepSpeed is not installed)."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ROOT = Path(__file__).parent.parent
BACKENDS = ["deepspeed_zero2", "deepspeed_zero3", "fsdp2"]
# Each example's metric prefix, and settings that keep a 3-step run small.
EXAMPLES = {
    "gndpo": ("gndpo/", []),
    "pgpo": ("pgpo/", []),
    "delight": ("delight/", []),
    "purified_distill": ("purify/", []),
    "prorl": ("prorl/", ["--ref_reset_steps", "1", "--steps_per_generation", "1"]),  # a reset every step
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(backend: str, example: str, output_dir: Path, *args: str) -> subprocess.CompletedProcess:
    script = ROOT / "examples" / f"{example}.py"
    defaults = ["--output_dir", str(output_dir), "--logging_steps", "1", "--demo_train_size", "512",
                "--save_strategy", "steps", "--save_steps", "1", "--disable_tqdm", "true", *EXAMPLES[example][1]]
    return accelerate_launch(backend, script, *defaults, *args)


def accelerate_launch(backend: str, script: Path, *args: str) -> subprocess.CompletedProcess:
    if backend.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed")
    path = [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    # free_port() releases the port before the launcher binds it; under pytest-xdist another launch (or an outgoing
    # connection's ephemeral port) can take it in between. The launcher then fails at its rendezvous, before any
    # training, and the launch is retried on a fresh port.
    for _ in range(3):
        command = [sys.executable, "-m", "accelerate.commands.launch",
                   "--config_file", str(ROOT / "examples" / "accelerate_configs" / f"{backend}.yaml"),
                   "--num_processes", str(torch.cuda.device_count()), "--main_process_port", str(free_port()),
                   str(script), *args]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
        if result.returncode == 0 or "EADDRINUSE" not in result.stderr:
            return result
    return result


def succeeded(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]


def logged(checkpoint: Path) -> list[dict]:
    return json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]


def saved_state(checkpoint: Path) -> dict:
    path = checkpoint / "trl_ext_state.pt"
    return torch.load(path, map_location="cpu", weights_only=False) if path.exists() else {}


def assert_close_state(a, b, where: str = "") -> None:
    """Same structure, full (non-empty) tensors, values equal up to GPU nondeterminism."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_close_state(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, torch.Tensor):
        assert a.numel() > 0 and a.shape == b.shape, (where, a.shape, b.shape)
        if a.is_floating_point():
            torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-3, msg=where)
        else:
            assert torch.equal(a, b), where
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close_state(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-2, abs=1e-3), where
    else:
        assert a == b, where


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("example", list(EXAMPLES))
def test_example_trains_checkpoints_and_resumes(tmp_path, backend, example):
    prefix = EXAMPLES[example][0]
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    succeeded(launch(backend, example, first, "--max_steps", "2"))
    history = logged(first / "checkpoint-2")
    metrics = {k: v for entry in history for k, v in entry.items() if k.startswith(prefix)}
    assert metrics, f"no {prefix} metrics in {history}"
    # None: TRL's "undefined in this logging window" (e.g. router accuracy with no decisive prompt).
    assert all(torch.isfinite(torch.tensor(float(v))) for v in metrics.values() if v is not None), metrics
    assert any(p.name.endswith(".safetensors") for p in first.iterdir()), sorted(p.name for p in first.iterdir())

    # Resume from step 1 in another directory: the state saved at step 1 is restored and step 2 is retrained.
    succeeded(launch(backend, example, resumed, "--max_steps", "1"))
    succeeded(launch(backend, example, resumed, "--max_steps", "2",
                     "--resume_from_checkpoint", str(resumed / "checkpoint-1")))
    assert json.loads((resumed / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2
    assert_close_state(saved_state(first / "checkpoint-2"), saved_state(resumed / "checkpoint-2"))


@pytest.mark.parametrize("variant", ["full", "lora"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_reset_of_a_sharded_model(tmp_path, backend, variant):
    """pi_ref <- pi_theta under ZeRO-2/3 and FSDP2: after each reset the gathered reference equals the gathered
    policy, the optimizer state is empty, and the next step's KL (policy vs the reset reference) is zero."""
    succeeded(accelerate_launch(backend, ROOT / "tests" / "distributed" / "prorl_reset_sharded.py", str(tmp_path),
                                variant))
    result = json.loads((tmp_path / "result.json").read_text())
    assert [h["step"] for h in result["history"]] == [1, 2, 3]
    for reset in result["resets"]:
        assert reset["parameters"] > 0 and reset["optimizer_state_entries"] == 0, reset
        assert reset["max_abs_difference"] == 0.0, reset
    assert result["kl"][1:] == pytest.approx([0.0, 0.0], abs=1e-4), result["kl"]
