"""Synthetic tasks with verifiable rewards, as `datasets.Dataset`s with a conversational `prompt` column.

Every row also carries `task` (the task's name) and `answer` (the exact target completion), so one reward
function, `task_reward`, scores rows of any task, including mixtures. Every split is seeded, so train and
evaluation prompts are reproducible.

For self-distillation (a policy that teaches itself from privileged context), tasks also know a worked solution to
show in a prompt (`solution`), the environment's feedback on a failed attempt (`feedback`, like a failing unit
test's message: "expected 12"), and a plausible wrong answer (`wrong_answer`). `with_feedback` adds a `feedback`
column to a dataset, optionally misleading on a seeded fraction of rows (`feedback_is_correct` says which).
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

    def feedback(self, question: str, answer: str) -> str:
        """The environment's message on a failed attempt that names `answer` as the expected one. Short on
        purpose: the demo models have a small context."""
        return f"expected {answer}"

    def wrong_answer(self, answer: str, rng: random.Random) -> str:
        """An answer that differs from `answer` (a corrupted label, misleading feedback)."""
        raise NotImplementedError(f"Task {self.name!r} has no wrong answers; implement `wrong_answer`.")

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

    def wrong_answer(self, answer: str, rng: random.Random) -> str:
        # Shifted modulo the number of possible sums, so a wrong answer looks like a right one (never equal: the
        # shift is never a multiple of the modulus, and an answer above the range, e.g. a corrupted teacher's
        # label, maps below it).
        num_sums = 2 * self.max_operand + 1
        return str((int(answer) + rng.randint(1, num_sums - 1)) % num_sums)


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

    def wrong_answer(self, answer: str, rng: random.Random) -> str:
        # The question's word copied unreversed is the natural mistake; a palindrome has to change a symbol.
        if answer != answer[::-1]:
            return answer[::-1]
        replaced = self.alphabet[(self.alphabet.index(answer[0]) + 1) % len(self.alphabet)]
        return replaced + answer[1:]


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


def with_feedback(dataset: Dataset, misleading_fraction: float = 0.0, seed: int = 0, block_size: int = 1) -> Dataset:
    """`dataset` (rows with `prompt`, `task`, `answer`) plus the environment's `feedback` on each prompt.

    Feedback is misleading (it names a wrong answer; `feedback_is_correct` is False) on a seeded `misleading_fraction`
    of blocks of `block_size` consecutive rows. With `block_size=1` every row draws independently, and as TRL shuffles
    the dataset every optimizer batch sees about that fraction, varying binomially. A block as large as one batch's
    prompts, read in order (`shuffle_dataset=False`), makes the feedback source reliable on some batches and
    misleading on others, as in PGPO's motivation.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    rng = random.Random(f"feedback-{seed}")
    feedback, is_correct = [], []
    misleading = False
    for i, (prompt, name, answer) in enumerate(zip(dataset["prompt"], dataset["task"], dataset["answer"])):
        if i % block_size == 0:
            misleading = rng.random() < misleading_fraction
        task = get_task(name)
        named = task.wrong_answer(answer, rng) if misleading else answer
        feedback.append(task.feedback(question_text(prompt), named))
        is_correct.append(not misleading)
    return dataset.add_column("feedback", feedback).add_column("feedback_is_correct", is_correct)


def completion_text(completion) -> str:
    """The text of a completion, conversational (list of messages) or plain."""
    if isinstance(completion, list):
        return completion[-1]["content"] if completion else ""
    return completion


def question_text(prompt) -> str:
    """The question of a prompt: its last (user) message's text, or the plain-text prompt."""
    return completion_text(prompt)  # a prompt has a completion's shape: a list of messages or plain text


def task_reward(completions, task, answer, **kwargs) -> list[float]:
    """Reward function for GRPOTrainer and friends: each row is scored by its own task."""
    return [get_task(t).reward(completion_text(c), a) for c, t, a in zip(completions, task, answer)]


def task_success(completions, task, answer, **kwargs) -> list[float]:
    """1.0 for an exactly correct answer (logged as a second reward with weight 0 in the examples)."""
    return [float(completion_text(c).strip() == a) for c, a in zip(completions, answer)]
