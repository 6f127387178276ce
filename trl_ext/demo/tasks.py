"""Synthetic tasks with verifiable rewards, as `datasets.Dataset`s with a conversational `prompt` column.

Every row also carries `task` (the task's name) and `answer` (the exact target completion), so one reward
function, `task_reward`, scores rows of any task, including mixtures. Tasks know their own worked solution
(`solution`) for tasks that give a model privileged context (self-distillation), and every split is seeded,
so train and evaluation prompts are reproducible.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from datasets import Dataset


@dataclass(frozen=True)
class Task:
    """A task: a question generator, its exact answer, and a reward in [0, 1]."""

    name: str

    def sample(self, rng: random.Random) -> tuple[str, str]:
        """One (question, answer) pair."""
        raise NotImplementedError

    def reward(self, completion: str, answer: str) -> float:
        return float(completion.strip() == answer)

    def solution(self, question: str, answer: str) -> str:
        """A worked solution to show in a prompt (self-distillation); by default the answer itself."""
        return answer

    def dataset(self, num_rows: int, seed: int = 0) -> Dataset:
        rng = random.Random(f"{self.name}-{seed}")
        rows = [self.sample(rng) for _ in range(num_rows)]
        return Dataset.from_dict(
            {
                "prompt": [[{"role": "user", "content": q}] for q, _ in rows],
                "task": [self.name] * num_rows,
                "answer": [a for _, a in rows],
            }
        )


@dataclass(frozen=True)
class Arithmetic(Task):
    """Small-number addition: "3+4=" -> "7"."""

    name: str = "arithmetic"
    max_operand: int = 9

    def sample(self, rng: random.Random) -> tuple[str, str]:
        a, b = rng.randint(0, self.max_operand), rng.randint(0, self.max_operand)
        return f"{a}+{b}=", str(a + b)


@dataclass(frozen=True)
class Reversal(Task):
    """Token reversal, as in the Kondo-gate paper: H symbols over an alphabet of M, answer reversed.

    The reward is the fraction of the H positions answered correctly (egg's per-position accuracy), so it is
    dense; "success" is an exact reversal.
    """

    name: str = "reversal"
    length: int = 5
    alphabet_size: int = 3

    @property
    def alphabet(self) -> str:
        return "abcdefghijklmnopqrstuvwxyz"[: self.alphabet_size]

    def sample(self, rng: random.Random) -> tuple[str, str]:
        word = "".join(rng.choice(self.alphabet) for _ in range(self.length))
        return f"rev {word}", word[::-1]

    def reward(self, completion: str, answer: str) -> float:
        produced = completion.strip()
        return sum(p == a for p, a in zip(produced, answer)) / len(answer)


TASKS: dict[str, Task] = {task.name: task for task in (Arithmetic(), Reversal())}


def register_task(task: Task) -> Task:
    """Make a task variant (e.g. `Reversal(name="reversal-h8", length=8)`) available by name to datasets, rewards
    and pretraining recipes. Re-registering a name with different settings is an error: cached models and dataset
    rows refer to tasks by name."""
    existing = TASKS.get(task.name)
    if existing is not None and existing != task:
        raise ValueError(f"A different task is already registered as {task.name!r}: {existing!r}.")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"Unknown demo task {name!r}; available: {sorted(TASKS)}.")
    return TASKS[name]


def completion_text(completion) -> str:
    """The text of a completion, conversational (list of messages) or plain."""
    if isinstance(completion, list):
        return completion[-1]["content"] if completion else ""
    return completion


def task_reward(completions, task, answer, **kwargs) -> list[float]:
    """Reward function for GRPOTrainer and friends: each row is scored by its own task."""
    return [get_task(t).reward(completion_text(c), a) for c, t, a in zip(completions, task, answer)]


def task_success(completions, task, answer, **kwargs) -> list[float]:
    """1.0 for an exactly correct answer (logged as a second reward with weight 0 in the examples)."""
    return [float(completion_text(c).strip() == a) for c, a in zip(completions, answer)]
