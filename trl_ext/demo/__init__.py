"""The embedded offline world: a tokenizer, tiny models, synthetic tasks and cached tiny pretrained models.

Everything is built in code, so examples, tests and benchmarks run with no Hub and no GPU:

    from trl_ext import demo
    teacher = demo.teacher_path("arithmetic")         # SFT-trained once, then cached (~15 s on 2 CPU cores)
    student = demo.student_path("arithmetic")         # a weak student: same architecture, brief SFT
    train = demo.get_task("arithmetic").dataset(4000, seed=1)
    reward_funcs = [demo.task_reward]

For self-distillation, where the policy is its own teacher once shown privileged context:

    self_teacher = demo.self_teacher_path("arithmetic")  # weak alone, reads a solution or feedback in its prompt
    train = demo.with_feedback(train, misleading_fraction=0.3, seed=1)  # + `feedback`, `feedback_is_correct`
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
    with_feedback,
)
from .tokenizer import build_tokenizer

# The default recipes of the demo world: a teacher that solves its task, and a weak student that has seen it
# briefly (an untrained student samples almost uniformly over the vocabulary and learns slowly on a CPU budget).
TEACHER_STEPS = 800
STUDENT_STEPS = 120
# The self-teacher sees mostly prompts that show the answer (as the official SDPO templates do), so it learns to
# read the context before it learns the task: alone it stays weak (~0.2 sampled success on arithmetic), with the
# correct answer in its prompt it is right > 0.95 of the time, and it copies a wrong answer shown as feedback. The
# teacher prompt needs more than the default 128 positions (~140 tokens with the feedback template).
SELF_TEACHER_STEPS = 400
SELF_TEACHER_LEARNING_RATE = 6e-3
SELF_TEACHER_PRIVILEGED_FRACTION = 0.9
SELF_TEACHER_ARCHITECTURE = TinyArchitecture(max_position_embeddings=256)


def teacher_recipe(task: str = "arithmetic", seed: int = 0) -> Pretraining:
    return Pretraining(tasks=(task,), steps=TEACHER_STEPS, seed=seed)


def student_recipe(task: str = "arithmetic", seed: int = 1) -> Pretraining:
    return Pretraining(tasks=(task,), steps=STUDENT_STEPS, seed=seed)


def self_teacher_recipe(task: str = "arithmetic", seed: int = 1) -> Pretraining:
    """A policy that is weak on `task` but reads a worked solution or feedback in a self-teacher prompt."""
    return Pretraining(
        tasks=(task,),
        steps=SELF_TEACHER_STEPS,
        learning_rate=SELF_TEACHER_LEARNING_RATE,
        seed=seed,
        privileged_fraction=SELF_TEACHER_PRIVILEGED_FRACTION,
        architecture=SELF_TEACHER_ARCHITECTURE,
    )


def teacher_path(task: str = "arithmetic", seed: int = 0, cache_dir=None) -> str:
    return pretrained_model(teacher_recipe(task, seed), cache_dir)


def student_path(task: str = "arithmetic", seed: int = 1, cache_dir=None) -> str:
    return pretrained_model(student_recipe(task, seed), cache_dir)


def self_teacher_path(task: str = "arithmetic", seed: int = 1, cache_dir=None) -> str:
    return pretrained_model(self_teacher_recipe(task, seed), cache_dir)


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
    "self_teacher_path",
    "self_teacher_recipe",
    "student_path",
    "student_recipe",
    "task_reward",
    "task_success",
    "teacher_path",
    "teacher_recipe",
    "untrained",
    "with_feedback",
]
