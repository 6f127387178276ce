"""Shared fixtures: the embedded demo world (built once, cached) and CPU-sized trainer configs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from trl_ext import demo  # noqa: E402

torch.set_num_threads(1)  # tiny models: a 2-thread pool spinning on a shared 2-core machine is far slower


@pytest.fixture(scope="session")
def teacher_path() -> str:
    """The demo teacher (arithmetic, SFT-trained once and cached)."""
    return demo.teacher_path("arithmetic")


@pytest.fixture(scope="session")
def student_path() -> str:
    """The demo's weak student."""
    return demo.student_path("arithmetic")


@pytest.fixture(scope="session")
def self_teacher_path() -> str:
    """The demo's self-teacher: weak alone, reads a solution or feedback shown in its prompt."""
    return demo.self_teacher_path("arithmetic")


@pytest.fixture(scope="session")
def other_vocab_path(tmp_path_factory) -> str:
    """A tiny model whose vocabulary is larger than the demo tokenizer's (for the mismatch error)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("other_vocab")
    config = LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def arithmetic_dataset():
    return demo.get_task("arithmetic").dataset(64, seed=3)


def cpu_config(config_cls, output_dir, **overrides):
    """A config sized for a 2-core CPU test: a couple of fast steps, nothing saved or reported."""
    settings = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        max_steps=2,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=4,
        learning_rate=1e-2,
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    settings.update(overrides)
    return config_cls(**settings)


def postprocessed_rollouts(trainer) -> list[dict]:
    """Spy on `trainer`'s post-rollout hook: returns the list it fills with a copy of each rollout's tensors as the
    hook (the trainer's own and its mixins') leaves them, i.e. as TRL's loss will get them."""
    rollouts: list[dict] = []
    original = trainer._postprocess_rollout

    def spy(inputs, rollout):
        rollout = original(inputs, rollout)
        rollouts.append({k: v.clone() for k, v in rollout.items() if isinstance(v, torch.Tensor)})
        return rollout

    trainer._postprocess_rollout = spy
    return rollouts


def steps_run_by(trainer) -> list[int]:
    """Attach a callback to `trainer` and return the list it fills with the global step after each optimizer step
    of this run: a resumed run lists only the steps it ran itself (a fresh one would start at 1)."""
    from transformers import TrainerCallback

    steps: list[int] = []

    class StepsRun(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps.append(state.global_step)

    trainer.add_callback(StepsRun())
    return steps


DISTRIBUTED_SCRIPTS = Path(__file__).parent / "distributed"


def end_distributed_run() -> None:
    """Called by tests/distributed/* scripts last, once their results are in files: wait for both ranks, shut the
    process group down, and leave without the interpreter's teardown. During that teardown a process can abort
    ("terminate called without an active exception", SIGABRT: a C++ thread of gloo / the device mesh destroyed while
    still joinable) after its work is done, which failed about one run in seven for nothing."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def torchrun(script: str, *args: str, timeout: int = 300) -> None:
    """Run tests/distributed/<script> as two real processes (torchrun, gloo on CPU); fail with their output.

    `accelerate launch --cpu --num_processes 2` would silently start one process, so tests use torchrun.
    """
    tests = Path(__file__).parent
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(tests.parent), str(tests), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(DISTRIBUTED_SCRIPTS / script), *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


def four_bit_config():
    """QLoRA's 4-bit base (NF4, float32 compute: CPU). bitsandbytes >= 0.45 runs it on CPU; it is in the `test` extra."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


def is_quantized(model) -> bool:
    """True when the model holds bitsandbytes 4-bit layers."""
    return any("Linear4bit" in type(m).__name__ for m in model.modules())


# GNDPO with the Kondo gate mixed in, as README's "gate any trainer" section composes it (used by several tests).
from dataclasses import dataclass  # noqa: E402

from trl_ext import GNDPOConfig, GNDPOTrainer  # noqa: E402
from trl_ext.delight import KondoGateArguments, KondoGateMixin  # noqa: E402


@dataclass
class GatedGNDPOConfig(KondoGateArguments, GNDPOConfig):
    pass


class GatedGNDPOTrainer(KondoGateMixin, GNDPOTrainer):
    pass


class ToolOnlyEnvironment:
    """An `environment_factory` environment with one tool and no `get_reward`: no reward source."""

    def reset(self, **kwargs):
        return None

    def add(self, a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: first
            b: second
        """
        return a + b
