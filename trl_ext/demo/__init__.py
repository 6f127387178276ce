"""The embedded offline world: a tokenizer, tiny models, synthetic tasks and cached tiny pretrained models.

Everything is built in code, so examples, tests and benchmarks run with no Hub and no GPU:

    from trl_ext import demo
    teacher = demo.teacher_path("arithmetic")         # SFT-trained once, then cached (~15 s on 2 CPU cores)
    student = demo.student_path("arithmetic")         # a weak student: same architecture, brief SFT
    train = demo.get_task("arithmetic").dataset(4000, seed=1)
    reward_funcs = [demo.task_reward]
"""

from .models import TinyArchitecture, build_model
from .pretrained import DEMO_VERSION, Pretraining, cache_root, pretrained_model, untrained
from .tasks import (
    TASKS,
    Arithmetic,
    Reversal,
    Task,
    completion_text,
    get_task,
    register_task,
    task_reward,
    task_success,
)
from .tokenizer import build_tokenizer

# The default recipes of the demo world: a teacher that solves its task, and a weak student that has seen it
# briefly (an untrained student samples almost uniformly over the vocabulary and learns slowly on a CPU budget).
TEACHER_STEPS = 800
STUDENT_STEPS = 120


def teacher_recipe(task: str = "arithmetic", seed: int = 0) -> Pretraining:
    return Pretraining(tasks=(task,), steps=TEACHER_STEPS, seed=seed)


def student_recipe(task: str = "arithmetic", seed: int = 1) -> Pretraining:
    return Pretraining(tasks=(task,), steps=STUDENT_STEPS, seed=seed)


def teacher_path(task: str = "arithmetic", seed: int = 0, cache_dir=None) -> str:
    return pretrained_model(teacher_recipe(task, seed), cache_dir)


def student_path(task: str = "arithmetic", seed: int = 1, cache_dir=None) -> str:
    return pretrained_model(student_recipe(task, seed), cache_dir)


__all__ = [
    "DEMO_VERSION",
    "TASKS",
    "Arithmetic",
    "Pretraining",
    "Reversal",
    "Task",
    "TinyArchitecture",
    "build_model",
    "build_tokenizer",
    "cache_root",
    "completion_text",
    "get_task",
    "pretrained_model",
    "register_task",
    "student_path",
    "student_recipe",
    "task_reward",
    "task_success",
    "teacher_path",
    "teacher_recipe",
    "untrained",
]
