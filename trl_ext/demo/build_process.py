"""Building a demo model in a process of its own when the caller is part of a distributed launch.

Under `torchrun` or `accelerate launch` the caller's environment (and often its already-initialized process group)
says "you are rank k of N". A `SFTTrainer` created there joins that group and waits for the other ranks, which are
meanwhile waiting on the cache's file lock: a hang. So inside a launch the build runs in a fresh Python process
whose environment has every launcher variable removed, which makes it an ordinary single-process run.

    python -m trl_ext.demo.build_process   # reads a pickled (recipe, tasks, out_dir) from stdin; used by pretrained.py

The recipe names its tasks, and a task registered at run time (`demo.register_task`, as the purification demo's
teachers do) exists only in the caller's registry, so the task objects travel with the recipe and the fresh process
registers them before building.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

# Variables through which torchrun / torchelastic, accelerate and MPI launchers tell a process it is one of many.
LAUNCHER_VARIABLES = frozenset({
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
    "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PMI_RANK", "PMI_SIZE", "MV2_COMM_WORLD_SIZE",
    "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_LOCAL_RANK",
})
LAUNCHER_PREFIXES = ("TORCHELASTIC_", "ACCELERATE_", "OMPI_COMM_WORLD_", "FSDP_")


def is_launcher_variable(name: str) -> bool:
    return name in LAUNCHER_VARIABLES or name.startswith(LAUNCHER_PREFIXES)


def inside_launch() -> bool:
    """True when this process was started by a (possibly single-process) launcher or has joined a process group."""
    import torch.distributed as dist

    return any(is_launcher_variable(name) for name in os.environ) or (dist.is_available() and dist.is_initialized())


def single_process_env() -> dict[str, str]:
    """This process's environment without the launcher variables, with this trl_ext importable."""
    env = {name: value for name, value in os.environ.items() if not is_launcher_variable(name)}
    package_parent = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
    return env


def build_in_subprocess(recipe, out_dir: Path) -> None:
    """Run `pretrained._build(recipe, out_dir)` in a fresh single-process Python; raise if it fails."""
    from .tasks import get_task

    tasks = [get_task(name) for name in recipe.tasks]
    command = [sys.executable, "-m", "trl_ext.demo.build_process"]
    result = subprocess.run(command, input=pickle.dumps((recipe, tasks, str(out_dir))), env=single_process_env())
    if result.returncode != 0:
        raise RuntimeError(
            f"Building the demo model {recipe.key()} in a subprocess failed (exit code {result.returncode}; its "
            f"output is above). Fix what it reports, or build the model once in a plain single process "
            f"(`python -c 'from trl_ext import demo; demo.pretrained_model(<recipe>)'`) and launch again."
        )


def _main() -> None:
    from .pretrained import _build
    from .tasks import register_task

    recipe, tasks, out_dir = pickle.load(sys.stdin.buffer)
    for task in tasks:
        register_task(task)
    _build(recipe, Path(out_dir))


if __name__ == "__main__":
    _main()
