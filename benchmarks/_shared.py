"""Common scaffolding of the benchmark scripts: quiet logging, version stamps, seed parsing, worker processes and
atomic JSON output."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import warnings
from pathlib import Path


def offline_environment() -> None:
    """No Hub access, no telemetry, no tokenizer thread pools (environment defaults; call before the Hugging Face
    libraries are imported)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def quiet() -> None:
    """Silence progress bars and deprecation chatter so the benchmark's own lines stay readable."""
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    for name in ("trl", "accelerate", "datasets", "transformers", "bitsandbytes", "trl_ext"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import datasets

        datasets.disable_progress_bars()
    except Exception:  # pragma: no cover - older datasets
        pass


def versions() -> dict:
    """Python and the installed versions of the stack (packages not installed are left out), trl_ext's, and what
    makes the demo world on this machine what it is (`demo_world`)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "trl", "accelerate", "peft", "datasets"):
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            pass
    import trl_ext

    found["trl_ext"] = trl_ext.__version__
    found["demo_world"] = demo_world()
    return found


def demo_world() -> dict:
    """The CPU kernels torch dispatches to and a fingerprint of each current demo model in the cache.

    The demo models are trained on the CPU at first use, and their weights depend on its vector instructions (the
    arithmetic self-teacher built with AVX2 kernels and with `ATEN_CPU_CAPABILITY=default` differs by up to 0.47 in a
    weight); a benchmark's results move with them. Two reports compare like for like only where the fingerprints of
    the models they used agree (the recipe's name is in the key). Entries that earlier code built under keys this code
    no longer produces are counted, not listed: no run of this code can have used them.
    """
    import torch

    from trl_ext.demo.cache_inventory import built_models, is_current

    built = built_models()
    current = [entry for entry in built if is_current(entry)]
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "models": {entry.name: weights_sha256(entry)[:16] for entry in current},
            "stale_cache_entries_not_listed": len(built) - len(current)}


def weights_sha256(model_dir: str | Path | None) -> str | None:
    """sha256 of a model directory's weights (`model.safetensors`), or None when they are not on disk."""
    import hashlib

    weights = Path(model_dir) / "model.safetensors" if model_dir else None
    if weights is None or not weights.is_file():
        return None
    return hashlib.sha256(weights.read_bytes()).hexdigest()


def parse_seeds(text: str) -> list[int]:
    """'3' -> [0, 1, 2]; '0,4,7' (or '5,') -> an explicit list."""
    text = text.strip()
    if "," in text:
        return [int(s) for s in text.split(",") if s.strip()]
    count = int(text)
    if count < 1:
        raise argparse.ArgumentTypeError("--seeds needs at least one seed")
    return list(range(count))


def paired_differences(differences) -> dict:
    """Mean, standard error and sign count of per-seed differences (method minus baseline, same seed).

    Pairing by seed removes what the seeds share (the initial model, the prompt order), so the standard error of the
    differences is the one to judge a gap by, not the two unpaired spreads."""
    import numpy as np

    d = np.asarray(differences, dtype=float)
    error = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    return {"mean": float(d.mean()), "standard_error": error, "seeds_ahead": int((d > 0).sum()), "seeds": len(d),
            "per_seed": d.tolist()}


def round_floats(obj, digits: int = 6):
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}") if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): round_floats(v, digits) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [round_floats(v, digits) for v in obj]
    return obj


def write_json(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(round_floats(obj), indent=1))
    os.replace(tmp, path)


_WORKER_EVALUATOR = None


def worker_evaluator(threads: int, build):
    """In a spawned worker process: quiet logging, `threads` torch threads, and one evaluator per process, built by
    `build()` on first use (evaluators hold tokenized prompts, so they are built once, not per run)."""
    global _WORKER_EVALUATOR
    import torch

    quiet()
    torch.set_num_threads(threads)
    if _WORKER_EVALUATOR is None:
        _WORKER_EVALUATOR = build()
    return _WORKER_EVALUATOR


def map_in_processes(run_one, jobs: list, workers: int):
    """Yields run_one(job) for every job as it finishes, `workers` at a time in spawned processes (spawn, not fork:
    a forked torch process can deadlock). run_one must be a module-level function and jobs picklable."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap_unordered(run_one, jobs)
