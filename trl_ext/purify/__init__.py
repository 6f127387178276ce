"""Multi-teacher distillation with knowledge purification (arXiv 2602.01064), online and offline.

* `PurifiedDistillTrainer` / `PurifiedDistillConfig`: on-policy distillation from K teachers, purified per prompt.
* `purify_rationales`: the paper's offline setting, one rationale per question for `SFTTrainer`.
"""

from .config import PurifiedDistillConfig
from .dataset import generation_aggregator, purify_rationales
from .methods import PURIFICATIONS, RouterSettings, build_purifier
from .signal import (
    best_teachers,
    choice_accuracy,
    decisive_prompts,
    ranking_agreement,
    teacher_conflict,
    teacher_consensus,
)
from .target import purified_logps
from .trainer import PurifiedDistillTrainer

__all__ = [
    "PURIFICATIONS",
    "PurifiedDistillConfig",
    "PurifiedDistillTrainer",
    "RouterSettings",
    "best_teachers",
    "build_purifier",
    "choice_accuracy",
    "decisive_prompts",
    "generation_aggregator",
    "purified_logps",
    "purify_rationales",
    "ranking_agreement",
    "teacher_conflict",
    "teacher_consensus",
]
