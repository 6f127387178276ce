from .config import DelightConfig
from .delight import delight_weights, masked, sequence_delight, surprisal, token_delight
from .gate import GATE_RULES, KondoGate, gate_decisions, quantile_price
from .gated import KondoGateArguments, KondoGateMixin
from ..core.rows import concat_rows, take_rows
from .packing import pack_survivors
from .trainer import DelightTrainer

__all__ = [
    "GATE_RULES",
    "DelightConfig",
    "DelightTrainer",
    "KondoGate",
    "KondoGateArguments",
    "KondoGateMixin",
    "concat_rows",
    "delight_weights",
    "gate_decisions",
    "masked",
    "pack_survivors",
    "quantile_price",
    "sequence_delight",
    "surprisal",
    "take_rows",
    "token_delight",
]
