"""A multi-teacher demo world: teachers with different strengths, one confidently wrong on part of the inputs,
and an in-domain / out-of-domain split of the inputs.

    teacher 0  "arithmetic expert"   SFT on addition only (the demo's default arithmetic teacher)
    teacher 1  "reversal expert"     SFT on reversal only (the demo's default reversal teacher)
    teacher 2  "blind-spot generalist"  SFT on both tasks, but taught a + b + 1 whenever the first operand is >= 5:
                                        confidently wrong there, right everywhere else

    in-domain prompts       addition with first operand 0-6, reversal of words starting with 'a' or 'b'
    out-of-domain prompts   addition with first operand 7-9, reversal of words starting with 'c'

So on in-domain addition the generalist is right on 5 of 7 first operands and confidently wrong on the other 2 (the
"knowledge conflict" with the arithmetic expert), and on out-of-domain addition it is always wrong; the reversal
expert knows no addition and the arithmetic expert no reversal. The right teacher is: the arithmetic expert on
addition, the reversal expert or the generalist on reversal. The student has seen both tasks briefly.

The task variants are registered in the demo's task registry (by name, so recipes and `task_reward` find them)
when this module is imported.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from datasets import Dataset, concatenate_datasets

from .pretrained import Pretraining, pretrained_model
from .tasks import Arithmetic, Reversal, Task, register_task

BLIND_SPOT_THRESHOLD = 5


@dataclass(frozen=True)
class ArithmeticRange(Arithmetic):
    """Addition whose first operand lies in [low, high] (the second one in [0, max_operand])."""

    name: str = "arithmetic_in"
    low: int = 0
    high: int = 6

    def sample(self, rng: random.Random) -> tuple[str, str]:
        a, b = rng.randint(self.low, self.high), rng.randint(0, self.max_operand)
        return f"{a}+{b}=", str(a + b)


@dataclass(frozen=True)
class ReversalRange(Reversal):
    """Reversal of words whose first letter is one of `first_letters`."""

    name: str = "reversal_in"
    first_letters: str = "ab"

    def sample(self, rng: random.Random) -> tuple[str, str]:
        word = rng.choice(self.first_letters) + "".join(rng.choice(self.alphabet) for _ in range(self.length - 1))
        return f"rev {word}", word[::-1]


@dataclass(frozen=True)
class BlindSpotArithmetic(Arithmetic):
    """Addition TAUGHT WRONG on part of the inputs: a + b + shift when a >= threshold. Only used to train a teacher."""

    name: str = "arithmetic_blindspot"
    threshold: int = BLIND_SPOT_THRESHOLD
    shift: int = 1

    def sample(self, rng: random.Random) -> tuple[str, str]:
        a, b = rng.randint(0, self.max_operand), rng.randint(0, self.max_operand)
        return f"{a}+{b}=", str(a + b + (self.shift if a >= self.threshold else 0))


IN_DOMAIN: tuple[Task, ...] = (
    ArithmeticRange("arithmetic_in", low=0, high=6),
    ReversalRange("reversal_in", first_letters="ab"),
)
OUT_OF_DOMAIN: tuple[Task, ...] = (
    ArithmeticRange("arithmetic_out", low=7, high=9),
    ReversalRange("reversal_out", first_letters="c"),
)
BLIND_SPOT = BlindSpotArithmetic()


for _task in (*IN_DOMAIN, *OUT_OF_DOMAIN, BLIND_SPOT):
    register_task(_task)

TEACHER_ROLES = ("arithmetic expert", "reversal expert", "blind-spot generalist")


def teacher_recipes() -> tuple[Pretraining, ...]:
    # The first two are the demo's default teachers (same recipes, same cache entries).
    return (
        Pretraining(tasks=("arithmetic",), steps=800, seed=0),
        Pretraining(tasks=("reversal",), steps=800, seed=0),
        Pretraining(tasks=(BLIND_SPOT.name, "reversal"), steps=1600, seed=2),
    )


def student_recipe() -> Pretraining:
    """A weak student that has seen both tasks briefly."""
    return Pretraining(tasks=("arithmetic", "reversal"), steps=150, seed=1)


def teacher_paths(cache_dir=None) -> list[str]:
    """The three teachers, in the order of TEACHER_ROLES (built once, then cached)."""
    return [pretrained_model(recipe, cache_dir) for recipe in teacher_recipes()]


def student_path(cache_dir=None) -> str:
    return pretrained_model(student_recipe(), cache_dir)


def mixed_dataset(tasks: tuple[Task, ...], num_rows: int, seed: int = 0) -> Dataset:
    """`num_rows` prompts split evenly between `tasks`, shuffled deterministically."""
    per_task = [num_rows // len(tasks) + (i < num_rows % len(tasks)) for i in range(len(tasks))]
    parts = [task.dataset(n, seed=seed) for task, n in zip(tasks, per_task)]
    return concatenate_datasets(parts).shuffle(seed=seed)


def in_domain_dataset(num_rows: int, seed: int = 0) -> Dataset:
    return mixed_dataset(IN_DOMAIN, num_rows, seed)


def out_of_domain_dataset(num_rows: int, seed: int = 0) -> Dataset:
    return mixed_dataset(OUT_OF_DOMAIN, num_rows, seed)


def right_teachers(task_name: str, question: str) -> set[int]:
    """Which teachers answer a question of this world correctly (by construction; for tests and benchmarks)."""
    if task_name.startswith("arithmetic"):
        first = int(question.split("+")[0])
        return {0} if first >= BLIND_SPOT_THRESHOLD else {0, 2}
    return {1, 2}
