"""Tiny pretrained models for the demo world, trained once with TRL's SFTTrainer and cached on disk.

A `Pretraining` recipe names everything that determines the weights (tasks, steps, seed, architecture, ...);
its hash, together with the source of the modules that build it and the versions of the libraries that train it
(`build_fingerprint`), is the cache key, so a model is built once per recipe, code and machine and reused by every
test, example and benchmark. Later methods add recipes, not machinery: a teacher good at another task, a teacher that is
confidently wrong on some inputs (`corrupt_fraction`), or a model that reads a worked solution or the environment's
feedback in its prompt (`privileged_fraction`: SFT rows whose prompt is the self-teacher's, from
`trl_ext.pgpo.context.teacher_prompt`, showing the correct answer).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from datasets import Dataset, concatenate_datasets
from filelock import FileLock

from ..pgpo.context import teacher_prompt
from .build_process import build_in_subprocess, inside_launch
from .models import TinyArchitecture, build_model
from .tasks import Task, get_task, question_text
from .tokenizer import build_tokenizer

DEMO_VERSION = 2  # bump when something outside BUILD_MODULES and TRAINING_LIBRARIES changes what a recipe produces

# What decides the weights a recipe trains into besides the recipe itself. Their source and versions are part of the
# cache key: a cache keyed by the recipe alone kept serving models that earlier code had built, and benchmark
# references started from models that the code of their own commit could not rebuild (benchmarks/README.md,
# "Reproducibility"). An edit to one of these files (a comment too) rebuilds the demo models once.
BUILD_MODULES = ("trl_ext.demo.pretrained", "trl_ext.demo.tasks", "trl_ext.demo.tokenizer", "trl_ext.demo.models",
                 "trl_ext.pgpo.context")
TRAINING_LIBRARIES = ("torch", "transformers", "trl", "accelerate", "datasets", "tokenizers")


def cache_root() -> Path:
    """`$TRL_EXT_CACHE`, else `$XDG_CACHE_HOME/trl_ext`, else `~/.cache/trl_ext`."""
    if os.environ.get("TRL_EXT_CACHE"):
        return Path(os.environ["TRL_EXT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "trl_ext"


@dataclass(frozen=True)
class Pretraining:
    """A recipe for a tiny pretrained model. `steps=0` gives the untrained (randomly initialised) model."""

    tasks: tuple[str, ...] = ("arithmetic",)
    steps: int = 300
    learning_rate: float = 3e-3
    batch_size: int = 32
    num_examples: int = 2000
    seed: int = 0
    corrupt_fraction: float = 0.0  # share of training answers replaced by a wrong one (an unreliable teacher)
    # Share of prompts replaced by a self-teacher's prompt that shows the correct answer, half of them as a worked
    # solution and half as the environment's feedback (a model that reads privileged context).
    privileged_fraction: float = 0.0
    architecture: TinyArchitecture = field(default_factory=TinyArchitecture)

    def key(self) -> str:
        # The tasks' full settings, not just their names, determine the training data.
        tasks = [repr(get_task(name)) for name in self.tasks]
        payload = json.dumps({"demo_version": DEMO_VERSION, "build": build_fingerprint(), "task_settings": tasks,
                              **asdict(self)}, sort_keys=True)
        name = "untrained" if self.steps == 0 else "-".join(self.tasks)
        return f"{name}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"


def code_fingerprint(module_names, libraries=()) -> str:
    """sha256 prefix of the named modules' source files and the installed versions of `libraries`."""
    from importlib.metadata import PackageNotFoundError, version

    digest = hashlib.sha256()
    for name in module_names:
        digest.update(name.encode() + b"\0" + Path(importlib.import_module(name).__file__).read_bytes() + b"\0")
    for library in libraries:
        try:
            installed = version(library)
        except PackageNotFoundError:
            installed = "absent"
        digest.update(f"{library}=={installed}\0".encode())
    return digest.hexdigest()[:12]


@functools.cache
def build_fingerprint() -> str:
    """The fingerprint of BUILD_MODULES and TRAINING_LIBRARIES in this process (they do not change while it runs)."""
    return code_fingerprint(BUILD_MODULES, TRAINING_LIBRARIES)


def untrained(seed: int = 0, architecture: TinyArchitecture = TinyArchitecture()) -> Pretraining:
    return Pretraining(tasks=(), steps=0, seed=seed, architecture=architecture)


def pretrained_model(recipe: Pretraining, cache_dir: str | Path | None = None) -> str:
    """Path of the model (weights + tokenizer) built by `recipe`, training it first if it is not cached.

    Safe under concurrent processes (e.g. two torchrun ranks): one builds, the others wait on a file lock. Inside a
    distributed launch the build runs in a single-process subprocess (`build_process.py`), never in the caller's
    process group.
    """
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    key = recipe.key()
    target = root / key
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").is_file():
            # Only the lock holder builds this recipe, so any staging directory of it is a killed build's leftover.
            for stale in root.glob(f".building-{key}-*"):
                shutil.rmtree(stale, ignore_errors=True)
            # mkdir (not mkdtemp, which makes 0700 directories) so the cache honours the umask like any download.
            staging = root / f".building-{key}-{os.getpid()}"
            staging.mkdir()
            try:
                if inside_launch():
                    build_in_subprocess(recipe, staging)
                else:
                    _build(recipe, staging)
                shutil.rmtree(target, ignore_errors=True)
                staging.rename(target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def sft_dataset(recipe: Pretraining) -> Dataset:
    """Prompt-completion rows for the recipe's tasks.

    A `corrupt_fraction` of answers is replaced by wrong ones; a `privileged_fraction` of prompts is rewritten into
    the self-teacher's prompt showing the correct answer (as a solution or as feedback, evenly).
    """
    parts = []
    for name in recipe.tasks:
        task = get_task(name)
        rows = task.dataset(recipe.num_examples, seed=recipe.seed + 10_000)  # disjoint from examples' seeds
        parts.append(rows)
    data = concatenate_datasets(parts).shuffle(seed=recipe.seed)
    rng = random.Random(recipe.seed)

    def to_sft(row):
        task, prompt, answer = get_task(row["task"]), row["prompt"], row["answer"]
        if rng.random() < recipe.privileged_fraction:
            prompt = privileged_prompt(task, prompt, answer, as_solution=rng.random() < 0.5)
        if rng.random() < recipe.corrupt_fraction:
            answer = task.wrong_answer(answer, rng)
        return {"prompt": prompt, "completion": [{"role": "assistant", "content": answer}]}

    return data.map(to_sft, remove_columns=["task", "answer"])


def privileged_prompt(task: Task, prompt, shown_answer: str, as_solution: bool):
    """The self-teacher's prompt for `prompt`, showing `shown_answer` as a worked solution or as the feedback."""
    question = question_text(prompt)
    if as_solution:
        return teacher_prompt(prompt, solution=task.solution(question, shown_answer), feedback=None)
    return teacher_prompt(prompt, solution=None, feedback=task.feedback(question, shown_answer))


def _build(recipe: Pretraining, out_dir: Path) -> None:
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, recipe.architecture, seed=recipe.seed)
    if recipe.steps > 0:
        _sft(model, tokenizer, recipe, out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "trl_ext_recipe.json").write_text(json.dumps(asdict(recipe), indent=2))


def _sft(model, tokenizer, recipe: Pretraining, out_dir: Path) -> None:
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=str(out_dir / "sft"),
        max_steps=recipe.steps,
        per_device_train_batch_size=recipe.batch_size,
        learning_rate=recipe.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=min(20, recipe.steps // 10),
        weight_decay=0.0,
        seed=recipe.seed,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        logging_steps=max(1, recipe.steps // 5),
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=sft_dataset(recipe), processing_class=tokenizer)
    trainer.train()
    shutil.rmtree(out_dir / "sft", ignore_errors=True)
