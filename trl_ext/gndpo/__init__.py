from .advantages import distillation_scores, gndpo_advantages, normalize_scores
from .config import GNDPOConfig
from .trainer import GNDPOTrainer

__all__ = ["GNDPOConfig", "GNDPOTrainer", "distillation_scores", "gndpo_advantages", "normalize_scores"]
