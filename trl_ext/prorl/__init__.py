from ..core.reference_reset import ReferenceResetCallback
from ..core.reset_triggers import ResetSchedule
from .config import ProRLConfig
from .dynamic_sampling import informative_groups, select_groups
from .eos_penalty import EOSPenalty
from .trainer import DynamicSamplingResult, ProRLTrainer

__all__ = [
    "DynamicSamplingResult",
    "EOSPenalty",
    "ProRLConfig",
    "ProRLTrainer",
    "ReferenceResetCallback",
    "ResetSchedule",
    "informative_groups",
    "select_groups",
]
