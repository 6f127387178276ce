"""trl_ext: recent RL and distillation methods as drop-in `trl.GRPOTrainer` subclasses."""

from . import _compat  # noqa: F401  (fails early with a clear message on an unsupported TRL version)
from .delight import DelightConfig, DelightTrainer
from .gndpo import GNDPOConfig, GNDPOTrainer
from .pgpo import PGPOConfig, PGPOTrainer
from .prorl import ProRLConfig, ProRLTrainer
from .purify import PurifiedDistillConfig, PurifiedDistillTrainer

__version__ = "0.1.0"

__all__ = [
    "DelightConfig",
    "DelightTrainer",
    "GNDPOConfig",
    "GNDPOTrainer",
    "PGPOConfig",
    "PGPOTrainer",
    "ProRLConfig",
    "ProRLTrainer",
    "PurifiedDistillConfig",
    "PurifiedDistillTrainer",
    "__version__",
]
