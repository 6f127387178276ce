"""PGPO: self-distillation policy optimization (SDPO) with an information-modulated step size."""

from .config import PGPOConfig
from .trainer import PGPOTrainer

__all__ = ["PGPOConfig", "PGPOTrainer"]
