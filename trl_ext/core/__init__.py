"""Shared machinery of every trl_ext trainer: the hooked base trainer, global statistics, teachers, model cards."""

from .stats import MaskedMoments, accelerator_reduce_sum, local_reduce, masked_mean, masked_moments
from .teachers import load_teacher, prepare_teacher
from .trainer import ExtGRPOTrainer, distillation_reward_funcs, environments_give_reward, zero_reward
from .vocabulary import check_teacher_vocabulary, vocab_size_of

__all__ = [
    "ExtGRPOTrainer",
    "MaskedMoments",
    "accelerator_reduce_sum",
    "check_teacher_vocabulary",
    "distillation_reward_funcs",
    "environments_give_reward",
    "load_teacher",
    "local_reduce",
    "masked_mean",
    "masked_moments",
    "prepare_teacher",
    "vocab_size_of",
    "zero_reward",
]
